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
