// Flash-attention forward ("prefill") for Hopper (sm_90a only: wgmma and setmaxnreg exist
// only in the `a` target), f16 and bf16 inputs (T is ff_f16 or ff_bf16), D = D_v in
// {64, 128}, no array mask (causal lower-right or none), no sinks, grouped-query heads.
//
//   out[b, h, i, :] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,g,j,:]) v[b,g,j,:]
//
// with g = h / group, online softmax in f32 and f32 accumulation, as attn_prefill.cu (whose
// masking and softmax steps, in ferrofast_mma.cuh, this kernel shares).
//
// Block: one query tile of BM = 128 rows of one (batch, head); 3 warpgroups (384 threads).
//   - Warpgroup 0, the producer, gives most of its registers away (setmaxnreg.dec to 24) and
//     one of its threads issues every load with TMA (cp.async.bulk.tensor, 4-d tensor maps
//     over [B, H, T, D] built on the host): the Q tile once, then K and V tiles of BN = 128
//     keys into a ring of two stages each, waiting on the stage's "empty" mbarrier before
//     reusing it. TMA zero-fills rows past T_q / T_kv (their scores are masked).
//   - Warpgroups 1 and 2, the consumers (setmaxnreg.inc to 240), own 64 query rows each. Per
//     key tile: wait for K ("full" mbarrier with the transaction byte count), S = Q K^T with
//     wgmma m64n128k16 (both operands from shared memory through matrix descriptors), release
//     K, mask (tiles crossing the causal diagonal or the end of the keys only) and online
//     softmax in registers (base-2 units, lazy rescaling), P rounded to T in registers, wait
//     for V, O += P V with wgmma (A = P from registers, B = V from shared memory, MN-major),
//     release V.
//
// Shared memory (1024-byte aligned, 128-byte swizzle as TMA writes it and wgmma reads it):
// every tile is stored as D / 64 panels of 64 columns (128 bytes a row); a panel of R rows is
// R * 128 bytes, row r at r * 128 with its 16-byte chunks permuted by chunk ^= r % 8. The Q
// tile (2 x 16 KB at D = 128), then two K stages and two V stages (BN x D each), then the
// mbarriers.
//
// Descriptors (64-bit, PTX "matrix descriptor"): start address >> 4 in bits 0-13, leading
// byte offset >> 4 in 16-29, stride byte offset >> 4 in 32-45, swizzle mode in 62-63 (1 =
// 128 bytes). Q and K are K-major (rows of D contiguous): the stride byte offset is 1024 (8
// rows of 128 bytes), the leading offset is unused, and the k-th 16-column step adds
// 32 * (k % 4) bytes inside panel k / 4. V is MN-major for P V (its rows are keys, the
// reduction axis): the stride byte offset is again 1024 (8 keys), the leading offset is the
// panel size (the distance between 64-column groups of the N axis), and the k-th 16-key
// step adds 16 * 128 bytes.
//
// Registers per consumer thread: S (64 f32), O (D_v / 2 f32), P (32 x u32) and the softmax
// state; 240 leaves room without spilling. No intra-warpgroup overlap of softmax and the next
// S yet (the two consumer warpgroups overlap each other).
//
// Query tiles are visited last-first (blockIdx.x counts down), as in attn_prefill.cu.
#include "ferrofast_mma.cuh"
#include "ferrofast_hopper.cuh"
#include "ferrofast_attn.cuh"

// ----- the kernel ---------------------------------------------------------------------------

// FLAGS bits of the kernel template: lazy rescaling (ff_attn_exp).
#define FF_SM90_FLAG_LAZY 1

// Shared-memory bytes a block of attn_prefill_sm90<T, D, ...> uses (the launcher computes the
// same number): 1024 bytes of alignment slack, the Q tile, two K and two V stages, and nine
// mbarriers.
#define FF_SM90_SMEM_BYTES(D) (1024 + 128 * (D) * 2 * 5 + 9 * 8)

// tm_q, tm_k, tm_v: tensor maps of q [B, N_q, T_q, D], k [B, N_kv, T_kv, D] and v
// [B, N_kv, T_kv, D] (dimensions innermost first: D, T, heads, batch), 16-bit elements,
// boxes of 64 x 128 x 1 x 1, 128-byte swizzle, zero fill out of bounds. out: row-major
// [B, N_q, T_q, D]. p: the sizes, causal flag and scale (its layouts, mask and sinks fields
// are not read: the tensor maps hold the layouts, and the kernel takes no mask or sinks). PVN: the N of each P V wgmma (64: one per 64-column panel of V; 128: one
// spanning both panels of D = 128 through the descriptor's leading byte offset).
template <typename T, int D, int PVN, int FLAGS>
__global__ void __launch_bounds__(384, 1)
    attn_prefill_sm90(const __grid_constant__ ff_tensor_map tm_q,
                      const __grid_constant__ ff_tensor_map tm_k,
                      const __grid_constant__ ff_tensor_map tm_v,
                      typename T::storage* __restrict__ out, const ff_attn_params p) {
    const int group = p.group, Tq = p.t_q, Tkv = p.t_kv, causal = p.causal;
    const int n_heads = p.n_kv * p.group;
    const float scale_log2 = p.scale_log2;
    typedef typename T::storage S;
    constexpr int DV = D;
    constexpr int BM = 128;
    constexpr int BN = 128;
    constexpr int PANELS = D / 64;
    constexpr ff_u32_t Q_PANEL = BM * 128;
    constexpr ff_u32_t KV_PANEL = BN * 128;
    constexpr ff_u32_t Q_BYTES = PANELS * Q_PANEL;
    constexpr ff_u32_t K_BYTES = PANELS * KV_PANEL;
    constexpr ff_u32_t V_BYTES = (DV / 64) * KV_PANEL;
    constexpr bool LAZY = (FLAGS & FF_SM90_FLAG_LAZY) != 0;
    static_assert(D == 64 || D == 128, "head dims");
    static_assert(PVN == 64 || (PVN == 128 && DV == 128), "P V tile");
    static_assert(FF_SM90_SMEM_BYTES(D) == 1024 + Q_BYTES + 2 * K_BYTES + 2 * V_BYTES + 9 * 8,
                  "shared memory size");

    extern __shared__ __align__(1024) unsigned char ff_sm90_smem[];
    const ff_u32_t raw = ff_smem_u32(ff_sm90_smem);
    const ff_u32_t sq = (raw + 1023u) & ~1023u;
    const ff_u32_t sk = sq + Q_BYTES;      // stage s at sk + s * K_BYTES
    const ff_u32_t sv = sk + 2 * K_BYTES;  // stage s at sv + s * V_BYTES
    const ff_u32_t bars = sv + 2 * V_BYTES;
    // mbarriers: Q full; K full, V full, K empty, V empty per stage.
    const ff_u32_t q_full = bars;
#define FF_K_FULL(s) (bars + 8u + 8u * (ff_u32_t)(s))
#define FF_V_FULL(s) (bars + 24u + 8u * (ff_u32_t)(s))
#define FF_K_EMPTY(s) (bars + 40u + 8u * (ff_u32_t)(s))
#define FF_V_EMPTY(s) (bars + 56u + 8u * (ff_u32_t)(s))
    // Arrivals that free a stage: lane 0 of each of the 8 consumer warps.
    constexpr ff_u32_t CONSUMER_WARPS = 8;

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int m_tile = (int)(gridDim.x - 1 - blockIdx.x);
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int m0 = m_tile * BM;
    const int diag = Tkv - Tq;
    const int kvh = h / group;

    // Keys this tile needs: all, or (causal) up to the diagonal of its last real row.
    const int rows_here = min(BM, Tq - m0);
    int n_end = Tkv;
    if (causal) {
        n_end = min(Tkv, m0 + rows_here + diag);
    }
    const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

    if (tid == 0) {
        ff_mbar_init(q_full, 1);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            ff_mbar_init(FF_K_FULL(s), 1);
            ff_mbar_init(FF_V_FULL(s), 1);
            ff_mbar_init(FF_K_EMPTY(s), CONSUMER_WARPS);
            ff_mbar_init(FF_V_EMPTY(s), CONSUMER_WARPS);
        }
        ff_mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer.
        ff_setmaxnreg_dec<24>();
        if (tid == 0) {
            ff_tma_prefetch(&tm_q);
            ff_tma_prefetch(&tm_k);
            ff_tma_prefetch(&tm_v);
            ff_mbar_arrive_tx(q_full, Q_BYTES);
#pragma unroll
            for (int p = 0; p < PANELS; ++p) {
                ff_tma_load_4d(sq + p * Q_PANEL, &tm_q, q_full, p * 64, m0, h, b);
            }
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j & 1;
                // Use u = j / 2 of the stage needs use u - 1 released: parity (u - 1) & 1,
                // which a fresh barrier reports complete for u = 0.
                const ff_u32_t parity = ((ff_u32_t)(j >> 1) & 1u) ^ 1u;
                ff_mbar_wait(FF_K_EMPTY(st), parity);
                ff_mbar_arrive_tx(FF_K_FULL(st), K_BYTES);
#pragma unroll
                for (int p = 0; p < PANELS; ++p) {
                    ff_tma_load_4d(sk + st * K_BYTES + p * KV_PANEL, &tm_k, FF_K_FULL(st), p * 64,
                                   j * BN, kvh, b);
                }
                ff_mbar_wait(FF_V_EMPTY(st), parity);
                ff_mbar_arrive_tx(FF_V_FULL(st), V_BYTES);
#pragma unroll
                for (int p = 0; p < DV / 64; ++p) {
                    ff_tma_load_4d(sv + st * V_BYTES + p * KV_PANEL, &tm_v, FF_V_FULL(st), p * 64,
                                   j * BN, kvh, b);
                }
            }
        }
        return;
    }

    // Consumers: warpgroup cw owns query rows m0 + 64 * cw .. + 63; warp w of it rows
    // 16 * w .. 16 * w + 15 of those (the wgmma accumulator layout).
    ff_setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int lane = tid & 31;
    const int warp = (tid >> 5) & 3;
    const int row0 = m0 + cw * 64 + warp * 16 + (lane >> 2);

    float o[1][DV / 8][4];
    ff_zero_frags(o);
    float m_run[2] = {FF_ATTN_NEG_INF, FF_ATTN_NEG_INF};
    float l_run[2] = {0.0f, 0.0f};

    // Tiles [0, n_plain) need no element-wise masking for this warpgroup's rows: inside the
    // keys and (causal) wholly left of the diagonal of its first row, with a positive scale.
    int n_plain = 0;
    if (scale_log2 > 0.0f) {
        const int lim = causal ? min(Tkv, m0 + cw * 64 + diag + 1) : Tkv;
        n_plain = lim > 0 ? lim / BN : 0;
    }

    const ff_u32_t q_rows = sq + (ff_u32_t)(cw * 64 * 128);
    ff_mbar_wait(q_full, 0);

    for (int j = 0; j < n_tiles; ++j) {
        const int st = j & 1;
        const ff_u32_t parity = (ff_u32_t)(j >> 1) & 1u;
        const ff_u32_t kt = sk + st * K_BYTES;
        const ff_u32_t vt = sv + st * V_BYTES;

        // S = Q K^T.
        ff_mbar_wait(FF_K_FULL(st), parity);
        float s[1][BN / 8][4];
        ff_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const ff_u32_t col = (ff_u32_t)((kk >> 2) * Q_PANEL + (kk & 3) * 32);
            const ff_u64_t da = ff_wgmma_desc(q_rows + col, 16, 1024);
            const ff_u64_t dk =
                ff_wgmma_desc(kt + (ff_u32_t)((kk >> 2) * KV_PANEL + (kk & 3) * 32), 16, 1024);
            ff_wgmma<T>::ss_n128(s[0], da, dk, kk > 0 ? 1 : 0);
        }
        ff_wgmma_commit();
        ff_wgmma_wait<0>();
        ff_fence_regs(s[0]);
        __syncwarp();
        if (lane == 0) {
            ff_mbar_arrive(FF_K_EMPTY(st));
        }

        // Mask (tiles crossing the diagonal or the end of the keys), online softmax, P.
        const bool masked = j >= n_plain;
        if (masked) {
            ff_attn_mask<T, 1, BN, 0>(s, scale_log2, row0, j * BN + 2 * (lane & 3), Tq, Tkv,
                                      causal != 0, diag, nullptr, 0, 0);
        }
        float alpha[2];
        const bool moved =
            ff_attn_exp<1, BN, LAZY>(s, m_run, l_run, alpha, masked ? 1.0f : scale_log2);
        ff_attn_rescale<DV, 1, LAZY>(o, alpha, moved);
        ff_u32_t p[1][BN / 16][4];
        ff_attn_pack<T, 1, BN>(p, s);

        // O += P V.
        ff_mbar_wait(FF_V_FULL(st), parity);
        ff_wgmma_fence();
#pragma unroll
        for (int kb = 0; kb < BN / 16; ++kb) {
            if (PVN == 128) {
                const ff_u64_t dv = ff_wgmma_desc(vt + (ff_u32_t)(kb * 16 * 128), KV_PANEL, 1024);
                ff_wgmma<T>::rs_n128(reinterpret_cast<float(&)[16][4]>(o[0][0]), p[0][kb], dv, 1);
            } else {
#pragma unroll
                for (int pn = 0; pn < DV / 64; ++pn) {
                    const ff_u64_t dv = ff_wgmma_desc(
                        vt + (ff_u32_t)(pn * KV_PANEL + kb * 16 * 128), KV_PANEL, 1024);
                    ff_wgmma<T>::rs_n64(reinterpret_cast<float(&)[8][4]>(o[0][8 * pn]), p[0][kb],
                                        dv, 1);
                }
            }
        }
        ff_wgmma_commit();
        ff_wgmma_wait<0>();
        ff_fence_regs(o[0]);
        ff_fence_regs(p[0]);
        __syncwarp();
        if (lane == 0) {
            ff_mbar_arrive(FF_V_EMPTY(st));
        }
    }
#undef FF_K_FULL
#undef FF_V_FULL
#undef FF_K_EMPTY
#undef FF_V_EMPTY

    // Epilogue: full row sums, normalise, round, store (4 bytes per lane and column pair).
    S* ob = out + (((ff_i64_t)b * n_heads + h) * Tq) * DV;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float sum = l_run[hf];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        // NaN (a NaN logit) stays NaN; only a row with nothing visible is 0.
        const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
        const int row = row0 + hf * 8;
        if (row < Tq) {
            ff_u32_t* orow = (ff_u32_t*)(ob + (ff_i64_t)row * DV) + (lane & 3);
#pragma unroll
            for (int db = 0; db < DV / 8; ++db) {
                orow[db * 4] =
                    ff_attn_mma<T>::pack(o[0][db][2 * hf] * inv, o[0][db][2 * hf + 1] * inv);
            }
        }
    }
}
