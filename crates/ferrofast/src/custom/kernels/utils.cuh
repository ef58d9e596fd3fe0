// Helpers for custom CUDA kernels (`fast::CudaKernel`), handed to NVRTC as the in-memory
// header "mlx/backend/cuda/device/utils.cuh", the name MLX's generated sources include, so
// kernels written for MLX's `cuda_kernel` find what they commonly use:
//   Shape / Strides (fixed arrays of MAX_NDIM entries), MAX_NDIM, WARP_SIZE, elem_to_loc,
//   elem_to_loc_nd, Limits<T>, AlignedVector / load_vector / store_vector, complex64_t,
//   and the f16 / bf16 types of cuda_fp16.h and cuda_bf16.h.
#ifndef FERROFAST_CUSTOM_UTILS_CUH
#define FERROFAST_CUSTOM_UTILS_CUH

#include <cuda/std/cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Metal's and MLX's kernels say `uint`; NVRTC has no system headers that define it.
typedef unsigned int uint;

namespace mlx::core::cu {

constexpr int MAX_NDIM = 10;
constexpr int WARP_SIZE = 32;

// A fixed-size array passed by value as a kernel parameter, with the parts of
// cuda::std::array's interface kernels use.
template <typename T, int N>
struct FixedArray {
    T elems[N];

    __host__ __device__ constexpr T& operator[](int i) { return elems[i]; }
    __host__ __device__ constexpr const T& operator[](int i) const { return elems[i]; }
    __host__ __device__ constexpr T* data() { return elems; }
    __host__ __device__ constexpr const T* data() const { return elems; }
    __host__ __device__ static constexpr int size() { return N; }
    __host__ __device__ constexpr T* begin() { return elems; }
    __host__ __device__ constexpr T* end() { return elems + N; }
    __host__ __device__ constexpr const T* begin() const { return elems; }
    __host__ __device__ constexpr const T* end() const { return elems + N; }
};

using Shape = FixedArray<int32_t, MAX_NDIM>;
using Strides = FixedArray<int64_t, MAX_NDIM>;

// The memory offset of row-major element `elem` of an array with `shape` and `strides`
// (innermost dimension last). The offset is computed in IdxT (signed 64-bit by default, so
// negative strides work whatever integer type `elem` has).
template <typename IdxT = int64_t, typename E>
__host__ __device__ IdxT elem_to_loc(E elem, const int32_t* shape, const int64_t* strides,
                                     int ndim) {
    IdxT loc = 0;
    IdxT rest = IdxT(elem);
    for (int i = ndim - 1; i >= 0 && rest > 0; --i) {
        loc += (rest % IdxT(shape[i])) * IdxT(strides[i]);
        rest /= IdxT(shape[i]);
    }
    return loc;
}

// elem_to_loc with the number of dimensions known at compile time.
template <int NDIM, typename IdxT = int64_t, typename E>
__host__ __device__ IdxT elem_to_loc_nd(E elem, const int32_t* shape, const int64_t* strides) {
    IdxT loc = 0;
    IdxT rest = IdxT(elem);
#pragma unroll
    for (int i = NDIM - 1; i >= 0; --i) {
        loc += (rest % IdxT(shape[i])) * IdxT(strides[i]);
        rest /= IdxT(shape[i]);
    }
    return loc;
}

// The same for two arrays sharing one shape: returns the offset into `a` and sets `b_loc`.
template <typename IdxT = int64_t, typename E>
__host__ __device__ IdxT elem_to_loc_2(E elem, const int32_t* shape, const int64_t* a_strides,
                                       const int64_t* b_strides, int ndim, IdxT& b_loc) {
    IdxT a_loc = 0;
    IdxT rest = IdxT(elem);
    b_loc = 0;
    for (int i = ndim - 1; i >= 0; --i) {
        IdxT pos = rest % IdxT(shape[i]);
        a_loc += pos * IdxT(a_strides[i]);
        b_loc += pos * IdxT(b_strides[i]);
        rest /= IdxT(shape[i]);
    }
    return a_loc;
}

// ----- limits ----------------------------------------------------------------------------------

template <typename T>
struct Limits;

#define FERROFAST_INT_LIMITS(T, LO, HI)                                  \
    template <>                                                          \
    struct Limits<T> {                                                   \
        __host__ __device__ static constexpr T max() { return HI; }      \
        __host__ __device__ static constexpr T min() { return LO; }      \
        __host__ __device__ static constexpr T finite_max() { return HI; } \
        __host__ __device__ static constexpr T finite_min() { return LO; } \
    };

FERROFAST_INT_LIMITS(bool, false, true)
FERROFAST_INT_LIMITS(int8_t, -128, 127)
FERROFAST_INT_LIMITS(uint8_t, 0, 255)
FERROFAST_INT_LIMITS(int16_t, -32768, 32767)
FERROFAST_INT_LIMITS(uint16_t, 0, 65535)
FERROFAST_INT_LIMITS(int32_t, (-2147483647 - 1), 2147483647)
FERROFAST_INT_LIMITS(uint32_t, 0u, 4294967295u)
FERROFAST_INT_LIMITS(int64_t, (-9223372036854775807LL - 1), 9223372036854775807LL)
FERROFAST_INT_LIMITS(uint64_t, 0ull, 18446744073709551615ull)
#undef FERROFAST_INT_LIMITS

template <>
struct Limits<float> {
    __device__ static float max() { return __int_as_float(0x7f800000); }
    __device__ static float min() { return __int_as_float(0xff800000); }
    __device__ static float finite_max() { return __int_as_float(0x7f7fffff); }
    __device__ static float finite_min() { return __int_as_float(0xff7fffff); }
};

template <>
struct Limits<double> {
    __device__ static double max() { return __longlong_as_double(0x7ff0000000000000LL); }
    __device__ static double min() { return __longlong_as_double(0xfff0000000000000LL); }
    __device__ static double finite_max() { return __longlong_as_double(0x7fefffffffffffffLL); }
    __device__ static double finite_min() { return __longlong_as_double(0xffefffffffffffffLL); }
};

template <>
struct Limits<__half> {
    __device__ static __half max() { return __ushort_as_half(0x7c00); }
    __device__ static __half min() { return __ushort_as_half(0xfc00); }
    __device__ static __half finite_max() { return __ushort_as_half(0x7bff); }
    __device__ static __half finite_min() { return __ushort_as_half(0xfbff); }
};

template <>
struct Limits<__nv_bfloat16> {
    __device__ static __nv_bfloat16 max() { return __ushort_as_bfloat16(0x7f80); }
    __device__ static __nv_bfloat16 min() { return __ushort_as_bfloat16(0xff80); }
    __device__ static __nv_bfloat16 finite_max() { return __ushort_as_bfloat16(0x7f7f); }
    __device__ static __nv_bfloat16 finite_min() { return __ushort_as_bfloat16(0xff7f); }
};

// ----- vector loads and stores -----------------------------------------------------------------

// N elements of T aligned to their total size, so a load or store of the whole vector is one
// wide memory access (N * sizeof(T) of 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
    T val[N];

    __device__ T& operator[](int i) { return val[i]; }
    __device__ const T& operator[](int i) const { return val[i]; }
};

// Whether `ptr` is aligned for AlignedVector<T, N> accesses.
template <int N, typename T>
__device__ inline bool is_aligned(const T* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % sizeof(AlignedVector<T, N>) == 0;
}

// Loads vector `offset` (elements [offset * N, offset * N + N)) of `ptr`, which must be
// aligned for AlignedVector<T, N>.
template <int N, typename T>
__device__ inline AlignedVector<T, N> load_vector(const T* ptr, uint32_t offset) {
    return reinterpret_cast<const AlignedVector<T, N>*>(ptr)[offset];
}

// As above, but elements at or past `size` read as `fallback` (and the vector is read one
// element at a time when it reaches past `size`).
template <int N, typename T, typename SizeT>
__device__ inline AlignedVector<T, N> load_vector(const T* ptr, uint32_t offset, SizeT size,
                                                  T fallback) {
    if (is_aligned<N>(ptr) && SizeT(offset + 1) * N <= size) {
        return load_vector<N>(ptr, offset);
    }
    AlignedVector<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        SizeT idx = SizeT(offset) * N + i;
        v[i] = idx < size ? ptr[idx] : fallback;
    }
    return v;
}

// Stores `v` as vector `offset` of `ptr`, which must be aligned for AlignedVector<T, N>.
template <int N, typename T>
__device__ inline void store_vector(T* ptr, uint32_t offset, const AlignedVector<T, N>& v) {
    reinterpret_cast<AlignedVector<T, N>*>(ptr)[offset] = v;
}

// As above, writing only the elements below `size`.
template <int N, typename T, typename SizeT>
__device__ inline void store_vector(T* ptr, uint32_t offset, const AlignedVector<T, N>& v,
                                    SizeT size) {
    if (is_aligned<N>(ptr) && SizeT(offset + 1) * N <= size) {
        store_vector<N>(ptr, offset, v);
        return;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        SizeT idx = SizeT(offset) * N + i;
        if (idx < size) {
            ptr[idx] = v[i];
        }
    }
}

// ----- complex64 -------------------------------------------------------------------------------

// A complex number of two floats (MLX's complex64), with the arithmetic kernels need.
struct alignas(8) complex64_t {
    float re;
    float im;

    __host__ __device__ constexpr complex64_t() : re(0.0f), im(0.0f) {}
    __host__ __device__ constexpr complex64_t(float r) : re(r), im(0.0f) {}
    __host__ __device__ constexpr complex64_t(float r, float i) : re(r), im(i) {}

    __host__ __device__ constexpr float real() const { return re; }
    __host__ __device__ constexpr float imag() const { return im; }

    __host__ __device__ complex64_t& operator+=(const complex64_t& o) {
        re += o.re;
        im += o.im;
        return *this;
    }
    __host__ __device__ complex64_t& operator-=(const complex64_t& o) {
        re -= o.re;
        im -= o.im;
        return *this;
    }
    __host__ __device__ complex64_t& operator*=(const complex64_t& o) {
        float r = re * o.re - im * o.im;
        im = re * o.im + im * o.re;
        re = r;
        return *this;
    }
};

__host__ __device__ inline complex64_t operator+(complex64_t a, const complex64_t& b) {
    return a += b;
}
__host__ __device__ inline complex64_t operator-(complex64_t a, const complex64_t& b) {
    return a -= b;
}
__host__ __device__ inline complex64_t operator*(complex64_t a, const complex64_t& b) {
    return a *= b;
}
__host__ __device__ inline complex64_t operator/(const complex64_t& a, const complex64_t& b) {
    float d = b.re * b.re + b.im * b.im;
    return complex64_t((a.re * b.re + a.im * b.im) / d, (a.im * b.re - a.re * b.im) / d);
}
__host__ __device__ inline complex64_t operator-(const complex64_t& a) {
    return complex64_t(-a.re, -a.im);
}
__host__ __device__ inline bool operator==(const complex64_t& a, const complex64_t& b) {
    return a.re == b.re && a.im == b.im;
}
__host__ __device__ inline bool operator!=(const complex64_t& a, const complex64_t& b) {
    return !(a == b);
}
__device__ inline float abs(const complex64_t& z) { return hypotf(z.re, z.im); }
__host__ __device__ inline complex64_t conj(const complex64_t& z) {
    return complex64_t(z.re, -z.im);
}

} // namespace mlx::core::cu

#endif // FERROFAST_CUSTOM_UTILS_CUH
