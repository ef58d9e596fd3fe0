// Rotary positional embedding forward for f32 / f16 / bf16 (T is a prelude tag: ff_f32,
// ff_f16, ff_bf16).
//
// Layout: x is read as (B, H, S, D) (S positions) through three strides in elements (batch,
// head, position; the last axis has stride 1), so row-contiguous inputs and [B, S, H, D]
// memory viewed as [B, H, S, D] are used in place. The output is row-major (B, H, S, D).
//
// Work items: (b, head group, s, column block) with the column fastest, so neighbouring
// threads touch neighbouring features. Item column block k covers columns c = k*V .. k*V+V-1:
// column c < dims/2 rotates pair c; column c < D - dims copies pass-through feature dims + c
// bit for bit. Each item serves up to FF_ROPE_HEADS heads with one cos/sin evaluation per
// column. V (1, 2, 4 or 8) columns an item make the accesses vectors of up to 16 bytes; the
// launcher picks V so that every vector is aligned (dims/2, D - dims, D and the strides are
// multiples of the vector's element count); V = 1 always works (element accesses).
//
// Numerics follow MLX's fused kernels (and the CPU back end): inv_freq = exp2(-(i / half) *
// log2(base)) or 1 / period, theta = (scale * pos) * inv_freq, accurate sincosf (the fast
// intrinsics lose accuracy at the large angles of long contexts), rotation in f32, one
// rounding to T.
//
// I is the work-item index type: `int` when the item count fits in 31 bits, `long long`
// otherwise. Element offsets are always 64-bit.
#include "ferrofast_prelude.cuh"

#define FF_ROPE_HEADS 4

// Raw storage of BYTES bytes, aligned to its size, for vector loads and stores.
template <int BYTES>
struct ff_raw;
template <>
struct alignas(16) ff_raw<16> {
    ff_u32_t w[4];
};
template <>
struct alignas(8) ff_raw<8> {
    ff_u32_t w[2];
};
template <>
struct alignas(4) ff_raw<4> {
    ff_u32_t w[1];
};
template <>
struct alignas(2) ff_raw<2> {
    ff_u16_t w[1];
};

// K consecutive elements of storage type S, moved as one vector.
template <typename S, int K>
union ff_chunk {
    ff_raw<K * (int)sizeof(S)> raw;
    S e[K];
};

template <typename S, int K>
__device__ __forceinline__ ff_chunk<S, K> ff_ld(const S* p) {
    ff_chunk<S, K> c;
    c.raw = *reinterpret_cast<const ff_raw<K * (int)sizeof(S)>*>(p);
    return c;
}

template <typename S, int K>
__device__ __forceinline__ void ff_st(S* p, const ff_chunk<S, K>& c) {
    *reinterpret_cast<ff_raw<K * (int)sizeof(S)>*>(p) = c.raw;
}

template <typename T, bool TRADITIONAL, typename I, int V>
__global__ void rope(const typename T::storage* __restrict__ x,
                     ff_i64_t x_offset,
                     ff_i64_t stride_b,
                     ff_i64_t stride_h,
                     ff_i64_t stride_s,
                     typename T::storage* __restrict__ out,
                     ff_i64_t n_items,
                     int n_heads,
                     int seq,
                     int cols,
                     int half,
                     int pass,
                     int D,
                     const float* __restrict__ periods,
                     float log2_base,
                     float scale,
                     const ff_i64_t* __restrict__ offsets,
                     ff_i64_t offset) {
    typedef typename T::storage S;
    const int dims = 2 * half;
    const I count = (I)n_items;
    const I groups = (I)((n_heads + FF_ROPE_HEADS - 1) / FF_ROPE_HEADS);
    const I step = (I)gridDim.x * (I)blockDim.x;
    for (I item = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; item < count; item += step) {
        I rest = item;
        const int c0 = (int)(rest % (I)cols) * V;
        rest /= (I)cols;
        const int s = (int)(rest % (I)seq);
        rest /= (I)seq;
        const int h0 = (int)(rest % groups) * FF_ROPE_HEADS;
        const ff_i64_t b = (ff_i64_t)(rest / groups);
        const int h1 = min(h0 + FF_ROPE_HEADS, n_heads);

        const S* xb = x + x_offset + b * stride_b + (ff_i64_t)s * stride_s;
        S* ob = out + ((b * n_heads + h0) * (ff_i64_t)seq + s) * (ff_i64_t)D;
        const ff_i64_t out_head = (ff_i64_t)seq * D;

        if (c0 < half) {
            const ff_i64_t pos = (ff_i64_t)s + (offsets != nullptr ? offsets[b] : offset);
            float cs[V];
            float sn[V];
#pragma unroll
            for (int v = 0; v < V; ++v) {
                const int c = c0 + v;
                float inv;
                if (periods != nullptr) {
                    inv = 1.0f / periods[c];
                } else {
                    inv = exp2f(-((float)c / (float)half) * log2_base);
                }
                const float theta = (scale * (float)pos) * inv;
                sincosf(theta, &sn[v], &cs[v]);
            }
            for (int h = h0; h < h1; ++h) {
                const S* xr = xb + (ff_i64_t)h * stride_h;
                S* orow = ob + (ff_i64_t)(h - h0) * out_head;
                if constexpr (TRADITIONAL && V == 1) {
                    // One pair (2c, 2c + 1) read element by element: the pair need not be
                    // aligned as a vector (odd strides or offsets).
                    const float x1 = T::to_f32(xr[2 * c0]);
                    const float x2 = T::to_f32(xr[2 * c0 + 1]);
                    orow[2 * c0] = T::from_f32(x1 * cs[0] - x2 * sn[0]);
                    orow[2 * c0 + 1] = T::from_f32(x1 * sn[0] + x2 * cs[0]);
                } else if constexpr (TRADITIONAL) {
                    // Pairs (2c, 2c + 1) for c in [c0, c0 + V): 2V consecutive elements.
                    const ff_chunk<S, 2 * V> in = ff_ld<S, 2 * V>(xr + 2 * c0);
                    ff_chunk<S, 2 * V> o;
#pragma unroll
                    for (int v = 0; v < V; ++v) {
                        const float x1 = T::to_f32(in.e[2 * v]);
                        const float x2 = T::to_f32(in.e[2 * v + 1]);
                        o.e[2 * v] = T::from_f32(x1 * cs[v] - x2 * sn[v]);
                        o.e[2 * v + 1] = T::from_f32(x1 * sn[v] + x2 * cs[v]);
                    }
                    ff_st<S, 2 * V>(orow + 2 * c0, o);
                } else {
                    // Pairs (c, c + half): V consecutive elements in each half.
                    const ff_chunk<S, V> a = ff_ld<S, V>(xr + c0);
                    const ff_chunk<S, V> bb = ff_ld<S, V>(xr + c0 + half);
                    ff_chunk<S, V> o1;
                    ff_chunk<S, V> o2;
#pragma unroll
                    for (int v = 0; v < V; ++v) {
                        const float x1 = T::to_f32(a.e[v]);
                        const float x2 = T::to_f32(bb.e[v]);
                        o1.e[v] = T::from_f32(x1 * cs[v] - x2 * sn[v]);
                        o2.e[v] = T::from_f32(x1 * sn[v] + x2 * cs[v]);
                    }
                    ff_st<S, V>(orow + c0, o1);
                    ff_st<S, V>(orow + c0 + half, o2);
                }
            }
        }
        if (c0 < pass) {
            const int j = dims + c0;
            for (int h = h0; h < h1; ++h) {
                ff_st<S, V>(ob + (ff_i64_t)(h - h0) * out_head + j,
                            ff_ld<S, V>(xb + (ff_i64_t)h * stride_h + j));
            }
        }
    }
}
