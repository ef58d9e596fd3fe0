// Attention backward for Hopper (sm_90a only: wgmma exists only in the `a` target), f16 and
// bf16 inputs (T is ff_f16 or ff_bf16), D = D_v in {64, 128}, every mask kind the forward
// takes (none, causal lower-right, bool and additive arrays with broadcasting), sinks
// (through the forward's log-sum-exp; their own gradient is `attn_bwd_dsinks`), grouped-
// query heads, any T_q and T_kv. The recomputation and its special values are those of
// attn_backward_mma.cu (ferrofast_attn_bwd.cuh: P, dS and the stores are shared); this file
// replaces its mma.sync products with warpgroup MMAs fed by TMA.
//
// Two passes (each block owning what it writes: no atomics, deterministic) or one fused pass
// (dQ added in f32 by bulk reductions: not bit-reproducible), two
// warpgroups (256 threads) per block with no producer warpgroup: thread 0 issues every TMA
// copy (4-d tensor maps over [B, H, T, D], 128-byte swizzle, rows past T zero-filled)
// STAGES - 1 tiles ahead into a ring of STAGES stages, each stage with a "full" mbarrier
// (transaction bytes) and an "empty" one (one arrival per warp).
//
//   attn_bwd_sm90_dkdv  one block per (128 keys, kv head, batch); warpgroup w owns keys
//                       64w .. 64w + 63 and their dK, dV in registers (64 x D f32 each).
//                       Query tiles of 64 rows of every query head of the group stream
//                       through the ring (Q and dO). Per tile: S^T = K Q^T and
//                       dP^T = V dO^T (wgmma m64n64k16, both operands from shared memory,
//                       K-major), P^T and dS^T in registers, then dV += P^T dO and
//                       dK += dS^T Q (A from registers, B = dO / Q from shared memory,
//                       MN-major). The rows' lse2 and delta go through a per-warpgroup
//                       double buffer in shared memory (one named barrier per tile).
//                       FUSED: dS^T also goes to shared memory (bf16 / f16, rows = keys,
//                       128-byte swizzle) and dQ (64 queries x D) += dS K with both
//                       operands from shared memory MN-major: at D 128 warpgroup w
//                       computes columns 64w .. 64w + 63 over all 128 keys (the two
//                       warpgroups meet at two block barriers a tile), at D 64 each
//                       warpgroup its own 64 keys' part. The f32 result goes to shared
//                       memory in the order of the accumulator fragments (see
//                       ff_sm90_dq_index) and is added to the f32 scratch `dq_acc` by one
//                       bulk reduction; attn_bwd_sm90_dq_convert then writes dQ.
//   attn_bwd_sm90_dq    one block per (128 queries, query head, batch), last tile first;
//                       warpgroup w owns queries 64w .. 64w + 63 and their dQ. Key tiles of
//                       64 keys (K and V) stream through the ring. Per tile: S = Q K^T and
//                       dP = dO V^T (ss), P and dS, dQ += dS K (A from registers, B = K
//                       MN-major).
//
// Shared-memory tiles are stored as TMA writes them: D / 64 panels of 64 columns, a row of
// a panel 128 bytes with its 16-byte chunks permuted by chunk ^= row % 8; descriptors as in
// attn_prefill_sm90.cu (K-major: stride byte offset 1024, k-th 16-column step at 32 * (k %
// 4) bytes of panel k / 4; MN-major: leading byte offset = panel size, 16-row step at 2048
// bytes).
#include "ferrofast_mma.cuh"
#include "ferrofast_hopper.cuh"
#include "ferrofast_attn.cuh"
#include "ferrofast_attn_bwd.cuh"

// Shared-memory bytes of the two kernels (the launcher computes the same numbers): 1024 bytes
// of alignment slack, the tiles, (dK / dV) two warpgroups' double buffers of 64 lse2 and 64
// delta, and the mbarriers.
#define FF_SM90_BWD_KV_SMEM(D, STAGES, FUSED)                                            \
    (1024 + 2 * 128 * (D) * 2 + (STAGES) * 2 * 64 * (D) * 2 + (FUSED) * FF_SM90_BWD_DQ_SMEM + \
     2 * 2 * 2 * 64 * 4 + (1 + 2 * (STAGES)) * 8)
// The fused kernel's dS^T tile (128 keys x 64 queries, 16-bit) and dQ tile (64 x D f32; at
// D 64 one per warpgroup): 48 KiB at D 64 and 128.
#define FF_SM90_BWD_DQ_SMEM (128 * 64 * 2 + 32768)
#define FF_SM90_BWD_Q_SMEM(D, STAGES) \
    (1024 + 2 * 128 * (D) * 2 + (STAGES) * 2 * 64 * (D) * 2 + (1 + 2 * (STAGES)) * 8)

// The mbarriers at shared address `bars` (a `bars` in scope, and STAGES): the resident
// tile's at bars, then stage s's "full" and "empty" ones.
#define FF_FULL(s) (bars + 8u + 8u * (ff_u32_t)(s))
#define FF_EMPTY(s) (bars + 8u + 8u * STAGES + 8u * (ff_u32_t)(s))

// Thread `tid` 0 initialises a block's mbarriers (the resident tile's and every stage's
// "full" one with one arrival, the "empty" ones with one per warp), then the block syncs.
template <int STAGES>
__device__ __forceinline__ void ff_sm90_bwd_init_bars(ff_u32_t bars, int tid) {
    if (tid == 0) {
        ff_mbar_init(bars, 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            ff_mbar_init(FF_FULL(s), 1);
            ff_mbar_init(FF_EMPTY(s), 8);
        }
        ff_mbar_init_fence();
    }
    __syncthreads();
}

// A barrier over the 128 threads of warpgroup `wg` (0 or 1): named barriers 1 and 2 (0 is
// __syncthreads), as immediates so ptxas reserves only those.
__device__ __forceinline__ void ff_wg_barrier(int wg) {
    if (wg == 0) {
        asm volatile("bar.sync 1, 128;\n" ::: "memory");
    } else {
        asm volatile("bar.sync 2, 128;\n" ::: "memory");
    }
}

// The element mask of head (b, h) as the shared steps read it, or null.
template <typename T>
__device__ __forceinline__ const void* ff_sm90_bwd_mask(const void* mask, const ff_attn_params& p,
                                                        ff_i64_t b, int h) {
    if (p.mask_kind == FF_MASK_NONE) {
        return nullptr;
    }
    const ff_i64_t base = p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh;
    return (const char*)mask +
           base * (p.mask_kind == FF_MASK_BOOL ? 1 : (ff_i64_t)sizeof(typename T::storage));
}

// A volatile read of shared memory, so the compiler reads it next to its use instead of
// hoisting every row's value into registers ahead of the products that need them.
__device__ __forceinline__ float ff_ld_shared_f32(const float* at) {
    return *(const volatile float*)at;
}

// The fused kernel's dQ scratch: per (batch, query head, 64-row query tile) 64 x D floats in
// the order warpgroup MMAs leave them, so a warp's stores of its accumulator are 512
// contiguous bytes a group: float (cp, wp, nb, lane, i) at (((cp * 4 + wp) * 8 + nb) * 32 +
// lane) * 4 + i holds dQ row 16 wp + lane / 4 + 8 (i / 2), column 64 cp + 8 nb + 2 (lane % 4) +
// i % 2 of the tile (cp: 64-column panel, wp: warp of the warpgroup, nb: 8-column group).
__device__ __forceinline__ int ff_sm90_dq_index(int cp, int wp, int nb, int lane) {
    return (((cp * 4 + wp) * 8 + nb) * 32 + lane) * 4;
}

// The fused dK / dV kernel's meeting point around the shared dS and dQ tiles: at D 128 both
// warpgroups (each reads the other's dS rows), at D 64 warpgroup `wg` alone.
template <int D>
__device__ __forceinline__ void ff_sm90_dq_sync(int wg) {
    if (D == 128) {
        __syncthreads();
    } else {
        ff_wg_barrier(wg);
    }
}

// acc (64 x N per warpgroup, N = 8 * NB) = A B^T over K = D: A rows at `a` (panel size
// A_PANEL), B rows at `b` (panel size B_PANEL), both K-major in 64-column panels.
template <typename T, int D>
__device__ __forceinline__ void ff_sm90_bwd_ss(float (&acc)[8][4], ff_u32_t a, ff_u32_t a_panel,
                                               ff_u32_t b, ff_u32_t b_panel) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const ff_u32_t col = (ff_u32_t)((kk & 3) * 32);
        const ff_u64_t da = ff_wgmma_desc(a + (ff_u32_t)(kk >> 2) * a_panel + col, 16, 1024);
        const ff_u64_t db = ff_wgmma_desc(b + (ff_u32_t)(kk >> 2) * b_panel + col, 16, 1024);
        ff_wgmma<T>::ss_n64(acc, da, db, kk > 0 ? 1 : 0);
    }
}

// acc (64 x D per warpgroup) += A B over K = 64 rows: A the packed fragments of a 64 x 64
// accumulator (four 16-column steps), B 64 rows x D at `b` (panel size B_PANEL), MN-major.
template <typename T, int D>
__device__ __forceinline__ void ff_sm90_bwd_rs(float (&acc)[D / 8][4], const ff_u32_t (&a)[4][4],
                                               ff_u32_t b, ff_u32_t b_panel) {
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
#pragma unroll
        for (int pn = 0; pn < D / 64; ++pn) {
            const ff_u64_t db = ff_wgmma_desc(b + (ff_u32_t)pn * b_panel + (ff_u32_t)(kb * 16 * 128),
                                              b_panel, 1024);
            ff_wgmma<T>::rs_n64(reinterpret_cast<float(&)[8][4]>(acc[8 * pn]), a[kb], db, 1);
        }
    }
}

// acc (64 x D per warpgroup) += A B over K = 64: A 64 rows x 64 at `a` (one 128-byte-
// swizzled panel, K-major), B 64 rows x D at `b` (panel size B_PANEL), MN-major.
template <typename T, int D>
__device__ __forceinline__ void ff_sm90_bwd_ss_bmn(float (&acc)[D / 8][4], ff_u32_t a,
                                                   ff_u32_t b, ff_u32_t b_panel) {
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
        const ff_u64_t da = ff_wgmma_desc(a + (ff_u32_t)(kb * 32), 16, 1024);
#pragma unroll
        for (int pn = 0; pn < D / 64; ++pn) {
            const ff_u64_t db = ff_wgmma_desc(b + (ff_u32_t)pn * b_panel + (ff_u32_t)(kb * 16 * 128),
                                              b_panel, 1024);
            ff_wgmma<T>::ss_n64_bmn(reinterpret_cast<float(&)[8][4]>(acc[8 * pn]), da, db, 1);
        }
    }
}

// tm_q, tm_g (d_out): boxes of 64 columns x 64 rows; tm_k, tm_v: 64 x 128. mask: as the
// params describe (or null). lse, delta: [B, N_q, T_q] f32. dk, dv: row-major
// [B, N_kv, T_kv, D]. dq_acc (FUSED; else unused): [B, N_q, ceil(T_q / 64)] tiles of 64 x D
// f32 in ff_sm90_dq_index's order, zeroed before the launch.
template <typename T, int D, int STAGES, bool FUSED>
__global__ void __launch_bounds__(256, 1)
    attn_bwd_sm90_dkdv(const __grid_constant__ ff_tensor_map tm_q,
                       const __grid_constant__ ff_tensor_map tm_k,
                       const __grid_constant__ ff_tensor_map tm_v,
                       const __grid_constant__ ff_tensor_map tm_g, const void* __restrict__ mask,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       typename T::storage* __restrict__ dk, typename T::storage* __restrict__ dv,
                       float* __restrict__ dq_acc, const ff_attn_params p, float scale) {
    static_assert(D == 64 || D == 128, "head dims");
    constexpr int BN = 128;  // keys per block
    constexpr int BM = 64;   // queries per tile
    constexpr int PANELS = D / 64;
    constexpr ff_u32_t KV_PANEL = BN * 128;
    constexpr ff_u32_t Q_PANEL = BM * 128;
    constexpr ff_u32_t KV_BYTES = PANELS * KV_PANEL;
    constexpr ff_u32_t Q_BYTES = PANELS * Q_PANEL;
    static_assert(STAGES >= 2 && STAGES <= 4, "stages");
    constexpr ff_u32_t DS_BYTES = FUSED ? BN * BM * 2 : 0;
    constexpr ff_u32_t DQ_BYTES = FUSED ? 32768 : 0;
    static_assert(FF_SM90_BWD_KV_SMEM(D, STAGES, FUSED) ==
                      1024 + 2 * KV_BYTES + 2 * STAGES * Q_BYTES + DS_BYTES + DQ_BYTES +
                          2 * 2 * 2 * BM * 4 + (1 + 2 * STAGES) * 8,
                  "shared memory size");
    static_assert(!FUSED || FF_SM90_BWD_DQ_SMEM == DS_BYTES + DQ_BYTES, "dQ tiles");

    extern __shared__ __align__(1024) unsigned char ff_sm90_bwd_smem[];
    const ff_u32_t raw = ff_smem_u32(ff_sm90_bwd_smem);
    const ff_u32_t pad = ((raw + 1023u) & ~1023u) - raw;
    const ff_u32_t sk = raw + pad;
    const ff_u32_t sv = sk + KV_BYTES;
    const ff_u32_t sq = sv + KV_BYTES;             // stage s at sq + s * Q_BYTES
    const ff_u32_t sg = sq + STAGES * Q_BYTES;     // stage s at sg + s * Q_BYTES
    const ff_u32_t sds = sg + STAGES * Q_BYTES;    // FUSED: dS^T, 1024-byte aligned
    const ff_u32_t sdq = sds + DS_BYTES;           // FUSED: the dQ tile(s)
    float* const rows_f = (float*)(ff_sm90_bwd_smem + pad + 2 * KV_BYTES + 2 * STAGES * Q_BYTES +
                                   DS_BYTES + DQ_BYTES);
    const ff_u32_t bars = sdq + DQ_BYTES + 2 * 2 * 2 * BM * 4;
    const ff_u32_t kv_full = bars;

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;
    const int lane = tid & 31;
    const int k0 = blockIdx.x * BN;
    const int g = blockIdx.y;
    const ff_i64_t b = blockIdx.z;
    const int n_q = p.n_kv * p.group;
    const int Tq = p.t_q, Tkv = p.t_kv;
    const int diag = Tkv - Tq;

    // Query tiles: from the first that sees one of these keys, for every head of the group.
    int q_first = 0;
    if (p.causal) {
        q_first = min(max(0, k0 - diag), Tq);
        q_first -= q_first % BM;
    }
    const int n_qt = (Tq - q_first + BM - 1) / BM;
    const int n_it = n_qt * p.group;

    ff_sm90_bwd_init_bars<STAGES>(bars, tid);

    // Thread 0: loads of iteration `it` into stage it % STAGES, after its last use is
    // released.
    auto issue = [&](int it) {
        const int st = it % STAGES;
        const int u = it / STAGES;
        if (u > 0) {
            ff_mbar_wait(FF_EMPTY(st), (ff_u32_t)(u - 1) & 1u);
        }
        const int h = g * p.group + it / n_qt;
        const int q0 = q_first + (it % n_qt) * BM;
        ff_mbar_arrive_tx(FF_FULL(st), 2 * Q_BYTES);
#pragma unroll
        for (int pn = 0; pn < PANELS; ++pn) {
            ff_tma_load_4d(sq + st * Q_BYTES + pn * Q_PANEL, &tm_q, FF_FULL(st), pn * 64, q0, h,
                           (int)b);
            ff_tma_load_4d(sg + st * Q_BYTES + pn * Q_PANEL, &tm_g, FF_FULL(st), pn * 64, q0, h,
                           (int)b);
        }
    };

    if (tid == 0 && n_it > 0) {
        ff_tma_prefetch(&tm_q);
        ff_tma_prefetch(&tm_k);
        ff_tma_prefetch(&tm_v);
        ff_tma_prefetch(&tm_g);
        ff_mbar_arrive_tx(kv_full, 2 * KV_BYTES);
#pragma unroll
        for (int pn = 0; pn < PANELS; ++pn) {
            ff_tma_load_4d(sk + pn * KV_PANEL, &tm_k, kv_full, pn * 64, k0, g, (int)b);
            ff_tma_load_4d(sv + pn * KV_PANEL, &tm_v, kv_full, pn * 64, k0, g, (int)b);
        }
        for (int it = 0; it < STAGES - 1 && it < n_it; ++it) {
            issue(it);
        }
    }

    float acc_k[D / 8][4];
    float acc_v[D / 8][4];
    ff_zero_frags(acc_k);
    ff_zero_frags(acc_v);

    const int wk = k0 + wg * 64 + warp * 16;  // this warp's first key
    const int krow0 = wk + (lane >> 2);
    const ff_u32_t k_rows = sk + (ff_u32_t)(wg * 64 * 128);
    const ff_u32_t v_rows = sv + (ff_u32_t)(wg * 64 * 128);
    const int t = tid & 127;
    // Threads t < 64 of each warpgroup carry the lse2 and delta of query t of the next tile
    // in registers: loaded one tile ahead, so the loads' latency hides under a tile's work.
    auto rows_of = [&](int it, float& l2, float& dl) {
        const int h = g * p.group + it / n_qt;
        const int q0 = q_first + (it % n_qt) * BM;
        const ff_i64_t row = ((ff_i64_t)b * n_q + h) * Tq + q0 + t;
        const bool in = q0 + t < Tq;
        l2 = ff_bwd_lse2(lse, row, in);
        dl = in ? delta[row] : 0.0f;
    };
    float next_l2 = 0.0f, next_dl = 0.0f;
    if (t < BM && n_it > 0) {
        rows_of(0, next_l2, next_dl);
    }
    if (n_it > 0) {
        ff_mbar_wait(kv_full, 0);
    }

    for (int it = 0; it < n_it; ++it) {
        const int st = it % STAGES;
        const int h = g * p.group + it / n_qt;
        const int q0 = q_first + (it % n_qt) * BM;
        if (tid == 0 && it + STAGES - 1 < n_it) {
            issue(it + STAGES - 1);
        }
        // This tile's lse2 and delta into this warpgroup's buffer it % 2 (its readers of
        // two tiles ago passed the barrier of the last tile), then the next tile's loads.
        float* const l2s = rows_f + (wg * 2 + (it & 1)) * 2 * BM;
        float* const dls = l2s + BM;
        if (t < BM) {
            l2s[t] = next_l2;
            dls[t] = next_dl;
            if (it + 1 < n_it) {
                rows_of(it + 1, next_l2, next_dl);
            }
        }
        ff_wg_barrier(wg);

        const ff_u32_t q_tile = sq + st * Q_BYTES;
        const ff_u32_t g_tile = sg + st * Q_BYTES;
        ff_mbar_wait(FF_FULL(st), (ff_u32_t)(it / STAGES) & 1u);

        // S^T = K Q^T and dP^T = V dO^T.
        float s[1][BM / 8][4];
        float dp[1][BM / 8][4];
        ff_wgmma_fence();
        ff_sm90_bwd_ss<T, D>(s[0], k_rows, KV_PANEL, q_tile, Q_PANEL);
        ff_wgmma_commit();
        ff_sm90_bwd_ss<T, D>(dp[0], v_rows, KV_PANEL, g_tile, Q_PANEL);
        ff_wgmma_commit();

        // Whether this warp's keys need element-wise masking against the tile.
        const bool full = p.mask_kind == FF_MASK_NONE && wk + 16 <= Tkv &&
                          (!p.causal || wk + 15 <= q0 + diag);
        const void* mask_bh = ff_sm90_bwd_mask<T>(mask, p, b, h);
        const int col0 = q0 + 2 * (lane & 3);
        ff_wgmma_wait<1>();
        ff_fence_regs(s[0]);
        ff_bwd_probs<T, 1, BM, true>(s, krow0, col0, full, p, mask_bh, p.scale_log2,
                                     [&](int qi) { return ff_ld_shared_f32(l2s + qi - q0); });
        ff_u32_t pp[1][BM / 16][4];
        ff_attn_pack<T, 1, BM>(pp, s);
        ff_wgmma_wait<0>();
        ff_fence_regs(dp[0]);
        ff_bwd_ds<1, BM, true>(dp, s, krow0, col0,
                               [&](int qi) { return ff_ld_shared_f32(dls + qi - q0); });
        ff_u32_t pds[1][BM / 16][4];
        ff_attn_pack<T, 1, BM>(pds, dp);
        if (FUSED) {
            // This warp's dS^T rows into the shared tile: 16-byte chunk nb of key row r
            // (queries 8 nb .. 8 nb + 7) at chunk nb ^ (r % 8), as a 128-byte swizzle reads it
            // (r % 8 = lane / 4). The XOR is done in the store's asm, from the row's address
            // and the lane's swizzle, so the compiler keeps two addresses live instead of
            // sixteen.
            const ff_u32_t swz = (ff_u32_t)((lane >> 2) << 4);
            const ff_u32_t row_at =
                sds + (ff_u32_t)((wg * 64 + warp * 16 + (lane >> 2)) * 128 + ((lane & 3) << 2));
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    asm volatile(
                        "{\n.reg .u32 a;\nxor.b32 a, %1, %2;\nadd.u32 a, a, %3;\n"
                        "st.shared.u32 [a], %0;\n}\n" ::"r"(pds[0][nb >> 1][(nb & 1) * 2 + hf]),
                        "r"(swz), "r"(nb << 4), "r"(row_at + (ff_u32_t)(hf * 8 * 128))
                        : "memory");
                }
            }
            ff_fence_proxy_async();
        }

        // dV += P^T dO, dK += dS^T Q (FUSED: dS^T from the shared tile, so no fragments of
        // it stay live across the products).
        ff_wgmma_fence();
        ff_sm90_bwd_rs<T, D>(acc_v, pp[0], g_tile, Q_PANEL);
        if (!FUSED) {
            ff_sm90_bwd_rs<T, D>(acc_k, pds[0], q_tile, Q_PANEL);
        }
        ff_wgmma_commit();
        float acc_q[BM / 8][4];
        if (FUSED) {
            // dK, and dQ += dS K over this warpgroup's keys and column panel, once the dS^T
            // rows they read are written and the last tile's reduction has read the dQ tile.
            if (t == 0 && it > 0) {
                ff_bulk_wait_read<0>();
            }
            ff_sm90_dq_sync<D>(wg);
            ff_wgmma_fence();
            ff_sm90_bwd_ss_bmn<T, D>(acc_k, sds + (ff_u32_t)(wg * 64 * 128), q_tile, Q_PANEL);
            constexpr int KEYS = D == 128 ? BN : 64;
            const int kbase = D == 128 ? 0 : wg * 64;
            const int cp = D == 128 ? wg : 0;
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                const ff_u32_t row = (ff_u32_t)((kbase + 16 * kk) * 128);
                const ff_u64_t da = ff_wgmma_desc(sds + row, BN * 128, 1024);
                const ff_u64_t db = ff_wgmma_desc(sk + (ff_u32_t)cp * KV_PANEL + row, KV_PANEL, 1024);
                ff_wgmma<T>::ss_n64_mn(acc_q, da, db, kk > 0 ? 1 : 0);
            }
            ff_wgmma_commit();
        }
        ff_wgmma_wait<0>();
        ff_fence_regs(acc_v);
        ff_fence_regs(acc_k);
        ff_fence_regs(pp[0]);
        if (!FUSED) {
            ff_fence_regs(pds[0]);
        }
        __syncwarp();
        if (lane == 0) {
            ff_mbar_arrive(FF_EMPTY(st));
        }
        if (FUSED) {
            ff_fence_regs(acc_q);
            const int cp = D == 128 ? wg : 0;
            const ff_u32_t tile = sdq + (D == 128 ? 0u : (ff_u32_t)wg * 16384u);
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const ff_u32_t at = tile + (ff_u32_t)ff_sm90_dq_index(cp, warp, nb, lane) * 4u;
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(at),
                             "f"(acc_q[nb][0]), "f"(acc_q[nb][1]), "f"(acc_q[nb][2]),
                             "f"(acc_q[nb][3])
                             : "memory");
            }
            ff_fence_proxy_async();
            ff_sm90_dq_sync<D>(wg);
            if (t == 0 && (D == 64 || wg == 0)) {
                const ff_i64_t n_tiles = (Tq + BM - 1) / BM;
                float* const dst =
                    dq_acc + ((((ff_i64_t)b * n_q + h) * n_tiles + q0 / BM) * BM * D);
                ff_bulk_reduce_add_f32(dst, tile, D == 128 ? 32768u : 16384u);
            }
        }
    }
    if (FUSED && t == 0) {
        ff_bulk_wait<0>();
    }

    const ff_i64_t kv_row0 = ((ff_i64_t)b * p.n_kv + g) * Tkv;
    float(&ak)[1][D / 8][4] = reinterpret_cast<float(&)[1][D / 8][4]>(acc_k);
    float(&av)[1][D / 8][4] = reinterpret_cast<float(&)[1][D / 8][4]>(acc_v);
    ff_bwd_store<T, 1, D>(dk + kv_row0 * D, ak, krow0, Tkv, scale, lane);
    ff_bwd_store<T, 1, D>(dv + kv_row0 * D, av, krow0, Tkv, 1.0f, lane);
}

// tm_q, tm_g (d_out): boxes of 64 columns x 128 rows; tm_k, tm_v: 64 x 64. Other inputs as
// attn_bwd_sm90_dkdv's; dq: row-major [B, N_q, T_q, D].
template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(256, 1)
    attn_bwd_sm90_dq(const __grid_constant__ ff_tensor_map tm_q,
                     const __grid_constant__ ff_tensor_map tm_k,
                     const __grid_constant__ ff_tensor_map tm_v,
                     const __grid_constant__ ff_tensor_map tm_g, const void* __restrict__ mask,
                     const float* __restrict__ lse, const float* __restrict__ delta,
                     typename T::storage* __restrict__ dq, const ff_attn_params p, float scale) {
    static_assert(D == 64 || D == 128, "head dims");
    constexpr int BM = 128;  // queries per block
    constexpr int BN = 64;   // keys per tile
    constexpr int PANELS = D / 64;
    constexpr ff_u32_t Q_PANEL = BM * 128;
    constexpr ff_u32_t KV_PANEL = BN * 128;
    constexpr ff_u32_t Q_BYTES = PANELS * Q_PANEL;
    constexpr ff_u32_t KV_BYTES = PANELS * KV_PANEL;
    static_assert(STAGES >= 2 && STAGES <= 4, "stages");
    static_assert(FF_SM90_BWD_Q_SMEM(D, STAGES) ==
                      1024 + 2 * Q_BYTES + 2 * STAGES * KV_BYTES + (1 + 2 * STAGES) * 8,
                  "shared memory size");

    extern __shared__ __align__(1024) unsigned char ff_sm90_bwd_smem[];
    const ff_u32_t raw = ff_smem_u32(ff_sm90_bwd_smem);
    const ff_u32_t sq = (raw + 1023u) & ~1023u;
    const ff_u32_t sg = sq + Q_BYTES;
    const ff_u32_t sk = sg + Q_BYTES;            // stage s at sk + s * KV_BYTES
    const ff_u32_t sv = sk + STAGES * KV_BYTES;  // stage s at sv + s * KV_BYTES
    const ff_u32_t bars = sv + STAGES * KV_BYTES;
    const ff_u32_t qg_full = bars;

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;
    const int lane = tid & 31;
    // Query tiles last-first: with a causal mask the longest start first.
    const int m0 = (int)(gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y;
    const ff_i64_t b = blockIdx.z;
    const int n_q = p.n_kv * p.group;
    const int kvh = h / p.group;
    const int Tq = p.t_q, Tkv = p.t_kv;
    const int diag = Tkv - Tq;

    const int rows_here = min(BM, Tq - m0);
    int n_end = Tkv;
    if (p.causal) {
        n_end = max(0, min(Tkv, m0 + rows_here + diag));
    }
    const int n_kt = (n_end + BN - 1) / BN;

    ff_sm90_bwd_init_bars<STAGES>(bars, tid);

    auto issue = [&](int j) {
        const int st = j % STAGES;
        const int u = j / STAGES;
        if (u > 0) {
            ff_mbar_wait(FF_EMPTY(st), (ff_u32_t)(u - 1) & 1u);
        }
        ff_mbar_arrive_tx(FF_FULL(st), 2 * KV_BYTES);
#pragma unroll
        for (int pn = 0; pn < PANELS; ++pn) {
            ff_tma_load_4d(sk + st * KV_BYTES + pn * KV_PANEL, &tm_k, FF_FULL(st), pn * 64, j * BN,
                           kvh, (int)b);
            ff_tma_load_4d(sv + st * KV_BYTES + pn * KV_PANEL, &tm_v, FF_FULL(st), pn * 64, j * BN,
                           kvh, (int)b);
        }
    };

    if (tid == 0 && n_kt > 0) {
        ff_tma_prefetch(&tm_q);
        ff_tma_prefetch(&tm_k);
        ff_tma_prefetch(&tm_v);
        ff_tma_prefetch(&tm_g);
        ff_mbar_arrive_tx(qg_full, 2 * Q_BYTES);
#pragma unroll
        for (int pn = 0; pn < PANELS; ++pn) {
            ff_tma_load_4d(sq + pn * Q_PANEL, &tm_q, qg_full, pn * 64, m0, h, (int)b);
            ff_tma_load_4d(sg + pn * Q_PANEL, &tm_g, qg_full, pn * 64, m0, h, (int)b);
        }
        for (int j = 0; j < STAGES - 1 && j < n_kt; ++j) {
            issue(j);
        }
    }

    const int wq = m0 + wg * 64 + warp * 16;  // this warp's first query
    const int qrow0 = wq + (lane >> 2);
    const ff_i64_t row_base = ((ff_i64_t)b * n_q + h) * Tq;
    float l2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = qrow0 + 8 * r;
        l2[r] = ff_bwd_lse2(lse, row_base + qi, qi < Tq);
        dl[r] = qi < Tq ? delta[row_base + qi] : 0.0f;
    }
    const void* mask_bh = ff_sm90_bwd_mask<T>(mask, p, b, h);

    float acc[D / 8][4];
    ff_zero_frags(acc);
    const ff_u32_t q_rows = sq + (ff_u32_t)(wg * 64 * 128);
    const ff_u32_t g_rows = sg + (ff_u32_t)(wg * 64 * 128);
    if (n_kt > 0) {
        ff_mbar_wait(qg_full, 0);
    }

    for (int j = 0; j < n_kt; ++j) {
        const int st = j % STAGES;
        const int n0 = j * BN;
        if (tid == 0 && j + STAGES - 1 < n_kt) {
            issue(j + STAGES - 1);
        }
        const ff_u32_t k_tile = sk + st * KV_BYTES;
        const ff_u32_t v_tile = sv + st * KV_BYTES;
        ff_mbar_wait(FF_FULL(st), (ff_u32_t)(j / STAGES) & 1u);

        // S = Q K^T and dP = dO V^T.
        float s[1][BN / 8][4];
        float dp[1][BN / 8][4];
        ff_wgmma_fence();
        ff_sm90_bwd_ss<T, D>(s[0], q_rows, Q_PANEL, k_tile, KV_PANEL);
        ff_wgmma_commit();
        ff_sm90_bwd_ss<T, D>(dp[0], g_rows, Q_PANEL, v_tile, KV_PANEL);
        ff_wgmma_commit();

        // Whether this warp's queries need element-wise masking against the key tile.
        const bool full = p.mask_kind == FF_MASK_NONE && n0 + BN <= Tkv &&
                          (!p.causal || n0 + BN - 1 <= wq + diag);
        ff_wgmma_wait<1>();
        ff_fence_regs(s[0]);
        ff_bwd_probs<T, 1, BN, false>(s, qrow0, n0 + 2 * (lane & 3), full, p, mask_bh,
                                      p.scale_log2,
                                      [&](int qi) { return l2[(qi - qrow0) >> 3]; });
        ff_wgmma_wait<0>();
        ff_fence_regs(dp[0]);
        ff_bwd_ds<1, BN, false>(dp, s, qrow0, 0, [&](int qi) { return dl[(qi - qrow0) >> 3]; });
        ff_u32_t pds[1][BN / 16][4];
        ff_attn_pack<T, 1, BN>(pds, dp);

        // dQ += dS K.
        ff_wgmma_fence();
        ff_sm90_bwd_rs<T, D>(acc, pds[0], k_tile, KV_PANEL);
        ff_wgmma_commit();
        ff_wgmma_wait<0>();
        ff_fence_regs(acc);
        ff_fence_regs(pds[0]);
        __syncwarp();
        if (lane == 0) {
            ff_mbar_arrive(FF_EMPTY(st));
        }
    }

    float(&aq)[1][D / 8][4] = reinterpret_cast<float(&)[1][D / 8][4]>(acc);
    ff_bwd_store<T, 1, D>(dq + row_base * D, aq, qrow0, Tq, scale, lane);
}

// dq (row-major [B, N_q, T_q, D], T) = scale * the fused dK / dV kernel's f32 scratch
// (`heads` = B * N_q tile rows of ceil(T_q / 64) tiles in ff_sm90_dq_index's order). One
// thread a float4 of the scratch (two elements of two rows), grid-stride.
template <typename T, int D>
__global__ void __launch_bounds__(256)
    attn_bwd_sm90_dq_convert(const float* __restrict__ dq_acc,
                             typename T::storage* __restrict__ dq, ff_i64_t heads, int tq,
                             float scale) {
    constexpr int PER_TILE = 16 * D;  // float4s a tile
    const ff_i64_t n_tiles = (tq + 63) / 64;
    const ff_i64_t total = heads * n_tiles * PER_TILE;
    const float4* const src = (const float4*)dq_acc;
    for (ff_i64_t g = (ff_i64_t)blockIdx.x * blockDim.x + threadIdx.x; g < total;
         g += (ff_i64_t)gridDim.x * blockDim.x) {
        const int within = (int)(g % PER_TILE);
        const ff_i64_t tile = g / PER_TILE;
        const ff_i64_t bh = tile / n_tiles;
        const int qt = (int)(tile % n_tiles);
        const int lane = within & 31;
        const int nb = (within >> 5) & 7;
        const int wp = (within >> 8) & 3;
        const int cp = within >> 10;
        const float4 v = src[g];
        const int row = qt * 64 + 16 * wp + (lane >> 2);
        const int col = 64 * cp + 8 * nb + 2 * (lane & 3);
        typename T::storage* const base = dq + bh * tq * D + col;
        if (row < tq) {
            *(ff_u32_t*)(base + (ff_i64_t)row * D) = ff_attn_mma<T>::pack(v.x * scale, v.y * scale);
        }
        if (row + 8 < tq) {
            *(ff_u32_t*)(base + (ff_i64_t)(row + 8) * D) =
                ff_attn_mma<T>::pack(v.z * scale, v.w * scale);
        }
    }
}
