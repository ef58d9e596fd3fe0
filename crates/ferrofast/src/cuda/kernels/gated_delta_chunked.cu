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
             ff_gdc_u16* __restrict__ qk_out, float* __restrict__ f_out, ff_gdc_params p) {
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
    if (tid < C) {
        const bool valid = tid < n;
        const bool taken = valid && (mask == nullptr || mask[bt0 + tid] != 0.0f);
        const ff_i64_t at = (bt0 + tid) * p.hv + h;
        g[tid] = taken ? TG::to_f32(gamma[at]) : 1.0f;
        bt[tid] = taken ? TG::to_f32(beta[at]) : 0.0f;
        tk[tid] = taken ? 1.0f : 0.0f;
        const float x = g[tid];
        lg[tid] = x == 0.0f ? 0.0f : logf(fabsf(x));
    }
    ff_cp_async_wait<0>();
    __syncthreads();
    if (mask != nullptr) {
        ff_gdc_zero_rows<DK, KS, 128>(ks, tk, tid);
        ff_gdc_zero_rows<DK, KS, 128>(qs, tk, tid);
        ff_gdc_zero_rows<DV, VS, 128>(vs, tk, tid);
    }
    // Prefixes, in step order (the CPU's order).
    float my_log = 0.0f;
    int my_zero = -1;
    int my_neg = 0;
    if (tid < C) {
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
    if (tid < C) {
        lg[tid] = my_log;
        zr[tid] = my_zero;
        ng[tid] = my_neg;
    }
    __syncthreads();
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

template <int DK, int DV, int NW>
__global__ void __launch_bounds__(32 * NW)
    gdc_state(const ff_gdc_u16* __restrict__ q, const ff_gdc_u16* __restrict__ k,
              const ff_gdc_u16* __restrict__ w_in, const ff_gdc_u16* __restrict__ u_in,
              const ff_gdc_u16* __restrict__ qk_in, const float* __restrict__ f_in,
              const float* __restrict__ state0, int has_mask, ff_gdc_u16* __restrict__ out,
              float* __restrict__ state, ff_gdc_params p) {
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
    {
        const float* src = state0 == nullptr ? nullptr : state0 + ((ff_i64_t)bh * DV + rw) * DK;
#pragma unroll
        for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                if (src != nullptr) {
                    const float2 x = *reinterpret_cast<const float2*>(
                        src + (gr + 8 * hf) * DK + nt * 8 + gc);
                    s[nt][2 * hf] = x.x;
                    s[nt][2 * hf + 1] = x.y;
                } else {
                    s[nt][2 * hf] = s[nt][2 * hf + 1] = 0.0f;
                }
            }
        }
    }

    auto issue = [&](int chunk) {
        ff_gdc_u16* st = stage0 + (chunk & 1) * L::ELEMS;
        const ff_i64_t t0 = (ff_i64_t)chunk * C;
        const int n = (int)min((ff_i64_t)C, p.t - t0);
        const ff_i64_t bt0 = (ff_i64_t)b * p.t + t0;
        const ff_i64_t wk = (ff_i64_t)bh * p.n_chunks + chunk;
        ff_load_tile<ff_gdc_u16, C, DK, L::KS, NT>(st + L::W, w_in + wk * C * DK, DK, C, tid);
        ff_load_tile<ff_gdc_u16, C, DK, L::KS, NT>(st + L::Q, q + (bt0 * p.hk + kh) * DK,
                                                   (ff_i64_t)p.hk * DK, n, tid);
        ff_load_tile<ff_gdc_u16, C, DK, L::KS, NT>(st + L::K, k + (bt0 * p.hk + kh) * DK,
                                                   (ff_i64_t)p.hk * DK, n, tid);
        ff_load_tile<ff_gdc_u16, C, C, L::AS, NT>(st + L::A, qk_in + wk * C * C, C, C, tid);
        ff_load_tile<ff_gdc_u16, C, 16 * NW, L::US, NT>(st + L::U, u_in + wk * C * DV + dv0, DV,
                                                        C, tid);
        ff_load_tile<ff_gdc_u16, 1, 2 * FF_GDC_F, 2 * FF_GDC_F, NT>(
            st + L::F, reinterpret_cast<const ff_gdc_u16*>(f_in + wk * FF_GDC_F), 0, 1, tid);
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
        {
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
        {
            // A = (Γ Δ)^T [value row][step] from the [step][value row] tile (ldmatrix.trans):
            // matrices (rows 0-7, steps 0-7), (rows 8-15, steps 0-7), (rows 0-7, steps 8-15),
            // (rows 8-15, steps 8-15).
            const ff_u32_t at_off =
                (ff_u32_t)((((lane & 7) + ((lane >> 4) & 1) * 8) * FF_GDC_DS +
                            ((lane >> 3) & 1) * 8) *
                           2);
            const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
            const int b_half = lane >> 4;
            const ff_u32_t kb_off = (ff_u32_t)((b_row * L::KS + b_half * 8) * 2);
#pragma unroll
            for (int kk = 0; kk < C / 16; ++kk) {
                ff_u32_t a[4];
                ff_ldmatrix_x4_trans(a, ds_a + at_off + (ff_u32_t)(kk * 16 * FF_GDC_DS * 2));
#pragma unroll
                for (int dd = 0; dd < DK / 16; ++dd) {
                    ff_u32_t bb[4];
                    ff_ldmatrix_x4_trans(
                        bb, k_a + kb_off + (ff_u32_t)((kk * 16 * L::KS + dd * 16) * 2));
                    ff_attn_mma<ff_bf16>::mma(s[2 * dd], a, bb[0], bb[1]);
                    ff_attn_mma<ff_bf16>::mma(s[2 * dd + 1], a, bb[2], bb[3]);
                }
            }
        }
        __syncthreads();
    }

    float* dst = state + ((ff_i64_t)bh * DV + rw) * DK;
#pragma unroll
    for (int nt = 0; nt < DK / 8; ++nt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            *reinterpret_cast<float2*>(dst + (gr + 8 * hf) * DK + nt * 8 + gc) =
                make_float2(s[nt][2 * hf], s[nt][2 * hf + 1]);
        }
    }
}
