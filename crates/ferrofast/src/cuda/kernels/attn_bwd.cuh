// The steps the attention backward kernels share (`attn_backward_mma.cu` on mma.sync,
// `attn_backward_sm90.cu` on wgmma): the recomputed probabilities, dS, and the stores of
// f32 accumulators, all on the m16n8k16 accumulator layout (which a wgmma accumulator has
// per warp). FlashAttention-2's recomputation in base-2 units, with lse2 = lse * log2(e):
//   P = 2^(scale * log2(e) * q k^T + mask * log2(e) - lse2),  dS = P * (dP - delta).
#pragma once
#include "ferrofast_mma.cuh"
#include "ferrofast_attn.cuh"

#define FF_BWD_DK 1
#define FF_BWD_DV 2
#define FF_BWD_POS_INF __int_as_float(0x7f800000)

// lse in base 2 for P = 2^(x - lse2): +inf for a row past T_q or a row that saw nothing
// (lse -inf), so its P is 0 for every key; NaN stays NaN.
__device__ __forceinline__ float ff_bwd_lse2(const float* lse, ff_i64_t row, bool in_range) {
    if (!in_range) {
        return FF_BWD_POS_INF;
    }
    const float l = lse[row];
    return l == FF_ATTN_NEG_INF ? FF_BWD_POS_INF : l * FF_ATTN_LOG2E;
}

// Calls f(ms, nb, i, value_of(query)) for every element [ms][nb][i] of one warp's MS slabs
// of 16 rows x NC columns, taking each query's value once, next to its elements (TRANS
// false: rows are queries, TRANS true: columns are; rows and columns as ff_bwd_probs').
template <int MS, int NC, bool TRANS, typename OF, typename F>
__device__ __forceinline__ void ff_bwd_each_query(int row0, int col0, OF value_of, F f) {
    if (TRANS) {
#pragma unroll
        for (int nb = 0; nb < NC / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float v = value_of(col0 + 8 * nb + e);
#pragma unroll
                for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        f(ms, nb, 2 * hf + e, v);
                    }
                }
            }
        }
    } else {
#pragma unroll
        for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float v = value_of(row0 + 16 * ms + 8 * hf);
#pragma unroll
                for (int nb = 0; nb < NC / 8; ++nb) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        f(ms, nb, 2 * hf + e, v);
                    }
                }
            }
        }
    }
}

// The scores of one warp's MS slabs of 16 rows x NC columns (mma accumulator layout) to
// probabilities in place. TRANS false: rows are queries, columns keys; TRANS true: rows
// keys, columns queries. `row0`: this lane's first row index (its rows are row0 + 16 ms +
// 8 hf); `col0`: its first column index (the others: col0 + 8 nb + e). `lse2_of(query)`
// gives a query's lse2. FULL: no element-wise mask applies (every key in range and
// visible, no array mask).
template <typename T, int MS, int NC, bool TRANS, typename LSE>
__device__ __forceinline__ void ff_bwd_probs(float (&s)[MS][NC / 8][4], int row0, int col0,
                                             bool full, const ff_attn_params& p,
                                             const void* mask_bh, float scale_log2,
                                             LSE lse2_of) {
    typedef typename T::storage S;
    if (full) {
        // Most tiles: one FMA and one exp2 an element, no branch.
        ff_bwd_each_query<MS, NC, TRANS>(row0, col0, lse2_of, [&](int ms, int nb, int i, float l) {
            s[ms][nb][i] = ff_exp2(s[ms][nb][i] * scale_log2 - l);
        });
        return;
    }
    const int diag = p.t_kv - p.t_q;
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = row0 + 16 * ms + 8 * hf;
#pragma unroll
            for (int nb = 0; nb < NC / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + 8 * nb + e;
                    const int qi = TRANS ? col : row;
                    const int kj = TRANS ? row : col;
                    const float l = lse2_of(qi);
                    float x = s[ms][nb][2 * hf + e] * scale_log2;
                    bool keep = kj < p.t_kv && qi < p.t_q && (!p.causal || kj <= qi + diag);
                    if (keep && p.mask_kind != FF_MASK_NONE) {
                        const ff_i64_t at = (ff_i64_t)qi * p.m_st + (ff_i64_t)kj * p.m_sk;
                        if (p.mask_kind == FF_MASK_BOOL) {
                            keep = ((const ff_u8_t*)mask_bh)[at] != 0;
                        } else {
                            // The forward's treatment of additive values.
                            x += ff_attn_mask_add(T::to_f32(((const S*)mask_bh)[at]));
                        }
                    }
                    x = keep ? x : FF_ATTN_NEG_INF;
                    s[ms][nb][2 * hf + e] = ff_exp2(x - l);
                }
            }
        }
    }
}

// dS = P * (dP - delta) in place of dP (0 where P is 0, whatever dP holds); rows and
// columns as ff_bwd_probs'.
template <int MS, int NC, bool TRANS, typename DELTA>
__device__ __forceinline__ void ff_bwd_ds(float (&dp)[MS][NC / 8][4],
                                          const float (&pr)[MS][NC / 8][4], int row0, int col0,
                                          DELTA delta_of) {
    ff_bwd_each_query<MS, NC, TRANS>(row0, col0, delta_of, [&](int ms, int nb, int i, float dl) {
        const float x = pr[ms][nb][i];
        dp[ms][nb][i] = x == 0.0f ? 0.0f : x * (dp[ms][nb][i] - dl);
    });
}

// Stores a warp's MS slabs of 16 rows x W accumulator (times `mul`) as T to rows
// row0 + 16 ms + 8 hf of `dst` (row pitch W), rows at or past `rows` skipped.
template <typename T, int MS, int W>
__device__ __forceinline__ void ff_bwd_store(typename T::storage* dst,
                                             const float (&acc)[MS][W / 8][4], int row0,
                                             int rows, float mul, int lane) {
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = row0 + 16 * ms + 8 * hf;
            if (row < rows) {
                ff_u32_t* out = (ff_u32_t*)(dst + (ff_i64_t)row * W) + (lane & 3);
#pragma unroll
                for (int db = 0; db < W / 8; ++db) {
                    out[db * 4] = ff_attn_mma<T>::pack(acc[ms][db][2 * hf] * mul,
                                                       acc[ms][db][2 * hf + 1] * mul);
                }
            }
        }
    }
}

