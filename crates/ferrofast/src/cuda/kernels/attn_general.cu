// General attention: any T_q, any head dims D and D_v, any strides (the feature axis
// included), every mask kind and sinks, for f32 / f16 / bf16 (T is a prelude tag) with f32
// math. Flash-style: tiles of keys stream through shared memory and an online softmax keeps a
// running max, sum and rescaled accumulator per query row, so nothing of size T_q x T_kv is
// ever stored.
//
// A block serves BQ query rows of one (batch, kv head) -- rows are (query head of the GQA
// group, query position) pairs, so the heads of a group share each key/value tile -- and one
// chunk of DVC output features (wider D_v takes several blocks, each recomputing the scores).
// Per key tile of BK keys: the scores are accumulated over D in chunks of DC features (q and
// k chunks in shared memory), masked, turned into weights; then the value tile's chunk is
// staged and P V accumulated in registers.
//
// Scores are in base-2 units (scale * log2(e); an additive mask and sinks times log2(e));
// a -inf score has weight 0; a row with no visible key and no sink is 0. When `lse` is not
// null, each row's natural-log log-sum-exp is written there (`[B, N_q, T_q]`, -inf for a
// row that sees nothing).
#include "ferrofast_attn.cuh"

#define FF_GEN_THREADS 128
#define FF_GEN_BQ 32
#define FF_GEN_BK 32
#define FF_GEN_DC 32
#define FF_GEN_DVC 128
#define FF_LOG2E 1.4426950408889634f
#define FF_NEG_INF (-__int_as_float(0x7f800000))

template <typename T>
__global__ void __launch_bounds__(FF_GEN_THREADS)
    attn_general(const typename T::storage* __restrict__ q,
                 const typename T::storage* __restrict__ k,
                 const typename T::storage* __restrict__ v,
                 const void* __restrict__ mask,
                 const typename T::storage* __restrict__ sinks,
                 typename T::storage* __restrict__ out,
                 float* __restrict__ lse,
                 ff_attn_params p) {
    typedef typename T::storage S;
    __shared__ float sq[FF_GEN_BQ][FF_GEN_DC + 1];
    __shared__ float sk[FF_GEN_BK][FF_GEN_DC + 1];
    __shared__ float sv[FF_GEN_BK][FF_GEN_DVC];
    __shared__ float sp[FF_GEN_BQ][FF_GEN_BK + 1];
    __shared__ float scorr[FF_GEN_BQ];
    __shared__ float sfin_m[FF_GEN_BQ];
    __shared__ float sfin_l[FF_GEN_BQ];
    __shared__ int sq_head[FF_GEN_BQ];
    __shared__ int sq_pos[FF_GEN_BQ];

    const int tid = threadIdx.x;
    ff_i64_t bx = blockIdx.x;
    const int dvc = (int)(bx % p.n_dv_chunks);
    bx /= p.n_dv_chunks;
    const int chunk = (int)(bx % p.n_row_chunks);
    bx /= p.n_row_chunks;
    const int kvh = (int)(bx % p.n_kv);
    const ff_i64_t b = bx / p.n_kv;
    const int rows_total = p.group * p.t_q;
    const int row0 = chunk * FF_GEN_BQ;
    const int n_rows = min(FF_GEN_BQ, rows_total - row0);
    const int n_q = p.n_kv * p.group;
    const int c0 = dvc * FF_GEN_DVC;

    if (tid < FF_GEN_BQ) {
        const int row = row0 + min(tid, n_rows - 1);
        sq_head[tid] = kvh * p.group + row / p.t_q;
        sq_pos[tid] = row % p.t_q;
    }
    __syncthreads();
    int t_max = 0;
    for (int r = 0; r < n_rows; ++r) {
        t_max = max(t_max, sq_pos[r]);
    }
    int end = p.t_kv;
    if (p.causal) {
        end = min(end, p.t_kv - p.t_q + t_max + 1);
    }

    // Score mapping: rows rg and rg + 16, keys kg + 8 * jj.
    const int rg = tid >> 3;
    const int kg = tid & 7;
    float m_run[2];
    float l_run[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = rg + 16 * i;
        m_run[i] = FF_NEG_INF;
        l_run[i] = 0.0f;
        if (p.has_sinks) {
            // The sink joins the softmax as a logit with no value: start the row from it.
            const float s = T::to_f32(sinks[p.s_off + (ff_i64_t)sq_head[r] * p.s_stride]);
            m_run[i] = s * FF_LOG2E;
            l_run[i] = m_run[i] == FF_NEG_INF ? 0.0f : 1.0f;
            // A sink of +inf makes the softmax inf / inf: start the row from NaN.
            if (m_run[i] == -FF_NEG_INF) {
                m_run[i] = __int_as_float(0x7fc00000);
            }
        }
    }
    // P V mapping: rows w + 4 * jr, features lane + 32 * ic of this block's chunk.
    const int warp = tid >> 5;
    const int lane = tid & 31;
    float acc[8][4];
#pragma unroll
    for (int jr = 0; jr < 8; ++jr) {
#pragma unroll
        for (int ic = 0; ic < 4; ++ic) {
            acc[jr][ic] = 0.0f;
        }
    }

    const S* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)kvh * p.k_sh;
    const S* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)kvh * p.v_sh;
    const S* qb = q + p.q_off + b * p.q_sb;

    for (int j0 = 0; j0 < end; j0 += FF_GEN_BK) {
        // The previous tile's weights and values are still being read.
        __syncthreads();
        float s[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                s[i][jj] = 0.0f;
            }
        }
        for (int d0 = 0; d0 < p.d; d0 += FF_GEN_DC) {
            if (d0 > 0) {
                __syncthreads();
            }
            for (int idx = tid; idx < FF_GEN_BQ * FF_GEN_DC; idx += FF_GEN_THREADS) {
                const int r = idx / FF_GEN_DC;
                const int dd = idx % FF_GEN_DC;
                float x = 0.0f;
                if (r < n_rows && d0 + dd < p.d) {
                    x = T::to_f32(qb[(ff_i64_t)sq_head[r] * p.q_sh + (ff_i64_t)sq_pos[r] * p.q_st +
                                     (ff_i64_t)(d0 + dd) * p.q_sd]);
                }
                sq[r][dd] = x * p.scale_log2;
            }
            for (int idx = tid; idx < FF_GEN_BK * FF_GEN_DC; idx += FF_GEN_THREADS) {
                const int kk = idx / FF_GEN_DC;
                const int dd = idx % FF_GEN_DC;
                float x = 0.0f;
                if (j0 + kk < end && d0 + dd < p.d) {
                    x = T::to_f32(kb[(ff_i64_t)(j0 + kk) * p.k_st + (ff_i64_t)(d0 + dd) * p.k_sd]);
                }
                sk[kk][dd] = x;
            }
            __syncthreads();
            const int dn = min(FF_GEN_DC, p.d - d0);
            for (int dd = 0; dd < dn; ++dd) {
                const float q0 = sq[rg][dd];
                const float q1 = sq[rg + 16][dd];
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    const float kx = sk[kg + 8 * jj][dd];
                    s[0][jj] = fmaf(q0, kx, s[0][jj]);
                    s[1][jj] = fmaf(q1, kx, s[1][jj]);
                }
            }
        }
        // Masks, then the online softmax update of rows rg and rg + 16.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = rg + 16 * i;
            const int h = sq_head[r];
            const int t = sq_pos[r];
            const ff_i64_t mrow =
                p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh + (ff_i64_t)t * p.m_st;
            float mt = m_run[i];
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const int j = j0 + kg + 8 * jj;
                float x = s[i][jj];
                if (r >= n_rows || j >= end || (p.causal && j > t + p.t_kv - p.t_q)) {
                    x = FF_NEG_INF;
                } else if (p.mask_kind == FF_MASK_BOOL) {
                    if (!static_cast<const ff_u8_t*>(mask)[mrow + (ff_i64_t)j * p.m_sk]) {
                        x = FF_NEG_INF;
                    }
                } else if (p.mask_kind == FF_MASK_ADD) {
                    x += T::to_f32(static_cast<const S*>(mask)[mrow + (ff_i64_t)j * p.m_sk]) *
                         FF_LOG2E;
                }
                s[i][jj] = x;
                mt = fmaxf(mt, x);
            }
            // The 8 lanes of a row are lanes kg = 0..7 of one aligned group of 8.
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) {
                mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
            }
            const float corr = m_run[i] == mt ? 1.0f : exp2f(m_run[i] - mt);
            float sum = 0.0f;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const float pr = s[i][jj] == FF_NEG_INF ? 0.0f : exp2f(s[i][jj] - mt);
                sp[r][kg + 8 * jj] = pr;
                sum += pr;
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, off);
            }
            l_run[i] = l_run[i] * corr + sum;
            m_run[i] = mt;
            if (kg == 0) {
                scorr[r] = corr;
            }
        }
        // Stage this block's chunk of the value tile.
        for (int idx = tid; idx < FF_GEN_BK * FF_GEN_DVC; idx += FF_GEN_THREADS) {
            const int kk = idx / FF_GEN_DVC;
            const int c = idx % FF_GEN_DVC;
            float x = 0.0f;
            if (j0 + kk < end && c0 + c < p.d_v) {
                x = T::to_f32(vb[(ff_i64_t)(j0 + kk) * p.v_st + (ff_i64_t)(c0 + c) * p.v_sd]);
            }
            sv[kk][c] = x;
        }
        __syncthreads();
#pragma unroll
        for (int jr = 0; jr < 8; ++jr) {
            const int r = warp + 4 * jr;
            const float corr = scorr[r];
#pragma unroll
            for (int ic = 0; ic < 4; ++ic) {
                acc[jr][ic] *= corr;
            }
        }
        const int kn = min(FF_GEN_BK, end - j0);
        for (int kk = 0; kk < kn; ++kk) {
            float vx[4];
#pragma unroll
            for (int ic = 0; ic < 4; ++ic) {
                vx[ic] = sv[kk][lane + 32 * ic];
            }
#pragma unroll
            for (int jr = 0; jr < 8; ++jr) {
                const float pr = sp[warp + 4 * jr][kk];
                // A key of weight 0 (masked, or underflowed) contributes nothing, even when
                // its value row holds NaN or an infinity; the branch is uniform per warp.
                if (pr != 0.0f) {
#pragma unroll
                    for (int ic = 0; ic < 4; ++ic) {
                        acc[jr][ic] = fmaf(pr, vx[ic], acc[jr][ic]);
                    }
                }
            }
        }
    }

    if (kg == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            sfin_m[rg + 16 * i] = m_run[i];
            sfin_l[rg + 16 * i] = l_run[i];
        }
    }
    __syncthreads();
#pragma unroll
    for (int jr = 0; jr < 8; ++jr) {
        const int r = warp + 4 * jr;
        if (r >= n_rows) {
            continue;
        }
        const float mm = sfin_m[r];
        const float ll = sfin_l[r];
        // Nothing visible: no weight at all (a NaN score makes the sum NaN, never 0).
        const bool empty = ll == 0.0f;
        const ff_i64_t orow = (b * n_q + sq_head[r]) * (ff_i64_t)p.t_q + sq_pos[r];
        if (lse != nullptr && dvc == 0 && lane == 0) {
            // Natural-log log-sum-exp of the row (scores are in base-2 units).
            lse[orow] = empty ? FF_NEG_INF : (mm + log2f(ll)) * 0.6931471805599453f;
        }
        S* op = out + orow * p.d_v;
#pragma unroll
        for (int ic = 0; ic < 4; ++ic) {
            const int c = c0 + lane + 32 * ic;
            if (c < p.d_v) {
                op[c] = T::from_f32(empty ? 0.0f : acc[jr][ic] / ll);
            }
        }
    }
}
