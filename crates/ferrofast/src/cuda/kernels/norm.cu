// RMS norm and layer norm forward over the last axis, for f32 / f16 / bf16 (T is a prelude
// tag: ff_f32, ff_f16, ff_bf16).
//
// Layout: row r of x starts at x + x_offset + r * x_row_stride (elements; the last axis has
// stride 1); row r of the output starts at out + r * D. Weight and bias are optional (null
// pointer) and strided (w + w_offset + i * w_stride).
//
// Numerics follow MLX: accumulate in f32, normalise in f32, round once to T, then multiply by
// the weight and add the bias in T (each product / sum rounded to T, which f32 arithmetic
// followed by one rounding reproduces exactly for the 16-bit types).
//
// Variants (K is ff_rms or ff_layer):
//   norm_rows<K, T, N_CHUNKS, ALIGNED>: one block per row, each thread keeps N_CHUNKS chunks
//     of N_READS = 16 / sizeof(T) consecutive elements in registers: one pass over x.
//   norm_looped<K, T, ALIGNED>: rows too long for registers; the block loops over the row (a
//     second and third read mostly hit L2).
//   norm_group<K, T, G, CH, ALIGNED>: several rows per block (below).
// Every kernel is declared launchable with 1024 threads, so the compiler keeps registers
// within what a full block may use (spilling rather than failing the launch).
//
// ALIGNED: every row start, the weight and bias are 16-byte aligned, their strides are 1 and
// D % N_READS == 0, so all loads and stores are 16-byte vectors. Otherwise scalar accesses
// with bounds checks handle odd D and unaligned rows.
#include "ferrofast_prelude.cuh"

template <typename T>
struct ff_norm {
    typedef typename T::storage S;
    static const int N = 16 / sizeof(S);
};

// Loads elements [base, base + N) of a row as f32; elements at or past D read as 0.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_load(const typename T::storage* __restrict__ p,
                                        ff_i64_t stride,
                                        int base,
                                        int D,
                                        float (&v)[ff_norm<T>::N]) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    if constexpr (ALIGNED) {
        if (base < D) {
            ff_pack<S, N> pk;
            pk.vec = *reinterpret_cast<const ff_vec16*>(p + base);
            ff_unpack<T>(pk, v);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int i = base + k;
            v[k] = i < D ? T::to_f32(p[(ff_i64_t)i * stride]) : 0.0f;
        }
    }
}

// Stores elements [base, base + N) of an output row (contiguous), skipping those past D.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_store(typename T::storage* __restrict__ p,
                                         int base,
                                         int D,
                                         const typename T::storage (&o)[ff_norm<T>::N]) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    if constexpr (ALIGNED) {
        if (base < D) {
            ff_pack<S, N> pk;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                pk.elem[k] = o[k];
            }
            *reinterpret_cast<ff_vec16*>(p + base) = pk.vec;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (base + k < D) {
                p[base + k] = o[k];
            }
        }
    }
}

// Loads elements [base, base + N) of a weight / bias in its storage type; zeros past D.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_load_raw(const typename T::storage* __restrict__ p,
                                            ff_i64_t stride,
                                            int base,
                                            int D,
                                            ff_pack<typename T::storage, ff_norm<T>::N>& pk) {
    const int N = ff_norm<T>::N;
    if constexpr (ALIGNED) {
        if (base < D) {
            pk.vec = *reinterpret_cast<const ff_vec16*>(p + base);
        } else {
            pk.vec = ff_vec16{{0u, 0u, 0u, 0u}};
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            pk.elem[k] = base + k < D ? p[(ff_i64_t)(base + k) * stride] : T::from_f32(0.0f);
        }
    }
}

// Packed 16-bit steps of the output (sm_80+): two f32 values rounded to bf16 / f16 into one
// register, and a * b + c on pairs with one rounding. A product or a sum of two 16-bit values
// rounded once equals the f32 result rounded to T (the product is exact in f32; where the
// f32 sum rounds, the 16-bit operand that lost bits is too small to move the rounding to T),
// so these reproduce MLX's per-step rounding exactly, two elements per instruction.
template <typename T>
struct ff_pair_ops {
    static const bool available = false;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// The specialisation for T, whose packed PTX type is PTX and whose pair of ones is ONE.
#define FF_PAIR_OPS(T, PTX, ONE)                                                           \
    template <>                                                                            \
    struct ff_pair_ops<T> {                                                                \
        static const bool available = true;                                                \
        static const ff_u32_t one = ONE;                                                   \
        static const ff_u32_t neg_zero = 0x80008000u;                                      \
        __device__ static ff_u32_t round2(float lo, float hi) {                            \
            ff_u32_t r;                                                                    \
            asm("cvt.rn." PTX "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));          \
            return r;                                                                      \
        }                                                                                  \
        __device__ static ff_u32_t fma2(ff_u32_t a, ff_u32_t b, ff_u32_t c) {              \
            ff_u32_t r;                                                                    \
            asm("fma.rn." PTX "x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));    \
            return r;                                                                      \
        }                                                                                  \
    };
FF_PAIR_OPS(ff_bf16, "bf16", 0x3f803f80u)
FF_PAIR_OPS(ff_f16, "f16", 0x3c003c00u)
#undef FF_PAIR_OPS
#endif

// The output elements of one chunk: the normalised values n rounded to T, times the weight
// (if has_w), plus the bias (if has_b), each step rounded to T as MLX does.
template <typename T>
__device__ __forceinline__ void ff_affine(const float (&n)[ff_norm<T>::N],
                                          const ff_pack<typename T::storage, ff_norm<T>::N>& wv,
                                          const ff_pack<typename T::storage, ff_norm<T>::N>& bv,
                                          bool has_w,
                                          bool has_b,
                                          ff_pack<typename T::storage, ff_norm<T>::N>& o) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    if constexpr (ff_pair_ops<T>::available) {
        typedef ff_pair_ops<T> P;
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            ff_u32_t y = P::round2(n[2 * i], n[2 * i + 1]);
            if (has_w) {
                y = P::fma2(y, wv.vec.w[i], P::neg_zero);
            }
            if (has_b) {
                y = P::fma2(y, P::one, bv.vec.w[i]);
            }
            o.vec.w[i] = y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            S y = T::from_f32(n[k]);
            if (has_w) {
                y = T::from_f32(T::to_f32(y) * T::to_f32(wv.elem[k]));
            }
            if (has_b) {
                y = T::from_f32(T::to_f32(y) + T::to_f32(bv.elem[k]));
            }
            o.elem[k] = y;
        }
    }
}

// The output elements for one chunk: round the normalised values to T, then apply the
// weight and bias in T.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_finish_chunk(const float (&normalized)[ff_norm<T>::N],
                                                const typename T::storage* __restrict__ w,
                                                ff_i64_t w_stride,
                                                const typename T::storage* __restrict__ b,
                                                ff_i64_t b_stride,
                                                int base,
                                                int D,
                                                typename T::storage (&o)[ff_norm<T>::N]) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    ff_pack<S, N> wv;
    ff_pack<S, N> bv;
    if (w != nullptr) {
        ff_load_raw<T, ALIGNED>(w, w_stride, base, D, wv);
    }
    if (b != nullptr) {
        ff_load_raw<T, ALIGNED>(b, b_stride, base, D, bv);
    }
    ff_pack<S, N> y;
    ff_affine<T>(normalized, wv, bv, w != nullptr, b != nullptr, y);
#pragma unroll
    for (int k = 0; k < N; ++k) {
        o[k] = y.elem[k];
    }
}

// The two normalisations, as the template argument K of every kernel: RMS norm scales by
// rsqrt(mean(x^2) + eps); layer norm centres on the mean and scales by rsqrt(var + eps).
// Every kernel takes the bias arguments; RMS norm's launcher passes a null bias, which the
// RMS instantiations never read.
struct ff_rms {
    static const bool layer = false;
};
struct ff_layer {
    static const bool layer = true;
};

// ----- statistics ---------------------------------------------------------------------------
//
// RMS norm sums x * x over the row (one block or group reduction).
//
// Layer norm://
// One reduction for both moments: every kernel sums d = x - shift and d * d over the row, with
// shift = x[row, 0] (a sample of the row, so |mean - shift| is typically of the order of the
// standard deviation). Then m1 = E[d] = mean - shift and var = E[d^2] - m1^2. The
// rounding error of that difference is about eps * (var + m1^2), so it is trusted while
// m1^2 <= 16 var (error within 17 ulps of var, below what the output dtypes resolve).
// Otherwise (the first element is an outlier of its row) the kernel makes a second pass
// about the estimated mean over the values it holds (the two-pass variance MLX computes),
// which also corrects the mean. Both sums share one block reduction, which halves the synchronisation of
// the two-pass form; the fallback is block-uniform (every thread sees the same totals).

// Moments from the shifted sums a1 = sum(x - shift), a2 = sum((x - shift)^2) of a row of D
// elements: m1 = mean - shift and the variance; false when the variance must be recomputed
// about the mean. Callers centre a value as (x - shift) - m1, which keeps the precision of
// the spread when the mean is large.
__device__ __forceinline__ bool ff_shifted_moments(float a1,
                                                   float a2,
                                                   int D,
                                                   float& m1,
                                                   float& var) {
    m1 = a1 / (float)D;
    var = fmaxf(a2 / (float)D - m1 * m1, 0.0f);
    return m1 * m1 <= 16.0f * var;
}

// The fallback's second pass, re-centred on the estimated mean (shift += m1, m1 = 0): from
// the sums of r = x - shift and r^2 over the row, the residual mean m1 (the estimate's
// rounding) and the variance about the exact mean; r's mean is small against the spread, so
// this difference does not cancel.
__device__ __forceinline__ void ff_refine_moments(float r1,
                                                  float r2,
                                                  int D,
                                                  float& m1,
                                                  float& var) {
    const float c = r1 / (float)D;
    m1 = c;
    var = fmaxf(r2 / (float)D - c * c, 0.0f);
}

// Sums of the M values v over the block, returned to every thread; `scratch` holds 32 * M
// floats of shared memory. Synchronises twice, like ff_block_sum.
template <int M>
__device__ __forceinline__ void ff_block_sums(float (&v)[M], float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            v[m] += __shfl_xor_sync(0xffffffffu, v[m], offset);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            scratch[32 * m + warp] = v[m];
        }
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) {
        v[m] = lane < n_warps ? scratch[32 * m + lane] : 0.0f;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            v[m] += __shfl_xor_sync(0xffffffffu, v[m], offset);
        }
    }
    __syncthreads();
}

// Sums of a and b over the block (ff_block_sums of two values; `scratch` holds 64 floats).
__device__ __forceinline__ void ff_block_sum2(float& a, float& b, float* scratch) {
    float v[2] = {a, b};
    ff_block_sums<2>(v, scratch);
    a = v[0];
    b = v[1];
}

// ----- parameters ---------------------------------------------------------------------------

// The forward kernels take their scalars as separate arguments: x at x_offset + r *
// x_row_stride (row r, its D elements contiguous), weight / bias element i at offset + i *
// stride (in elements). The backward kernels take them as one block, `ff_norm_params` (the
// C layout of `NormParams` in `cuda/norm.rs`). (The forward kept separate arguments: on
// H200, rows of 4096 16-bit values ran up to 10% slower with the block.)
struct ff_norm_params {
    ff_i64_t x_offset, x_row_stride;
    ff_i64_t w_offset, w_stride;
    ff_i64_t b_offset, b_stride;
    ff_i64_t n_rows;
    int D;
    float eps;
};

// The parameters under the names the kernel bodies use.
#define FF_NORM_PARAMS(p)                                                              \
    const ff_i64_t x_offset = (p).x_offset, x_row_stride = (p).x_row_stride;           \
    const ff_i64_t w_offset = (p).w_offset, w_stride = (p).w_stride;                   \
    const ff_i64_t b_offset = (p).b_offset, b_stride = (p).b_stride;                   \
    const ff_i64_t n_rows = (p).n_rows;                                                \
    const int D = (p).D;                                                               \
    const float eps = (p).eps

// The forward kernels' parameters (the layout in the header comment).
#define FF_NORM_FWD_PARAMS(T)                                                             \
    const typename T::storage* __restrict__ x, ff_i64_t x_offset, ff_i64_t x_row_stride,  \
        const typename T::storage* __restrict__ w, ff_i64_t w_offset, ff_i64_t w_stride,  \
        const typename T::storage* __restrict__ b, ff_i64_t b_offset, ff_i64_t b_stride,  \
        typename T::storage* __restrict__ out, ff_i64_t n_rows, int D, float eps

// Adds a value v of a row to the first pass's sums: for layer norm a1 += d and a2 += d * d
// with d = v - shift, or d = 0 for an element outside the row (`in` false); for RMS norm
// a2 += v * v (elements past D are loaded as zeros).
template <typename K>
__device__ __forceinline__ void ff_moments_add(bool in,
                                               float v,
                                               float shift,
                                               float& a1,
                                               float& a2) {
    if constexpr (K::layer) {
        const float d = in ? v - shift : 0.0f;
        a1 += d;
        a2 += d * d;
    } else {
        a2 += v * v;
    }
}

// Adds a value v of a row to the layer norm fallback's sums about the estimated mean:
// r1 += d and r2 += d * d with d = (v - shift) - m1, or d = 0 for an element outside the row.
__device__ __forceinline__ void ff_residual_add(bool in,
                                                float v,
                                                float shift,
                                                float m1,
                                                float& r1,
                                                float& r2) {
    const float d = in ? (v - shift) - m1 : 0.0f;
    r1 += d;
    r2 += d * d;
}

// A value v of a row, normalised: ((v - shift) - m1) * inv for layer norm, v * inv for RMS
// norm.
template <typename K>
__device__ __forceinline__ float ff_normalize(float v, float shift, float m1, float inv) {
    return K::layer ? ((v - shift) - m1) * inv : v * inv;
}

// The statistics of a row one block shares, from the first pass's per-thread sums a1 and a2
// (ff_moments_add; both become block totals). Returns the scale inv: 1 / sqrt(var + eps) for
// layer norm, 1 / sqrt(mean(x^2) + eps) for RMS norm. Layer norm sets m1 = mean - shift from
// the shifted moments, or, when those are not trusted, re-centres shift on the estimated mean
// and takes m1 and the variance from the second pass `residuals(shift, m1, r1, r2)`, which
// adds the thread's values to r1 and r2 with ff_residual_add. `scratch`: 64 floats of shared
// memory (32 for RMS norm).
template <typename K, typename F>
__device__ __forceinline__ float ff_block_stats(float& a1,
                                                float& a2,
                                                int D,
                                                float eps,
                                                float* scratch,
                                                float& shift,
                                                float& m1,
                                                F residuals) {
    m1 = 0.0f;
    if constexpr (K::layer) {
        ff_block_sum2(a1, a2, scratch);
        float var;
        if (!ff_shifted_moments(a1, a2, D, m1, var)) {
            // Second pass over the values about the estimated mean, skipping the padding past
            // D; its residual sum corrects the mean too.
            shift += m1;
            m1 = 0.0f;
            float r1 = 0.0f;
            float r2 = 0.0f;
            residuals(shift, m1, r1, r2);
            ff_block_sum2(r1, r2, scratch);
            ff_refine_moments(r1, r2, D, m1, var);
        }
        return 1.0f / sqrtf(var + eps);
    } else {
        a2 = ff_block_sum(a2, scratch);
        return 1.0f / sqrtf(a2 / (float)D + eps);
    }
}

// ----- one block per row ---------------------------------------------------------------------

template <typename K, typename T, int N_CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(1024) norm_rows(FF_NORM_FWD_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[K::layer ? 64 : 32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    // RMS norm has no bias: a null known at compile time, so the bias code is compiled out.
    const S* bp = (K::layer && b != nullptr) ? b + b_offset : nullptr;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float shift = K::layer ? T::to_f32(xr[0]) : 0.0f;
        float v[N_CHUNKS][N];
        float a1 = 0.0f;
        float a2 = 0.0f;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            ff_load<T, ALIGNED>(xr, 1, base, D, v[c]);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                ff_moments_add<K>(ALIGNED ? base < D : base + k < D, v[c][k], shift, a1, a2);
            }
        }
        float m1;
        const float inv =
            ff_block_stats<K>(a1, a2, D, eps, scratch, shift, m1, [&](float shift, float m1, float& r1, float& r2) {
#pragma unroll
                for (int c = 0; c < N_CHUNKS; ++c) {
                    const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        ff_residual_add(base + k < D, v[c][k], shift, m1, r1, r2);
                    }
                }
            });
        S* orow = out + row * (ff_i64_t)D;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            if (base < D) {
                float n[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    n[k] = ff_normalize<K>(v[c][k], shift, m1, inv);
                }
                S o[N];
                ff_finish_chunk<T, ALIGNED>(n, wp, w_stride, bp, b_stride, base, D, o);
                ff_store<T, ALIGNED>(orow, base, D, o);
            }
        }
    }
}

template <typename K, typename T, bool ALIGNED>
__global__ void __launch_bounds__(1024) norm_looped(FF_NORM_FWD_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[K::layer ? 64 : 32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    // RMS norm has no bias: a null known at compile time, so the bias code is compiled out.
    const S* bp = (K::layer && b != nullptr) ? b + b_offset : nullptr;
    const int step = (int)blockDim.x * N;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float shift = K::layer ? T::to_f32(xr[0]) : 0.0f;
        float a1 = 0.0f;
        float a2 = 0.0f;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                ff_moments_add<K>(base + k < D, v[k], shift, a1, a2);
            }
        }
        float m1;
        const float inv =
            ff_block_stats<K>(a1, a2, D, eps, scratch, shift, m1, [&](float shift, float m1, float& r1, float& r2) {
                for (int base = (int)threadIdx.x * N; base < D; base += step) {
                    float v[N];
                    ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        ff_residual_add(base + k < D, v[k], shift, m1, r1, r2);
                    }
                }
            });
        S* orow = out + row * (ff_i64_t)D;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = ff_normalize<K>(v[k], shift, m1, inv);
            }
            S o[N];
            ff_finish_chunk<T, ALIGNED>(v, wp, w_stride, bp, b_stride, base, D, o);
            ff_store<T, ALIGNED>(orow, base, D, o);
        }
    }
}

// ----- several rows per block ---------------------------------------------------------------
//
// norm_group<K, T, G, CH, ALIGNED>: G consecutive lanes of a warp (G in {4, 8, 16, 32}) own one row
// and reduce with shuffles only; a block of FF_GROUP_BLOCK threads handles
// FF_GROUP_BLOCK / G rows. Each lane keeps CH chunks of N_READS elements in registers in
// their storage type (16 bytes a chunk, whatever T), so a row of up to G * CH * N_READS
// elements is read once and written once with every load of a lane in flight together.
// Short rows (D = 128) no longer leave most of a block idle, and there is no __syncthreads.

#define FF_GROUP_BLOCK 256

// A 16-byte load through the read-only path (x, weight and bias are never written by the
// kernel).
__device__ __forceinline__ ff_vec16 ff_ld_nc16(const void* p) {
    ff_vec16 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
                 : "l"(p));
    return v;
}

// Sum over the G lanes of a group. Every lane of the warp calls this (rows past the end
// take part with zeros), so the full mask is always valid.
template <int G>
__device__ __forceinline__ float ff_group_sum(float v) {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Loads chunk c of a lane: elements [base, base + N) of the row, zeros past D or for a row
// past the end (valid == false).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_group_load(const typename T::storage* __restrict__ xr,
                                              int base,
                                              int D,
                                              bool valid,
                                              ff_pack<typename T::storage, ff_norm<T>::N>& pk) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    if constexpr (ALIGNED) {
        if (valid && base < D) {
            pk.vec = ff_ld_nc16(xr + base);
        } else {
            pk.vec.w[0] = 0u;
            pk.vec.w[1] = 0u;
            pk.vec.w[2] = 0u;
            pk.vec.w[3] = 0u;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            pk.elem[k] = (valid && base + k < D) ? xr[base + k] : T::from_f32(0.0f);
        }
    }
}

// Writes chunk c of a lane: the normalised values n, rounded to T, times the weight and plus
// the bias (each rounded to T, as MLX), stored with one 16-byte store when ALIGNED.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_group_store(typename T::storage* __restrict__ orow,
                                               const typename T::storage* __restrict__ w,
                                               ff_i64_t w_stride,
                                               const typename T::storage* __restrict__ b,
                                               ff_i64_t b_stride,
                                               int base,
                                               int D,
                                               const float (&n)[ff_norm<T>::N]) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    ff_pack<S, N> wp;
    ff_pack<S, N> bp;
    if constexpr (ALIGNED) {
        if (w != nullptr) {
            wp.vec = ff_ld_nc16(w + base);
        }
        if (b != nullptr) {
            bp.vec = ff_ld_nc16(b + base);
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const bool in = base + k < D;
            wp.elem[k] = (w != nullptr && in) ? w[(ff_i64_t)(base + k) * w_stride]
                                              : T::from_f32(0.0f);
            bp.elem[k] = (b != nullptr && in) ? b[(ff_i64_t)(base + k) * b_stride]
                                              : T::from_f32(0.0f);
        }
    }
    ff_pack<S, N> o;
    ff_affine<T>(n, wp, bp, w != nullptr, b != nullptr, o);
    if constexpr (ALIGNED) {
        *reinterpret_cast<ff_vec16*>(orow + base) = o.vec;
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (base + k < D) {
                orow[base + k] = o.elem[k];
            }
        }
    }
}

template <typename K, typename T, int G, int CH, bool ALIGNED>
__global__ void __launch_bounds__(FF_GROUP_BLOCK) norm_group(FF_NORM_FWD_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    const int lane = (int)threadIdx.x % G;
    const ff_i64_t row = (ff_i64_t)blockIdx.x * (FF_GROUP_BLOCK / G) + threadIdx.x / G;
    const bool valid = row < n_rows;
    const S* xr = x + x_offset + (valid ? row : 0) * x_row_stride;
    ff_pack<S, N> raw[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        ff_group_load<T, ALIGNED>(xr, (c * G + lane) * N, D, valid, raw[c]);
    }
    float shift = (K::layer && valid) ? T::to_f32(xr[0]) : 0.0f;
    float a1 = 0.0f;
    float a2 = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * G + lane) * N;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if constexpr (K::layer) {
                const bool in = ALIGNED ? base < D : base + k < D;
                const float d = in ? T::to_f32(raw[c].elem[k]) - shift : 0.0f;
                a1 += d;
                a2 += d * d;
            } else {
                // Loads past D are zeros.
                const float v = T::to_f32(raw[c].elem[k]);
                a2 += v * v;
            }
        }
    }
    float m1 = 0.0f;
    float inv;
    if constexpr (K::layer) {
#pragma unroll
        for (int offset = G / 2; offset > 0; offset >>= 1) {
            a1 += __shfl_xor_sync(0xffffffffu, a1, offset);
            a2 += __shfl_xor_sync(0xffffffffu, a2, offset);
        }
        float var;
        const bool trusted = ff_shifted_moments(a1, a2, D, m1, var);
        // The exact pass shuffles across the whole warp, so every lane takes it when any
        // row of the warp needs it.
        if (__any_sync(0xffffffffu, !trusted)) {
            shift += m1;
            m1 = 0.0f;
            float r1 = 0.0f;
            float r2 = 0.0f;
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const int base = (c * G + lane) * N;
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float d =
                        base + k < D ? (T::to_f32(raw[c].elem[k]) - shift) - m1 : 0.0f;
                    r1 += d;
                    r2 += d * d;
                }
            }
#pragma unroll
            for (int offset = G / 2; offset > 0; offset >>= 1) {
                r1 += __shfl_xor_sync(0xffffffffu, r1, offset);
                r2 += __shfl_xor_sync(0xffffffffu, r2, offset);
            }
            ff_refine_moments(r1, r2, D, m1, var);
        }
        inv = 1.0f / sqrtf(var + eps);
    } else {
        a2 = ff_group_sum<G>(a2);
        inv = 1.0f / sqrtf(a2 / (float)D + eps);
    }
    if (!valid) {
        return;
    }
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    // RMS norm has no bias: a null known at compile time, so the bias code is compiled out.
    const S* bp = (K::layer && b != nullptr) ? b + b_offset : nullptr;
    S* orow = out + row * (ff_i64_t)D;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * G + lane) * N;
        if (base < D) {
            float n[N];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                n[k] = ff_normalize<K>(T::to_f32(raw[c].elem[k]), shift, m1, inv);
            }
            ff_group_store<T, ALIGNED>(orow, wp, w_stride, bp, b_stride, base, D, n);
        }
    }
}

// ----- backward ------------------------------------------------------------------------------
//
// dx of every row, and per-block partial sums over the rows a block visits of
// dw = g * xhat and db = g (f32, [gridDim.x, D] each; null when not wanted), which
// norm_vjp_reduce adds in block order: no atomics, the same bits on every run. With
// n = rsqrt(var + eps), gw = g * w and xc = x - mean (x for RMS norm):
//   dx = (gw - mean(gw)) * n - xc * mean(gw * xc) * n^3      (mean(gw) is 0 for RMS norm)
// Everything in f32; layer norm's statistics as the forward computes them (moments about
// the row's first element, with the forward's fallback about the estimated mean). x and g rows: last axis contiguous, at
// x + x_offset + r * x_row_stride and g + g_offset + r * g_row_stride; the weight strided as
// in the forward (the bias is not read); dx row-major [n_rows, D].

// Scalar parameters of the backward kernels; the C layout matches `NormVjpParams` in
// `cuda/norm.rs`.
struct ff_norm_vjp_params {
    ff_norm_params f;
    ff_i64_t g_offset, g_row_stride;
};

// The backward kernels' parameters.
#define FF_NORM_VJP_PARAMS(T)                                                              \
    const typename T::storage* __restrict__ x, const typename T::storage* __restrict__ w,  \
        const typename T::storage* __restrict__ g, typename T::storage* __restrict__ dx,   \
        float* __restrict__ dw_part, float* __restrict__ db_part, const ff_norm_vjp_params params

// Threads per block of the backward kernels (`VJP_MAX_THREADS` in `cuda/norm.rs`): 128
// registers per thread, room for a row in flight while the previous one is reduced.
#define FF_NORM_VJP_THREADS 512

// The sums of ff_norm_vjp_stats over the block (`scratch`: 32 floats per value) ...
struct ff_block_summer {
    float* scratch;
    template <int M>
    __device__ __forceinline__ void operator()(float (&v)[M]) const {
        ff_block_sums(v, scratch);
    }
};

// ... and over the warp.
struct ff_warp_summer {
    template <int M>
    __device__ __forceinline__ void operator()(float (&v)[M]) const {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            v[m] = ff_group_sum<32>(v[m]);
        }
    }
};

// A row's statistics for the backward, from its values in registers (CH chunks of N per
// thread; chunk c starts at element base_of(c), values past D are 0). Layer norm takes the
// moments of x about `shift` (the row's first element) together with sum(g * w) and
// sum(g * w * (x - shift)) in one reduction, and falls back to a second one about the
// estimated mean when the shifted moments are not trusted (ff_shifted_moments, as the
// forward); xv leaves centred on the mean (0 past D), with mean(g * w). Then
// n = rsqrt(var + eps) and c3 = mean(g * w * xc) * n^3. sums(v) adds each value of a
// float[M] over the threads sharing the row.
template <typename K, int CH, int N, typename BASE, typename SUMS>
__device__ __forceinline__ void ff_norm_vjp_stats(float (&xv)[CH][N], const float (&gv)[CH][N],
                                                  const float (&wv)[CH][N], int D, float eps,
                                                  float shift, BASE base_of, SUMS sums,
                                                  float& mean_gw, float& n, float& c3) {
    const float inv_d = 1.0f / (float)D;
    mean_gw = 0.0f;
    float var;
    float q;
    if constexpr (K::layer) {
        // Per thread: sum(d), sum(d^2), sum(g * w * d) and sum(g * w) with d = x - about (0
        // past D); the products as fmaf, so g * w is not kept in registers between passes.
        auto row_sums = [&](float about, float(&s)[4]) {
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const int base = base_of(c);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float d = base + k < D ? xv[c][k] - about : 0.0f;
                    s[0] += d;
                    s[1] += d * d;
                    s[2] = fmaf(gv[c][k], wv[c][k] * d, s[2]);
                    s[3] = fmaf(gv[c][k], wv[c][k], s[3]);
                }
            }
        };
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        row_sums(shift, a);
        sums(a);
        float m1;
        q = a[2];
        if (!ff_shifted_moments(a[0], a[1], D, m1, var)) {
            // Not trusted: the same sums about the estimated mean (the rare path).
            shift += m1;
            float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            row_sums(shift, r);
            sums(r);
            ff_refine_moments(r[0], r[1], D, m1, var);
            q = r[2];
        }
        // sum(g * w * (x - mean)) from the sum about the shift: (x - mean) = d - m1.
        q -= m1 * a[3];
        mean_gw = a[3] * inv_d;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int base = base_of(c);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                xv[c][k] = base + k < D ? (xv[c][k] - shift) - m1 : 0.0f;
            }
        }
    } else {
        (void)shift;
        float a[2] = {0.0f, 0.0f};
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                a[0] += xv[c][k] * xv[c][k];
                a[1] += gv[c][k] * wv[c][k] * xv[c][k];
            }
        }
        sums(a);
        var = a[0] * inv_d;
        q = a[1];
    }
    n = 1.0f / sqrtf(var + eps);
    c3 = q * inv_d * n * n * n;
}

template <typename K, typename T, int N_CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(FF_NORM_VJP_THREADS) norm_vjp_rows(FF_NORM_VJP_PARAMS(T)) {
    FF_NORM_PARAMS(params.f);
    (void)b_offset;
    (void)b_stride;
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[K::layer ? 128 : 64];
    float wv[N_CHUNKS][N];
    float dwp[N_CHUNKS][N];
    float dbp[N_CHUNKS][N];
#pragma unroll
    for (int c = 0; c < N_CHUNKS; ++c) {
        const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
        if (w != nullptr) {
            ff_load<T, ALIGNED>(w + w_offset, w_stride, base, D, wv[c]);
        }
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (w == nullptr) {
                wv[c][k] = 1.0f;
            }
            dwp[c][k] = 0.0f;
            dbp[c][k] = 0.0f;
        }
    }
    // Each row's x and g are loaded (packed, unconverted) one iteration ahead, so the loads
    // of the next row are in flight while this one is reduced and written.
    ff_pack<S, N> xp[N_CHUNKS];
    ff_pack<S, N> gp[N_CHUNKS];
    S x0p = S();  // the row's first element: layer norm's shift
    auto load_row = [&](ff_i64_t r) {
        const S* xr = x + x_offset + r * x_row_stride;
        const S* gr = g + params.g_offset + r * params.g_row_stride;
        if constexpr (K::layer) {
            x0p = xr[0];
        }
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            ff_load_raw<T, ALIGNED>(xr, 1, base, D, xp[c]);
            ff_load_raw<T, ALIGNED>(gr, 1, base, D, gp[c]);
        }
    };
    if ((ff_i64_t)blockIdx.x < n_rows) {
        load_row(blockIdx.x);
    }
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        float xv[N_CHUNKS][N];
        float gv[N_CHUNKS][N];
        const float shift = K::layer ? T::to_f32(x0p) : 0.0f;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                xv[c][k] = T::to_f32(xp[c].elem[k]);
                gv[c][k] = T::to_f32(gp[c].elem[k]);
            }
        }
        if (row + gridDim.x < n_rows) {
            load_row(row + gridDim.x);
        }
        float mean_gw, n, c3;
        ff_norm_vjp_stats<K, N_CHUNKS, N>(
            xv, gv, wv, D, eps, shift,
            [&](int c) { return (c * (int)blockDim.x + (int)threadIdx.x) * N; },
            ff_block_summer{scratch}, mean_gw, n, c3);
        S* dxr = dx + row * (ff_i64_t)D;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            if (base < D) {
                S o[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    o[k] = T::from_f32((gv[c][k] * wv[c][k] - mean_gw) * n - xv[c][k] * c3);
                    dwp[c][k] += gv[c][k] * xv[c][k] * n;
                    dbp[c][k] += gv[c][k];
                }
                ff_store<T, ALIGNED>(dxr, base, D, o);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < N_CHUNKS; ++c) {
        const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (base + k < D) {
                const ff_i64_t at = (ff_i64_t)blockIdx.x * D + base + k;
                if (dw_part != nullptr) {
                    dw_part[at] = dwp[c][k];
                }
                if (db_part != nullptr) {
                    db_part[at] = dbp[c][k];
                }
            }
        }
    }
}

// Rows of at most 32 * N * CH elements (ALIGNED layouts only): a warp per row, so every sum
// is a warp shuffle (the one-block-per-row kernel's block reductions dominate short rows).
// A warp keeps its next row's x and g in flight while it reduces the current one. Each warp
// adds its rows' dw / db contributions into its own slice of shared memory (element j of
// lane l's chunk c at (c * N + j) * 32 + l: conflict-free); at the end the block adds its
// warps' slices in warp order into its partial row. Rows go to warps round-robin over the
// grid, in a loop every warp runs the same number of times (shuffles need every lane).
#define FF_NORM_VJP_WARPS 4

template <typename K, typename T, int CH>
__global__ void __launch_bounds__(32 * FF_NORM_VJP_WARPS) norm_vjp_warp(FF_NORM_VJP_PARAMS(T)) {
    FF_NORM_PARAMS(params.f);
    (void)b_offset;
    (void)b_stride;
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    constexpr int SLICE = 32 * N * CH;  // floats of one warp's partial sums
    __shared__ float s_dw[FF_NORM_VJP_WARPS * SLICE];
    __shared__ float s_db[FF_NORM_VJP_WARPS * SLICE];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const bool want_dw = dw_part != nullptr;
    const bool want_db = db_part != nullptr;
    for (int i = threadIdx.x; i < FF_NORM_VJP_WARPS * SLICE; i += blockDim.x) {
        s_dw[i] = 0.0f;
        s_db[i] = 0.0f;
    }
    __syncthreads();
    float* const my_dw = s_dw + warp * SLICE + lane;
    float* const my_db = s_db + warp * SLICE + lane;
    float wv[CH][N];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * 32 + lane) * N;
        if (w != nullptr) {
            ff_load<T, true>(w + w_offset, 1, base, D, wv[c]);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                wv[c][k] = 1.0f;
            }
        }
    }
    const ff_i64_t stride = (ff_i64_t)gridDim.x * FF_NORM_VJP_WARPS;
    const ff_i64_t first = (ff_i64_t)blockIdx.x * FF_NORM_VJP_WARPS + warp;
    ff_pack<S, N> xp[CH];
    ff_pack<S, N> gp[CH];
    auto load_row = [&](ff_i64_t r) {
        const bool valid = r < n_rows;
        const S* xr = x + x_offset + (valid ? r : 0) * x_row_stride;
        const S* gr = g + params.g_offset + (valid ? r : 0) * params.g_row_stride;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            ff_group_load<T, true>(xr, (c * 32 + lane) * N, D, valid, xp[c]);
            ff_group_load<T, true>(gr, (c * 32 + lane) * N, D, valid, gp[c]);
        }
    };
    load_row(first);
    for (ff_i64_t r0 = 0; r0 < n_rows; r0 += stride) {
        const ff_i64_t row = r0 + first;
        float xv[CH][N];
        float gv[CH][N];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                xv[c][k] = T::to_f32(xp[c].elem[k]);
                gv[c][k] = T::to_f32(gp[c].elem[k]);
            }
        }
        if (r0 + stride < n_rows) {
            load_row(row + stride);
        }
        float mean_gw, n, c3;
        // Lane 0's first value is the row's first element: layer norm's shift.
        const float shift = __shfl_sync(0xffffffffu, xv[0][0], 0);
        ff_norm_vjp_stats<K, CH, N>(
            xv, gv, wv, D, eps, shift, [&](int c) { return (c * 32 + lane) * N; },
            ff_warp_summer{},
            mean_gw, n, c3);
        if (row < n_rows) {
            S* dxr = dx + row * (ff_i64_t)D;
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const int base = (c * 32 + lane) * N;
                if (base < D) {
                    S o[N];
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        o[k] = T::from_f32((gv[c][k] * wv[c][k] - mean_gw) * n - xv[c][k] * c3);
                        const int at = (c * N + k) * 32;
                        if (want_dw) {
                            my_dw[at] += gv[c][k] * xv[c][k] * n;
                        }
                        if (want_db) {
                            my_db[at] += gv[c][k];
                        }
                    }
                    ff_store<T, true>(dxr, base, D, o);
                }
            }
        }
    }
    __syncthreads();
    // The block's partial row: the warps' slices added in warp order.
    for (int e = threadIdx.x; e < SLICE; e += blockDim.x) {
        const int l = e & 31;
        const int ck = e >> 5;
        const int col = ((ck / N) * 32 + l) * N + ck % N;
        if (col < D) {
            float sw = 0.0f;
            float sb = 0.0f;
#pragma unroll
            for (int v = 0; v < FF_NORM_VJP_WARPS; ++v) {
                sw += s_dw[v * SLICE + e];
                sb += s_db[v * SLICE + e];
            }
            const ff_i64_t at = (ff_i64_t)blockIdx.x * D + col;
            if (want_dw) {
                dw_part[at] = sw;
            }
            if (want_db) {
                db_part[at] = sb;
            }
        }
    }
}

// Rows too long for registers: two passes over each row (the sums of ff_norm_vjp_stats,
// then the output; layer norm adds the fallback's pass between them when the shifted moments
// are not trusted; the later passes mostly hit L2), the partial sums kept in the block's slice
// of dw_part / db_part (each element owned by one thread, so no synchronisation). dw_part and
// db_part must not be null when a weight / bias gradient is wanted; the kernel zeroes them
// first.
template <typename K, typename T>
__global__ void __launch_bounds__(FF_NORM_VJP_THREADS) norm_vjp_looped(FF_NORM_VJP_PARAMS(T)) {
    FF_NORM_PARAMS(params.f);
    (void)b_offset;
    (void)b_stride;
    typedef typename T::storage S;
    __shared__ float scratch[K::layer ? 128 : 64];
    const int step = (int)blockDim.x;
    const float inv_d = 1.0f / (float)D;
    float* dwb = dw_part != nullptr ? dw_part + (ff_i64_t)blockIdx.x * D : nullptr;
    float* dbb = db_part != nullptr ? db_part + (ff_i64_t)blockIdx.x * D : nullptr;
    for (int i = threadIdx.x; i < D; i += step) {
        if (dwb != nullptr) {
            dwb[i] = 0.0f;
        }
        if (dbb != nullptr) {
            dbb[i] = 0.0f;
        }
    }
    auto wat = [&](int i) {
        return w != nullptr ? T::to_f32(w[w_offset + (ff_i64_t)i * w_stride]) : 1.0f;
    };
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        const S* gr = g + params.g_offset + row * params.g_row_stride;
        float shift = 0.0f;
        float m1 = 0.0f;
        float mean_gw = 0.0f;
        float var;
        float q;
        if constexpr (K::layer) {
            shift = T::to_f32(xr[0]);
            // ff_norm_vjp_stats's four sums about `about`, over this thread's elements.
            auto row_sums = [&](float about, float(&s)[4]) {
                for (int i = threadIdx.x; i < D; i += step) {
                    const float d = T::to_f32(xr[i]) - about;
                    const float gw = T::to_f32(gr[i]) * wat(i);
                    s[0] += d;
                    s[1] += d * d;
                    s[2] += gw * d;
                    s[3] += gw;
                }
            };
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            row_sums(shift, a);
            ff_block_sums(a, scratch);
            q = a[2];
            if (!ff_shifted_moments(a[0], a[1], D, m1, var)) {
                shift += m1;
                float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                row_sums(shift, r);
                ff_block_sums(r, scratch);
                ff_refine_moments(r[0], r[1], D, m1, var);
                q = r[2];
            }
            q -= m1 * a[3];
            mean_gw = a[3] * inv_d;
        } else {
            float a[2] = {0.0f, 0.0f};
            for (int i = threadIdx.x; i < D; i += step) {
                const float xi = T::to_f32(xr[i]);
                a[0] += xi * xi;
                a[1] += T::to_f32(gr[i]) * wat(i) * xi;
            }
            ff_block_sums(a, scratch);
            var = a[0] * inv_d;
            q = a[1];
        }
        const float n = 1.0f / sqrtf(var + eps);
        const float c3 = q * inv_d * n * n * n;
        S* dxr = dx + row * (ff_i64_t)D;
        for (int i = threadIdx.x; i < D; i += step) {
            const float xc = (T::to_f32(xr[i]) - shift) - m1;
            const float gi = T::to_f32(gr[i]);
            dxr[i] = T::from_f32((gi * wat(i) - mean_gw) * n - xc * c3);
            if (dwb != nullptr) {
                dwb[i] += gi * xc * n;
            }
            if (dbb != nullptr) {
                dbb[i] += gi;
            }
        }
    }
}

// out[i] = sum over p < n_parts of part[p * D + i], in a fixed order: block (32 columns x
// FF_REDUCE_ROWS row groups); group r sums parts r, r + FF_REDUCE_ROWS, ... in order, then
// the groups are added in order through shared memory.
#define FF_REDUCE_ROWS 32
__global__ void __launch_bounds__(32 * FF_REDUCE_ROWS) norm_vjp_reduce(
    const float* __restrict__ part, int n_parts, int D, float* __restrict__ out) {
    __shared__ float sums[FF_REDUCE_ROWS][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < D) {
        for (int p = threadIdx.y; p < n_parts; p += FF_REDUCE_ROWS) {
            s += part[(ff_i64_t)p * D + col];
        }
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < D) {
        float t = 0.0f;
#pragma unroll
        for (int r = 0; r < FF_REDUCE_ROWS; ++r) {
            t += sums[r][threadIdx.x];
        }
        out[col] = t;
    }
}
