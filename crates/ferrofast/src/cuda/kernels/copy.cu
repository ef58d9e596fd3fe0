// Strided copy with dtype conversion: gathers the elements of a strided view (up to 8
// dimensions, any strides including 0 and negative) into a new row-major buffer, converting
// each element with the host's `astype` rules. Serves `contiguous()`, `astype()` and
// `reshape()` of GPU arrays without a host round trip.
//
// `copy_strided` copies between two strided views of one shape (the destination a view of an
// existing buffer): `slice_update` on the GPU. It moves element bits of one width, so the
// source already has the destination's dtype.
#include "ferrofast_prelude.cuh"

#define FF_COPY_MAX_DIMS 8

// Passed by value (128 bytes of kernel parameters). Dimensions are collapsed on the host, so
// `ndim` is usually 1 or 2.
struct ff_copy_layout {
    ff_i64_t shape[FF_COPY_MAX_DIMS];
    ff_i64_t strides[FF_COPY_MAX_DIMS];
};

template <typename A, typename B>
struct ff_is_same {
    static const bool value = false;
};
template <typename A>
struct ff_is_same<A, A> {
    static const bool value = true;
};

// Same type: the bits pass through unchanged (NaN payloads included).
template <typename S, typename D>
__device__ __forceinline__ typename D::storage ff_convert(typename S::storage x) {
    if constexpr (ff_is_same<S, D>::value) {
        return x;
    } else if constexpr (S::is_float || D::is_float) {
        return D::from_f64(S::to_f64(x));
    } else {
        return D::from_i64(S::to_i64(x));
    }
}

// I is the index type: `int` when every element offset fits in 31 bits (cheaper division),
// `long long` otherwise.
template <typename S, typename D, typename I>
__global__ void copy_cast(const typename S::storage* __restrict__ src,
                          ff_i64_t src_offset,
                          typename D::storage* __restrict__ dst,
                          ff_copy_layout layout,
                          int ndim,
                          ff_i64_t n) {
    const I count = (I)n;
    const I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < count; i += step) {
        I rem = i;
        I off = (I)src_offset;
        // Innermost axes first; the outermost needs no modulo. Not unrolled: 162
        // instantiations of an unrolled 8-level division chain make NVRTC slow, and the loop
        // is short after the host merges contiguous axes.
#pragma unroll 1
        for (int d = ndim - 1; d >= 1; --d) {
            const I extent = (I)layout.shape[d];
            const I q = rem / extent;
            off += (rem - q * extent) * (I)layout.strides[d];
            rem = q;
        }
        off += rem * (I)layout.strides[0];
        dst[i] = ff_convert<S, D>(src[off]);
    }
}

// Passed by value (192 bytes of kernel parameters): one shape, the source's and the
// destination's strides. Dimensions are collapsed on the host.
struct ff_copy2_layout {
    ff_i64_t shape[FF_COPY_MAX_DIMS];
    ff_i64_t src_strides[FF_COPY_MAX_DIMS];
    ff_i64_t dst_strides[FF_COPY_MAX_DIMS];
};

// W is the element's storage of its width (ff_u8_t, ff_u16_t, ff_u32_t, ff_u64_t): the bits
// are copied unchanged. I as in copy_cast. The destination view's elements are distinct
// (the host checks), so no two threads write one element.
template <typename W, typename I>
__global__ void copy_strided(const W* __restrict__ src,
                             ff_i64_t src_offset,
                             W* __restrict__ dst,
                             ff_i64_t dst_offset,
                             ff_copy2_layout layout,
                             int ndim,
                             ff_i64_t n) {
    const I count = (I)n;
    const I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < count; i += step) {
        I rem = i;
        I s_off = (I)src_offset;
        I d_off = (I)dst_offset;
#pragma unroll 1
        for (int d = ndim - 1; d >= 1; --d) {
            const I extent = (I)layout.shape[d];
            const I q = rem / extent;
            const I r = rem - q * extent;
            s_off += r * (I)layout.src_strides[d];
            d_off += r * (I)layout.dst_strides[d];
            rem = q;
        }
        s_off += rem * (I)layout.src_strides[0];
        d_off += rem * (I)layout.dst_strides[0];
        dst[d_off] = src[s_off];
    }
}
