// The chunked (WY) form of the gated delta rule forward on tensor cores, for bf16 q, k, v
// (ops/gated_delta.rs has the recurrence; cpu/gated_delta/chunked.rs derives this form and
// is its CPU twin). Per chunk of 64 steps with S the state at its start, Γ(t, j) the
// product of the decays of steps j+1 ..= t and G_t = Γ(t, start):
//   (I + L) Δ = diag(β) (V - diag(G) K S^T),   L_tj = β_t Γ(t, j) k_t · k_j  (j < t)
//   M = (I + L)^{-1},  U = M diag(β) V,  W = M diag(β G) K,  Δ = U - W S^T
//   out_t = G_t S q_t + Σ_{j<=t} Γ(t, j) (q_t · k_j) Δ_j
//   S'    = Γ(end, start) S + Σ_j (Γ(end, j) Δ_j) k_j^T
//
// gdc_prep: a block per (chunk, batch · value head), every chunk in parallel. Loads the
//   chunk's K, Q, V (bf16) into shared memory, forms the decay products exactly (prefix sums
//   of ln |γ| over the non-zero decays, the last zero and the sign), K K^T and Q K^T on
//   tensor cores, inverts I + L in place in 16 x 16 blocks, and writes W and U (bf16, products on tensor cores with f32 sums), the
//   Γ-weighted Q K^T (bf16) and the per-step factors (f32).
// gdc_state: a block per (batch · value head, 16 NW value rows); warp w owns 16 rows of the
//   state, all of Dk, as f32 mma accumulators. It walks the chunks in order with the next
//   chunk's W, Q, K, U tile and Q K^T double-buffered in shared memory (cp.async): Δ = U - W
//   S^T and Q S^T with S's fragments as the B operand, out = G ⊙ Q S^T + (ΓQK^T) Δ, and
//   S' = Γ(end, start) S + (Γ(end, ·) ⊙ Δ)^T K, Δ passing through a warp-private tile of
//   shared memory (bf16) for its two transposed uses.
//
// A masked-out step is a step with decay 1, β 0 and zero q, k, v (its inputs are not read;
// rows of the loaded tiles are zeroed) whose output is 0. Layouts (row-major, contiguous):
//   q, k [B, T, Hk, DK] bf16; v, out [B, T, Hv, DV] bf16; gamma, beta [B, T, Hv] TG;
//   mask [B, T] f32 (nonzero = taken) or null; state0, state [B, Hv, DV, DK] f32 (state0
//   may be null: zeros). Workspace per (batch · value head, chunk): W [64, DK], U [64, DV],
//   QK [64, 64] bf16, and 256 f32 factors: G_t, Γ(end, t), taken (1 / 0) for the 64 steps,
//   then Γ(end, start).
#include "ferrofast_mma.cuh"

#define FF_GDC_C 64
#define FF_GDC_F 256

struct ff_gdc_params {
    ff_i64_t t;     // steps
    int hk;         // key heads
    int hv;         // value heads
    int group;      // hv / hk
    int n_chunks;   // ceil(t / 64)
};

typedef ff_u16_t ff_gdc_u16;

// Γ(t, j) for -1 <= j <= t from the chunk's prefix arrays.
__device__ __forceinline__ float ff_gdc_between(const float* lg, const int* zr, const int* ng,
                                                int t, int j) {
    if (zr[t] > j) {
        return 0.0f;
    }
    const float l = j < 0 ? 0.0f : lg[j];
    const int n = j < 0 ? 0 : ng[j];
    const float m = expf(lg[t] - l);
    return (ng[t] ^ n) ? -m : m;
}

// The chunk's per-step factors, thread tid < 64 for step tid: the decay (1 for a step not
// taken or past the end), β (0 then), whether the step is taken (1 / 0) and ln |decay|
// (0 for a zero decay). Steps start at row bt0 of the [B T] rows of head h of hv.
template <typename TG>
__device__ __forceinline__ void ff_gdc_load_steps(const typename TG::storage* gamma,
                                                  const typename TG::storage* beta,
                                                  const float* mask, ff_i64_t bt0, int hv, int h,
                                                  int n, int tid, float* g, float* bt, float* tk,
                                                  float* lg) {
    if (tid < FF_GDC_C) {
        const bool valid = tid < n;
        const bool taken = valid && (mask == nullptr || mask[bt0 + tid] != 0.0f);
        const ff_i64_t at = (bt0 + tid) * hv + h;
        g[tid] = taken ? TG::to_f32(gamma[at]) : 1.0f;
        bt[tid] = taken ? TG::to_f32(beta[at]) : 0.0f;
        tk[tid] = taken ? 1.0f : 0.0f;
        const float x = g[tid];
        lg[tid] = x == 0.0f ? 0.0f : logf(fabsf(x));
    }
}

// The decays' prefix arrays over the chunk, in step order (the CPU's order), once g and lg of
// ff_gdc_load_steps are visible to the block: lg[t] becomes the sum of ln |decay| over the
// non-zero decays of steps 0 ..= t, zr[t] the last step <= t with a zero decay (-1: none),
// ng[t] the parity of the negative decays. Ends with the block synchronised.
__device__ __forceinline__ void ff_gdc_prefixes(const float* g, float* lg, int* zr, int* ng,
                                                int tid) {
    float my_log = 0.0f;
    int my_zero = -1;
    int my_neg = 0;
    if (tid < FF_GDC_C) {
        for (int m = 0; m <= tid; ++m) {
            const float x = g[m];
            if (x == 0.0f) {
                my_zero = m;
            } else {
                my_log += lg[m];
                my_neg ^= x < 0.0f ? 1 : 0;
            }
        }
    }
    __syncthreads();
    if (tid < FF_GDC_C) {
        lg[tid] = my_log;
        zr[tid] = my_zero;
        ng[tid] = my_neg;
    }
    __syncthreads();
}

// Zeroes the rows r < 64 of a [64, COLS] bf16 tile (row stride STRIDE) whose step is not
// taken (taken[r] == 0).
template <int COLS, int STRIDE, int NT>
__device__ __forceinline__ void ff_gdc_zero_rows(ff_gdc_u16* s, const float* taken, int tid) {
    constexpr int CH = COLS / 8;
    for (int c = tid; c < FF_GDC_C * CH; c += NT) {
        const int r = c / CH;
        if (taken[r] == 0.0f) {
            *reinterpret_cast<ff_vec16*>(s + r * STRIDE + (c % CH) * 8) = ff_vec16{{0, 0, 0, 0}};
        }
    }
}

// Stores a warp's 16 x (8 NB) f32 accumulator rows as bf16 pairs at row `r0 + lane / 4`
// (and + 8) of a row-major array with `stride` elements a row; rows >= rows_valid skipped.
template <int NB>
__device__ __forceinline__ void ff_gdc_store_acc(ff_gdc_u16* g, ff_i64_t stride,
                                                 const float (&acc)[NB][4], int r0,
                                                 int rows_valid, int lane) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = r0 + (lane >> 2) + 8 * hf;
        if (r < rows_valid) {
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                const ff_u32_t v = ff_attn_mma<ff_bf16>::pack(acc[nb][2 * hf], acc[nb][2 * hf + 1]);
                *reinterpret_cast<ff_u32_t*>(g + r * stride + nb * 8 + 2 * (lane & 3)) = v;
            }
        }
    }
}

template <typename TG, int DK, int DV>
__global__ void __launch_bounds__(128)
    gdc_prep(const ff_gdc_u16* __restrict__ q, const ff_gdc_u16* __restrict__ k,
             const ff_gdc_u16* __restrict__ v, const typename TG::storage* __restrict__ gamma,
             const typename TG::storage* __restrict__ beta, const float* __restrict__ mask,
             ff_gdc_u16* __restrict__ w_out, ff_gdc_u16* __restrict__ u_out,
             ff_gdc_u16* __restrict__ qk_out, float* __restrict__ f_out,
             float* __restrict__ m_out, ff_gdc_params p) {
    constexpr int C = FF_GDC_C;
    constexpr int KS = DK + 8;
    constexpr int VS = DV + 8;
    constexpr int LS = C + 1;
    extern __shared__ __align__(16) unsigned char ff_smem[];
    ff_gdc_u16* ks = reinterpret_cast<ff_gdc_u16*>(ff_smem);
    ff_gdc_u16* qs = ks + C * KS;
    ff_gdc_u16* vs = qs + C * KS;
    float* lm = reinterpret_cast<float*>(vs + C * VS);   // L, then M in place, [C][LS]
    float* xt = lm + C * LS;                              // [3][16][16] solve scratch
    float* g = xt + 3 * 256;                              // decay (1 when not taken)
    float* bt = g + C;                                    // beta (0 when not taken)
    float* tk = bt + C;                                   // taken
    float* lg = tk + C;                                   // prefix of ln |decay|
    float* gs = lg + C;                                   // G_t
    int* zr = reinterpret_cast<int*>(gs + C);             // last zero decay
    int* ng = zr + C;                                     // sign parity

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int chunk = blockIdx.x;
    const int bh = blockIdx.y;
    const int b = bh / p.hv;
    const int h = bh % p.hv;
    const int kh = h / p.group;
    const ff_i64_t t0 = (ff_i64_t)chunk * C;
    const int n = (int)min((ff_i64_t)C, p.t - t0);
    const ff_i64_t bt0 = (ff_i64_t)b * p.t + t0;

    ff_load_tile<ff_gdc_u16, C, DK, KS, 128>(ks, k + (bt0 * p.hk + kh) * DK,
                                              (ff_i64_t)p.hk * DK, n, tid);
    ff_load_tile<ff_gdc_u16, C, DK, KS, 128>(qs, q + (bt0 * p.hk + kh) * DK,
                                              (ff_i64_t)p.hk * DK, n, tid);
    ff_load_tile<ff_gdc_u16, C, DV, VS, 128>(vs, v + (bt0 * p.hv + h) * DV,
                                              (ff_i64_t)p.hv * DV, n, tid);
    ff_cp_async_commit();
    ff_gdc_load_steps<TG>(gamma, beta, mask, bt0, p.hv, h, n, tid, g, bt, tk, lg);
    ff_cp_async_wait<0>();
    __syncthreads();
    if (mask != nullptr) {
        ff_gdc_zero_rows<DK, KS, 128>(ks, tk, tid);
        ff_gdc_zero_rows<DK, KS, 128>(qs, tk, tid);
        ff_gdc_zero_rows<DV, VS, 128>(vs, tk, tid);
    }
    ff_gdc_prefixes(g, lg, zr, ng, tid);
    const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;
    if (tid < C) {
        const float gst = ff_gdc_between(lg, zr, ng, tid, -1);
        gs[tid] = gst;
        float* f = f_out + wk * FF_GDC_F;
        f[tid] = gst;
        f[C + tid] = tid < n ? ff_gdc_between(lg, zr, ng, n - 1, tid) : 0.0f;
        f[2 * C + tid] = tk[tid];
        f[3 * C + tid] = tid == 0 ? ff_gdc_between(lg, zr, ng, n - 1, -1) : 0.0f;
    }

    // K K^T and Q K^T for this warp's 16 rows.
    const ff_u32_t ks_a = ff_smem_u32(ks);
    const ff_u32_t qs_a = ff_smem_u32(qs);
    {
        float skk[1][C / 8][4];
        float sqk[1][C / 8][4];
        ff_attn_scores<ff_bf16, DK, 1, C, KS, KS>(skk, ks_a + (ff_u32_t)(16 * warp * KS * 2),
                                                  ks_a, lane);
        ff_attn_scores<ff_bf16, DK, 1, C, KS, KS>(sqk, qs_a + (ff_u32_t)(16 * warp * KS * 2),
                                                  ks_a, lane);
        ff_gdc_u16* qk = qk_out + wk * C * C;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int t = 16 * warp + (lane >> 2) + 8 * hf;
#pragma unroll
            for (int nb = 0; nb < C / 8; ++nb) {
                float o[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = nb * 8 + 2 * (lane & 3) + e;
                    const float gtj = j <= t ? ff_gdc_between(lg, zr, ng, t, j) : 0.0f;
                    lm[t * LS + j] = j < t ? bt[t] * gtj * skk[0][nb][2 * hf + e] : 0.0f;
                    o[e] = j <= t ? gtj * sqk[0][nb][2 * hf + e] : 0.0f;
                }
                *reinterpret_cast<ff_u32_t*>(qk + t * C + nb * 8 + 2 * (lane & 3)) =
                    ff_attn_mma<ff_bf16>::pack(o[0], o[1]);
            }
        }
    }
    __syncthreads();
    // M = (I + L)^{-1} in place over L, in 16 x 16 blocks (L is strictly lower, so M is unit
    // lower triangular). First each warp inverts one diagonal block by forward substitution
    // (lane c < 16 owns column c in registers); then block row i = 1, 2, 3 in turn:
    // M_ij = -M_ii Σ_{k=j}^{i-1} L_ik M_kj for j < i (the rows above are M by then).
    if (lane < 16) {
        const int c = lane;
        const float* lb = lm + 16 * warp * LS + 16 * warp;
        float col[16];
#pragma unroll
        for (int t = 0; t < 16; ++t) {
            float acc = t == c ? 1.0f : 0.0f;
#pragma unroll
            for (int j = 0; j < t; ++j) {
                acc = fmaf(-lb[t * LS + j], col[j], acc);
            }
            col[t] = t < c ? 0.0f : acc;
        }
        __syncwarp(0xffffu);
        float* mb = lm + 16 * warp * LS + 16 * warp;
#pragma unroll
        for (int t = 0; t < 16; ++t) {
            mb[t * LS + c] = col[t];
        }
    }
    for (int i = 1; i < 4; ++i) {
        __syncthreads();
        // X_ij = Σ_{k=j}^{i-1} L_ik M_kj into xt[j].
        for (int e = tid; e < i * 256; e += 128) {
            const int j = e >> 8;
            const int r = (e >> 4) & 15;
            const int cc = e & 15;
            const float* lrow = lm + (16 * i + r) * LS;
            float acc = 0.0f;
            for (int k = j; k < i; ++k) {
#pragma unroll
                for (int m = 0; m < 16; ++m) {
                    acc = fmaf(lrow[16 * k + m], lm[(16 * k + m) * LS + 16 * j + cc], acc);
                }
            }
            xt[e] = acc;
        }
        __syncthreads();
        // M_ij = -M_ii X_ij (M_ii lower triangular), over L_ij.
        for (int e = tid; e < i * 256; e += 128) {
            const int j = e >> 8;
            const int r = (e >> 4) & 15;
            const int cc = e & 15;
            const float* mrow = lm + (16 * i + r) * LS + 16 * i;
            float acc = 0.0f;
            for (int m = 0; m <= r; ++m) {
                acc = fmaf(mrow[m], xt[(j << 8) + (m << 4) + cc], acc);
            }
            lm[(16 * i + r) * LS + 16 * j + cc] = -acc;
        }
    }
    __syncthreads();
    const float* mm = lm;
    if (m_out != nullptr) {
        // The backward's copy of M (f32, [64, 64]).
        float* mo = m_out + wk * C * C;
        for (int e = tid; e < C * C; e += 128) {
            mo[e] = mm[(e >> 6) * LS + (e & 63)];
        }
    }
    // W = M diag(β G) K and U = M diag(β) V for this warp's 16 rows (M is lower triangular:
    // key blocks past the warp's rows are zero).
    {
        ff_u32_t pw[1][C / 16][4];
        ff_u32_t pu[1][C / 16][4];
        const int r = 16 * warp + (lane >> 2);
#pragma unroll
        for (int kb = 0; kb < C / 16; ++kb) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int rr = r + 8 * (i & 1);
                const int j = kb * 16 + 2 * (lane & 3) + 8 * (i >> 1);
                const float m0 = mm[rr * LS + j] * bt[j];
                const float m1 = mm[rr * LS + j + 1] * bt[j + 1];
                pu[0][kb][i] = ff_attn_mma<ff_bf16>::pack(m0, m1);
                pw[0][kb][i] = ff_attn_mma<ff_bf16>::pack(m0 * gs[j], m1 * gs[j + 1]);
            }
        }
        {
            float acc[1][DK / 8][4];
#pragma unroll
            for (int i = 0; i < DK / 8; ++i) {
                acc[0][i][0] = acc[0][i][1] = acc[0][i][2] = acc[0][i][3] = 0.0f;
            }
            ff_attn_pv_packed<ff_bf16, DK, 1, C, KS>(acc, pw, ks_a, lane);
            ff_gdc_store_acc<DK / 8>(w_out + wk * C * DK, DK, acc[0], 16 * warp, C, lane);
        }
        {
            float acc[1][DV / 8][4];
#pragma unroll
            for (int i = 0; i < DV / 8; ++i) {
                acc[0][i][0] = acc[0][i][1] = acc[0][i][2] = acc[0][i][3] = 0.0f;
            }
            ff_attn_pv_packed<ff_bf16, DV, 1, C, VS>(acc, pu, ff_smem_u32(vs), lane);
            ff_gdc_store_acc<DV / 8>(u_out + wk * C * DV, DV, acc[0], 16 * warp, C, lane);
        }
    }
}

// A warp's 16 rows of a row-major [.., DK] f32 state (row r at src + r * DK) as f32 mma
// accumulators (zeros when src is null).
template <int DK>
__device__ __forceinline__ void ff_gdc_load_rows(float (&s)[DK / 8][4], const float* src,
                                                 int lane) {
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            if (src != nullptr) {
                const float2 x =
                    *reinterpret_cast<const float2*>(src + (gr + 8 * hf) * DK + nt * 8 + gc);
                s[nt][2 * hf] = x.x;
                s[nt][2 * hf + 1] = x.y;
            } else {
                s[nt][2 * hf] = s[nt][2 * hf + 1] = 0.0f;
            }
        }
    }
}

// The accumulators of ff_gdc_load_rows back to rows at dst.
template <int DK>
__device__ __forceinline__ void ff_gdc_store_rows(float* dst, const float (&s)[DK / 8][4],
                                                  int lane) {
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            *reinterpret_cast<float2*>(dst + (gr + 8 * hf) * DK + nt * 8 + gc) =
                make_float2(s[nt][2 * hf], s[nt][2 * hf + 1]);
        }
    }
}

// Issues (cp.async, uncommitted) the tiles both walks stage for `chunk` of head bh = (b, h)
// reading key head kh: W, Q, K ([64][KS]), Γ Q K^T ([64][AS]) and the 256 factors.
template <int DK, int KS, int AS, int NT>
__device__ __forceinline__ void ff_gdc_issue_walk(
    ff_gdc_u16* w_s, ff_gdc_u16* q_s, ff_gdc_u16* k_s, ff_gdc_u16* a_s, ff_gdc_u16* f_s,
    const ff_gdc_u16* q, const ff_gdc_u16* k, const ff_gdc_u16* w_in, const ff_gdc_u16* qk_in,
    const float* f_in, const ff_gdc_params& p, int b, int bh, int kh, int chunk, int tid) {
    constexpr int C = FF_GDC_C;
    const ff_i64_t t0 = (ff_i64_t)chunk * C;
    const int n = (int)min((ff_i64_t)C, p.t - t0);
    const ff_i64_t bt0 = (ff_i64_t)b * p.t + t0;
    const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;
    ff_load_tile<ff_gdc_u16, C, DK, KS, NT>(w_s, w_in + wk * C * DK, DK, C, tid);
    ff_load_tile<ff_gdc_u16, C, DK, KS, NT>(q_s, q + (bt0 * p.hk + kh) * DK, (ff_i64_t)p.hk * DK,
                                            n, tid);
    ff_load_tile<ff_gdc_u16, C, DK, KS, NT>(k_s, k + (bt0 * p.hk + kh) * DK, (ff_i64_t)p.hk * DK,
                                            n, tid);
    ff_load_tile<ff_gdc_u16, C, C, AS, NT>(a_s, qk_in + wk * C * C, C, C, tid);
    ff_load_tile<ff_gdc_u16, 1, 2 * FF_GDC_F, 2 * FF_GDC_F, NT>(
        f_s, reinterpret_cast<const ff_gdc_u16*>(f_in + wk * FF_GDC_F), 0, 1, tid);
}

// Shared memory of one gdc_state stage, in bf16 elements: W, Q, K [64][DK + 8], QK
// [64][72], the U tile [64][16 NW + 8]; then 256 f32 factors.
template <int DK, int NW>
struct ff_gdc_stage {
    static constexpr int KS = DK + 8;
    static constexpr int AS = FF_GDC_C + 8;
    static constexpr int US = 16 * NW + 8;
    static constexpr int W = 0;
    static constexpr int Q = W + FF_GDC_C * KS;
    static constexpr int K = Q + FF_GDC_C * KS;
    static constexpr int A = K + FF_GDC_C * KS;
    static constexpr int U = A + FF_GDC_C * AS;
    static constexpr int F = U + FF_GDC_C * US;          // in bf16 elements (even)
    static constexpr int ELEMS = F + 2 * FF_GDC_F;       // 256 floats
};

// The per-warp tile Δ passes through: [64][24] bf16.
#define FF_GDC_DS 24

// s += T^T B for a warp's 16 state rows (all DK columns, mma accumulators): T the warp's
// [64][FF_GDC_DS] bf16 tile of [step][row] (read transposed with ldmatrix.trans: matrices
// (rows 0-7, steps 0-7), (rows 8-15, steps 0-7), (rows 0-7, steps 8-15), (rows 8-15, steps
// 8-15)), B a row-major [64][KS] bf16 tile of [step][column].
template <int DK, int KS>
__device__ __forceinline__ void ff_gdc_rows_update(float (&s)[DK / 8][4], ff_u32_t t_tile,
                                                   ff_u32_t b_tile, int lane) {
    const ff_u32_t at_off = (ff_u32_t)((((lane & 7) + ((lane >> 4) & 1) * 8) * FF_GDC_DS +
                                        ((lane >> 3) & 1) * 8) *
                                       2);
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const ff_u32_t kb_off = (ff_u32_t)((b_row * KS + (lane >> 4) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < FF_GDC_C / 16; ++kk) {
        ff_u32_t a[4];
        ff_ldmatrix_x4_trans(a, t_tile + at_off + (ff_u32_t)(kk * 16 * FF_GDC_DS * 2));
#pragma unroll
        for (int dd = 0; dd < DK / 16; ++dd) {
            ff_u32_t bb[4];
            ff_ldmatrix_x4_trans(bb, b_tile + kb_off + (ff_u32_t)((kk * 16 * KS + dd * 16) * 2));
            ff_attn_mma<ff_bf16>::mma(s[2 * dd], a, bb[0], bb[1]);
            ff_attn_mma<ff_bf16>::mma(s[2 * dd + 1], a, bb[2], bb[3]);
        }
    }
}

template <int DK, int DV, int NW>
__global__ void __launch_bounds__(32 * NW)
    gdc_state(const ff_gdc_u16* __restrict__ q, const ff_gdc_u16* __restrict__ k,
              const ff_gdc_u16* __restrict__ w_in, const ff_gdc_u16* __restrict__ u_in,
              const ff_gdc_u16* __restrict__ qk_in, const float* __restrict__ f_in,
              const float* __restrict__ state0, int has_mask, ff_gdc_u16* __restrict__ out,
              float* __restrict__ state, float* __restrict__ ckpt, ff_gdc_params p) {
    constexpr int C = FF_GDC_C;
    constexpr int NT = 32 * NW;
    typedef ff_gdc_stage<DK, NW> L;
    extern __shared__ __align__(16) unsigned char ff_smem[];
    ff_gdc_u16* stage0 = reinterpret_cast<ff_gdc_u16*>(ff_smem);
    ff_gdc_u16* dsm = stage0 + 2 * L::ELEMS;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int bh = blockIdx.x;
    const int b = bh / p.hv;
    const int h = bh % p.hv;
    const int kh = h / p.group;
    const int dv0 = blockIdx.y * 16 * NW;        // the block's first value row
    const int rw = dv0 + 16 * warp;               // this warp's first value row
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);

    // The state rows rw .. rw + 15, all DK columns, as mma accumulators.
    float s[DK / 8][4];
    ff_gdc_load_rows<DK>(s, state0 == nullptr ? nullptr : state0 + ((ff_i64_t)bh * DV + rw) * DK,
                         lane);

    auto issue = [&](int chunk) {
        ff_gdc_u16* st = stage0 + (chunk & 1) * L::ELEMS;
        ff_gdc_issue_walk<DK, L::KS, L::AS, NT>(st + L::W, st + L::Q, st + L::K, st + L::A,
                                                st + L::F, q, k, w_in, qk_in, f_in, p, b, bh, kh,
                                                chunk, tid);
        const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;
        ff_load_tile<ff_gdc_u16, C, 16 * NW, L::US, NT>(st + L::U, u_in + wk * C * DV + dv0, DV,
                                                        C, tid);
        ff_cp_async_commit();
    };

    ff_gdc_u16* ds = dsm + warp * C * FF_GDC_DS;
    const ff_u32_t ds_a = ff_smem_u32(ds);
    issue(0);
    for (int chunk = 0; chunk < p.n_chunks; ++chunk) {
        if (chunk + 1 < p.n_chunks) {
            issue(chunk + 1);
            ff_cp_async_wait<1>();
        } else {
            ff_cp_async_wait<0>();
        }
        __syncthreads();
        if (ckpt != nullptr) {
            // The backward's checkpoint: this warp's rows of the state at the chunk's start.
            ff_gdc_store_rows<DK>(ckpt + (((ff_i64_t)bh * p.n_chunks + chunk) * DV + rw) * DK, s,
                                  lane);
        }
        ff_gdc_u16* st = stage0 + (chunk & 1) * L::ELEMS;
        const float* f = reinterpret_cast<const float*>(st + L::F);
        const float* gs = f;
        const float* ge = f + C;
        const float* tk = f + 2 * C;
        const float g_all = f[3 * C];
        if (has_mask) {
            // Not-taken steps: zero K rows (their Δ is exactly 0, but 0 · NaN is not).
            ff_gdc_zero_rows<DK, L::KS, NT>(st + L::K, tk, tid);
            __syncthreads();
        }
        const ff_u32_t w_a = ff_smem_u32(st + L::W);
        const ff_u32_t q_a = ff_smem_u32(st + L::Q);
        const ff_u32_t k_a = ff_smem_u32(st + L::K);
        const ff_u32_t a_a = ff_smem_u32(st + L::A);
        const ff_gdc_u16* us = st + L::U + 16 * warp;

        // Δ = U - W S^T and o = Q S^T (rows: the chunk's steps; columns: this warp's rows).
        float d[4][2][4];
        float o[4][2][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    d[mt][nb][e] = 0.0f;
                    o[mt][nb][e] = 0.0f;
                }
            }
        }
        const ff_u32_t a_off = (ff_u32_t)(((lane & 15) * L::KS + (lane >> 4) * 8) * 2);
#pragma unroll
        for (int kt = 0; kt < DK / 16; ++kt) {
            ff_u32_t sb[2][2];
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
                sb[nb][0] = ff_attn_mma<ff_bf16>::pack(s[2 * kt][2 * nb], s[2 * kt][2 * nb + 1]);
                sb[nb][1] =
                    ff_attn_mma<ff_bf16>::pack(s[2 * kt + 1][2 * nb], s[2 * kt + 1][2 * nb + 1]);
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const ff_u32_t off = a_off + (ff_u32_t)((mt * 16 * L::KS + kt * 16) * 2);
                ff_u32_t a[4];
                ff_ldmatrix_x4(a, w_a + off);
                ff_attn_mma<ff_bf16>::mma(d[mt][0], a, sb[0][0], sb[0][1]);
                ff_attn_mma<ff_bf16>::mma(d[mt][1], a, sb[1][0], sb[1][1]);
                ff_ldmatrix_x4(a, q_a + off);
                ff_attn_mma<ff_bf16>::mma(o[mt][0], a, sb[0][0], sb[0][1]);
                ff_attn_mma<ff_bf16>::mma(o[mt][1], a, sb[1][0], sb[1][1]);
            }
        }
        // Δ into the warp's tile; o scaled by G_t.
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = mt * 16 + gr + 8 * hf;
#pragma unroll
                for (int nb = 0; nb < 2; ++nb) {
                    const ff_u32_t uu =
                        *reinterpret_cast<const ff_u32_t*>(us + r * L::US + nb * 8 + gc);
                    const float u0 = ff_bf16::to_f32((ff_u16_t)(uu & 0xffffu));
                    const float u1 = ff_bf16::to_f32((ff_u16_t)(uu >> 16));
                    d[mt][nb][2 * hf] = u0 - d[mt][nb][2 * hf];
                    d[mt][nb][2 * hf + 1] = u1 - d[mt][nb][2 * hf + 1];
                    *reinterpret_cast<ff_u32_t*>(ds + r * FF_GDC_DS + nb * 8 + gc) =
                        ff_attn_mma<ff_bf16>::pack(d[mt][nb][2 * hf], d[mt][nb][2 * hf + 1]);
                    o[mt][nb][2 * hf] *= gs[r];
                    o[mt][nb][2 * hf + 1] *= gs[r];
                }
            }
        }
        __syncwarp();
        // o += (Γ Q K^T) Δ, lower triangular in steps.
        {
            const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
            const int b_half = lane >> 4;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                for (int kk = 0; kk <= mt; ++kk) {
                    ff_u32_t a[4];
                    ff_ldmatrix_x4(a, a_a + (ff_u32_t)((((lane & 15) + mt * 16) * L::AS +
                                                         kk * 16 + (lane >> 4) * 8) *
                                                        2));
                    ff_u32_t bb[4];
                    ff_ldmatrix_x4_trans(
                        bb, ds_a + (ff_u32_t)(((kk * 16 + b_row) * FF_GDC_DS + b_half * 8) * 2));
                    ff_attn_mma<ff_bf16>::mma(o[mt][0], a, bb[0], bb[1]);
                    ff_attn_mma<ff_bf16>::mma(o[mt][1], a, bb[2], bb[3]);
                }
            }
        }
        // The outputs of the chunk's valid steps (0 where not taken).
        if (out != nullptr) {
            const ff_i64_t t0 = (ff_i64_t)chunk * C;
            const int n = (int)min((ff_i64_t)C, p.t - t0);
            ff_gdc_u16* og = out + (((ff_i64_t)b * p.t + t0) * p.hv + h) * DV + rw;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = mt * 16 + gr + 8 * hf;
                    if (r < n) {
                        const bool taken = tk[r] != 0.0f;
#pragma unroll
                        for (int nb = 0; nb < 2; ++nb) {
                            const ff_u32_t v = ff_attn_mma<ff_bf16>::pack(
                                taken ? o[mt][nb][2 * hf] : 0.0f,
                                taken ? o[mt][nb][2 * hf + 1] : 0.0f);
                            *reinterpret_cast<ff_u32_t*>(og + (ff_i64_t)r * p.hv * DV + nb * 8 +
                                                         gc) = v;
                        }
                    }
                }
            }
        }
        __syncwarp();
        // Γ(end, t) Δ_t into the warp's tile, then S = Γ(end, start) S + (that)^T K.
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = mt * 16 + gr + 8 * hf;
                const float e = ge[r];
#pragma unroll
                for (int nb = 0; nb < 2; ++nb) {
                    *reinterpret_cast<ff_u32_t*>(ds + r * FF_GDC_DS + nb * 8 + gc) =
                        ff_attn_mma<ff_bf16>::pack(d[mt][nb][2 * hf] * e,
                                                   d[mt][nb][2 * hf + 1] * e);
                }
            }
        }
        __syncwarp();
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] *= g_all;
            }
        }
        ff_gdc_rows_update<DK, L::KS>(s, ds_a, k_a, lane);
        __syncthreads();
    }

    if (state == nullptr) {
        return;
    }
    ff_gdc_store_rows<DK>(state + ((ff_i64_t)bh * DV + rw) * DK, s, lane);
}

// ----- the backward -------------------------------------------------------------------------
//
// The chunked backward (cpu/gated_delta/chunked.rs `ChunkGrads` has the algebra), after
// gdc_prep (with M kept) and gdc_state (with the state at every chunk's start kept, `ckpt`):
// gdc_bstate walks the chunks in reverse with the state's gradient dS in mma accumulators:
//   Δ = U - W S^T,  dΔ = Γ(end, ·) ⊙ K dS'^T + A^T dO,  dS = Γ(end, start) dS' + (G ⊙ dO)^T Q
//   - dΔ^T W
// keeping dΔ (bf16) and dS' (the gradient at the chunk's end, f32) for gdc_bgrad, which then
// turns every chunk into its inputs' gradients in parallel.

// acc[N / 8][4] += A B for a warp's 16 rows: A the rows at `a` of a row-major bf16 tile with
// `as` elements a row, K columns; B a row-major [K][N] bf16 tile at `b`, `bs` a row.
template <int K, int N>
__device__ __forceinline__ void ff_gdc_mm(float (&acc)[N / 8][4], ff_u32_t a, int as,
                                          ff_u32_t b, int bs, int lane) {
    const ff_u32_t a_addr = a + (ff_u32_t)(((lane & 15) * as + (lane >> 4) * 8) * 2);
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const ff_u32_t b_addr = b + (ff_u32_t)((b_row * bs + (lane >> 4) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        ff_u32_t af[4];
        ff_ldmatrix_x4(af, a_addr + (ff_u32_t)(kk * 32));
#pragma unroll
        for (int dd = 0; dd < N / 16; ++dd) {
            ff_u32_t bb[4];
            ff_ldmatrix_x4_trans(bb, b_addr + (ff_u32_t)((kk * 16 * bs + dd * 16) * 2));
            ff_attn_mma<ff_bf16>::mma(acc[2 * dd], af, bb[0], bb[1]);
            ff_attn_mma<ff_bf16>::mma(acc[2 * dd + 1], af, bb[2], bb[3]);
        }
    }
}

// acc[N / 8][4] += A B with A's 16 x 64 fragments already packed (af[kb], K = 64) and B a
// row-major [64][N] bf16 tile at `b`, `bs` a row.
template <int N>
__device__ __forceinline__ void ff_gdc_mm_packed(float (&acc)[N / 8][4],
                                                 const ff_u32_t (&af)[FF_GDC_C / 16][4],
                                                 ff_u32_t b, int bs, int lane) {
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const ff_u32_t b_addr = b + (ff_u32_t)((b_row * bs + (lane >> 4) * 8) * 2);
#pragma unroll
    for (int kk = 0; kk < FF_GDC_C / 16; ++kk) {
#pragma unroll
        for (int dd = 0; dd < N / 16; ++dd) {
            ff_u32_t bb[4];
            ff_ldmatrix_x4_trans(bb, b_addr + (ff_u32_t)((kk * 16 * bs + dd * 16) * 2));
            ff_attn_mma<ff_bf16>::mma(acc[2 * dd], af[kk], bb[0], bb[1]);
            ff_attn_mma<ff_bf16>::mma(acc[2 * dd + 1], af[kk], bb[2], bb[3]);
        }
    }
}

// Packs a warp's 16 x 64 A operand (rows r0 .. r0 + 15) from an f32 function of (row, col).
template <typename F>
__device__ __forceinline__ void ff_gdc_pack_a(ff_u32_t (&af)[FF_GDC_C / 16][4], int r0,
                                              int lane, F at) {
#pragma unroll
    for (int kb = 0; kb < FF_GDC_C / 16; ++kb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + (lane >> 2) + 8 * (i & 1);
            const int c = kb * 16 + 2 * (lane & 3) + 8 * (i >> 1);
            af[kb][i] = ff_attn_mma<ff_bf16>::pack(at(r, c), at(r, c + 1));
        }
    }
}

// Shared memory of one gdc_bstate stage, in bf16 elements: W, Q, K [64][DK + 8], A = Γ Q K^T
// [64][72], the dO tile [64][16 NW + 8]; then 256 f32 factors.
template <int DK, int NW>
struct ff_gdc_bstage {
    static constexpr int KS = DK + 8;
    static constexpr int AS = FF_GDC_C + 8;
    static constexpr int US = 16 * NW + 8;
    static constexpr int W = 0;
    static constexpr int Q = W + FF_GDC_C * KS;
    static constexpr int K = Q + FF_GDC_C * KS;
    static constexpr int A = K + FF_GDC_C * KS;
    static constexpr int O = A + FF_GDC_C * AS;
    static constexpr int F = O + FF_GDC_C * US;
    static constexpr int ELEMS = F + 2 * FF_GDC_F;
};

// A block per (batch · value head, 16 NW value rows), warp w owning 16 rows of dS (all of DK)
// as f32 mma accumulators; the chunks in reverse, the previous chunk's tiles double-buffered.
// d_out [B, T, Hv, DV] bf16; d_state (the final state's cotangent) [B, Hv, DV, DK] f32 or
// null (zeros); dckpt [B · Hv, chunks, DV, DK] f32; dd [B · Hv, chunks, 64, DV] bf16;
// dstate0 [B, Hv, DV, DK] f32 or null. (dΔ and dS need no state: S enters the backward
// only through gdc_bgrad's products.)
template <int DK, int DV, int NW>
__global__ void __launch_bounds__(32 * NW)
    gdc_bstate(const ff_gdc_u16* __restrict__ q, const ff_gdc_u16* __restrict__ k,
               const ff_gdc_u16* __restrict__ w_in, const ff_gdc_u16* __restrict__ qk_in,
               const float* __restrict__ f_in, const ff_gdc_u16* __restrict__ d_out,
               const float* __restrict__ d_state, int has_mask, ff_gdc_u16* __restrict__ dd,
               float* __restrict__ dckpt, float* __restrict__ dstate0, ff_gdc_params p) {
    constexpr int C = FF_GDC_C;
    constexpr int NT = 32 * NW;
    typedef ff_gdc_bstage<DK, NW> L;
    extern __shared__ __align__(16) unsigned char ff_smem[];
    ff_gdc_u16* stage0 = reinterpret_cast<ff_gdc_u16*>(ff_smem);
    ff_gdc_u16* tsm = stage0 + 2 * L::ELEMS;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int bh = blockIdx.x;
    const int b = bh / p.hv;
    const int h = bh % p.hv;
    const int kh = h / p.group;
    const int dv0 = blockIdx.y * 16 * NW;
    const int rw = dv0 + 16 * warp;
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);

    // dS rows rw .. rw + 15 (the state's gradient), all DK columns.
    float ds[DK / 8][4];
    ff_gdc_load_rows<DK>(
        ds, d_state == nullptr ? nullptr : d_state + ((ff_i64_t)bh * DV + rw) * DK, lane);

    auto issue = [&](int chunk) {
        ff_gdc_u16* st = stage0 + (chunk & 1) * L::ELEMS;
        ff_gdc_issue_walk<DK, L::KS, L::AS, NT>(st + L::W, st + L::Q, st + L::K, st + L::A,
                                                st + L::F, q, k, w_in, qk_in, f_in, p, b, bh, kh,
                                                chunk, tid);
        const ff_i64_t t0 = (ff_i64_t)chunk * C;
        const int n = (int)min((ff_i64_t)C, p.t - t0);
        const ff_i64_t bt0 = (ff_i64_t)b * p.t + t0;
        ff_load_tile<ff_gdc_u16, C, 16 * NW, L::US, NT>(
            st + L::O, d_out + (bt0 * p.hv + h) * DV + dv0, (ff_i64_t)p.hv * DV, n, tid);
        ff_cp_async_commit();
    };

    ff_gdc_u16* ts = tsm + warp * C * FF_GDC_DS;
    const ff_u32_t ts_a = ff_smem_u32(ts);
    // ldmatrix lane addresses: A from a row-major tile (rows lane % 16, column half lane / 16);
    // B from a row-major [k][n] tile (.trans).
    const ff_u32_t a_off = (ff_u32_t)(((lane & 15) * L::KS + (lane >> 4) * 8) * 2);
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int b_half = lane >> 4;

    issue(p.n_chunks - 1);
    for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
        if (chunk > 0) {
            issue(chunk - 1);
            ff_cp_async_wait<1>();
        } else {
            ff_cp_async_wait<0>();
        }
        __syncthreads();
        ff_gdc_u16* st = stage0 + (chunk & 1) * L::ELEMS;
        const float* f = reinterpret_cast<const float*>(st + L::F);
        const float* gs = f;
        const float* ge = f + C;
        const float* tk = f + 2 * C;
        const float g_all = f[3 * C];
        if (has_mask) {
            // Not-taken steps: zero K, Q and dO rows (their terms are exactly 0; 0 · NaN is not).
            ff_gdc_zero_rows<DK, L::KS, NT>(st + L::K, tk, tid);
            ff_gdc_zero_rows<DK, L::KS, NT>(st + L::Q, tk, tid);
            ff_gdc_zero_rows<16 * NW, L::US, NT>(st + L::O, tk, tid);
            __syncthreads();
        }
        const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;
        const ff_u32_t w_a = ff_smem_u32(st + L::W);
        const ff_u32_t q_a = ff_smem_u32(st + L::Q);
        const ff_u32_t k_a = ff_smem_u32(st + L::K);
        const ff_u32_t a_a = ff_smem_u32(st + L::A);
        const ff_u32_t o_a = ff_smem_u32(st + L::O);
        const ff_gdc_u16* os = st + L::O + 16 * warp;

        // This warp's rows of dS as mma B fragments (bf16).
        ff_u32_t db[DK / 16][2][2];
#pragma unroll
        for (int kt = 0; kt < DK / 16; ++kt) {
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
                for (int hk = 0; hk < 2; ++hk) {
                    db[kt][nb][hk] = ff_attn_mma<ff_bf16>::pack(ds[2 * kt + hk][2 * nb],
                                                                ds[2 * kt + hk][2 * nb + 1]);
                }
            }
        }
        // dS' (the gradient at the chunk's end) for gdc_bgrad.
        ff_gdc_store_rows<DK>(dckpt + (wk * DV + rw) * DK, ds, lane);
        // K dS^T (rows: the chunk's steps; columns: this warp's value rows).
        float e[4][2][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    e[mt][nb][x] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int kt = 0; kt < DK / 16; ++kt) {
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const ff_u32_t off = a_off + (ff_u32_t)((mt * 16 * L::KS + kt * 16) * 2);
                ff_u32_t a[4];
                ff_ldmatrix_x4(a, k_a + off);
                ff_attn_mma<ff_bf16>::mma(e[mt][0], a, db[kt][0][0], db[kt][0][1]);
                ff_attn_mma<ff_bf16>::mma(e[mt][1], a, db[kt][1][0], db[kt][1][1]);
            }
        }
        // dΔ = Γ(end, t) (K dS^T)_t + (A^T dO)_t; A is lower triangular, so A^T's step block
        // mt takes dO's blocks kk >= mt.
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float x = ge[mt * 16 + gr + 8 * hf];
#pragma unroll
                for (int nb = 0; nb < 2; ++nb) {
                    e[mt][nb][2 * hf] *= x;
                    e[mt][nb][2 * hf + 1] *= x;
                }
            }
#pragma unroll
            for (int kk = mt; kk < 4; ++kk) {
                ff_u32_t a[4];
                ff_ldmatrix_x4_trans(
                    a, a_a + (ff_u32_t)(((kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * L::AS +
                                         mt * 16 + ((lane >> 3) & 1) * 8) *
                                        2));
                ff_u32_t bb[4];
                ff_ldmatrix_x4_trans(
                    bb, o_a + (ff_u32_t)(((kk * 16 + b_row) * L::US + 16 * warp + b_half * 8) * 2));
                ff_attn_mma<ff_bf16>::mma(e[mt][0], a, bb[0], bb[1]);
                ff_attn_mma<ff_bf16>::mma(e[mt][1], a, bb[2], bb[3]);
            }
        }
        // dΔ out (bf16, [64][DV] of this chunk) and -dΔ into the warp's tile.
        {
            ff_gdc_u16* dg = dd + wk * C * DV + rw;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = mt * 16 + gr + 8 * hf;
#pragma unroll
                    for (int nb = 0; nb < 2; ++nb) {
                        *reinterpret_cast<ff_u32_t*>(dg + r * DV + nb * 8 + gc) =
                            ff_attn_mma<ff_bf16>::pack(e[mt][nb][2 * hf], e[mt][nb][2 * hf + 1]);
                        *reinterpret_cast<ff_u32_t*>(ts + r * FF_GDC_DS + nb * 8 + gc) =
                            ff_attn_mma<ff_bf16>::pack(-e[mt][nb][2 * hf],
                                                       -e[mt][nb][2 * hf + 1]);
                    }
                }
            }
        }
        __syncwarp();
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                ds[nt][x] *= g_all;
            }
        }
        // dS += (-dΔ)^T W, then dS += (G ⊙ dO)^T Q through the same tile.
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
            const ff_u32_t bsrc = pass == 0 ? w_a : q_a;
            ff_gdc_rows_update<DK, L::KS>(ds, ts_a, bsrc, lane);
            if (pass == 0) {
                __syncwarp();
#pragma unroll
                for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int r = mt * 16 + gr + 8 * hf;
                        const float g = gs[r];
#pragma unroll
                        for (int nb = 0; nb < 2; ++nb) {
                            const ff_u32_t oo =
                                *reinterpret_cast<const ff_u32_t*>(os + r * L::US + nb * 8 + gc);
                            const float o0 = ff_bf16::to_f32((ff_u16_t)(oo & 0xffffu));
                            const float o1 = ff_bf16::to_f32((ff_u16_t)(oo >> 16));
                            *reinterpret_cast<ff_u32_t*>(ts + r * FF_GDC_DS + nb * 8 + gc) =
                                ff_attn_mma<ff_bf16>::pack(g * o0, g * o1);
                        }
                    }
                }
                __syncwarp();
            }
        }
        __syncthreads();
    }

    if (dstate0 == nullptr) {
        return;
    }
    ff_gdc_store_rows<DK>(dstate0 + ((ff_i64_t)bh * DV + rw) * DK, ds, lane);
}

// gdc_bgrad's shared memory: bf16 tiles K, Q, W (then dW) [64][DK + 8] and V, U (then Δ),
// dΔ, dO [64][DV + 8]; then a region holding first S and dS' (bf16 [DV][DK + 8] each), then
// four f32 [64][65] arrays (M, dA then Γ ⊙ dA, dM then dL then the E terms, dM M^T then the
// decay products); the decay products' gradients X [64][65] f32; and the per-step arrays.
template <int DK, int DV>
struct ff_gdc_bgrad_smem {
    static constexpr int C = FF_GDC_C;
    static constexpr int KS = DK + 8;
    static constexpr int VS = DV + 8;
    static constexpr int XS = C + 1;
    static constexpr int K = 0;
    static constexpr int Q = K + C * KS;
    static constexpr int W = Q + C * KS;
    static constexpr int V = W + C * KS;
    static constexpr int U = V + C * VS;
    static constexpr int D = U + C * VS;
    static constexpr int O = D + C * VS;
    static constexpr int TILE_BYTES = (O + C * VS) * 2;
    static constexpr int ST_BYTES = 2 * DV * KS * 2;
    static constexpr int F32_BYTES = 4 * C * XS * 4;
    static constexpr int UNION_BYTES = ST_BYTES > F32_BYTES ? ST_BYTES : F32_BYTES;
    static constexpr int X_OFF = TILE_BYTES + UNION_BYTES;
    static constexpr int SMALL_OFF = X_OFF + C * XS * 4;
    static constexpr int BYTES = SMALL_OFF + (21 * C + 8) * 4;
};

// Sum over the four lanes of a quad (lanes sharing lane / 4).
__device__ __forceinline__ float ff_gdc_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Row dot products of a warp's 16 x N accumulator with the same rows of a row-major bf16
// tile (`rows` at the warp's first row, `stride` a row): out[gr] and out[gr + 8] on lanes
// with lane % 4 == 0 (written to `dst` at those rows).
template <int N>
__device__ __forceinline__ void ff_gdc_row_dots(const float (&acc)[N / 8][4],
                                                const ff_gdc_u16* rows, int stride, float* dst,
                                                int lane) {
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float x = 0.0f;
        const ff_gdc_u16* r = rows + (gr + 8 * hf) * stride;
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb) {
            const ff_u32_t v = *reinterpret_cast<const ff_u32_t*>(r + nb * 8 + gc);
            x = fmaf(acc[nb][2 * hf], ff_bf16::to_f32((ff_u16_t)(v & 0xffffu)), x);
            x = fmaf(acc[nb][2 * hf + 1], ff_bf16::to_f32((ff_u16_t)(v >> 16)), x);
        }
        x = ff_gdc_quad_sum(x);
        if ((lane & 3) == 0) {
            dst[gr + 8 * hf] = x;
        }
    }
}

// Writes a warp's 16 x N accumulator rows (f32) to `g` (row r at g + r * stride) for rows
// r0 + r < n whose step was taken (0 for the others).
template <int N>
__device__ __forceinline__ void ff_gdc_store_grad(float* g, ff_i64_t stride,
                                                  const float (&acc)[N / 8][4], int r0, int n,
                                                  const float* tk, int lane) {
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = r0 + gr + 8 * hf;
        if (r < n) {
            const bool taken = tk[r] != 0.0f;
#pragma unroll
            for (int nb = 0; nb < N / 8; ++nb) {
                *reinterpret_cast<float2*>(g + r * stride + nb * 8 + gc) =
                    taken ? make_float2(acc[nb][2 * hf], acc[nb][2 * hf + 1])
                          : make_float2(0.0f, 0.0f);
            }
        }
    }
}

// A warp's 16 rows of a [64, 64] f32 product from shared memory: acc[r][c] = Σ_{k < K}
// a(16 warp + r, k) · b(k, lane + 32 c). Each b load serves 16 FMAs and each a load (the same
// address on every lane) 32, where one output a thread would load twice per FMA.
template <int K, typename FA, typename FB>
__device__ __forceinline__ void ff_gdc_rows_product(float (&acc)[16][2], int warp, int lane,
                                                    FA a, FB b) {
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        acc[r][0] = acc[r][1] = 0.0f;
    }
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
        const float b0 = b(k, lane);
        const float b1 = b(k, lane + 32);
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const float x = a(16 * warp + r, k);
            acc[r][0] = fmaf(x, b0, acc[r][0]);
            acc[r][1] = fmaf(x, b1, acc[r][1]);
        }
    }
}

// A block per (chunk, batch · value head), four warps of 16 steps: the chunk's input
// gradients from its state S (ckpt), the gradient dS' at its end (dckpt), dΔ (dd) and the
// cotangent dO, every chunk in parallel. Writes dq, dk ([B, T, Hv, DK] f32, per value head:
// the launcher sums the heads sharing a key head), dv [B, T, Hv, DV], dgamma and dbeta
// [B, T, Hv] f32 for the chunk's steps (0 where not taken).
template <typename TG, int DK, int DV>
__global__ void __launch_bounds__(128)
    gdc_bgrad(const ff_gdc_u16* __restrict__ q, const ff_gdc_u16* __restrict__ k,
              const ff_gdc_u16* __restrict__ v, const typename TG::storage* __restrict__ gamma,
              const typename TG::storage* __restrict__ beta, const float* __restrict__ mask,
              const ff_gdc_u16* __restrict__ w_in, const ff_gdc_u16* __restrict__ u_in,
              const float* __restrict__ m_in, const float* __restrict__ ckpt,
              const float* __restrict__ dckpt, const ff_gdc_u16* __restrict__ dd,
              const ff_gdc_u16* __restrict__ d_out, float* __restrict__ dq,
              float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ dgamma,
              float* __restrict__ dbeta, ff_gdc_params p) {
    constexpr int C = FF_GDC_C;
    typedef ff_gdc_bgrad_smem<DK, DV> L;
    constexpr int KS = L::KS;
    constexpr int VS = L::VS;
    constexpr int XS = L::XS;
    extern __shared__ __align__(16) unsigned char ff_smem[];
    ff_gdc_u16* tiles = reinterpret_cast<ff_gdc_u16*>(ff_smem);
    ff_gdc_u16* s_t = reinterpret_cast<ff_gdc_u16*>(ff_smem + L::TILE_BYTES);
    ff_gdc_u16* ds_t = s_t + DV * KS;
    float* mt = reinterpret_cast<float*>(ff_smem + L::TILE_BYTES);   // M
    float* dat = mt + C * XS;                                          // dA, then Γ ⊙ dA
    float* dmt = dat + C * XS;                                         // dM, dL, then E
    float* tmt = dmt + C * XS;                                         // dM M^T, then Γ
    float* xt = reinterpret_cast<float*>(ff_smem + L::X_OFF);          // X
    float* g = reinterpret_cast<float*>(ff_smem + L::SMALL_OFF);
    float* bt = g + C;
    float* tk = bt + C;
    float* lg = tk + C;
    int* zr = reinterpret_cast<int*>(lg + C);
    int* ng = zr + C;
    float* gs = reinterpret_cast<float*>(ng + C);
    float* ge = gs + C;
    float* kbw = ge + C;
    float* vbu = kbw + C;
    float* xq = vbu + C;
    float* xk = xq + C;
    float* dbp = xk + C;
    float* red = dbp + C;        // 8
    float* colk = red + 8;       // [4][64]: per-warp column sums (a fixed order, no atomics)
    float* colv = colk + 4 * C;  // [4][64]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int gr = lane >> 2;
    const int gc = 2 * (lane & 3);
    const int m0 = 16 * warp;
    const int chunk = blockIdx.x;
    const int bh = blockIdx.y;
    const int b = bh / p.hv;
    const int h = bh % p.hv;
    const int kh = h / p.group;
    const ff_i64_t t0 = (ff_i64_t)chunk * C;
    const int n = (int)min((ff_i64_t)C, p.t - t0);
    const ff_i64_t bt0 = (ff_i64_t)b * p.t + t0;
    const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;

    ff_load_tile<ff_gdc_u16, C, DK, KS, 128>(tiles + L::K, k + (bt0 * p.hk + kh) * DK,
                                              (ff_i64_t)p.hk * DK, n, tid);
    ff_load_tile<ff_gdc_u16, C, DK, KS, 128>(tiles + L::Q, q + (bt0 * p.hk + kh) * DK,
                                              (ff_i64_t)p.hk * DK, n, tid);
    ff_load_tile<ff_gdc_u16, C, DK, KS, 128>(tiles + L::W, w_in + wk * C * DK, DK, C, tid);
    ff_load_tile<ff_gdc_u16, C, DV, VS, 128>(tiles + L::V, v + (bt0 * p.hv + h) * DV,
                                              (ff_i64_t)p.hv * DV, n, tid);
    ff_load_tile<ff_gdc_u16, C, DV, VS, 128>(tiles + L::U, u_in + wk * C * DV, DV, C, tid);
    ff_load_tile<ff_gdc_u16, C, DV, VS, 128>(tiles + L::D, dd + wk * C * DV, DV, C, tid);
    ff_load_tile<ff_gdc_u16, C, DV, VS, 128>(tiles + L::O, d_out + (bt0 * p.hv + h) * DV,
                                              (ff_i64_t)p.hv * DV, n, tid);
    ff_cp_async_commit();
    // S and dS' to bf16 tiles, <dS', S> on the way (from the f32 values).
    {
        const float4* s4 = reinterpret_cast<const float4*>(ckpt + wk * DV * DK);
        const float4* d4 = reinterpret_cast<const float4*>(dckpt + wk * DV * DK);
        float dot = 0.0f;
#pragma unroll 4
        for (int e = tid; e < DV * DK / 4; e += 128) {
            const int r = e / (DK / 4);
            const int c = (e % (DK / 4)) * 4;
            const float4 x = s4[e];
            const float4 y = d4[e];
            dot = fmaf(x.x, y.x, fmaf(x.y, y.y, fmaf(x.z, y.z, fmaf(x.w, y.w, dot))));
            *reinterpret_cast<ff_u32_t*>(s_t + r * KS + c) = ff_attn_mma<ff_bf16>::pack(x.x, x.y);
            *reinterpret_cast<ff_u32_t*>(s_t + r * KS + c + 2) =
                ff_attn_mma<ff_bf16>::pack(x.z, x.w);
            *reinterpret_cast<ff_u32_t*>(ds_t + r * KS + c) =
                ff_attn_mma<ff_bf16>::pack(y.x, y.y);
            *reinterpret_cast<ff_u32_t*>(ds_t + r * KS + c + 2) =
                ff_attn_mma<ff_bf16>::pack(y.z, y.w);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            dot += __shfl_xor_sync(0xffffffffu, dot, o);
        }
        if (lane == 0) {
            red[warp] = dot;
        }
    }
    ff_gdc_load_steps<TG>(gamma, beta, mask, bt0, p.hv, h, n, tid, g, bt, tk, lg);
    ff_cp_async_wait<0>();
    __syncthreads();
    if (mask != nullptr) {
        ff_gdc_zero_rows<DK, KS, 128>(tiles + L::K, tk, tid);
        ff_gdc_zero_rows<DK, KS, 128>(tiles + L::Q, tk, tid);
        ff_gdc_zero_rows<DV, VS, 128>(tiles + L::V, tk, tid);
        ff_gdc_zero_rows<DV, VS, 128>(tiles + L::O, tk, tid);
    }
    ff_gdc_prefixes(g, lg, zr, ng, tid);
    if (tid < C) {
        gs[tid] = ff_gdc_between(lg, zr, ng, tid, -1);
        ge[tid] = tid < n ? ff_gdc_between(lg, zr, ng, n - 1, tid) : 0.0f;
    }
    const float dg_all = red[0] + red[1] + red[2] + red[3];

    const ff_u32_t k_a = ff_smem_u32(tiles + L::K);
    const ff_u32_t q_a = ff_smem_u32(tiles + L::Q);
    const ff_u32_t w_a = ff_smem_u32(tiles + L::W);
    const ff_u32_t v_a = ff_smem_u32(tiles + L::V);
    const ff_u32_t u_a = ff_smem_u32(tiles + L::U);
    const ff_u32_t d_a = ff_smem_u32(tiles + L::D);
    const ff_u32_t o_a = ff_smem_u32(tiles + L::O);
    const ff_u32_t s_a = ff_smem_u32(s_t);
    const ff_u32_t dss_a = ff_smem_u32(ds_t);

    // Δ = U - W S^T for this warp's steps, over U.
    {
        float acc[1][DV / 8][4];
        ff_attn_scores<ff_bf16, DK, 1, DV, KS, KS>(acc, w_a + (ff_u32_t)(m0 * KS * 2), s_a, lane);
        ff_gdc_u16* us = tiles + L::U;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = m0 + gr + 8 * hf;
#pragma unroll
            for (int nb = 0; nb < DV / 8; ++nb) {
                ff_u32_t* at = reinterpret_cast<ff_u32_t*>(us + r * VS + nb * 8 + gc);
                const ff_u32_t uu = *at;
                *at = ff_attn_mma<ff_bf16>::pack(
                    ff_bf16::to_f32((ff_u16_t)(uu & 0xffffu)) - acc[0][nb][2 * hf],
                    ff_bf16::to_f32((ff_u16_t)(uu >> 16)) - acc[0][nb][2 * hf + 1]);
            }
        }
    }
    __syncthreads();
    float da[1][C / 8][4];
    {
        float acc[1][DK / 8][4];
        // dW = -dΔ S over W (this warp's rows).
        ff_zero_frags(acc);
        ff_gdc_mm<DV, DK>(acc[0], d_a + (ff_u32_t)(m0 * VS * 2), VS, s_a, KS, lane);
        {
            ff_gdc_u16* ws = tiles + L::W;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = m0 + gr + 8 * hf;
#pragma unroll
                for (int nb = 0; nb < DK / 8; ++nb) {
                    *reinterpret_cast<ff_u32_t*>(ws + r * KS + nb * 8 + gc) =
                        ff_attn_mma<ff_bf16>::pack(-acc[0][nb][2 * hf], -acc[0][nb][2 * hf + 1]);
                }
            }
        }
        // dq = G ⊙ (dO S) + (Γ ⊙ dA) K with dA = dO Δ^T (lower triangular with the diagonal);
        // q_t · (S^T dO_t) for the decays.
        ff_zero_frags(acc);
        ff_gdc_mm<DV, DK>(acc[0], o_a + (ff_u32_t)(m0 * VS * 2), VS, s_a, KS, lane);
        ff_gdc_row_dots<DK>(acc[0], tiles + L::Q + m0 * KS, KS, xq + m0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float x = gs[m0 + gr + 8 * hf];
#pragma unroll
            for (int nb = 0; nb < DK / 8; ++nb) {
                acc[0][nb][2 * hf] *= x;
                acc[0][nb][2 * hf + 1] *= x;
            }
        }
        ff_attn_scores<ff_bf16, DV, 1, C, VS, VS>(da, o_a + (ff_u32_t)(m0 * VS * 2), u_a, lane);
        {
            float ta[1][C / 8][4];
#pragma unroll
            for (int nb = 0; nb < C / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int t = m0 + gr + 8 * (e >> 1);
                    const int j = nb * 8 + gc + (e & 1);
                    if (j > t) {
                        da[0][nb][e] = 0.0f;
                    }
                    ta[0][nb][e] = j <= t ? da[0][nb][e] * ff_gdc_between(lg, zr, ng, t, j) : 0.0f;
                }
            }
            ff_u32_t pf[1][C / 16][4];
            ff_attn_pack<ff_bf16, 1, C>(pf, ta);
            ff_attn_pv_packed<ff_bf16, DK, 1, C, KS>(acc, pf, k_a, lane);
        }
        ff_gdc_store_grad<DK>(dq + (bt0 * p.hv + h) * DK, (ff_i64_t)p.hv * DK, acc[0], m0, n, tk,
                              lane);
        // Γ(end, t) (Δ dS')_t: dk's first term (stored now, the rest added below); k_t · (dS'^T
        // Δ_t) for the decays.
        ff_zero_frags(acc);
        ff_gdc_mm<DV, DK>(acc[0], u_a + (ff_u32_t)(m0 * VS * 2), VS, dss_a, KS, lane);
        ff_gdc_row_dots<DK>(acc[0], tiles + L::K + m0 * KS, KS, xk + m0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float x = ge[m0 + gr + 8 * hf];
#pragma unroll
            for (int nb = 0; nb < DK / 8; ++nb) {
                acc[0][nb][2 * hf] *= x;
                acc[0][nb][2 * hf + 1] *= x;
            }
        }
        ff_gdc_store_grad<DK>(dk + (bt0 * p.hv + h) * DK, (ff_i64_t)p.hv * DK, acc[0], m0, n,
                              tk, lane);
    }
    __syncthreads();
    // S and dS' are done with: the f32 arrays take their place.
#pragma unroll
    for (int nb = 0; nb < C / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dat[(m0 + gr + 8 * (e >> 1)) * XS + nb * 8 + gc + (e & 1)] = da[0][nb][e];
        }
    }
    for (int e = tid; e < C * C; e += 128) {
        mt[(e >> 6) * XS + (e & 63)] = m_in[wk * C * C + e];
    }
    for (int e = tid; e < C * XS; e += 128) {
        xt[e] = 0.0f;
    }
    __syncthreads();
    // dM_tj = β_j (G_j dW_t · k_j + dU_t · v_j) for j < t; the column sums Σ_t M_tj (dW_t · k_j)
    // and Σ_t M_tj (dU_t · v_j).
    {
        float p1[1][C / 8][4];
        float p2[1][C / 8][4];
        ff_attn_scores<ff_bf16, DK, 1, C, KS, KS>(p1, w_a + (ff_u32_t)(m0 * KS * 2), k_a, lane);
        ff_attn_scores<ff_bf16, DV, 1, C, VS, VS>(p2, d_a + (ff_u32_t)(m0 * VS * 2), v_a, lane);
#pragma unroll
        for (int nb = 0; nb < C / 8; ++nb) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int j = nb * 8 + gc + c;
                float ck = 0.0f;
                float cv = 0.0f;
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int t = m0 + gr + 8 * hf;
                    const float x1 = p1[0][nb][2 * hf + c];
                    const float x2 = p2[0][nb][2 * hf + c];
                    const float m = mt[t * XS + j];
                    ck = fmaf(m, x1, ck);
                    cv = fmaf(m, x2, cv);
                    dmt[t * XS + j] = j < t ? bt[j] * fmaf(gs[j], x1, x2) : 0.0f;
                }
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) {
                    ck += __shfl_xor_sync(0xffffffffu, ck, o);
                    cv += __shfl_xor_sync(0xffffffffu, cv, o);
                }
                if (gr == 0) {
                    colk[warp * C + j] = ck;
                    colv[warp * C + j] = cv;
                }
            }
        }
    }
    __syncthreads();
    // dM M^T (dM is strictly lower and M lower, with exact zeros elsewhere: the sums run over
    // every column); β's and the decays' terms through W and U.
    {
        float acc[16][2];
        ff_gdc_rows_product<C>(
            acc, warp, lane, [&](int a, int bb) { return dmt[a * XS + bb]; },
            [&](int bb, int j) { return mt[j * XS + bb]; });
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            tmt[(m0 + r) * XS + lane] = acc[r][0];
            tmt[(m0 + r) * XS + lane + 32] = acc[r][1];
        }
    }
    if (tid < C) {
        kbw[tid] = (colk[tid] + colk[C + tid]) + (colk[2 * C + tid] + colk[3 * C + tid]);
        vbu[tid] = (colv[tid] + colv[C + tid]) + (colv[2 * C + tid] + colv[3 * C + tid]);
        dbp[tid] = fmaf(gs[tid], kbw[tid], vbu[tid]);
        xt[tid * XS] += bt[tid] * kbw[tid];
    }
    __syncthreads();
    // dL = -M^T (dM M^T) on the strict lower triangle, over dM (M^T is upper triangular:
    // the sum over every row a is the sum over a >= t).
    {
        float acc[16][2];
        ff_gdc_rows_product<C>(
            acc, warp, lane, [&](int t, int a) { return mt[a * XS + t]; },
            [&](int a, int j) { return tmt[a * XS + j]; });
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const int t = m0 + r;
            dmt[t * XS + lane] = lane < t ? -acc[r][0] : 0.0f;
            dmt[t * XS + lane + 32] = lane + 32 < t ? -acc[r][1] : 0.0f;
        }
    }
    __syncthreads();
    // A_tj = Γ(t, j) q_t · k_j and L_tj = β_t Γ(t, j) k_t · k_j: the decay products'
    // gradients (X), β's (through L), and the weights of the q / k products for below.
    {
        float qk[1][C / 8][4];
        float kk[1][C / 8][4];
        ff_attn_scores<ff_bf16, DK, 1, C, KS, KS>(qk, q_a + (ff_u32_t)(m0 * KS * 2), k_a, lane);
        ff_attn_scores<ff_bf16, DK, 1, C, KS, KS>(kk, k_a + (ff_u32_t)(m0 * KS * 2), k_a, lane);
        float db[2] = {0.0f, 0.0f};
#pragma unroll
        for (int nb = 0; nb < C / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int hf = e >> 1;
                const int t = m0 + gr + 8 * hf;
                const int j = nb * 8 + gc + (e & 1);
                const float gg = j <= t ? ff_gdc_between(lg, zr, ng, t, j) : 0.0f;
                const float a = dat[t * XS + j];
                const float l = j < t ? dmt[t * XS + j] : 0.0f;
                float x = j <= t ? a * qk[0][nb][e] : 0.0f;
                x = fmaf(l * bt[t], kk[0][nb][e], x);
                db[hf] = fmaf(l * gg, kk[0][nb][e], db[hf]);
                xt[t * XS + j + 1] += x;
                dat[t * XS + j] = a * gg;
                dmt[t * XS + j] = l * bt[t] * gg;
                tmt[t * XS + j + 1] = gg;
            }
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float x = ff_gdc_quad_sum(db[hf]);
            if ((lane & 3) == 0) {
                const int t = m0 + gr + 8 * hf;
                dbp[t] += x;
                tmt[t * XS] = gs[t];
            }
        }
    }
    __syncthreads();
    if (tid < C) {
        xt[tid * XS] += xq[tid] + (tid == n - 1 ? dg_all : 0.0f);
        if (tid + 1 < n) {
            xt[(n - 1) * XS + tid + 1] += xk[tid];
        }
    }
    // dk_j += Σ_t (Γ ⊙ dA)_tj q_t + Σ_t (E_tj + E_jt) k_t + β_j G_j Σ_t M_tj dW_t (E_tj =
    // dL_tj β_t Γ(t, j)), dv_j = β_j Σ_t M_tj dU_t, for this warp's steps j.
    {
        float acc[1][DK / 8][4];
        ff_zero_frags(acc);
        ff_u32_t af[C / 16][4];
        ff_gdc_pack_a(af, m0, lane, [&](int r, int c) { return dat[c * XS + r]; });
        ff_gdc_mm_packed<DK>(acc[0], af, q_a, KS, lane);
        ff_gdc_pack_a(af, m0, lane,
                      [&](int r, int c) { return dmt[c * XS + r] + dmt[r * XS + c]; });
        ff_gdc_mm_packed<DK>(acc[0], af, k_a, KS, lane);
        ff_gdc_pack_a(af, m0, lane,
                      [&](int r, int c) { return bt[r] * gs[r] * mt[c * XS + r]; });
        ff_gdc_mm_packed<DK>(acc[0], af, w_a, KS, lane);
        float* dkg = dk + (bt0 * p.hv + h) * DK;
        const ff_i64_t ks = (ff_i64_t)p.hv * DK;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = m0 + gr + 8 * hf;
            if (r < n) {
#pragma unroll
                for (int nb = 0; nb < DK / 8; ++nb) {
                    const float2 x = *reinterpret_cast<const float2*>(dkg + r * ks + nb * 8 + gc);
                    acc[0][nb][2 * hf] += x.x;
                    acc[0][nb][2 * hf + 1] += x.y;
                }
            }
        }
        ff_gdc_store_grad<DK>(dkg, ks, acc[0], m0, n, tk, lane);
    }
    {
        float acc[1][DV / 8][4];
        ff_zero_frags(acc);
        ff_u32_t af[C / 16][4];
        ff_gdc_pack_a(af, m0, lane, [&](int r, int c) { return bt[r] * mt[c * XS + r]; });
        ff_gdc_mm_packed<DV>(acc[0], af, d_a, VS, lane);
        ff_gdc_store_grad<DV>(dv + (bt0 * p.hv + h) * DV, (ff_i64_t)p.hv * DV, acc[0], m0, n, tk,
                              lane);
    }
    __syncthreads();
    // dγ_s = Σ_{t >= s} Γ(t, s) Z_ts with Z_ts = Σ_{j < s} X_t(j) Γ(s - 1, j) (j = -1: from the
    // chunk's start; Γ(s - 1, s - 1) = 1): the product over (j, t] without step s. Z = X G^T
    // with G_s(k) = Γ(s - 1, k - 1) for k < s, 1 at k = s, 0 past it; Γ(t, s) = 0 for s > t.
    {
        float acc[16][2];
        ff_gdc_rows_product<C + 1>(
            acc, warp, lane, [&](int t, int kk) { return xt[t * XS + kk]; },
            [&](int kk, int sc) {
                return kk == sc ? 1.0f : (kk < sc ? tmt[(sc - 1) * XS + kk] : 0.0f);
            });
        float part0 = 0.0f;
        float part1 = 0.0f;
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const int t = m0 + r;
            part0 = fmaf(tmt[t * XS + lane + 1], acc[r][0], part0);
            part1 = fmaf(tmt[t * XS + lane + 33], acc[r][1], part1);
        }
        colk[warp * C + lane] = part0;
        colk[warp * C + lane + 32] = part1;
    }
    __syncthreads();
    if (tid < n) {
        const int st = tid;
        const ff_i64_t at = (bt0 + st) * p.hv + h;
        const bool taken = tk[st] != 0.0f;
        const float dg = (colk[st] + colk[C + st]) + (colk[2 * C + st] + colk[3 * C + st]);
        dgamma[at] = taken ? dg : 0.0f;
        dbeta[at] = taken ? dbp[st] : 0.0f;
    }
}
