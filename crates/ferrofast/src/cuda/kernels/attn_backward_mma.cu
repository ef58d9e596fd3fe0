// Attention backward on the tensor cores (mma.sync m16n8k16, sm_80 and later) for f16 and
// bf16 inputs (T is ff_f16 or ff_bf16), every case the forward takes: grouped-query heads,
// causal (lower-right), bool and additive masks with broadcasting (mask kind read at run
// time: only tiles that need element-wise masking look at it), sinks (through the forward's
// log-sum-exp, which counts them; their own gradient is `attn_bwd_dsinks` in
// attn_backward.cu), any T_q and T_kv.
//
// FlashAttention-2's recomputation, in base-2 units: with lse2 = lse * log2(e) per query,
//   P = 2^(scale * log2(e) * q k^T + mask * log2(e) - lse2),  dP = dO v^T,
//   dS = P * (dP - delta)   (delta = rowsum(dO * O), from attn_bwd_delta),
//   dV = P^T dO,  dK = scale * dS^T q,  dQ = scale * dS k.
// P and dS are rounded to T before their products (f32 accumulation), as FlashAttention
// does. Two kernels, each block owning what it writes (no atomics, deterministic):
//
//   attn_bwd_mma_dkdv  one block per (key tile of 16 * NW keys, kv head, batch); warp w owns
//                      keys 16w .. 16w + 15 of the tile and keeps their dK and dV in
//                      registers while query tiles of BM rows of every query head of the
//                      group (GQA summed here) stream through shared memory, double-buffered
//                      by cp.async. Per query tile a warp computes S^T = K Q^T, P^T,
//                      dP^T = V dO^T, dS^T, then dV += P^T dO and dK += dS^T Q with P^T and
//                      dS^T as A fragments straight from the accumulators. WANT selects dK
//                      (1), dV (2) or both (3): for wide heads the two run as separate
//                      launches so each one's accumulators fit in registers.
//   attn_bwd_mma_dq    one block per (query tile of 16 * MS * NW queries, query head,
//                      batch); warp w owns 16 * MS queries and their dQ; key tiles of BN
//                      keys (K and V)
//                      stream through shared memory, double-buffered. Per key tile: S = Q K^T,
//                      P, dP = dO V^T, dS, dQ += dS K.
//
// Causal: a key tile's first visible query is (first key) - (T_kv - T_q), so the dK / dV
// kernel starts at that query tile; the dQ kernel stops at the key tile past the diagonal of
// its last query. Only tiles crossing the diagonal, the end of the keys, or with an array
// mask take the element-wise path. Rows past T_q / T_kv are zero-filled in shared memory
// (cp.async with source size 0) and carry lse2 = +inf, so their P is 0 and nothing garbage
// enters the products; a query that saw nothing in the forward (lse -inf) has P = 0 too.
// A masked key gives P = 0 and dS = 0 whatever its values hold.
//
// Shared-memory rows are padded by 8 elements (16 bytes): ldmatrix's eight rows then land in
// distinct banks for every head dim taken here (an odd number of 16-byte chunks per row).
#include "ferrofast_mma.cuh"
#include "ferrofast_attn.cuh"
#include "ferrofast_attn_bwd.cuh"

// q, k, v: last axis contiguous, rows 16-byte aligned (the launcher copies inputs that are
// not), read through p's offsets and strides. d_out: row-major [B, N_q, T_q, DV]; lse, delta:
// [B, N_q, T_q] f32. dk / dv: row-major [B, N_kv, T_kv, D / DV], written where WANT asks.
template <typename T, int D, int DV, int BM, int NW, int WANT>
__global__ void __launch_bounds__(NW * 32) attn_bwd_mma_dkdv(
    const typename T::storage* __restrict__ q, const typename T::storage* __restrict__ k,
    const typename T::storage* __restrict__ v, const void* __restrict__ mask,
    const typename T::storage* __restrict__ d_out, const float* __restrict__ lse,
    const float* __restrict__ delta, typename T::storage* __restrict__ dk,
    typename T::storage* __restrict__ dv, const ff_attn_params p, float scale) {
    typedef typename T::storage S;
    constexpr int BN = 16 * NW;  // keys per block
    constexpr int NT = NW * 32;
    constexpr int QS = D + 8;
    constexpr int GS = DV + 8;
    constexpr bool WANT_DK = (WANT & FF_BWD_DK) != 0;
    constexpr bool WANT_DV = (WANT & FF_BWD_DV) != 0;
    static_assert(D % 16 == 0 && DV % 16 == 0 && BM % 16 == 0, "tile shapes");

    extern __shared__ __align__(16) unsigned char ff_bwd_smem[];
    S* sk = (S*)ff_bwd_smem;                        // [BN][QS]
    S* sv = sk + BN * QS;                           // [BN][GS] (dK only)
    S* sq = sv + (WANT_DK ? BN * GS : 0);           // [2][BM][QS]
    S* sg = sq + 2 * BM * QS;                       // [2][BM][GS]
    float* slse = (float*)(sg + 2 * BM * GS);       // [2][BM]
    float* sdelta = slse + 2 * BM;                  // [2][BM]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int k0 = blockIdx.x * BN;
    const int g = blockIdx.y;
    const ff_i64_t b = blockIdx.z;
    const int n_q = p.n_kv * p.group;
    const int Tq = p.t_q, Tkv = p.t_kv;
    const int diag = Tkv - Tq;
    const float scale_log2 = p.scale_log2;

    const S* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)g * p.k_sh + (ff_i64_t)k0 * p.k_st;
    const S* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)g * p.v_sh + (ff_i64_t)k0 * p.v_st;
    const int keys_here = min(BN, Tkv - k0);
    ff_load_tile<S, BN, D, QS, NT>(sk, kb, p.k_st, keys_here, tid);
    if (WANT_DK) {
        ff_load_tile<S, BN, DV, GS, NT>(sv, vb, p.v_st, keys_here, tid);
    }
    ff_cp_async_commit();

    // Query tiles: from the first that sees one of these keys, for every head of the group.
    int q_first = 0;
    if (p.causal) {
        q_first = max(0, k0 - diag);
        q_first = min(q_first, Tq);
        q_first -= q_first % BM;
    }
    const int n_qt = (Tq - q_first + BM - 1) / BM;
    const int n_it = n_qt * p.group;

    // Issues the loads of iteration `it` into buffer `buf`; lse2 and delta come back in
    // registers (thread tid < BM: query tid of the tile) to be stored after this iteration.
    auto issue = [&](int it, int buf, float& l2, float& dl) {
        const int h = g * p.group + it / n_qt;
        const int q0 = q_first + (it % n_qt) * BM;
        const S* qb = q + p.q_off + b * p.q_sb + (ff_i64_t)h * p.q_sh + (ff_i64_t)q0 * p.q_st;
        const ff_i64_t row0 = (b * n_q + h) * Tq + q0;
        ff_load_tile<S, BM, D, QS, NT>(sq + buf * BM * QS, qb, p.q_st, Tq - q0, tid);
        ff_load_tile<S, BM, DV, GS, NT>(sg + buf * BM * GS, d_out + row0 * DV, DV, Tq - q0, tid);
        ff_cp_async_commit();
        if (tid < BM) {
            const bool in = q0 + tid < Tq;
            l2 = ff_bwd_lse2(lse, row0 + tid, in);
            dl = in ? delta[row0 + tid] : 0.0f;
        }
    };

    float acc_k[1][D / 8][4];
    float acc_v[1][DV / 8][4];
    ff_zero_frags(acc_k);
    ff_zero_frags(acc_v);

    const int wk = warp * 16;  // this warp's first key in the tile
    const ff_u32_t k_rows = ff_smem_u32(sk + wk * QS);
    const ff_u32_t v_rows = ff_smem_u32(sv + wk * GS);
    const int krow0 = k0 + wk + (lane >> 2);

    if (n_it > 0) {
        float l2 = 0.0f, dl = 0.0f;
        issue(0, 0, l2, dl);
        if (tid < BM) {
            slse[tid] = l2;
            sdelta[tid] = dl;
        }
    }
    for (int it = 0; it < n_it; ++it) {
        const int buf = it & 1;
        const int h = g * p.group + it / n_qt;
        const int q0 = q_first + (it % n_qt) * BM;
        ff_cp_async_wait<0>();
        __syncthreads();
        float nl2 = 0.0f, ndl = 0.0f;
        const bool more = it + 1 < n_it;
        if (more) {
            issue(it + 1, buf ^ 1, nl2, ndl);
        }
        const ff_u32_t q_tile = ff_smem_u32(sq + buf * BM * QS);
        const ff_u32_t g_tile = ff_smem_u32(sg + buf * BM * GS);
        const float* lse_t = slse + buf * BM;
        const float* delta_t = sdelta + buf * BM;

        // Whether this warp's keys need element-wise masking against the tile: keys past
        // T_kv, an array mask, or (causal) one of its keys hidden from a query of the tile.
        const bool full = p.mask_kind == FF_MASK_NONE && k0 + wk + 16 <= Tkv &&
                          (!p.causal || k0 + wk + 15 <= q0 + diag);
        const void* mask_bh = nullptr;
        if (p.mask_kind != FF_MASK_NONE) {
            const ff_i64_t base = p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh;
            mask_bh = (const char*)mask +
                      base * (p.mask_kind == FF_MASK_BOOL ? 1 : (ff_i64_t)sizeof(S));
        }

        // S^T = K Q^T, then P^T.
        float st[1][BM / 8][4];
        ff_attn_scores<T, D, 1, BM, QS, QS>(st, k_rows, q_tile, lane);
        const int col0 = q0 + 2 * (lane & 3);
        ff_bwd_probs<T, 1, BM, true>(st, krow0, col0, full, p, mask_bh, scale_log2,
                                  [&](int qi) { return lse_t[qi - q0]; });
        if (WANT_DV) {
            ff_u32_t pp[1][BM / 16][4];
            ff_attn_pack<T, 1, BM>(pp, st);
            ff_attn_pv_packed<T, DV, 1, BM, GS>(acc_v, pp, g_tile, lane);
        }
        if (WANT_DK) {
            // dP^T = V dO^T, dS^T, dK += dS^T Q.
            float dpt[1][BM / 8][4];
            ff_attn_scores<T, DV, 1, BM, GS, GS>(dpt, v_rows, g_tile, lane);
            ff_bwd_ds<1, BM, true>(dpt, st, krow0, col0, [&](int qi) { return delta_t[qi - q0]; });
            ff_u32_t pds[1][BM / 16][4];
            ff_attn_pack<T, 1, BM>(pds, dpt);
            ff_attn_pv_packed<T, D, 1, BM, QS>(acc_k, pds, q_tile, lane);
        }
        if (more && tid < BM) {
            slse[(buf ^ 1) * BM + tid] = nl2;
            sdelta[(buf ^ 1) * BM + tid] = ndl;
        }
    }
    ff_cp_async_wait<0>();

    const ff_i64_t kv_row0 = (b * p.n_kv + g) * Tkv;
    if (WANT_DK) {
        ff_bwd_store<T, 1, D>(dk + kv_row0 * D, acc_k, krow0, Tkv, scale, lane);
    }
    if (WANT_DV) {
        ff_bwd_store<T, 1, DV>(dv + kv_row0 * DV, acc_v, krow0, Tkv, 1.0f, lane);
    }
}

// Inputs as attn_bwd_mma_dkdv's; dq: row-major [B, N_q, T_q, D]. Each warp owns MS slabs
// of 16 queries (16 * MS * NW per block), so every K / V fragment read from shared memory
// feeds MS products.
template <typename T, int D, int DV, int BN, int NW, int MS>
__global__ void __launch_bounds__(NW * 32) attn_bwd_mma_dq(
    const typename T::storage* __restrict__ q, const typename T::storage* __restrict__ k,
    const typename T::storage* __restrict__ v, const void* __restrict__ mask,
    const typename T::storage* __restrict__ d_out, const float* __restrict__ lse,
    const float* __restrict__ delta, typename T::storage* __restrict__ dq,
    const ff_attn_params p, float scale) {
    typedef typename T::storage S;
    constexpr int BM = 16 * MS * NW;  // queries per block
    constexpr int NT = NW * 32;
    constexpr int QS = D + 8;
    constexpr int GS = DV + 8;
    static_assert(D % 16 == 0 && DV % 16 == 0 && BN % 16 == 0, "tile shapes");

    extern __shared__ __align__(16) unsigned char ff_bwd_smem[];
    S* sq = (S*)ff_bwd_smem;      // [BM][QS]
    S* sg = sq + BM * QS;         // [BM][GS]
    S* sk = sg + BM * GS;         // [2][BN][QS]
    S* sv = sk + 2 * BN * QS;     // [2][BN][GS]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    // Query tiles last-first: with a causal mask the longest start first.
    const int q0 = (int)(gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y;
    const ff_i64_t b = blockIdx.z;
    const int n_q = p.n_kv * p.group;
    const int g = h / p.group;
    const int Tq = p.t_q, Tkv = p.t_kv;
    const int diag = Tkv - Tq;
    const float scale_log2 = p.scale_log2;

    const ff_i64_t row0 = (b * n_q + h) * Tq + q0;
    const S* qb = q + p.q_off + b * p.q_sb + (ff_i64_t)h * p.q_sh + (ff_i64_t)q0 * p.q_st;
    const S* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)g * p.k_sh;
    const S* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)g * p.v_sh;
    const int rows_here = min(BM, Tq - q0);
    ff_load_tile<S, BM, D, QS, NT>(sq, qb, p.q_st, rows_here, tid);
    ff_load_tile<S, BM, DV, GS, NT>(sg, d_out + row0 * DV, DV, rows_here, tid);

    int k_end = Tkv;
    if (p.causal) {
        k_end = max(0, min(Tkv, q0 + rows_here + diag));
    }
    const int n_kt = (k_end + BN - 1) / BN;
    if (n_kt > 0) {
        ff_load_tile<S, BN, D, QS, NT>(sk, kb, p.k_st, min(BN, Tkv), tid);
        ff_load_tile<S, BN, DV, GS, NT>(sv, vb, p.v_st, min(BN, Tkv), tid);
    }
    ff_cp_async_commit();

    const int wq = warp * 16 * MS;  // this warp's first query in the tile
    const int qrow0 = q0 + wq + (lane >> 2);
    float l2[2 * MS], dl[2 * MS];
#pragma unroll
    for (int r = 0; r < 2 * MS; ++r) {
        const int qi = qrow0 + 8 * r;
        l2[r] = ff_bwd_lse2(lse, row0 - q0 + qi, qi < Tq);
        dl[r] = qi < Tq ? delta[row0 - q0 + qi] : 0.0f;
    }
    const void* mask_bh = nullptr;
    if (p.mask_kind != FF_MASK_NONE) {
        const ff_i64_t base = p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh;
        mask_bh = (const char*)mask + base * (p.mask_kind == FF_MASK_BOOL ? 1 : (ff_i64_t)sizeof(S));
    }

    float acc[MS][D / 8][4];
    ff_zero_frags(acc);
    const ff_u32_t q_rows = ff_smem_u32(sq + wq * QS);
    const ff_u32_t g_rows = ff_smem_u32(sg + wq * GS);

    for (int j = 0; j < n_kt; ++j) {
        const int buf = j & 1;
        const int n0 = j * BN;
        ff_cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < n_kt) {
            const int n1 = n0 + BN;
            ff_load_tile<S, BN, D, QS, NT>(sk + (buf ^ 1) * BN * QS, kb + (ff_i64_t)n1 * p.k_st,
                                           p.k_st, min(BN, Tkv - n1), tid);
            ff_load_tile<S, BN, DV, GS, NT>(sv + (buf ^ 1) * BN * GS, vb + (ff_i64_t)n1 * p.v_st,
                                            p.v_st, min(BN, Tkv - n1), tid);
        }
        ff_cp_async_commit();
        const ff_u32_t k_tile = ff_smem_u32(sk + buf * BN * QS);
        const ff_u32_t v_tile = ff_smem_u32(sv + buf * BN * GS);
        // Whether this warp's queries need element-wise masking against the key tile.
        const bool full = p.mask_kind == FF_MASK_NONE && n0 + BN <= Tkv &&
                          (!p.causal || n0 + BN - 1 <= q0 + wq + diag);

        float s[MS][BN / 8][4];
        ff_attn_scores<T, D, MS, BN, QS, QS>(s, q_rows, k_tile, lane);
        // Row qrow0 + 8 r of this lane: its lse2 and delta are l2[r], dl[r].
        ff_bwd_probs<T, MS, BN, false>(s, qrow0, n0 + 2 * (lane & 3), full, p, mask_bh,
                                       scale_log2, [&](int qi) { return l2[(qi - qrow0) >> 3]; });
        float dp[MS][BN / 8][4];
        ff_attn_scores<T, DV, MS, BN, GS, GS>(dp, g_rows, v_tile, lane);
        ff_bwd_ds<MS, BN, false>(dp, s, qrow0, 0, [&](int qi) { return dl[(qi - qrow0) >> 3]; });
        ff_u32_t pds[MS][BN / 16][4];
        ff_attn_pack<T, MS, BN>(pds, dp);
        ff_attn_pv_packed<T, D, MS, BN, QS>(acc, pds, k_tile, lane);
    }
    ff_cp_async_wait<0>();
    ff_bwd_store<T, MS, D>(dq + (row0 - q0) * D, acc, qrow0, Tq, scale, lane);
}
