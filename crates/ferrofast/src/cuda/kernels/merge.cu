// merge_attention_states for f32 / f16 / bf16 parts (T is a prelude tag: ff_f32, ff_f16,
// ff_bf16), and the f32 accumulation of the context-parallel backward.
//
// merge_states: the parts out_a, out_b (B, H, S, Dv) are read through four strides each
// (any views), their log-sum-exps (B, H, S) through three; the output (B, H, S, Dv) and
// the merged log-sum-exp (B, H, S) are row-major. Work items are (row, chunk) with the chunk
// fastest: item chunk c of a row handles the features j = c + e * chunks for
// e < FF_MERGE_V, so the threads of a warp touch neighbouring features at every step, and
// the row's factors are computed once per FF_MERGE_V features. Chunk 0 writes the row's
// log-sum-exp.
//
// Per row (ops/merge.rs, row_factors_f32, is the same sequence): m = max(la, lb) (NaN when
// either is NaN); m = -inf (both parts saw nothing) gives 0 and -inf; m = +inf gives NaN
// factors (a NaN row) and +inf; else
// w = exp(l - m) (0 when l - m < -87.3), c_a = w_a / (w_a + w_b), c_b = w_b / (w_a + w_b) and
// lse = m + log1p(w of the smaller part). A part whose factor is exactly 0 is not read, so
// whatever its row holds does not reach the result. All arithmetic f32, one rounding to T.
//
// merge_add: out = acc + x as f32, x (N0, N1, N2, N3) through four strides, acc (when not
// null) and out row-major f32.
//
// I is the index type: `int` when every item index fits in 31 bits, `long long` otherwise.
// Element offsets are always 64-bit.
#include "ferrofast_prelude.cuh"

#define FF_MERGE_V 4
// ops::merge::MIN_LOG_WEIGHT: a part further below the other gets weight exactly 0.
#define FF_MERGE_MIN_LOG_WEIGHT (-87.3f)

__device__ __forceinline__ void ff_merge_factors(float la, float lb, float& ca, float& cb,
                                                 float& lse) {
    const float nan = __int_as_float(0x7fc00000);
    const float neg_inf = __int_as_float(0xff800000);
    const bool any_nan = (la != la) || (lb != lb);
    const float m = any_nan ? nan : (la >= lb ? la : lb);
    if (m == neg_inf) {
        ca = 0.0f;
        cb = 0.0f;
        lse = neg_inf;
        return;
    }
    if (m == -neg_inf) {
        ca = nan;
        cb = nan;
        lse = -neg_inf;
        return;
    }
    const float wa = la - m < FF_MERGE_MIN_LOG_WEIGHT ? 0.0f : expf(la - m);
    const float wb = lb - m < FF_MERGE_MIN_LOG_WEIGHT ? 0.0f : expf(lb - m);
    const float s = wa + wb;
    lse = m + log1pf(la >= lb ? wb : wa);
    ca = wa / s;
    cb = wb / s;
}

template <typename T, typename I>
__global__ void merge_states(const typename T::storage* __restrict__ oa,
                             ff_i64_t oa_off,
                             ff_i64_t oa_s0,
                             ff_i64_t oa_s1,
                             ff_i64_t oa_s2,
                             ff_i64_t oa_s3,
                             const typename T::storage* __restrict__ ob,
                             ff_i64_t ob_off,
                             ff_i64_t ob_s0,
                             ff_i64_t ob_s1,
                             ff_i64_t ob_s2,
                             ff_i64_t ob_s3,
                             const float* __restrict__ la,
                             ff_i64_t la_off,
                             ff_i64_t la_s0,
                             ff_i64_t la_s1,
                             ff_i64_t la_s2,
                             const float* __restrict__ lb,
                             ff_i64_t lb_off,
                             ff_i64_t lb_s0,
                             ff_i64_t lb_s1,
                             ff_i64_t lb_s2,
                             typename T::storage* __restrict__ out,
                             float* __restrict__ lse,
                             I n_items,
                             I heads,
                             I seq,
                             int dv,
                             int chunks) {
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I item = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; item < n_items; item += stride) {
        const I row = item / chunks;
        const int c = (int)(item - row * chunks);
        const I s = row % seq;
        const I bh = row / seq;
        const I h = bh % heads;
        const I b = bh / heads;
        const float lva = la[la_off + (ff_i64_t)b * la_s0 + (ff_i64_t)h * la_s1 + (ff_i64_t)s * la_s2];
        const float lvb = lb[lb_off + (ff_i64_t)b * lb_s0 + (ff_i64_t)h * lb_s1 + (ff_i64_t)s * lb_s2];
        float ca, cb, l;
        ff_merge_factors(lva, lvb, ca, cb, l);
        if (c == 0) {
            lse[row] = l;
        }
        const ff_i64_t ra = oa_off + (ff_i64_t)b * oa_s0 + (ff_i64_t)h * oa_s1 + (ff_i64_t)s * oa_s2;
        const ff_i64_t rb = ob_off + (ff_i64_t)b * ob_s0 + (ff_i64_t)h * ob_s1 + (ff_i64_t)s * ob_s2;
        typename T::storage* orow = out + (ff_i64_t)row * dv;
#pragma unroll
        for (int e = 0; e < FF_MERGE_V; ++e) {
            const int j = c + e * chunks;
            if (j < dv) {
                const float pa = ca == 0.0f ? 0.0f : ca * T::to_f32(oa[ra + (ff_i64_t)j * oa_s3]);
                const float pb = cb == 0.0f ? 0.0f : cb * T::to_f32(ob[rb + (ff_i64_t)j * ob_s3]);
                orow[j] = T::from_f32(pa + pb);
            }
        }
    }
}

template <typename T, typename I>
__global__ void merge_add(const float* __restrict__ acc,
                          const typename T::storage* __restrict__ x,
                          ff_i64_t x_off,
                          ff_i64_t x_s0,
                          ff_i64_t x_s1,
                          ff_i64_t x_s2,
                          ff_i64_t x_s3,
                          I n1,
                          I n2,
                          I n3,
                          float* __restrict__ out,
                          I n) {
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < n; i += stride) {
        const I i3 = i % n3;
        const I r2 = i / n3;
        const I i2 = r2 % n2;
        const I r1 = r2 / n2;
        const I i1 = r1 % n1;
        const I i0 = r1 / n1;
        const float v = T::to_f32(x[x_off + (ff_i64_t)i0 * x_s0 + (ff_i64_t)i1 * x_s1 +
                                    (ff_i64_t)i2 * x_s2 + (ff_i64_t)i3 * x_s3]);
        out[i] = acc == 0 ? v : acc[i] + v;
    }
}
