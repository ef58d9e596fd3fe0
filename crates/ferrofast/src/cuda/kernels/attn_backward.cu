// Attention backward on the SIMT cores, for every case the forward takes: any head dims,
// strided q / k / v, grouped-query heads, causal (lower-right) and bool / additive masks
// with broadcasting, sinks. f32 / f16 / bf16 (T is a prelude tag) with f32 math.
//
// FlashAttention-2's recomputation: with P = exp(scale * q k^T + mask - lse) rebuilt tile by
// tile from the forward's log-sum-exp, delta = rowsum(dO * O) and dS = P * (dO v^T - delta):
//   dV = P^T dO,  dK = scale * dS^T q,  dQ = scale * dS k,  dsink = -sum P_sink * delta.
// Nothing of size T_q x T_kv is stored. Three passes, each block owning what it writes, so
// results do not depend on scheduling and no atomics are used:
//   attn_bwd_delta   one warp per query row: delta.
//   attn_bwd_dkdv    one block per (batch, kv head, tile of TILE keys): sums dK and dV over
//                    every query row of the group's query heads (GQA reduced here, K and V
//                    never copied per query head), query tiles streaming through shared
//                    memory; under a causal mask the query tiles that see none of its keys
//                    are skipped.
//   attn_bwd_dq      one block per (batch, query head, tile of TILE queries): sums dQ over
//                    the key tiles the queries see.
//   attn_bwd_dsinks  one block per query head: the sink's gradient, a fixed-order sum.
// q, k, v, the mask and the sinks are read through `ff_attn_params` (the forward's layout);
// out, d_out and lse are row-major ([B, N_q, T_q, D_v], [B, N_q, T_q]); dq, dk, dv are
// written row-major in T.
#include "ferrofast_attn.cuh"

#define FF_BWD_THREADS 128
#define FF_BWD_LOG2E 1.4426950408889634f
#define FF_BWD_NEG_INF (-__int_as_float(0x7f800000))

// delta[row] = sum_c out[row, c] * d_out[row, c], one warp per row (four rows per block).
template <typename T>
__global__ void __launch_bounds__(FF_BWD_THREADS)
    attn_bwd_delta(const typename T::storage* __restrict__ out,
                   const typename T::storage* __restrict__ d_out, float* __restrict__ delta,
                   ff_i64_t rows, int dv) {
    const ff_i64_t row = (ff_i64_t)blockIdx.x * (FF_BWD_THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) {
        return;
    }
    float sum = 0.0f;
    for (int c = lane; c < dv; c += 32) {
        sum = fmaf(T::to_f32(out[row * dv + c]), T::to_f32(d_out[row * dv + c]), sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    if (lane == 0) {
        delta[row] = sum;
    }
}

// The shared-memory tiles of one (query tile, key tile) pair. Rows are padded by one float
// so that threads reading different rows of one column hit different banks.
struct ff_bwd_tiles {
    float* q;      // [TILE][d + 1]: q * scale
    float* g;      // [TILE][d_v + 1]: d_out
    float* k;      // [TILE][d + 1]
    float* v;      // [TILE][d_v + 1]
    float* p;      // [TILE][TILE + 1]: probabilities
    float* ds;     // [TILE][TILE + 1]: dS
    float* lse;    // [TILE]: lse * log2(e)
    float* delta;  // [TILE]
    float* acc;    // dK and dV ([TILE][d], [TILE][d_v]) or dQ ([TILE][d])
};

template <int TILE>
__device__ __forceinline__ ff_bwd_tiles ff_bwd_carve(float* smem, int d, int dv) {
    ff_bwd_tiles t;
    t.q = smem;
    t.g = t.q + TILE * (d + 1);
    t.k = t.g + TILE * (dv + 1);
    t.v = t.k + TILE * (d + 1);
    t.p = t.v + TILE * (dv + 1);
    t.ds = t.p + TILE * (TILE + 1);
    t.lse = t.ds + TILE * (TILE + 1);
    t.delta = t.lse + TILE;
    t.acc = t.delta + TILE;
    return t;
}

// Loads rows t0 .. t0 + TILE of a strided [len]-feature head (rows past `t_end` are 0),
// times `mul`, into `dst` (row pitch len + 1).
template <typename T, int TILE>
__device__ __forceinline__ void ff_bwd_load(float* dst, const typename T::storage* base,
                                            ff_i64_t st, ff_i64_t sd, int t0, int t_end,
                                            int len, float mul) {
    for (int idx = threadIdx.x; idx < TILE * len; idx += FF_BWD_THREADS) {
        const int r = idx / len;
        const int c = idx % len;
        float x = 0.0f;
        if (t0 + r < t_end) {
            x = T::to_f32(base[(ff_i64_t)(t0 + r) * st + (ff_i64_t)c * sd]) * mul;
        }
        dst[r * (len + 1) + c] = x;
    }
}

// Loads the query-side tiles of head (b, h), queries q0 .. q0 + TILE: q * scale, d_out, and
// the rows' lse (base 2) and delta.
template <typename T, int TILE>
__device__ __forceinline__ void ff_bwd_load_queries(
    const ff_bwd_tiles& t, const typename T::storage* q, const typename T::storage* d_out,
    const float* lse, const float* delta, const ff_attn_params& p, float scale, ff_i64_t b,
    int h, int q0) {
    const int n_q = p.n_kv * p.group;
    ff_bwd_load<T, TILE>(t.q, q + p.q_off + b * p.q_sb + (ff_i64_t)h * p.q_sh, p.q_st, p.q_sd,
                         q0, p.t_q, p.d, scale);
    const ff_i64_t row0 = ((ff_i64_t)b * n_q + h) * p.t_q;
    ff_bwd_load<T, TILE>(t.g, d_out + row0 * p.d_v, p.d_v, 1, q0, p.t_q, p.d_v, 1.0f);
    for (int r = threadIdx.x; r < TILE; r += FF_BWD_THREADS) {
        const bool in = q0 + r < p.t_q;
        t.lse[r] = in ? lse[row0 + q0 + r] * FF_BWD_LOG2E : FF_BWD_NEG_INF;
        t.delta[r] = in ? delta[row0 + q0 + r] : 0.0f;
    }
}

// P and dS of the loaded query tile (head h, queries q0 ..) against the loaded key tile
// (keys k0 ..): a key the forward hid (causal, bool mask, -inf) and a row that saw nothing
// (lse -inf) have P = dS = 0.
template <typename T, int TILE>
__device__ __forceinline__ void ff_bwd_p_ds(const ff_bwd_tiles& t, const void* mask,
                                            const ff_attn_params& p, ff_i64_t b, int h, int q0,
                                            int k0) {
    typedef typename T::storage S;
    const int d = p.d;
    const int dv = p.d_v;
    for (int e = threadIdx.x; e < TILE * TILE; e += FF_BWD_THREADS) {
        const int i = e / TILE;
        const int kk = e % TILE;
        const int qi = q0 + i;
        const int kj = k0 + kk;
        float pr = 0.0f;
        float ds = 0.0f;
        bool visible = qi < p.t_q && kj < p.t_kv && t.lse[i] != FF_BWD_NEG_INF &&
                       (!p.causal || kj <= qi + p.t_kv - p.t_q);
        float s = 0.0f;
        if (visible) {
            const float* qr = t.q + i * (d + 1);
            const float* kr = t.k + kk * (d + 1);
            for (int c = 0; c < d; ++c) {
                s = fmaf(qr[c], kr[c], s);
            }
            s *= FF_BWD_LOG2E;
            const ff_i64_t m = p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh +
                               (ff_i64_t)qi * p.m_st + (ff_i64_t)kj * p.m_sk;
            if (p.mask_kind == FF_MASK_BOOL) {
                visible = static_cast<const ff_u8_t*>(mask)[m] != 0;
            } else if (p.mask_kind == FF_MASK_ADD) {
                s += T::to_f32(static_cast<const S*>(mask)[m]) * FF_BWD_LOG2E;
            }
            visible = visible && s != FF_BWD_NEG_INF;
        }
        if (visible) {
            pr = exp2f(s - t.lse[i]);
            const float* gr = t.g + i * (dv + 1);
            const float* vr = t.v + kk * (dv + 1);
            float dp = 0.0f;
            for (int c = 0; c < dv; ++c) {
                dp = fmaf(gr[c], vr[c], dp);
            }
            ds = pr * (dp - t.delta[i]);
        }
        t.p[i * (TILE + 1) + kk] = pr;
        t.ds[i * (TILE + 1) + kk] = ds;
    }
}

template <typename T, int TILE>
__global__ void __launch_bounds__(FF_BWD_THREADS)
    attn_bwd_dkdv(const typename T::storage* __restrict__ q,
                  const typename T::storage* __restrict__ k,
                  const typename T::storage* __restrict__ v, const void* __restrict__ mask,
                  const typename T::storage* __restrict__ sinks,
                  const typename T::storage* __restrict__ d_out,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  typename T::storage* __restrict__ dk, typename T::storage* __restrict__ dv,
                  const ff_attn_params p, float scale) {
    extern __shared__ float ff_bwd_smem[];
    const int d = p.d;
    const int d_v = p.d_v;
    const ff_bwd_tiles t = ff_bwd_carve<TILE>(ff_bwd_smem, d, d_v);
    float* acc_k = t.acc;
    float* acc_v = t.acc + TILE * d;
    const int n_k_tiles = (p.t_kv + TILE - 1) / TILE;
    ff_i64_t bx = blockIdx.x;
    const int k0 = (int)(bx % n_k_tiles) * TILE;
    bx /= n_k_tiles;
    const int g = (int)(bx % p.n_kv);
    const ff_i64_t b = bx / p.n_kv;

    ff_bwd_load<T, TILE>(t.k, k + p.k_off + b * p.k_sb + (ff_i64_t)g * p.k_sh, p.k_st, p.k_sd,
                         k0, p.t_kv, d, 1.0f);
    ff_bwd_load<T, TILE>(t.v, v + p.v_off + b * p.v_sb + (ff_i64_t)g * p.v_sh, p.v_st, p.v_sd,
                         k0, p.t_kv, d_v, 1.0f);
    for (int e = threadIdx.x; e < TILE * (d + d_v); e += FF_BWD_THREADS) {
        t.acc[e] = 0.0f;
    }
    // Causal: query i sees key j iff j <= i + T_kv - T_q, so queries below k0 - (T_kv - T_q)
    // see none of these keys.
    int q_first = 0;
    if (p.causal) {
        q_first = max(0, k0 - (p.t_kv - p.t_q));
        q_first = (q_first / TILE) * TILE;
    }
    for (int h = g * p.group; h < (g + 1) * p.group; ++h) {
        for (int q0 = q_first; q0 < p.t_q; q0 += TILE) {
            __syncthreads();  // the previous tile's P and dS are still being read
            ff_bwd_load_queries<T, TILE>(t, q, d_out, lse, delta, p, scale, b, h, q0);
            __syncthreads();
            ff_bwd_p_ds<T, TILE>(t, mask, p, b, h, q0, k0);
            __syncthreads();
            // dK[kk, c] += sum_i dS[i, kk] * (scale q)[i, c]; dV[kk, c] += sum_i P[i, kk] g[i, c].
            for (int e = threadIdx.x; e < TILE * d; e += FF_BWD_THREADS) {
                const int kk = e / d;
                const int c = e % d;
                float a = acc_k[e];
                for (int i = 0; i < TILE; ++i) {
                    a = fmaf(t.ds[i * (TILE + 1) + kk], t.q[i * (d + 1) + c], a);
                }
                acc_k[e] = a;
            }
            for (int e = threadIdx.x; e < TILE * d_v; e += FF_BWD_THREADS) {
                const int kk = e / d_v;
                const int c = e % d_v;
                float a = acc_v[e];
                for (int i = 0; i < TILE; ++i) {
                    a = fmaf(t.p[i * (TILE + 1) + kk], t.g[i * (d_v + 1) + c], a);
                }
                acc_v[e] = a;
            }
        }
    }
    const ff_i64_t row0 = ((ff_i64_t)b * p.n_kv + g) * p.t_kv + k0;
    const int n_keys = min(TILE, p.t_kv - k0);
    for (int e = threadIdx.x; e < n_keys * d; e += FF_BWD_THREADS) {
        dk[row0 * d + e] = T::from_f32(acc_k[e]);
    }
    for (int e = threadIdx.x; e < n_keys * d_v; e += FF_BWD_THREADS) {
        dv[row0 * d_v + e] = T::from_f32(acc_v[e]);
    }
}

template <typename T, int TILE>
__global__ void __launch_bounds__(FF_BWD_THREADS)
    attn_bwd_dq(const typename T::storage* __restrict__ q,
                const typename T::storage* __restrict__ k,
                const typename T::storage* __restrict__ v, const void* __restrict__ mask,
                const typename T::storage* __restrict__ sinks,
                const typename T::storage* __restrict__ d_out, const float* __restrict__ lse,
                const float* __restrict__ delta, typename T::storage* __restrict__ dq,
                const ff_attn_params p, float scale) {
    extern __shared__ float ff_bwd_smem[];
    const int d = p.d;
    const int d_v = p.d_v;
    const ff_bwd_tiles t = ff_bwd_carve<TILE>(ff_bwd_smem, d, d_v);
    const int n_q = p.n_kv * p.group;
    const int n_q_tiles = (p.t_q + TILE - 1) / TILE;
    ff_i64_t bx = blockIdx.x;
    const int q0 = (int)(bx % n_q_tiles) * TILE;
    bx /= n_q_tiles;
    const int h = (int)(bx % n_q);
    const ff_i64_t b = bx / n_q;
    const int g = h / p.group;

    ff_bwd_load_queries<T, TILE>(t, q, d_out, lse, delta, p, scale, b, h, q0);
    for (int e = threadIdx.x; e < TILE * d; e += FF_BWD_THREADS) {
        t.acc[e] = 0.0f;
    }
    // Causal: the tile's last query sees keys up to q0 + TILE - 1 + T_kv - T_q.
    int k_end = p.t_kv;
    if (p.causal) {
        k_end = max(0, min(k_end, q0 + TILE + p.t_kv - p.t_q));
    }
    const typename T::storage* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)g * p.k_sh;
    const typename T::storage* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)g * p.v_sh;
    for (int k0 = 0; k0 < k_end; k0 += TILE) {
        __syncthreads();  // the previous key tile and dS are still being read
        ff_bwd_load<T, TILE>(t.k, kb, p.k_st, p.k_sd, k0, p.t_kv, d, 1.0f);
        ff_bwd_load<T, TILE>(t.v, vb, p.v_st, p.v_sd, k0, p.t_kv, d_v, 1.0f);
        __syncthreads();
        ff_bwd_p_ds<T, TILE>(t, mask, p, b, h, q0, k0);
        __syncthreads();
        // dQ[i, c] += sum_kk dS[i, kk] * k[kk, c].
        for (int e = threadIdx.x; e < TILE * d; e += FF_BWD_THREADS) {
            const int i = e / d;
            const int c = e % d;
            float a = t.acc[e];
            for (int kk = 0; kk < TILE; ++kk) {
                a = fmaf(t.ds[i * (TILE + 1) + kk], t.k[kk * (d + 1) + c], a);
            }
            t.acc[e] = a;
        }
    }
    __syncthreads();
    const ff_i64_t row0 = ((ff_i64_t)b * n_q + h) * p.t_q + q0;
    const int n_rows = min(TILE, p.t_q - q0);
    for (int e = threadIdx.x; e < n_rows * d; e += FF_BWD_THREADS) {
        dq[row0 * d + e] = T::from_f32(t.acc[e] * scale);
    }
}

// dsinks[h] = -sum over batch b and query i of exp(sink_h - lse) * delta (rows that saw
// nothing add 0), one block per head, summed in double in a fixed order.
template <typename T>
__global__ void __launch_bounds__(FF_BWD_THREADS)
    attn_bwd_dsinks(const typename T::storage* __restrict__ sinks,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    float* __restrict__ dsinks, const ff_attn_params p, int batch) {
    __shared__ double part[FF_BWD_THREADS];
    const int h = blockIdx.x;
    const int n_q = p.n_kv * p.group;
    const float sink = T::to_f32(sinks[p.s_off + (ff_i64_t)h * p.s_stride]);
    double sum = 0.0;
    const ff_i64_t n = (ff_i64_t)batch * p.t_q;
    for (ff_i64_t e = threadIdx.x; e < n; e += FF_BWD_THREADS) {
        const ff_i64_t b = e / p.t_q;
        const ff_i64_t row = (b * n_q + h) * p.t_q + e % p.t_q;
        const float l = lse[row];
        if (l != FF_BWD_NEG_INF) {
            sum += (double)expf(sink - l) * (double)delta[row];
        }
    }
    part[threadIdx.x] = sum;
    __syncthreads();
    for (int w = FF_BWD_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) {
            part[threadIdx.x] += part[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        dsinks[h] = (float)(-part[0]);
    }
}
