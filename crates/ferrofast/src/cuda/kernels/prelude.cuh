// ferrofast's shared device prelude, handed to NVRTC as the in-memory header
// "ferrofast_prelude.cuh". It includes no CUDA headers on purpose: a bare libnvrtc (the
// nvidia-cuda-nvrtc wheel) can then compile every built-in kernel, so CI compile-checks them
// on machines without a CUDA toolkit. f16/bf16 travel as 16-bit integers and are converted
// with PTX or bit operations; all arithmetic is f32 (f64 where a cast needs it).
#pragma once

typedef unsigned char ff_u8_t;
typedef unsigned short ff_u16_t;
typedef unsigned int ff_u32_t;
typedef long long ff_i64_t;
typedef unsigned long long ff_u64_t;

// ----- f16 / bf16 <-> f32 -------------------------------------------------------------------

__device__ __forceinline__ float ff_f16_to_f32(ff_u16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, as `half::f16::from_f32` does.
__device__ __forceinline__ ff_u16_t ff_f32_to_f16(float f) {
    ff_u16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float ff_bf16_to_f32(ff_u16_t b) {
    return __uint_as_float(((ff_u32_t)b) << 16);
}

// Round to nearest even. sm_80 and later convert in one instruction (a NaN becomes the
// canonical quiet NaN); older devices round on the bits (a NaN stays a quiet NaN with its
// payload, as in `half::bf16::from_f32`). The bit version costs about seven integer
// instructions an element, which made bf16 norms and rope compute-bound.
__device__ __forceinline__ ff_u16_t ff_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    ff_u16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    ff_u32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (ff_u16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ff_u16_t)(u >> 16);
#endif
}

// ----- element types ------------------------------------------------------------------------
// One tag per DType: `storage` is the bit layout in memory; to_f64 / from_f64 / to_i64 /
// from_i64 implement `astype` (floats round to nearest even; float -> int truncates toward
// zero and saturates, NaN -> 0; int -> int wraps; -> bool is `!= 0`). As in MLX, a value
// becomes f16 or bf16 through f32: f64 -> f32 -> f16 rounds twice, exactly like MLX's
// `static_cast<float16_t>(double)`.

struct ff_bool {
    typedef ff_u8_t storage;
    static const bool is_float = false;
    __device__ static double to_f64(storage v) { return v ? 1.0 : 0.0; }
    __device__ static ff_i64_t to_i64(storage v) { return v ? 1 : 0; }
    __device__ static storage from_f64(double v) { return v != 0.0 ? 1 : 0; }
    __device__ static storage from_i64(ff_i64_t v) { return v != 0 ? 1 : 0; }
};

struct ff_u8 {
    typedef ff_u8_t storage;
    static const bool is_float = false;
    __device__ static double to_f64(storage v) { return (double)v; }
    __device__ static ff_i64_t to_i64(storage v) { return (ff_i64_t)v; }
    __device__ static storage from_f64(double v) {
        if (!(v > 0.0)) return 0;
        if (v >= 255.0) return 255;
        return (storage)(ff_u32_t)v;
    }
    __device__ static storage from_i64(ff_i64_t v) { return (storage)v; }
};

struct ff_u32 {
    typedef ff_u32_t storage;
    static const bool is_float = false;
    __device__ static double to_f64(storage v) { return (double)v; }
    __device__ static ff_i64_t to_i64(storage v) { return (ff_i64_t)v; }
    __device__ static storage from_f64(double v) {
        if (!(v > 0.0)) return 0;
        if (v >= 4294967295.0) return 4294967295u;
        return (storage)v;
    }
    __device__ static storage from_i64(ff_i64_t v) { return (storage)v; }
};

struct ff_i32 {
    typedef int storage;
    static const bool is_float = false;
    __device__ static double to_f64(storage v) { return (double)v; }
    __device__ static ff_i64_t to_i64(storage v) { return (ff_i64_t)v; }
    __device__ static storage from_f64(double v) {
        if (v != v) return 0;
        if (v <= -2147483648.0) return (-2147483647 - 1);
        if (v >= 2147483647.0) return 2147483647;
        return (storage)v;
    }
    __device__ static storage from_i64(ff_i64_t v) { return (storage)(ff_u32_t)(ff_u64_t)v; }
};

struct ff_i64 {
    typedef ff_i64_t storage;
    static const bool is_float = false;
    __device__ static double to_f64(storage v) { return (double)v; }
    __device__ static ff_i64_t to_i64(storage v) { return v; }
    __device__ static storage from_f64(double v) {
        if (v != v) return 0;
        if (v <= -9223372036854775808.0) return (-9223372036854775807ll - 1);
        if (v >= 9223372036854775808.0) return 9223372036854775807ll;
        return (storage)v;
    }
    __device__ static storage from_i64(ff_i64_t v) { return v; }
};

struct ff_f16 {
    typedef ff_u16_t storage;
    static const bool is_float = true;
    __device__ static float to_f32(storage v) { return ff_f16_to_f32(v); }
    __device__ static storage from_f32(float v) { return ff_f32_to_f16(v); }
    __device__ static double to_f64(storage v) { return (double)ff_f16_to_f32(v); }
    __device__ static ff_i64_t to_i64(storage v) { return ff_i64::from_f64(to_f64(v)); }
    __device__ static storage from_f64(double v) { return ff_f32_to_f16((float)v); }
    __device__ static storage from_i64(ff_i64_t v) { return from_f64((double)v); }
};

struct ff_bf16 {
    typedef ff_u16_t storage;
    static const bool is_float = true;
    __device__ static float to_f32(storage v) { return ff_bf16_to_f32(v); }
    __device__ static storage from_f32(float v) { return ff_f32_to_bf16(v); }
    __device__ static double to_f64(storage v) { return (double)ff_bf16_to_f32(v); }
    __device__ static ff_i64_t to_i64(storage v) { return ff_i64::from_f64(to_f64(v)); }
    __device__ static storage from_f64(double v) { return ff_f32_to_bf16((float)v); }
    __device__ static storage from_i64(ff_i64_t v) { return from_f64((double)v); }
};

struct ff_f32 {
    typedef float storage;
    static const bool is_float = true;
    __device__ static float to_f32(storage v) { return v; }
    __device__ static storage from_f32(float v) { return v; }
    __device__ static double to_f64(storage v) { return (double)v; }
    __device__ static ff_i64_t to_i64(storage v) { return ff_i64::from_f64((double)v); }
    __device__ static storage from_f64(double v) { return (float)v; }
    __device__ static storage from_i64(ff_i64_t v) { return (float)(double)v; }
};

struct ff_f64 {
    typedef double storage;
    static const bool is_float = true;
    __device__ static float to_f32(storage v) { return (float)v; }
    __device__ static storage from_f32(float v) { return (double)v; }
    __device__ static double to_f64(storage v) { return v; }
    __device__ static ff_i64_t to_i64(storage v) { return ff_i64::from_f64(v); }
    __device__ static storage from_f64(double v) { return v; }
    __device__ static storage from_i64(ff_i64_t v) { return (double)v; }
};

// ----- 16-byte vectors ----------------------------------------------------------------------

struct alignas(16) ff_vec16 {
    ff_u32_t w[4];
};

// `N` elements of `S` viewed as one 16-byte vector, for vectorised loads and stores.
template <typename S, int N>
union ff_pack {
    ff_vec16 vec;
    S elem[N];
};

// The N elements of `pk` (T's storage) as floats, at v[0..N).
template <typename T, int N>
__device__ __forceinline__ void ff_unpack(const ff_pack<typename T::storage, N>& pk, float* v) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        v[k] = T::to_f32(pk.elem[k]);
    }
}

// ----- fast math ----------------------------------------------------------------------------

// 2^x in one MUFU.EX2 (about 2 ulp; results below 2^-126 flush to zero, -inf gives 0).
__device__ __forceinline__ float ff_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// max(a, b), NaN when either is NaN (fmaxf drops a NaN operand).
__device__ __forceinline__ float ff_max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}

// ----- reductions ---------------------------------------------------------------------------

__device__ __forceinline__ float ff_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` holds 32 floats of shared
// memory; the call synchronises the block twice, so it may be reused by the next call.
__device__ __forceinline__ float ff_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    v = ff_warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = lane < n_warps ? scratch[lane] : 0.0f;
    total = ff_warp_sum(total);
    __syncthreads();
    return total;
}
