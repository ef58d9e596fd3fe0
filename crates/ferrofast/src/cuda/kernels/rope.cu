// Rotary positional embedding forward for f32 / f16 / bf16 (T is a prelude tag: ff_f32,
// ff_f16, ff_bf16).
//
// Layout: x is read as (B, H, S, D) (S positions) through three strides in elements (batch,
// head, position; the last axis has stride 1), so row-contiguous inputs and [B, S, H, D]
// memory viewed as [B, H, S, D] are used in place. The output is row-major (B, H, S, D).
//
// Work items: (b, head group, s, column c) with the column fastest, so neighbouring threads
// touch neighbouring features. Column c < dims/2 rotates pair c; column c < D - dims copies
// pass-through feature dims + c bit for bit. Each item serves up to FF_ROPE_HEADS heads with
// one cos/sin evaluation.
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

template <typename T, bool TRADITIONAL, typename I>
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
        const int c = (int)(rest % (I)cols);
        rest /= (I)cols;
        const int s = (int)(rest % (I)seq);
        rest /= (I)seq;
        const int h0 = (int)(rest % groups) * FF_ROPE_HEADS;
        const ff_i64_t b = (ff_i64_t)(rest / groups);
        const int h1 = min(h0 + FF_ROPE_HEADS, n_heads);

        const S* xb = x + x_offset + b * stride_b + (ff_i64_t)s * stride_s;
        S* ob = out + ((b * n_heads + h0) * (ff_i64_t)seq + s) * (ff_i64_t)D;
        const ff_i64_t out_head = (ff_i64_t)seq * D;

        if (c < half) {
            float inv;
            if (periods != nullptr) {
                inv = 1.0f / periods[c];
            } else {
                inv = exp2f(-((float)c / (float)half) * log2_base);
            }
            const ff_i64_t pos = (ff_i64_t)s + (offsets != nullptr ? offsets[b] : offset);
            const float theta = (scale * (float)pos) * inv;
            float sn;
            float cs;
            sincosf(theta, &sn, &cs);
            const int j1 = TRADITIONAL ? 2 * c : c;
            const int j2 = TRADITIONAL ? 2 * c + 1 : c + half;
            for (int h = h0; h < h1; ++h) {
                const S* xr = xb + (ff_i64_t)h * stride_h;
                S* orow = ob + (ff_i64_t)(h - h0) * out_head;
                const float x1 = T::to_f32(xr[j1]);
                const float x2 = T::to_f32(xr[j2]);
                orow[j1] = T::from_f32(x1 * cs - x2 * sn);
                orow[j2] = T::from_f32(x1 * sn + x2 * cs);
            }
        }
        if (c < pass) {
            const int j = dims + c;
            for (int h = h0; h < h1; ++h) {
                ob[(ff_i64_t)(h - h0) * out_head + j] = xb[(ff_i64_t)h * stride_h + j];
            }
        }
    }
}
