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
// Variants:
//   *_rows<T, N_CHUNKS, ALIGNED>: one block per row, each thread keeps N_CHUNKS chunks of
//     N_READS = 16 / sizeof(T) consecutive elements in registers: one pass over x.
//   *_looped<T, ALIGNED>: rows too long for registers; the block loops over the row (a second
//     and third read mostly hit L2).
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
    const int N = ff_norm<T>::N;
    float wv[N];
    float bv[N];
    if (w != nullptr) {
        ff_load<T, ALIGNED>(w, w_stride, base, D, wv);
    }
    if (b != nullptr) {
        ff_load<T, ALIGNED>(b, b_stride, base, D, bv);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
        typename T::storage y = T::from_f32(normalized[k]);
        if (w != nullptr) {
            y = T::from_f32(T::to_f32(y) * wv[k]);
        }
        if (b != nullptr) {
            y = T::from_f32(T::to_f32(y) + bv[k]);
        }
        o[k] = y;
    }
}

// ----- RMS norm -----------------------------------------------------------------------------

template <typename T, int N_CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(1024) rms_norm_rows(const typename T::storage* __restrict__ x,
                              ff_i64_t x_offset,
                              ff_i64_t x_row_stride,
                              const typename T::storage* __restrict__ w,
                              ff_i64_t w_offset,
                              ff_i64_t w_stride,
                              typename T::storage* __restrict__ out,
                              ff_i64_t n_rows,
                              int D,
                              float eps) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float v[N_CHUNKS][N];
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            ff_load<T, ALIGNED>(xr, 1, base, D, v[c]);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                ss += v[c][k] * v[c][k];
            }
        }
        ss = ff_block_sum(ss, scratch);
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        S* orow = out + row * (ff_i64_t)D;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            if (base < D) {
                float n[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    n[k] = v[c][k] * inv;
                }
                S o[N];
                ff_finish_chunk<T, ALIGNED>(n, wp, w_stride, nullptr, 0, base, D, o);
                ff_store<T, ALIGNED>(orow, base, D, o);
            }
        }
    }
}

template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(1024) rms_norm_looped(const typename T::storage* __restrict__ x,
                                ff_i64_t x_offset,
                                ff_i64_t x_row_stride,
                                const typename T::storage* __restrict__ w,
                                ff_i64_t w_offset,
                                ff_i64_t w_stride,
                                typename T::storage* __restrict__ out,
                                ff_i64_t n_rows,
                                int D,
                                float eps) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    const int step = (int)blockDim.x * N;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float ss = 0.0f;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                ss += v[k] * v[k];
            }
        }
        ss = ff_block_sum(ss, scratch);
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        S* orow = out + row * (ff_i64_t)D;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] *= inv;
            }
            S o[N];
            ff_finish_chunk<T, ALIGNED>(v, wp, w_stride, nullptr, 0, base, D, o);
            ff_store<T, ALIGNED>(orow, base, D, o);
        }
    }
}

// ----- layer norm ---------------------------------------------------------------------------

template <typename T, int N_CHUNKS, bool ALIGNED>
__global__ void __launch_bounds__(1024) layer_norm_rows(const typename T::storage* __restrict__ x,
                                ff_i64_t x_offset,
                                ff_i64_t x_row_stride,
                                const typename T::storage* __restrict__ w,
                                ff_i64_t w_offset,
                                ff_i64_t w_stride,
                                const typename T::storage* __restrict__ b,
                                ff_i64_t b_offset,
                                ff_i64_t b_stride,
                                typename T::storage* __restrict__ out,
                                ff_i64_t n_rows,
                                int D,
                                float eps) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    const S* bp = b != nullptr ? b + b_offset : nullptr;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float v[N_CHUNKS][N];
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            ff_load<T, ALIGNED>(xr, 1, base, D, v[c]);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                s += v[c][k];
            }
        }
        const float mean = ff_block_sum(s, scratch) / (float)D;
        // Second pass over the registers: the centred sum of squares (MLX's two-pass
        // variance), skipping the zero padding past D.
        float s2 = 0.0f;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = v[c][k] - mean;
                s2 += base + k < D ? d * d : 0.0f;
            }
        }
        const float var = ff_block_sum(s2, scratch) / (float)D;
        const float inv = 1.0f / sqrtf(var + eps);
        S* orow = out + row * (ff_i64_t)D;
#pragma unroll
        for (int c = 0; c < N_CHUNKS; ++c) {
            const int base = (c * (int)blockDim.x + (int)threadIdx.x) * N;
            if (base < D) {
                float n[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    n[k] = (v[c][k] - mean) * inv;
                }
                S o[N];
                ff_finish_chunk<T, ALIGNED>(n, wp, w_stride, bp, b_stride, base, D, o);
                ff_store<T, ALIGNED>(orow, base, D, o);
            }
        }
    }
}

template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(1024) layer_norm_looped(const typename T::storage* __restrict__ x,
                                  ff_i64_t x_offset,
                                  ff_i64_t x_row_stride,
                                  const typename T::storage* __restrict__ w,
                                  ff_i64_t w_offset,
                                  ff_i64_t w_stride,
                                  const typename T::storage* __restrict__ b,
                                  ff_i64_t b_offset,
                                  ff_i64_t b_stride,
                                  typename T::storage* __restrict__ out,
                                  ff_i64_t n_rows,
                                  int D,
                                  float eps) {
    typedef typename T::storage S;
    const int N = ff_norm<T>::N;
    __shared__ float scratch[32];
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    const S* bp = b != nullptr ? b + b_offset : nullptr;
    const int step = (int)blockDim.x * N;
    for (ff_i64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* xr = x + x_offset + row * x_row_stride;
        float s = 0.0f;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                s += v[k];
            }
        }
        const float mean = ff_block_sum(s, scratch) / (float)D;
        float s2 = 0.0f;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = v[k] - mean;
                s2 += base + k < D ? d * d : 0.0f;
            }
        }
        const float var = ff_block_sum(s2, scratch) / (float)D;
        const float inv = 1.0f / sqrtf(var + eps);
        S* orow = out + row * (ff_i64_t)D;
        for (int base = (int)threadIdx.x * N; base < D; base += step) {
            float v[N];
            ff_load<T, ALIGNED>(xr, 1, base, D, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = (v[k] - mean) * inv;
            }
            S o[N];
            ff_finish_chunk<T, ALIGNED>(v, wp, w_stride, bp, b_stride, base, D, o);
            ff_store<T, ALIGNED>(orow, base, D, o);
        }
    }
}

// ----- several rows per block ---------------------------------------------------------------
//
// *_group<T, G, CH, ALIGNED>: G consecutive lanes of a warp (G in {4, 8, 16, 32}) own one row
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
#pragma unroll
    for (int k = 0; k < N; ++k) {
        S y = T::from_f32(n[k]);
        if (w != nullptr) {
            y = T::from_f32(T::to_f32(y) * T::to_f32(wp.elem[k]));
        }
        if (b != nullptr) {
            y = T::from_f32(T::to_f32(y) + T::to_f32(bp.elem[k]));
        }
        o.elem[k] = y;
    }
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

template <typename T, int G, int CH, bool ALIGNED>
__global__ void __launch_bounds__(FF_GROUP_BLOCK) rms_norm_group(
    const typename T::storage* __restrict__ x,
    ff_i64_t x_offset,
    ff_i64_t x_row_stride,
    const typename T::storage* __restrict__ w,
    ff_i64_t w_offset,
    ff_i64_t w_stride,
    typename T::storage* __restrict__ out,
    ff_i64_t n_rows,
    int D,
    float eps) {
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
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const float v = T::to_f32(raw[c].elem[k]);
            ss += v * v;
        }
    }
    ss = ff_group_sum<G>(ss);
    if (!valid) {
        return;
    }
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    S* orow = out + row * (ff_i64_t)D;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * G + lane) * N;
        if (base < D) {
            float n[N];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                n[k] = T::to_f32(raw[c].elem[k]) * inv;
            }
            ff_group_store<T, ALIGNED>(orow, wp, w_stride, nullptr, 0, base, D, n);
        }
    }
}

template <typename T, int G, int CH, bool ALIGNED>
__global__ void __launch_bounds__(FF_GROUP_BLOCK) layer_norm_group(
    const typename T::storage* __restrict__ x,
    ff_i64_t x_offset,
    ff_i64_t x_row_stride,
    const typename T::storage* __restrict__ w,
    ff_i64_t w_offset,
    ff_i64_t w_stride,
    const typename T::storage* __restrict__ b,
    ff_i64_t b_offset,
    ff_i64_t b_stride,
    typename T::storage* __restrict__ out,
    ff_i64_t n_rows,
    int D,
    float eps) {
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
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            s += T::to_f32(raw[c].elem[k]);
        }
    }
    const float mean = ff_group_sum<G>(s) / (float)D;
    // MLX's two-pass variance, from the registers; the zero padding past D is skipped.
    float s2 = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * G + lane) * N;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const float d = T::to_f32(raw[c].elem[k]) - mean;
            s2 += base + k < D ? d * d : 0.0f;
        }
    }
    const float var = ff_group_sum<G>(s2) / (float)D;
    if (!valid) {
        return;
    }
    const float inv = 1.0f / sqrtf(var + eps);
    const S* wp = w != nullptr ? w + w_offset : nullptr;
    const S* bp = b != nullptr ? b + b_offset : nullptr;
    S* orow = out + row * (ff_i64_t)D;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int base = (c * G + lane) * N;
        if (base < D) {
            float n[N];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                n[k] = (T::to_f32(raw[c].elem[k]) - mean) * inv;
            }
            ff_group_store<T, ALIGNED>(orow, wp, w_stride, bp, b_stride, base, D, n);
        }
    }
}
