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
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = T::to_f32(pk.elem[k]);
            }
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

// A 16-byte load through the read-only path (x, weight, bias and cotangent are never written
// by the kernels).
__device__ __forceinline__ ff_vec16 ff_ld_nc16(const void* p) {
    ff_vec16 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
                 : "l"(p));
    return v;
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
            pk.vec = ff_ld_nc16(p + base);
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
// One specialisation per 16-bit type: its tag, the PTX type of a pair and 1.0 in both halves.
#define FF_PAIR_OPS(TAG, PTX, ONE)                                                         \
    template <>                                                                           \
    struct ff_pair_ops<TAG> {                                                             \
        static const bool available = true;                                               \
        static const ff_u32_t one = ONE;                                                  \
        static const ff_u32_t neg_zero = 0x80008000u;                                     \
        __device__ static ff_u32_t round2(float lo, float hi) {                           \
            ff_u32_t r;                                                                   \
            asm("cvt.rn." PTX ".f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));           \
            return r;                                                                     \
        }                                                                                 \
        __device__ static ff_u32_t fma2(ff_u32_t a, ff_u32_t b, ff_u32_t c) {             \
            ff_u32_t r;                                                                   \
            asm("fma.rn." PTX " %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));      \
            return r;                                                                     \
        }                                                                                 \
    };
FF_PAIR_OPS(ff_bf16, "bf16x2", 0x3f803f80u)
FF_PAIR_OPS(ff_f16, "f16x2", 0x3c003c00u)
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

// Writes elements [base, base + N) of an output row (those below D): the normalised values
// rounded to T, times the weight and plus the bias (null: absent), each step rounded to T as
// MLX does; one 16-byte store when ALIGNED.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_write_chunk(typename T::storage* __restrict__ orow,
                                               const float (&normalized)[ff_norm<T>::N],
                                               const typename T::storage* __restrict__ w,
                                               ff_i64_t w_stride,
                                               const typename T::storage* __restrict__ b,
                                               ff_i64_t b_stride,
                                               int base,
                                               int D) {
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
    ff_store<T, ALIGNED>(orow, base, D, y.elem);
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

// Sums of a and b over the block, returned to every thread; `scratch` holds 64 floats of
// shared memory. Synchronises twice, like ff_block_sum.
__device__ __forceinline__ void ff_block_sum2(float& a, float& b, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, offset);
        b += __shfl_xor_sync(0xffffffffu, b, offset);
    }
    if (lane == 0) {
        scratch[warp] = a;
        scratch[32 + warp] = b;
    }
    __syncthreads();
    a = lane < n_warps ? scratch[lane] : 0.0f;
    b = lane < n_warps ? scratch[32 + lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, offset);
        b += __shfl_xor_sync(0xffffffffu, b, offset);
    }
    __syncthreads();
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

// ----- row statistics, shared by the forward kernels ----------------------------------------

// Sums over the W consecutive lanes of a warp that share a row (W a power of two up to 32).
// Every lane of the warp calls these (rows past the end take part with zeros), so the full
// mask is always valid.
template <int W>
__device__ __forceinline__ float ff_lane_sum(float v) {
#pragma unroll
    for (int offset = W / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

template <int W>
__device__ __forceinline__ void ff_lane_sum2(float& a, float& b) {
#pragma unroll
    for (int offset = W / 2; offset > 0; offset >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, offset);
        b += __shfl_xor_sync(0xffffffffu, b, offset);
    }
}

// How the threads that share a row reduce: the whole block (statistics are block-uniform),
// or G lanes of a warp (several rows per warp: the layer-norm fallback runs on the whole
// warp when any of its rows needs it, since its shuffles span the warp).
struct ff_block_reduce {
    float* scratch;  // shared memory: 32 floats for sum, 64 for sum2
    __device__ float sum(float v) const { return ff_block_sum(v, scratch); }
    __device__ void sum2(float& a, float& b) const { ff_block_sum2(a, b, scratch); }
    __device__ bool any(bool p) const { return p; }
};

template <int G>
struct ff_lane_reduce {
    __device__ float sum(float v) const { return ff_lane_sum<G>(v); }
    __device__ void sum2(float& a, float& b) const { ff_lane_sum2<G>(a, b); }
    __device__ bool any(bool p) const { return __any_sync(0xffffffffu, p); }
};

// The statistics of one row, as every forward kernel computes them (see "statistics"
// above). `sums(shift, s1, s2)` adds to s1 and s2 the sums of d = v - shift and d * d over the
// elements the thread holds (d = 0 for padding past D); RMS norm reads s2 with shift 0. x0 is
// the row's first element (layer norm's shift; 0 for a row past the end). Returns inv; a
// value v normalises to ff_normalized<K>(v, shift, m1, inv).
template <typename K, typename Red, typename Sums>
__device__ __forceinline__ float ff_row_stats(const Red& red,
                                              Sums sums,
                                              float x0,
                                              int D,
                                              float eps,
                                              float& shift,
                                              float& m1) {
    m1 = 0.0f;
    shift = K::layer ? x0 : 0.0f;
    float a1 = 0.0f;
    float a2 = 0.0f;
    sums(shift, a1, a2);
    if constexpr (K::layer) {
        red.sum2(a1, a2);
        float var;
        if (red.any(!ff_shifted_moments(a1, a2, D, m1, var))) {
            // Second pass about the estimated mean; its residual sum corrects the mean too.
            shift += m1;
            float r1 = 0.0f;
            float r2 = 0.0f;
            sums(shift, r1, r2);
            red.sum2(r1, r2);
            ff_refine_moments(r1, r2, D, m1, var);
        }
        return 1.0f / sqrtf(var + eps);
    } else {
        a2 = red.sum(a2);
        return 1.0f / sqrtf(a2 / (float)D + eps);
    }
}

// One element's share of ff_row_stats's sums.
__device__ __forceinline__ void ff_add_centred(float v, bool in, float shift, float& s1, float& s2) {
    const float d = in ? v - shift : 0.0f;
    s1 += d;
    s2 += d * d;
}

template <typename K>
__device__ __forceinline__ float ff_normalized(float v, float shift, float m1, float inv) {
    return K::layer ? ((v - shift) - m1) * inv : v * inv;
}

// The forward kernels' arguments, in order: x, its offset and row stride, weight and bias
// (pointer, offset, stride each; null when absent), the output, rows, D and eps.
#define FF_NORM_FWD_ARGS                                                                  \
    const typename T::storage *__restrict__ x, ff_i64_t x_offset, ff_i64_t x_row_stride,   \
        const typename T::storage *__restrict__ w, ff_i64_t w_offset, ff_i64_t w_stride,   \
        const typename T::storage *__restrict__ b, ff_i64_t b_offset, ff_i64_t b_stride,   \
        typename T::storage *__restrict__ out, ff_i64_t n_rows, int D, float eps

// ----- one block per row ---------------------------------------------------------------------

template <typename K, typename T, int N_CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(1024) norm_rows(FF_NORM_FWD_ARGS) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[K::layer ? 64 : 32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    // RMS norm has no bias: a null known at compile time, so the bias code is compiled out.
    const S* bp = (K::layer && b != nullptr) ? b + b_offset : nullptr;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float v[N_CHUNKS][N];
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            ff_load<T, ALIGNED>(xr, 1, (c * (int)blockDim.x + (int)threadIdx.x) * N, D, v[c]);
        }
        auto sums = [&](float shift, float& s1, float& s2) {
#pragma unroll
            for (int c = 0; c < N_CHUNKS; ++c) {
                const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    ff_add_centred(v[c][k], ALIGNED ? base < D : base + k < D, shift, s1, s2);
                }
            }
        };
        float shift;
        float m1;
        const float inv = ff_row_stats<K>(
            ff_block_reduce{scratch}, sums, K::layer ? T::to_f32(xr[0]) : 0.0f, D, eps, shift, m1);
        S* orow = out + row * (ff_i64_t)D;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            if (base < D) {
                float n[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    n[k] = ff_normalized<K>(v[c][k], shift, m1, inv);
                }
                ff_write_chunk<T, ALIGNED>(orow, n, wp, w_stride, bp, b_stride, base, D);
            }
        }
    }
}

template <typename K, typename T, bool ALIGNED>
__global__ void __launch_bounds__(1024) norm_looped(FF_NORM_FWD_ARGS) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[K::layer ? 64 : 32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    // RMS norm has no bias: a null known at compile time, so the bias code is compiled out.
    const S* bp = (K::layer && b != nullptr) ? b + b_offset : nullptr;
    const int step = (int)blockDim.x * N;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        // Each pass reads the row again (mostly from L2).
        auto sums = [&](float shift, float& s1, float& s2) {
            for (int base = (int)threadIdx.x * N; base < D; base += step) {
                float v[N];
                ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    ff_add_centred(v[k], base + k < D, shift, s1, s2);
                }
            }
        };
        float shift;
        float m1;
        const float inv = ff_row_stats<K>(
            ff_block_reduce{scratch}, sums, K::layer ? T::to_f32(xr[0]) : 0.0f, D, eps, shift, m1);
        S* orow = out + row * (ff_i64_t)D;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = ff_normalized<K>(v[k], shift, m1, inv);
            }
            ff_write_chunk<T, ALIGNED>(orow, v, wp, w_stride, bp, b_stride, base, D);
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

// Loads chunk c of a lane: elements [base, base + N) of the row, zeros past D or for a row
// past the end (valid == false).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_group_load(const typename T::storage* __restrict__ xr,
                                              int base,
                                              int D,
                                              bool valid,
                                              ff_pack<typename T::storage, ff_norm<T>::N>& pk) {
    if (valid) {
        ff_load_raw<T, ALIGNED>(xr, 1, base, D, pk);
    } else {
        pk.vec = ff_vec16{{0u, 0u, 0u, 0u}};
    }
}

template <typename K, typename T, int G, int CH, bool ALIGNED>
__global__ void __launch_bounds__(FF_GROUP_BLOCK) norm_group(FF_NORM_FWD_ARGS) {
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
    auto sums = [&](float shift, float& s1, float& s2) {
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int base = (c * G + lane) * N;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const bool in = ALIGNED ? base < D : base + k < D;
                ff_add_centred(T::to_f32(raw[c].elem[k]), in, shift, s1, s2);
            }
        }
    };
    float shift;
    float m1;
    const float inv = ff_row_stats<K>(ff_lane_reduce<G>{},
                                      sums,
                                      (K::layer && valid) ? T::to_f32(xr[0]) : 0.0f,
                                      D,
                                      eps,
                                      shift,
                                      m1);
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
                n[k] = ff_normalized<K>(T::to_f32(raw[c].elem[k]), shift, m1, inv);
            }
            ff_write_chunk<T, ALIGNED>(orow, n, wp, w_stride, bp, b_stride, base, D);
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
// Everything in f32; the statistics as the forward computes them (layer norm: mean first,
// then the variance about it, both from registers). x and g rows: last axis contiguous, at
// x + x_offset + r * x_row_stride and g + g_offset + r * g_row_stride; the weight strided as
// in the forward (the bias is not read); dx row-major [n_rows, D].

// Scalar parameters of the backward kernels; the C layout matches `NormVjpParams` in
// `cuda/norm.rs`.
struct ff_norm_vjp_params {
    ff_norm_params f;
    ff_i64_t g_offset, g_row_stride;
};

// The backward kernels' arguments (`vjp` in `cuda/norm.rs` passes them in this order), and
// their scalars under the names the bodies use (the bias is not read).
#define FF_NORM_VJP_ARGS                                                                  \
    const typename T::storage *__restrict__ x, const typename T::storage *__restrict__ w,  \
        const typename T::storage *__restrict__ g, typename T::storage *__restrict__ dx,   \
        float *__restrict__ dw_part, float *__restrict__ db_part,                          \
        const ff_norm_vjp_params params
#define FF_NORM_VJP_PARAMS \
    FF_NORM_PARAMS(params.f); \
    (void)b_offset;           \
    (void)b_stride

// The backward statistics of one row. `sums(pass, mean, a, b)` adds to a and b, over the
// elements the thread holds, what ff_vjp_add adds for each (x and gw = g * w as f32, zero
// past D); `sum2` adds two values over the threads of the row (every one of them gets the
// totals). Sets mean and mean_gw (0 for RMS norm), n = rsqrt(var + eps) and
// c3 = mean(gw * xc) * n^3; an element's centred value is ff_vjp_centred<K>(x, in, mean).
template <typename K>
__device__ __forceinline__ float ff_vjp_centred(float x, bool in, float mean) {
    return (!K::layer || in) ? x - mean : 0.0f;
}

// Pass 0 (layer norm): sums of x and of gw. Pass 1: sums of xc^2 and of gw * xc.
template <typename K>
__device__ __forceinline__ void ff_vjp_add(
    int pass, float x, float gw, bool in, float mean, float& a, float& b) {
    if (pass == 0) {
        a += x;
        b += gw;
    } else {
        const float xc = ff_vjp_centred<K>(x, in, mean);
        a += xc * xc;
        b += gw * xc;
    }
}

template <typename K, typename Sum2, typename Sums>
__device__ __forceinline__ void ff_vjp_row_stats(Sum2 sum2,
                                                 Sums sums,
                                                 int D,
                                                 float eps,
                                                 float& mean,
                                                 float& mean_gw,
                                                 float& n,
                                                 float& c3) {
    const float inv_d = 1.0f / (float)D;
    mean = 0.0f;
    mean_gw = 0.0f;
    if constexpr (K::layer) {
        float s1 = 0.0f;
        float s2 = 0.0f;
        sums(0, 0.0f, s1, s2);
        sum2(s1, s2);
        mean = s1 * inv_d;
        mean_gw = s2 * inv_d;
    }
    float q1 = 0.0f;
    float q2 = 0.0f;
    sums(1, mean, q1, q2);
    sum2(q1, q2);
    n = 1.0f / sqrtf(q1 * inv_d + eps);
    c3 = q2 * inv_d * n * n * n;
}

// Threads per block of the backward's group kernel: max(FF_NORM_VJP_MIN_BLOCK, G)
// (`VJP_MIN_BLOCK` in `cuda/norm.rs`); the widest group has FF_NORM_VJP_MAX_GROUP threads.
#define FF_NORM_VJP_MIN_BLOCK 128
#define FF_NORM_VJP_MAX_GROUP 256
// Blocks per SM the aligned group kernels are compiled to fit (128 registers a thread): x
// and g kept as loaded fill the registers, up to 64 KB of loads in flight per SM. The
// unaligned ones (scalar loads) get no such bound.
#define FF_NORM_VJP_MIN_BLOCKS(G, ALIGNED) \
    (!ALIGNED ? 1 : G > FF_NORM_VJP_MIN_BLOCK ? 65536 / 128 / G : 65536 / 128 / FF_NORM_VJP_MIN_BLOCK)

// Sums of a and b over the G consecutive threads of a group (G a power of two from 8 to
// FF_NORM_VJP_MAX_GROUP), returned to each of them. Up to a warp: shuffles alone. Wider: each
// warp shuffles, then the group's warps exchange their sums through `red` (2 x 2 x
// FF_NORM_VJP_MAX_GROUP / 32 floats of shared memory) behind one named barrier per call
// (barrier 1 + group index, G threads), every thread adding the warp sums in warp order. The
// slots alternate with `parity`: a thread writing slot p again has passed the barrier of the
// call in between, so every reader of the previous use of p is done.
template <int G>
__device__ __forceinline__ void ff_group_sum2(float& a, float& b, float* red, int& parity) {
    ff_lane_sum2<(G < 32 ? G : 32)>(a, b);
    if constexpr (G > 32) {
        const int n_warps = FF_NORM_VJP_MAX_GROUP / 32;
        const int warp = (int)threadIdx.x >> 5;
        const int first = warp & ~(G / 32 - 1);
        float* slot = red + parity * 2 * n_warps;
        if ((threadIdx.x & 31) == 0) {
            slot[warp] = a;
            slot[n_warps + warp] = b;
        }
        asm volatile("bar.sync %0, %1;" ::"r"(1 + (int)threadIdx.x / G), "r"(G) : "memory");
        a = 0.0f;
        b = 0.0f;
#pragma unroll
        for (int i = 0; i < G / 32; ++i) {
            a += slot[first + i];
            b += slot[n_warps + first + i];
        }
        parity ^= 1;
    }
}

// Four floats moved as one 16-byte shared-memory access.
struct alignas(16) ff_f32x4 {
    float v[4];
};

// part[i] += add[i] for the N consecutive floats of one chunk (16-byte aligned), in 16-byte
// shared-memory accesses.
template <int N>
__device__ __forceinline__ void ff_add_chunk(float* part, const float (&add)[N]) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
        ff_f32x4 p = reinterpret_cast<ff_f32x4*>(part)[q];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p.v[j] += add[4 * q + j];
        }
        reinterpret_cast<ff_f32x4*>(part)[q] = p;
    }
}

// A group of G threads per row (G in {8, ..., FF_NORM_VJP_MAX_GROUP}); a block of B =
// max(FF_NORM_VJP_MIN_BLOCK, G) threads has R = B / G rows in flight. Each thread keeps CH
// chunks of N = 16 / sizeof(T) elements of x and g in registers in their storage type
// (chunk c of a thread: elements (c * G + lane) * N ...), and the next row's chunks, loaded
// before this row's reductions; the reductions are group-wide (shuffles; named barriers past
// a warp), never block-wide. Registers hold only x and g: the weight (in T) and the dw / db
// partials (f32, one slice of D per group) live in dynamic shared memory,
//   [weight: D elements, padded to 16 bytes][dw: R x D, if dw_part][db: R x D, if db_part],
// each thread adding its own columns of its group's slice (no synchronisation); at the end
// the block adds the R slices in group order into its row of dw_part / db_part. Rows are
// visited block-uniformly (row0 + group for row0 = blockIdx.x * R, stepping gridDim.x * R),
// rows past the end taking part in the reductions with zeros. Unaligned (ALIGNED false):
// scalar global loads, D % N arbitrary; the shared-memory layout is the same.
template <typename K, typename T, int G, int CH, bool ALIGNED>
__global__ void __launch_bounds__(G > FF_NORM_VJP_MIN_BLOCK ? G : FF_NORM_VJP_MIN_BLOCK,
                                   FF_NORM_VJP_MIN_BLOCKS(G, ALIGNED))
    norm_vjp_group(FF_NORM_VJP_ARGS) {
    FF_NORM_VJP_PARAMS;
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    const int B = G > FF_NORM_VJP_MIN_BLOCK ? G : FF_NORM_VJP_MIN_BLOCK;
    const int R = B / G;
    __shared__ float red[2 * 2 * (FF_NORM_VJP_MAX_GROUP / 32)];
    extern __shared__ ff_vec16 ff_vjp_smem[];
    const int group = (int)threadIdx.x / G;
    const int lane = (int)threadIdx.x % G;
    // The padded chunk count of a row: shared-memory rows hold whole chunks.
    const int DP = (D + N - 1) / N * N;
    S* ws = reinterpret_cast<S*>(ff_vjp_smem);
    // DP * sizeof(S) is a multiple of 16, so the partials start 16-byte aligned.
    float* parts = reinterpret_cast<float*>(ws + DP);
    float* pdw = dw_part != nullptr ? parts : nullptr;
    float* pdb = db_part != nullptr ? parts + (pdw != nullptr ? R * DP : 0) : nullptr;
    for (int i = threadIdx.x; i < DP; i += B) {
        ws[i] = (w == nullptr || i >= D) ? T::from_f32(w == nullptr ? 1.0f : 0.0f)
                                         : w[w_offset + (ff_i64_t)i * w_stride];
    }
    for (int i = threadIdx.x; i < R * DP; i += B) {
        if (pdw != nullptr) {
            pdw[i] = 0.0f;
        }
        if (pdb != nullptr) {
            pdb[i] = 0.0f;
        }
    }
    __syncthreads();
    const ff_i64_t step = (ff_i64_t)gridDim.x * R;
    ff_pack<S, N> xn[CH];
    ff_pack<S, N> gn[CH];
    auto load_row = [&](ff_i64_t row) {
        const bool valid = row < n_rows;
        const ff_i64_t r = valid ? row : 0;
        const S* xr = x + x_offset + r * x_row_stride;
        const S* gr = g + params.g_offset + r * params.g_row_stride;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            ff_group_load<T, ALIGNED>(xr, (c * G + lane) * N, D, valid, xn[c]);
            ff_group_load<T, ALIGNED>(gr, (c * G + lane) * N, D, valid, gn[c]);
        }
    };
    // The weight of chunk c (zeros past D), from shared memory.
    auto wchunk = [&](int c) {
        ff_pack<S, N> pk;
        const int base = (c * G + lane) * N;
        if (base < DP) {
            pk.vec = *reinterpret_cast<const ff_vec16*>(ws + base);
        } else {
            pk.vec = ff_vec16{{0u, 0u, 0u, 0u}};
        }
        return pk;
    };
    int parity = 0;
    ff_i64_t row0 = (ff_i64_t)blockIdx.x * R;
    load_row(row0 + group);
    for (; row0 < n_rows; row0 += step) {
        const ff_i64_t row = row0 + group;
        ff_pack<S, N> xc[CH];
        ff_pack<S, N> gc[CH];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            xc[c] = xn[c];
            gc[c] = gn[c];
        }
        if (row0 + step < n_rows) {
            load_row(row + step);
        }
        auto sums = [&](int pass, float m, float& a, float& b) {
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const ff_pack<S, N> wk = wchunk(c);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const bool in = (c * G + lane) * N + k < D;
                    const float gw = T::to_f32(gc[c].elem[k]) * T::to_f32(wk.elem[k]);
                    ff_vjp_add<K>(pass, T::to_f32(xc[c].elem[k]), gw, in, m, a, b);
                }
            }
        };
        float mean, mean_gw, n, c3;
        ff_vjp_row_stats<K>([&](float& a, float& b) { ff_group_sum2<G>(a, b, red, parity); },
                            sums, D, eps, mean, mean_gw, n, c3);
        if (row < n_rows) {
            S* dxr = dx + row * (ff_i64_t)D;
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const int base = (c * G + lane) * N;
                if (base < D) {
                    const ff_pack<S, N> wk = wchunk(c);
                    S o[N];
                    float dwv[N];
                    float dbv[N];
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        const float xv =
                            ff_vjp_centred<K>(T::to_f32(xc[c].elem[k]), base + k < D, mean);
                        const float gv = T::to_f32(gc[c].elem[k]);
                        o[k] = T::from_f32((gv * T::to_f32(wk.elem[k]) - mean_gw) * n - xv * c3);
                        dwv[k] = gv * xv * n;
                        dbv[k] = gv;
                    }
                    ff_store<T, ALIGNED>(dxr, base, D, o);
                    if (pdw != nullptr) {
                        ff_add_chunk<N>(pdw + group * DP + base, dwv);
                    }
                    if (K::layer && pdb != nullptr) {
                        ff_add_chunk<N>(pdb + group * DP + base, dbv);
                    }
                }
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += B) {
        float sw = 0.0f;
        float sb = 0.0f;
        for (int r = 0; r < R; ++r) {
            if (pdw != nullptr) {
                sw += pdw[r * DP + i];
            }
            if (pdb != nullptr) {
                sb += pdb[r * DP + i];
            }
        }
        if (pdw != nullptr) {
            dw_part[(ff_i64_t)blockIdx.x * D + i] = sw;
        }
        if (pdb != nullptr) {
            db_part[(ff_i64_t)blockIdx.x * D + i] = sb;
        }
    }
}

// Threads per block of the looped backward kernel (`VJP_LOOPED_THREADS` in `cuda/norm.rs`).
#define FF_NORM_VJP_LOOPED_THREADS 512

// Rows too long for registers: three passes over each row (sums, centred sums, output; the
// later ones mostly hit L2), the partial sums kept in the block's slice of dw_part / db_part
// (each element owned by one thread, so no synchronisation). dw_part and db_part must not be
// null when a weight / bias gradient is wanted; the kernel zeroes them first.
template <typename K, typename T>
__global__ void __launch_bounds__(FF_NORM_VJP_LOOPED_THREADS) norm_vjp_looped(FF_NORM_VJP_ARGS) {
    FF_NORM_VJP_PARAMS;
    typedef typename T::storage S;
    __shared__ float scratch[64];
    const int step = (int)blockDim.x;
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
        auto sums = [&](int pass, float m, float& a, float& b) {
            for (int i = threadIdx.x; i < D; i += step) {
                ff_vjp_add<K>(pass, T::to_f32(xr[i]), T::to_f32(gr[i]) * wat(i), true, m, a, b);
            }
        };
        float mean, mean_gw, n, c3;
        ff_vjp_row_stats<K>([&](float& a, float& b) { ff_block_sum2(a, b, scratch); },
                            sums, D, eps, mean, mean_gw, n, c3);
        S* dxr = dx + row * (ff_i64_t)D;
        for (int i = threadIdx.x; i < D; i += step) {
            const float xc = T::to_f32(xr[i]) - mean;
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
