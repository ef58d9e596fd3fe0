// Flash-attention forward ("prefill": many queries) on the tensor cores with mma.sync
// (m16n8k16, sm_80 and later), for f16 and bf16 inputs (T is ff_f16 or ff_bf16).
//
//   out[b, h, i, :] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,g,j,:] + mask) v[b,g,j,:]
//
// with g = h / group (grouped-query heads), online softmax in f32 and f32 accumulation.
//
// Work split: one block per (query tile of BM = 16 * MS * NW rows, query head, batch).
// Each of the NW warps owns 16 * MS consecutive query rows (MS slabs of 16) and all BN keys
// of the current key tile, so the softmax of a row never leaves its warp (4 lanes share a
// row; they combine with two shuffles). Per key tile the warp computes S = Q K^T into
// registers (A fragments of Q and B fragments of K come from shared memory through
// ldmatrix), applies the mask, updates the running max / sum, turns S into P (f16 / bf16)
// in registers and accumulates O += P V (V fragments through ldmatrix.trans).
//
// Memory: the Q tile and two buffers each of K and V live in shared memory; K and V tiles
// arrive by cp.async (16 bytes per thread and instruction). In the general loop the next
// tile's K load is issued while this tile's S is computed and the next V while P V runs; the
// pipelined loop (FLAGS bit PIPE, tiles needing no element-wise mask) issues both a tile
// ahead with one barrier per tile and runs a tile's softmax in the same stretch of code as
// the previous tile's P V, so one warp keeps the tensor cores and the FP32 / special-function
// units busy at once (it needs 32 more registers per thread for the previous tile's P, which
// spill at D >= 96 with 64-key tiles; measured faster at D = 64, slower at D = 128). Rows are padded by 8
// elements (16 bytes), which makes the 8 rows of every ldmatrix land in distinct banks for
// every head dim used here (D + 8 = 72, 88, 104, 136, 200, 264 elements: an odd number of
// 16-byte chunks). Rows past T_q / T_kv are zero-filled by cp.async (source size 0), so no
// garbage (possibly NaN) enters the products; their scores are masked below.
//
// Scores are kept in base-2 units: x = s * scale * log2(e) (+ mask * log2(e)), p = 2^(x - m)
// (one FFMA and one ex2 per score where no mask applies).
// With FLAGS bit LAZY a row keeps its reference until a score exceeds it by more than 8 (a
// factor 2^8), so most tiles skip the rescale of O (a warp-uniform branch).
// A row whose every score so far is -inf uses 0 as its reference, so no inf - inf appears;
// a row that saw no key ends with sum 0 and outputs 0. A sink enters as the initial running
// max (sink * log2(e)) with initial sum 1 (counted on one of the row's four lanes).
//
// Masks (template MASK): 0 none; 1 bool array (keep where != 0); 2 additive array (of T).
// Array masks are read through four strides (a broadcast view: strides may be 0). Causal
// masking (lower-right aligned, key j visible to query i iff j <= i + T_kv - T_q) is a
// run-time flag: key tiles wholly past the diagonal are never loaded or computed, and only
// tiles crossing the diagonal or the end of the keys take the element-wise masking path.
//
// Query tiles are visited last-first (blockIdx.x counts down), so with a causal mask the
// longest tiles start first and the short ones fill the tail of the grid.
//
// The per-tile steps (load K/V, S = Q K^T, softmax, O += P V) are separate functions so a
// Hopper version (wgmma from shared memory, TMA loads, producer / consumer warps) can
// replace the inner loop while keeping the masking, softmax and epilogue.
#include "ferrofast_mma.cuh"
#include "ferrofast_attn.cuh"

// FLAGS bits of the kernel template: lazy rescaling (ff_attn_exp), pipelined loop over the
// unmasked key tiles (ff_attn_pipe_step).
#define FF_ATTN_FLAG_LAZY 1
#define FF_ATTN_FLAG_PIPE 2

// One key tile j of the PIPE loop: issue the loads of K for tile j + 1 and V for tile j,
// S = Q K_j^T, softmax of S, then (PREV) o += P_{j-1} V_{j-1} in the same stretch of code as
// the softmax, the rescale of o, and P_j packed into p.
template <typename T, int D, int DV, int MS, int BN, int QS, int KS, int VS, int NT, bool LAZY,
          bool PREV, typename S>
__device__ __forceinline__ void ff_attn_pipe_step(
    int j, int n_plain, ff_u32_t (&p)[MS][BN / 16][4], float (&o)[MS][DV / 8][4],
    float (&m)[2 * MS], float (&l)[2 * MS], S* sk, S* sv, const S* kb, const S* vb,
    ff_i64_t k_st, ff_i64_t v_st, ff_u32_t q_rows, ff_u32_t k_smem, ff_u32_t v_smem, int tid,
    int lane, float scale_log2) {
    constexpr bool SW = ff_kv_layout<D, DV>::SW;
    const int buf = j & 1;
    ff_cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < n_plain) {
        ff_load_tile<S, BN, D, KS, NT, 0, SW>(sk + (buf ^ 1) * BN * KS,
                                              kb + (ff_i64_t)(j + 1) * BN * k_st, k_st, BN, tid);
    }
    ff_load_tile<S, BN, DV, VS, NT, 0, SW>(sv + buf * BN * VS, vb + (ff_i64_t)j * BN * v_st, v_st,
                                           BN, tid);
    ff_cp_async_commit();
    float s[MS][BN / 8][4];
    ff_attn_scores<T, D, MS, BN, QS, KS, SW>(s, q_rows, k_smem + (ff_u32_t)(buf * BN * KS * 2),
                                             lane);
    float alpha[2 * MS];
    const bool moved = ff_attn_exp<MS, BN, LAZY>(s, m, l, alpha, scale_log2);
    if (PREV) {
        ff_attn_pv_packed<T, DV, MS, BN, VS, SW>(
            o, p, v_smem + (ff_u32_t)((buf ^ 1) * BN * VS * 2), lane);
    }
    ff_attn_rescale<DV, MS, LAZY>(o, alpha, moved);
    ff_attn_pack<T, MS, BN>(p, s);
}

// ----- the kernel ---------------------------------------------------------------------------

// q, k, v: last axis contiguous, every row start 16-byte aligned (the launcher copies inputs
// that are not); their offsets and strides (elements) are p's. out: row-major
// [B, N_q, T_q, DV]. mask: element (b, h, i, j) at mask[p.m_off + b*p.m_sb + h*p.m_sh +
// i*p.m_st + j*p.m_sk] (u8 for MASK 1, T for MASK 2; unused for MASK 0). sinks: null, or
// element h at sinks[p.s_off + h * p.s_stride] (T). The mask kind is the MASK template
// argument; p's mask_kind, has_sinks, d, d_v and chunk fields are not read.
template <typename T, int D, int DV, int MS, int NW, int BN, int MASK, int FLAGS>
__global__ void __launch_bounds__(NW * 32) attn_prefill(
    const typename T::storage* __restrict__ q, const typename T::storage* __restrict__ k,
    const typename T::storage* __restrict__ v, const void* __restrict__ mask,
    const typename T::storage* __restrict__ sinks, typename T::storage* __restrict__ out,
    float* __restrict__ lse, const ff_attn_params p) {
    const ff_i64_t q_off = p.q_off, q_sb = p.q_sb, q_sh = p.q_sh, q_st = p.q_st;
    const ff_i64_t k_off = p.k_off, k_sb = p.k_sb, k_sh = p.k_sh, k_st = p.k_st;
    const ff_i64_t v_off = p.v_off, v_sb = p.v_sb, v_sh = p.v_sh, v_st = p.v_st;
    const ff_i64_t m_off = p.m_off, m_sb = p.m_sb, m_sh = p.m_sh, m_sq = p.m_st, m_sk = p.m_sk;
    const ff_i64_t s_off = p.s_off, s_st = p.s_stride;
    const int group = p.group, Tq = p.t_q, Tkv = p.t_kv, causal = p.causal;
    const float scale_log2 = p.scale_log2;
    const int n_heads = p.n_kv * p.group;
    typedef typename T::storage S;
    constexpr int BM = 16 * MS * NW;
    constexpr int NT = NW * 32;
    // K / V rows: swizzled or padded (ff_kv_layout), so each 128-byte piece of a row is one
    // L2 request where the widths allow.
    constexpr bool SW = ff_kv_layout<D, DV>::SW;
    constexpr int QS = D + 8;
    constexpr int KS = ff_kv_layout<D, DV>::KS;
    constexpr int VS = ff_kv_layout<D, DV>::VS;
    constexpr bool LAZY = (FLAGS & FF_ATTN_FLAG_LAZY) != 0;
    constexpr bool PIPE = (FLAGS & FF_ATTN_FLAG_PIPE) != 0 && MASK == 0;
    static_assert(D % 16 == 0 && DV % 16 == 0 && BN % 16 == 0, "tile shapes");

    extern __shared__ __align__(16) unsigned char ff_attn_smem[];
    S* sq = (S*)ff_attn_smem;
    S* sk = sq + BM * QS;
    S* sv = sk + 2 * BN * KS;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int m_tile = (int)(gridDim.x - 1 - blockIdx.x);
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int m0 = m_tile * BM;
    const int diag = Tkv - Tq;

    const S* qb = q + q_off + (ff_i64_t)b * q_sb + (ff_i64_t)h * q_sh + (ff_i64_t)m0 * q_st;
    const int kvh = h / group;
    const S* kb = k + k_off + (ff_i64_t)b * k_sb + (ff_i64_t)kvh * k_sh;
    const S* vb = v + v_off + (ff_i64_t)b * v_sb + (ff_i64_t)kvh * v_sh;

    // Keys this tile needs: all, or (causal) up to the diagonal of its last real row.
    const int rows_here = min(BM, Tq - m0);
    int n_end = Tkv;
    if (causal) {
        n_end = min(Tkv, m0 + rows_here + diag);
    }
    const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

    float o[MS][DV / 8][4];
    ff_zero_frags(o);
    float m_run[2 * MS];
    float l_run[2 * MS];
    {
        const float sink =
            sinks != nullptr ? T::to_f32(sinks[s_off + (ff_i64_t)h * s_st]) * FF_ATTN_LOG2E
                             : FF_ATTN_NEG_INF;
#pragma unroll
        for (int r = 0; r < 2 * MS; ++r) {
            m_run[r] = sink;
            l_run[r] = (sinks != nullptr && (lane & 3) == 0) ? 1.0f : 0.0f;
        }
    }

    const int wrow = warp * 16 * MS;
    const ff_u32_t q_rows = ff_smem_u32(sq + wrow * QS);
    const ff_u32_t k_smem = ff_smem_u32(sk);
    const ff_u32_t v_smem = ff_smem_u32(sv);
    const int row0 = m0 + wrow + (lane >> 2);
    const char* mask_bh = nullptr;
    if (MASK != 0) {
        const ff_i64_t base = m_off + (ff_i64_t)b * m_sb + (ff_i64_t)h * m_sh;
        mask_bh = (const char*)mask + base * (MASK == 1 ? 1 : (ff_i64_t)sizeof(S));
    }

    // Tiles [0, n_plain) need no element-wise masking: inside the keys and (causal) wholly
    // left of the diagonal of the tile's first row, with no array mask and a positive scale.
    int n_plain = 0;
    if (MASK == 0 && scale_log2 > 0.0f) {
        const int lim = causal ? min(Tkv, m0 + diag + 1) : Tkv;
        n_plain = lim > 0 ? lim / BN : 0;
    }

    int j0 = 0;
    // Pipelined loop over the plain tiles (PIPE): one barrier per tile; at the start of
    // tile j the loads of K for tile j + 1 and V for tile j are issued; tile j's scores are
    // computed, then its softmax runs in the same stretch of code as the previous tile's
    // o += P V (P kept packed), and the accumulators are rescaled after that product. K of
    // tile t lives in buffer t % 2, V likewise.
    if (PIPE && n_plain > 0) {
        ff_load_tile<S, BM, D, QS, NT>(sq, qb, q_st, rows_here, tid);
        ff_load_tile<S, BN, D, KS, NT, 0, SW>(sk, kb, k_st, BN, tid);
        ff_cp_async_commit();
        ff_u32_t p[MS][BN / 16][4];
        // Tile 0 (no previous product), then tiles 1 .. n_plain - 1.
        ff_attn_pipe_step<T, D, DV, MS, BN, QS, KS, VS, NT, LAZY, false>(
            0, n_plain, p, o, m_run, l_run, sk, sv, kb, vb, k_st, v_st, q_rows, k_smem, v_smem,
            tid, lane, scale_log2);
        for (int j = 1; j < n_plain; ++j) {
            ff_attn_pipe_step<T, D, DV, MS, BN, QS, KS, VS, NT, LAZY, true>(
                j, n_plain, p, o, m_run, l_run, sk, sv, kb, vb, k_st, v_st, q_rows, k_smem,
                v_smem, tid, lane, scale_log2);
        }
        ff_cp_async_wait<0>();
        __syncthreads();
        ff_attn_pv_packed<T, DV, MS, BN, VS, SW>(o, p, v_smem + (ff_u32_t)(((n_plain - 1) & 1) * BN * VS * 2),
                                             lane);
        j0 = n_plain;
    }

    // General loop (the remaining tiles): K and V of tile j in buffer (j - j0) % 2, the next
    // tile's K load issued while this tile's S is computed and the next V while P V runs.
    if (j0 < n_tiles) {
        if (j0 == 0) {
            ff_load_tile<S, BM, D, QS, NT>(sq, qb, q_st, rows_here, tid);
        } else {
            __syncthreads();  // every warp is done with the pipelined loop's buffers
        }
        const int n_first = j0 * BN;
        ff_load_tile<S, BN, D, KS, NT, 0, SW>(sk, kb + (ff_i64_t)n_first * k_st, k_st,
                                       min(BN, Tkv - n_first), tid);
        ff_cp_async_commit();
        ff_load_tile<S, BN, DV, VS, NT, 0, SW>(sv, vb + (ff_i64_t)n_first * v_st, v_st,
                                        min(BN, Tkv - n_first), tid);
        ff_cp_async_commit();
    }

    for (int j = j0; j < n_tiles; ++j) {
        const int n0 = j * BN;
        const int buf = (j - j0) & 1;
        const bool more = j + 1 < n_tiles;
        ff_cp_async_wait<1>();
        __syncthreads();
        if (more) {
            ff_load_tile<S, BN, D, KS, NT, 0, SW>(sk + (buf ^ 1) * BN * KS, kb + (ff_i64_t)(n0 + BN) * k_st,
                                           k_st, min(BN, Tkv - n0 - BN), tid);
        }
        ff_cp_async_commit();

        float s[MS][BN / 8][4];
        ff_attn_scores<T, D, MS, BN, QS, KS, SW>(s, q_rows, k_smem + (ff_u32_t)(buf * BN * KS * 2),
                                             lane);

        // Tiles crossing the end of the keys or the causal diagonal, array masks, and a
        // scale <= 0 take the element-wise path (scores scaled there); the others leave the
        // raw scores to the softmax, which folds the scale into its exponent.
        const bool masked = j >= n_plain;
        if (masked) {
            const void* mrow = MASK != 0 ? (const void*)mask_bh : nullptr;
            ff_attn_mask<T, MS, BN, MASK>(s, scale_log2, row0, n0 + 2 * (lane & 3), Tq, Tkv,
                                          causal != 0, diag, mrow, m_sq, m_sk);
        }
        float alpha[2 * MS];
        const bool moved =
            ff_attn_exp<MS, BN, LAZY>(s, m_run, l_run, alpha, masked ? 1.0f : scale_log2);
        ff_attn_rescale<DV, MS, LAZY>(o, alpha, moved);

        ff_cp_async_wait<1>();
        __syncthreads();
        if (more) {
            ff_load_tile<S, BN, DV, VS, NT, 0, SW>(sv + (buf ^ 1) * BN * VS, vb + (ff_i64_t)(n0 + BN) * v_st,
                                            v_st, min(BN, Tkv - n0 - BN), tid);
        }
        ff_cp_async_commit();

        ff_attn_pv<T, DV, MS, BN, VS, SW>(o, s, v_smem + (ff_u32_t)(buf * BN * VS * 2), lane);
    }
    ff_cp_async_wait<0>();

    // Epilogue: full row sums, normalise, round, store (4 bytes per lane and column pair).
    S* ob = out + (((ff_i64_t)b * n_heads + h) * Tq) * DV;
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float sum = l_run[2 * ms + hf];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            // A row that sees nothing is 0; a NaN sum (a NaN score) makes the row NaN.
            const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
            const int row = row0 + ms * 16 + hf * 8;
            if (lse != nullptr && row < Tq && (lane & 3) == 0) {
                // The row's reference max (base 2; 0 while every score is -inf) plus log2 of
                // its sum, in natural-log units.
                const float ref = m_run[2 * ms + hf] == FF_ATTN_NEG_INF ? 0.0f : m_run[2 * ms + hf];
                lse[((ff_i64_t)b * n_heads + h) * Tq + row] =
                    sum == 0.0f ? FF_ATTN_NEG_INF : (ref + log2f(sum)) * 0.6931471805599453f;
            }
            if (row < Tq) {
                ff_u32_t* orow = (ff_u32_t*)(ob + (ff_i64_t)row * DV) + (lane & 3);
#pragma unroll
                for (int db = 0; db < DV / 8; ++db) {
                    orow[db * 4] = ff_attn_mma<T>::pack(o[ms][db][2 * hf] * inv,
                                                       o[ms][db][2 * hf + 1] * inv);
                }
            }
        }
    }
}
