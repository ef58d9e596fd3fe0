// Attention decode: a few query rows (T_q <= 8) against a long key/value cache, for f32 / f16
// / bf16 (T is a prelude tag) with f32 math.
//
// Work split. A block serves one (batch, kv head), up to R query rows of that kv head's GQA
// group (rows are (query head in group, query position) pairs, so every query head of a group
// and every query position share one read of each key/value row), and one range of keys
// (split-KV: long caches are cut into n_splits ranges so that enough blocks run). Within the
// block, 4 warps are cut into groups of LPK lanes; a group reads one key row (and its value
// row) with one 16-byte load per lane per VPL, KU rows at a time, and keeps its own online
// softmax state (running max, running sum, rescaled accumulator) per query row. At the end the
// groups of a warp merge through shuffles, the warps through shared memory.
//
// With one split the block writes the normalised output (sinks applied). With several, it
// writes its unnormalised accumulator and (max, sum) to f32 workspaces and `attn_decode_combine`
// merges the splits of each output row.
//
// Scores are in base-2 units: q is pre-multiplied by scale * log2(e), an additive mask and
// the sinks by log2(e), and exp2 replaces exp. A key whose score is -inf (masked by a false
// bool entry, a -inf additive entry, causality or the range end) gets weight 0; a row that
// sees no key and has no sink is 0.
//
// Requirements (checked by the launcher): K and V rows have unit stride along the feature
// axis and every row starts 16-byte aligned; D and D_v are multiples of 8 and at most
// LPK * VPL * (16 / sizeof(T)). q, the mask and the sinks are read through any strides.
//
// `attn_decode_mma` (end of the file) is the tensor-core version for f16 / bf16 and the
// head dims of its launcher; `attn_decode` above serves f32 and every other shape.
#include "ferrofast_mma.cuh"
#include "ferrofast_attn.cuh"

#define FF_DECODE_WARPS 4
#define FF_DECODE_THREADS (FF_DECODE_WARPS * 32)
#define FF_LOG2E 1.4426950408889634f
#define FF_NEG_INF (-__int_as_float(0x7f800000))

// exp2 of a difference of base-2 logits where either may be -inf: a -inf score has weight 0,
// and equal maxima (including -inf == -inf) give 1.
__device__ __forceinline__ float ff_rescale(float from, float to) {
    return from == to ? 1.0f : exp2f(from - to);
}

// A 16-byte load of data read once: through the non-coherent path, not kept in L1.
__device__ __forceinline__ ff_vec16 ff_load_stream(const void* p) {
    ff_vec16 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
        : "l"(p));
    return v;
}

template <typename T>
struct ff_decode_traits {
    typedef typename T::storage S;
    static const int E = 16 / sizeof(S);
};

// A lane's VPL vectors of a key or value row as VPL * E floats, vector by vector.
template <typename T, int VPL, int E>
__device__ __forceinline__ void ff_decode_unpack(const ff_pack<typename T::storage, E> (&pk)[VPL],
                                                 float (&f)[VPL * E]) {
#pragma unroll
    for (int vi = 0; vi < VPL; ++vi) {
        ff_unpack<T>(pk[vi], f + vi * E);
    }
}

// Whether key `j` is visible to query position `t`, and the additive term (base 2) if any.
template <typename T>
__device__ __forceinline__ float ff_mask_term(const void* mask,
                                              int mask_kind,
                                              ff_i64_t row_off,
                                              ff_i64_t stride_k,
                                              int j) {
    if (mask_kind == FF_MASK_BOOL) {
        const ff_u8_t keep = static_cast<const ff_u8_t*>(mask)[row_off + (ff_i64_t)j * stride_k];
        return keep ? 0.0f : FF_NEG_INF;
    }
    if (mask_kind == FF_MASK_ADD) {
        const typename T::storage a =
            static_cast<const typename T::storage*>(mask)[row_off + (ff_i64_t)j * stride_k];
        return T::to_f32(a) * FF_LOG2E;
    }
    return 0.0f;
}

// The end of a decode block for one output element: column `c` of output row `orow` (query
// head `h`) from the block's merged running max `mm` (base 2), sum `lt` and accumulator `a`.
// With one split: sinks applied, normalised, rounded and stored; with several: the partial
// accumulator and (max, sum) go to the workspaces for `attn_decode_combine`.
template <typename T>
__device__ __forceinline__ void ff_decode_store(float mm,
                                                float lt,
                                                float a,
                                                int c,
                                                ff_i64_t orow,
                                                int h,
                                                int split,
                                                const typename T::storage* __restrict__ sinks,
                                                typename T::storage* __restrict__ out,
                                                float* __restrict__ part_acc,
                                                float* __restrict__ part_ml,
                                                const ff_attn_params& p) {
    if (p.n_splits == 1) {
        if (p.has_sinks) {
            const float sk = T::to_f32(sinks[p.s_off + (ff_i64_t)h * p.s_stride]) * FF_LOG2E;
            const float m2 = fmaxf(mm, sk);
            const float c1 = mm == FF_NEG_INF ? 0.0f : exp2f(mm - m2);
            a *= c1;
            lt = lt * c1 + (sk == FF_NEG_INF ? 0.0f : exp2f(sk - m2));
            mm = m2;
        }
        // A NaN logit (score, mask or sink) leaves lt NaN: the row is NaN, never 0.
        const float o = lt != lt ? lt : ((mm == FF_NEG_INF || lt == 0.0f) ? 0.0f : a / lt);
        out[orow * p.d_v + c] = T::from_f32(o);
    } else {
        const ff_i64_t slot = orow * p.n_splits + split;
        part_acc[slot * p.d_v + c] = a;
        if (c == 0) {
            part_ml[2 * slot] = mm;
            part_ml[2 * slot + 1] = lt;
        }
    }
}

template <typename T, int LPK, int VPL, int R>
__global__ void __launch_bounds__(FF_DECODE_THREADS)
    attn_decode(const typename T::storage* __restrict__ q,
                const typename T::storage* __restrict__ k,
                const typename T::storage* __restrict__ v,
                const void* __restrict__ mask,
                const typename T::storage* __restrict__ sinks,
                typename T::storage* __restrict__ out,
                float* __restrict__ part_acc,
                float* __restrict__ part_ml,
                ff_attn_params p) {
    typedef typename T::storage S;
    const int E = ff_decode_traits<T>::E;
    const int W = VPL * E;                  // features per lane
    const int KU = (VPL == 1 && R <= 4) ? 4 : 2;  // key rows per group per step
    const int GPW = 32 / LPK;               // groups per warp
    const int N_GROUPS = FF_DECODE_WARPS * GPW;

    __shared__ float sm_m[FF_DECODE_WARPS][R];
    __shared__ float sm_l[FF_DECODE_WARPS][R];
    __shared__ float sm_acc[FF_DECODE_WARPS][R][LPK * W];

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int lg = lane % LPK;              // lane within the group

    ff_i64_t bx = blockIdx.x;
    const int chunk = (int)(bx % p.n_row_chunks);
    bx /= p.n_row_chunks;
    const int split = (int)(bx % p.n_splits);
    bx /= p.n_splits;
    const int kvh = (int)(bx % p.n_kv);
    const ff_i64_t b = bx / p.n_kv;

    const int rows_total = p.group * p.t_q;
    const int row0 = chunk * R;
    const int n_rows = min(R, rows_total - row0);
    const int n_q = p.n_kv * p.group;

    // Query rows in registers, pre-scaled; lane lg holds features (vi * LPK + lg) * E + e.
    // Rows past n_rows repeat the last row (valid addresses) and are masked out.
    float qr[R][W];
    int lim[R];  // causal: the last key row r sees
    int t_max = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = row0 + min(r, n_rows - 1);
        const int h = kvh * p.group + row / p.t_q;
        const int t = row % p.t_q;
        lim[r] = r < n_rows ? t + p.t_kv - p.t_q : -1;
        t_max = max(t_max, t);
        const S* qp = q + p.q_off + b * p.q_sb + (ff_i64_t)h * p.q_sh + (ff_i64_t)t * p.q_st;
#pragma unroll
        for (int vi = 0; vi < VPL; ++vi) {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int dd = (vi * LPK + lg) * E + e;
                qr[r][vi * E + e] =
                    dd < p.d ? T::to_f32(qp[(ff_i64_t)dd * p.q_sd]) * p.scale_log2 : 0.0f;
            }
        }
    }
    if (!p.causal) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            lim[r] = r < n_rows ? p.t_kv : -1;
        }
    }

    float m[R];
    float l[R];
    float acc[R][W];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = FF_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            acc[r][i] = 0.0f;
        }
    }

    const int start = split * p.split_len;
    int end = min(p.t_kv, start + p.split_len);
    if (p.causal) {
        end = min(end, p.t_kv - p.t_q + t_max + 1);
    }
    const S* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)kvh * p.k_sh;
    const S* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)kvh * p.v_sh;
    const int nvec_k = p.d / E;
    const int nvec_v = p.d_v / E;

    // The loop bound is uniform across the warp (the score reductions shuffle across it);
    // keys past `end` are masked.
    for (int jw = start + warp * GPW * KU; jw < end; jw += N_GROUPS * KU) {
        const int j0 = jw + (lane / LPK) * KU;
        ff_pack<S, E> kv[KU][VPL];
        ff_pack<S, E> vv[KU][VPL];
        // Issue every load of the step before using any.
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const int j = j0 + u;
            const S* kr = kb + (ff_i64_t)j * p.k_st;
            const S* vr = vb + (ff_i64_t)j * p.v_st;
#pragma unroll
            for (int vi = 0; vi < VPL; ++vi) {
                const int idx = vi * LPK + lg;
                kv[u][vi].vec = ff_vec16{{0u, 0u, 0u, 0u}};
                vv[u][vi].vec = ff_vec16{{0u, 0u, 0u, 0u}};
                if (j < end && idx < nvec_k) {
                    kv[u][vi].vec = ff_load_stream(kr + idx * E);
                }
                if (j < end && idx < nvec_v) {
                    vv[u][vi].vec = ff_load_stream(vr + idx * E);
                }
            }
        }
        // Scores, reduced over the LPK lanes of the group (every lane gets the sum).
        float s[KU][R];
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            float kf[W];
            ff_decode_unpack<T>(kv[u], kf);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < W; ++i) {
                    dot = fmaf(qr[r][i], kf[i], dot);
                }
#pragma unroll
                for (int off = LPK / 2; off > 0; off >>= 1) {
                    dot += __shfl_xor_sync(0xffffffffu, dot, off);
                }
                s[u][r] = dot;
            }
        }
        // Range end, causality (and rows past n_rows), then the mask array.
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const int j = j0 + u;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float x = s[u][r];
                if (j >= end || j > lim[r]) {
                    x = FF_NEG_INF;
                } else if (p.mask_kind != FF_MASK_NONE) {
                    const int row = row0 + r;
                    const int h = kvh * p.group + row / p.t_q;
                    const int t = row % p.t_q;
                    const ff_i64_t mrow =
                        p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh + (ff_i64_t)t * p.m_st;
                    // A hidden key is -inf whatever its score (a NaN key stays out).
                    const float term = ff_mask_term<T>(mask, p.mask_kind, mrow, p.m_sk, j);
                    x = term == FF_NEG_INF ? term : x + term;
                }
                s[u][r] = x;
            }
        }
        // Online softmax: new running max, rescale, weights (s becomes p).
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float mt = m[r];
#pragma unroll
            for (int u = 0; u < KU; ++u) {
                mt = fmaxf(mt, s[u][r]);
            }
            const float corr = ff_rescale(m[r], mt);
            l[r] *= corr;
#pragma unroll
            for (int i = 0; i < W; ++i) {
                acc[r][i] *= corr;
            }
#pragma unroll
            for (int u = 0; u < KU; ++u) {
                const float pr = s[u][r] == FF_NEG_INF ? 0.0f : exp2f(s[u][r] - mt);
                l[r] += pr;
                s[u][r] = pr;
            }
            m[r] = mt;
        }
        // P V.
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            float vf[W];
            ff_decode_unpack<T>(vv[u], vf);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                // A key of weight 0 (masked, or underflowed) contributes nothing, even when
                // its value row holds NaN or an infinity (0 * NaN would poison the row).
                if (s[u][r] != 0.0f) {
#pragma unroll
                    for (int i = 0; i < W; ++i) {
                        acc[r][i] = fmaf(s[u][r], vf[i], acc[r][i]);
                    }
                }
            }
        }
    }

    // Merge the groups of each warp: lanes lg of every group hold the same features.
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[r], off);
            const float lo = __shfl_xor_sync(0xffffffffu, l[r], off);
            const float mm = fmaxf(m[r], mo);
            const float c1 = ff_rescale(m[r], mm);
            const float c2 = ff_rescale(mo, mm);
            l[r] = l[r] * c1 + lo * c2;
#pragma unroll
            for (int i = 0; i < W; ++i) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[r][i], off);
                acc[r][i] = acc[r][i] * c1 + ao * c2;
            }
            m[r] = mm;
        }
    }
    if (lane < LPK) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (lane == 0) {
                sm_m[warp][r] = m[r];
                sm_l[warp][r] = l[r];
            }
#pragma unroll
            for (int vi = 0; vi < VPL; ++vi) {
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    sm_acc[warp][r][(vi * LPK + lg) * E + e] = acc[r][vi * E + e];
                }
            }
        }
    }
    __syncthreads();

    // Merge the warps; one thread per (row, feature).
    for (int idx = tid; idx < n_rows * p.d_v; idx += FF_DECODE_THREADS) {
        const int r = idx / p.d_v;
        const int c = idx % p.d_v;
        float mm = FF_NEG_INF;
#pragma unroll
        for (int w = 0; w < FF_DECODE_WARPS; ++w) {
            mm = fmaxf(mm, sm_m[w][r]);
        }
        float lt = 0.0f;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < FF_DECODE_WARPS; ++w) {
            const float cw = sm_m[w][r] == FF_NEG_INF ? 0.0f : exp2f(sm_m[w][r] - mm);
            lt += sm_l[w][r] * cw;
            a += sm_acc[w][r][c] * cw;
        }
        const int row = row0 + r;
        const int h = kvh * p.group + row / p.t_q;
        const int t = row % p.t_q;
        const ff_i64_t orow = (b * n_q + h) * (ff_i64_t)p.t_q + t;
        ff_decode_store<T>(mm, lt, a, c, orow, h, split, sinks, out, part_acc, part_ml, p);
    }
}

// Most splits `attn_decode_combine` merges (the launcher caps n_splits at this).
#define FF_DECODE_MAX_SPLITS 256

// Merges the n_splits partial results of each output row: one block per row.
template <typename T>
__global__ void __launch_bounds__(FF_DECODE_THREADS)
    attn_decode_combine(const float* __restrict__ part_acc,
                        const float* __restrict__ part_ml,
                        const typename T::storage* __restrict__ sinks,
                        typename T::storage* __restrict__ out,
                        ff_attn_params p) {
    __shared__ float weight[FF_DECODE_MAX_SPLITS];
    __shared__ float total[2];
    const ff_i64_t orow = blockIdx.x;
    const int n_q = p.n_kv * p.group;
    const int h = (int)((orow / p.t_q) % n_q);
    const float* ml = part_ml + 2 * orow * p.n_splits;
    if (threadIdx.x < 32) {
        float mm = FF_NEG_INF;
        for (int s = threadIdx.x; s < p.n_splits; s += 32) {
            mm = fmaxf(mm, ml[2 * s]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, off));
        }
        float sink_w = 0.0f;
        if (p.has_sinks) {
            const float sk = T::to_f32(sinks[p.s_off + (ff_i64_t)h * p.s_stride]) * FF_LOG2E;
            const float m2 = fmaxf(mm, sk);
            sink_w = sk == FF_NEG_INF ? 0.0f : exp2f(sk - m2);
            mm = m2;
        }
        float lt = 0.0f;
        for (int s = threadIdx.x; s < p.n_splits; s += 32) {
            const float ms = ml[2 * s];
            const float w = ms == FF_NEG_INF ? 0.0f : exp2f(ms - mm);
            weight[s] = w;
            lt += ml[2 * s + 1] * w;
        }
        lt = ff_warp_sum(lt) + sink_w;
        if (threadIdx.x == 0) {
            total[0] = mm;
            total[1] = lt;
        }
    }
    __syncthreads();
    const float mm = total[0];
    const float lt = total[1];
    // A NaN logit leaves lt NaN: inv is then NaN and so is the row.
    const bool empty = lt == lt && (mm == FF_NEG_INF || lt == 0.0f);
    const float inv = empty ? 0.0f : 1.0f / lt;
    const float* acc = part_acc + orow * p.n_splits * (ff_i64_t)p.d_v;
    for (int c = threadIdx.x; c < p.d_v; c += blockDim.x) {
        float a = 0.0f;
        if (!empty) {
            for (int s = 0; s < p.n_splits; ++s) {
                a = fmaf(acc[(ff_i64_t)s * p.d_v + c], weight[s], a);
            }
        }
        out[orow * p.d_v + c] = T::from_f32(a * inv);
    }
}

// ----- tensor-core decode (f16 / bf16) ------------------------------------------------------
//
// The same work split as `attn_decode` (a block per (row chunk, split, kv head, batch); rows
// are the (query head in group, query position) pairs of a GQA group, so every query row of
// a kv head shares one read of each key / value row), computed on the tensor cores: the
// chunk's rows, zero-padded to 16, are the M dimension of mma.sync m16n8k16, keys are N for
// S = Q K^T and K for O += P V (the fragment steps of `ferrofast_mma.cuh`, as in prefill).
//
// Memory: the block's key range is cut into tiles of BN keys; warp w takes tiles w, w + NW,
// w + 2 NW, ... and streams them through its own ring of ST shared-memory stages (K and V
// rows of the tile, padded by 8 elements so ldmatrix rows hit distinct banks) filled by
// cp.async, ST - 1 tiles ahead of the one it computes. Warps never wait for each other in
// the key loop (each waits on its own cp.async groups and synchronises with __syncwarp), so
// a block keeps about NW * (ST - 1) tiles of K and V in flight. Keys past the range are
// zero-filled by cp.async and masked.
//
// Each warp keeps its own online-softmax state (running max, sum, f32 accumulator in mma
// fragments); at the end the warps merge through shared memory (reusing the stages) and
// the block writes the output or its split's partials exactly as `attn_decode` does.
//
// Scores are scaled to base-2 units in f32 (q is not pre-scaled: rounding it to 16 bits
// would cost accuracy), masked element-wise (range end, lower-right causality per row, the
// array mask), then exponentiated with ex2. Additive mask entries are clamped to -2e38 like
// prefill (a row of finfo.min stays a uniform average); -inf drops the key.
//
// Shared memory (dynamic): 16 * (D + 8) elements of Q, then NW * ST stages of
// BN * (KS + VS) elements: rows of D and DV elements, swizzled, when both are multiples of 64
// (every 128-byte piece of a K / V row then reaches shared memory as one L2 request), rows
// padded by 8 elements otherwise. LD: the L2 hint of the K / V copies (ff_cp_async16_hint).
template <typename T, int D, int DV, int NW, int ST, int BN, int LD>
__global__ void __launch_bounds__(NW * 32)
    attn_decode_mma(const typename T::storage* __restrict__ q,
                    const typename T::storage* __restrict__ k,
                    const typename T::storage* __restrict__ v,
                    const void* __restrict__ mask,
                    const typename T::storage* __restrict__ sinks,
                    typename T::storage* __restrict__ out,
                    float* __restrict__ part_acc,
                    float* __restrict__ part_ml,
                    ff_attn_params p) {
    typedef typename T::storage S;
    constexpr int NT = NW * 32;
    // K / V rows: swizzled or padded (ff_kv_layout).
    constexpr bool SW = ff_kv_layout<D, DV>::SW;
    constexpr int QS = D + 8;
    constexpr int KS = ff_kv_layout<D, DV>::KS;
    constexpr int VS = ff_kv_layout<D, DV>::VS;
    constexpr int STAGE = BN * (KS + VS);  // elements of one stage
    static_assert(D % 16 == 0 && DV % 16 == 0 && BN % 16 == 0, "multiples of 16");
    static_assert(ST >= 2, "at least two stages");
    static_assert(ST * STAGE * 2 >= 16 * DV * 4, "the merge buffer must fit in the stages");

    extern __shared__ __align__(16) unsigned char ff_dmma_smem[];
    __shared__ float sm_m[NW][16];
    __shared__ float sm_l[NW][16];
    S* sq = (S*)ff_dmma_smem;
    S* pipe = sq + 16 * QS;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    ff_i64_t bx = blockIdx.x;
    const int chunk = (int)(bx % p.n_row_chunks);
    bx /= p.n_row_chunks;
    const int split = (int)(bx % p.n_splits);
    bx /= p.n_splits;
    const int kvh = (int)(bx % p.n_kv);
    const ff_i64_t b = bx / p.n_kv;

    const int rows_total = p.group * p.t_q;
    const int row0 = chunk * 16;
    const int n_rows = min(16, rows_total - row0);
    const int n_q = p.n_kv * p.group;

    // The block's keys: its split's range, cut at the causal limit of its last query position.
    const int start = split * p.split_len;
    int end = min(p.t_kv, start + p.split_len);
    if (p.causal) {
        int t_max = 0;
        for (int r = 0; r < n_rows; ++r) {
            t_max = max(t_max, (row0 + r) % p.t_q);
        }
        end = min(end, p.t_kv - p.t_q + t_max + 1);
    }
    const int n_tiles = end > start ? (end - start + BN - 1) / BN : 0;
    const int my_tiles = warp < n_tiles ? (n_tiles - warp + NW - 1) / NW : 0;

    // This lane's two rows (lane / 4 and lane / 4 + 8): the last key each sees, and the
    // mask row.
    int lim[2];
    ff_i64_t mrow[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = (lane >> 2) + 8 * hf;
        lim[hf] = -1;
        mrow[hf] = 0;
        if (r < n_rows) {
            const int row = row0 + r;
            const int h = kvh * p.group + row / p.t_q;
            const int t = row % p.t_q;
            lim[hf] = min(end - 1, p.causal ? t + p.t_kv - p.t_q : p.t_kv - 1);
            mrow[hf] = p.m_off + b * p.m_sb + (ff_i64_t)h * p.m_sh + (ff_i64_t)t * p.m_st;
        }
    }

    const S* kb = k + p.k_off + b * p.k_sb + (ff_i64_t)kvh * p.k_sh;
    const S* vb = v + p.v_off + b * p.v_sb + (ff_i64_t)kvh * p.v_sh;
    S* wpipe = pipe + warp * ST * STAGE;
    const ff_u32_t wpipe_u = ff_smem_u32(wpipe);
    const ff_u32_t q_u = ff_smem_u32(sq);
    const ff_u64_t policy = LD >= 2 ? ff_evict_first_policy() : 0;

    // Warp-local tile j covers keys start + (warp + j * NW) * BN ...
    auto load = [&](int j, int stage) {
        const int key0 = start + (warp + j * NW) * BN;
        const int valid = min(BN, end - key0);
        S* dst = wpipe + stage * STAGE;
        ff_load_tile<S, BN, D, KS, 32, LD, SW>(dst, kb + (ff_i64_t)key0 * p.k_st, p.k_st,
                                               valid, lane, policy);
        ff_load_tile<S, BN, DV, VS, 32, LD, SW>(dst + BN * KS, vb + (ff_i64_t)key0 * p.v_st,
                                                p.v_st, valid, lane, policy);
    };
#pragma unroll
    for (int s = 0; s < ST - 1; ++s) {
        if (s < my_tiles) {
            load(s, s);
        }
        ff_cp_async_commit();
    }

    // The Q tile (while the first K / V tiles are on their way): rows past n_rows are zero
    // (their scores are masked anyway).
    for (int i = tid; i < 16 * D; i += NT) {
        const int r = i / D;
        const int c = i % D;
        S x = 0;
        if (r < n_rows) {
            const int row = row0 + r;
            const int h = kvh * p.group + row / p.t_q;
            const int t = row % p.t_q;
            x = q[p.q_off + b * p.q_sb + (ff_i64_t)h * p.q_sh + (ff_i64_t)t * p.q_st +
                  (ff_i64_t)c * p.q_sd];
        }
        sq[r * QS + c] = x;
    }
    __syncthreads();  // the Q tile

    float o[1][DV / 8][4];
    ff_zero_frags(o);
    float m_run[2] = {FF_ATTN_NEG_INF, FF_ATTN_NEG_INF};
    float l_run[2] = {0.0f, 0.0f};
    const ff_u8_t* mask_u8 = (const ff_u8_t*)mask;
    const S* mask_t = (const S*)mask;

    int stage = 0;
    int fill = ST - 1;  // the stage the next load goes to
    for (int j = 0; j < my_tiles; ++j) {
        ff_cp_async_wait<ST - 2>();
        __syncwarp();
        // The stage refilled now was read in the previous iteration, before __syncwarp.
        if (j + ST - 1 < my_tiles) {
            load(j + ST - 1, fill);
        }
        ff_cp_async_commit();
        fill = fill + 1 == ST ? 0 : fill + 1;

        const ff_u32_t k_u = wpipe_u + (ff_u32_t)(stage * STAGE * 2);
        float s[1][BN / 8][4];
        ff_attn_scores<T, D, 1, BN, QS, KS, SW>(s, q_u, k_u, lane);

        const int key0 = start + (warp + j * NW) * BN + 2 * (lane & 3);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = key0 + nb * 8 + e;
                    float x = s[0][nb][2 * hf + e] * p.scale_log2;
                    bool keep = key <= lim[hf];
                    if (p.mask_kind != FF_MASK_NONE && keep) {
                        const ff_i64_t at = mrow[hf] + (ff_i64_t)key * p.m_sk;
                        if (p.mask_kind == FF_MASK_BOOL) {
                            keep = mask_u8[at] != 0;
                        } else {
                            const float mv = T::to_f32(mask_t[at]);
                            x += ff_attn_mask_add(mv);
                        }
                    }
                    s[0][nb][2 * hf + e] = keep ? x : FF_ATTN_NEG_INF;
                }
            }
        }
        ff_attn_softmax<DV, 1, BN>(s, o, m_run, l_run, 1.0f);
        ff_attn_pv<T, DV, 1, BN, VS, SW>(o, s, k_u + (ff_u32_t)(BN * KS * 2), lane);
        stage = stage + 1 == ST ? 0 : stage + 1;
    }
    ff_cp_async_wait<0>();
    __syncthreads();  // every warp is done with its stages: they become the merge buffer

    // Per warp: the full row sums, then max, sum and accumulator rows to shared memory.
    float* sm_acc = (float*)pipe;  // [NW][16][DV]
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = l_run[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = (lane >> 2) + 8 * hf;
        if ((lane & 3) == 0) {
            sm_m[warp][r] = m_run[hf];
            sm_l[warp][r] = l;
        }
        float* arow = sm_acc + (warp * 16 + r) * DV + 2 * (lane & 3);
#pragma unroll
        for (int db = 0; db < DV / 8; ++db) {
            arow[db * 8] = o[0][db][2 * hf];
            arow[db * 8 + 1] = o[0][db][2 * hf + 1];
        }
    }
    __syncthreads();

    // Merge the warps; one thread per (row, feature).
    for (int idx = tid; idx < n_rows * DV; idx += NT) {
        const int r = idx / DV;
        const int c = idx % DV;
        float mm = FF_NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            mm = fmaxf(mm, sm_m[w][r]);
        }
        float lt = 0.0f;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float cw = sm_m[w][r] == FF_NEG_INF ? 0.0f : exp2f(sm_m[w][r] - mm);
            lt += sm_l[w][r] * cw;
            a += sm_acc[(w * 16 + r) * DV + c] * cw;
        }
        const int row = row0 + r;
        const int h = kvh * p.group + row / p.t_q;
        const int t = row % p.t_q;
        const ff_i64_t orow = (b * n_q + h) * (ff_i64_t)p.t_q + t;
        ff_decode_store<T>(mm, lt, a, c, orow, h, split, sinks, out, part_acc, part_ml, p);
    }
}
