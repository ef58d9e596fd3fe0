// Tensor-core building blocks shared by the attention kernels (`attn_prefill.cu`,
// `attn_decode.cu`), handed to NVRTC as the in-memory header "ferrofast_mma.cuh": PTX
// wrappers (cp.async, ldmatrix, mma.sync m16n8k16 for f16 / bf16), the cp.async tile
// loader, and the per-tile steps of a flash-attention loop (S = Q K^T, masking, online
// softmax, O += P V) on fragments of 16 query rows. Like the prelude it includes no CUDA headers.
//
// Fragment layout of the m16n8k16 accumulator (C / D), per lane: elements 0, 1 are row
// lane / 4, columns 2 * (lane % 4) + {0, 1} of an 8-column block; elements 2, 3 the same
// columns of row lane / 4 + 8.
#pragma once

#include "ferrofast_prelude.cuh"

#define FF_ATTN_LOG2E 1.4426950408889634f
#define FF_ATTN_NEG_INF __int_as_float(0xff800000)

// ----- PTX wrappers -------------------------------------------------------------------------

__device__ __forceinline__ ff_u32_t ff_smem_u32(const void* p) {
    ff_u32_t a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared; `src_bytes` 0 zero-fills the destination without reading.
__device__ __forceinline__ void ff_cp_async16(ff_u32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

// ff_cp_async16 with an L2 hint (LD): 0 none; 1 prefetch the surrounding 256 bytes into L2;
// 2 the cache policy `policy` (ff_evict_first_policy: streamed data read once); 3 both.
template <int LD>
__device__ __forceinline__ void ff_cp_async16_hint(ff_u32_t dst, const void* src, int src_bytes,
                                                   ff_u64_t policy) {
    if (LD == 1) {
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst),
                     "l"(src), "r"(src_bytes)
                     : "memory");
    } else if (LD == 2) {
        asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(
                         dst),
                     "l"(src), "r"(src_bytes), "l"(policy)
                     : "memory");
    } else if (LD == 3) {
        asm volatile(
            "cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(
                dst),
            "l"(src), "r"(src_bytes), "l"(policy)
            : "memory");
    } else {
        ff_cp_async16(dst, src, src_bytes);
    }
}

// An L2 cache policy that evicts the lines it is attached to first.
__device__ __forceinline__ ff_u64_t ff_evict_first_policy() {
    ff_u64_t policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

__device__ __forceinline__ void ff_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void ff_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ff_ldmatrix_x4(ff_u32_t (&r)[4], ff_u32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ff_ldmatrix_x4_trans(ff_u32_t (&r)[4], ff_u32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The tensor-core instruction and the f32 -> 16-bit pair conversion per input type.
template <typename T>
struct ff_attn_mma;

// The specialisation for T, whose PTX type is PTX.
#define FF_ATTN_MMA(T, PTX)                                                                     \
    template <>                                                                                 \
    struct ff_attn_mma<T> {                                                                     \
        __device__ static __forceinline__ void mma(float (&d)[4], const ff_u32_t (&a)[4],       \
                                                   ff_u32_t b0, ff_u32_t b1) {                  \
            asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 {%0, %1, %2, %3}, "  \
                "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                               \
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                \
        }                                                                                       \
        /* lo in the low half, hi in the high half, each rounded to nearest even. */            \
        __device__ static __forceinline__ ff_u32_t pack(float lo, float hi) {                   \
            ff_u32_t r;                                                                         \
            asm("cvt.rn." PTX "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));               \
            return r;                                                                           \
        }                                                                                       \
    };
FF_ATTN_MMA(ff_bf16, "bf16")
FF_ATTN_MMA(ff_f16, "f16")
#undef FF_ATTN_MMA

// Zeroes M x N accumulator fragments of the mma (four floats each).
template <int M, int N>
__device__ __forceinline__ void ff_zero_frags(float (&acc)[M][N][4]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int n = 0; n < N; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[m][n][e] = 0.0f;
            }
        }
    }
}

// Zeroes N accumulator fragments of the mma (four floats each).
template <int N>
__device__ __forceinline__ void ff_zero_frags(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[n][e] = 0.0f;
        }
    }
}

// ----- tile loads ---------------------------------------------------------------------------

// Issues cp.async for a ROWS x COLS tile (COLS a multiple of 8) whose row r starts at
// g + r * g_stride, into shared memory rows of STRIDE elements. Rows >= rows_valid are
// zero-filled (their source address is clamped to row 0, which exists, and never read).
// When the block's threads cover whole rows (NT a multiple of COLS / 8), each thread keeps
// one column and steps a single pointer down the rows: the compiler then has no per-chunk
// 64-bit addresses to hoist out of the key loop (they cost registers the MMAs need).
//
// LD and `policy`: the L2 hint of every copy (ff_cp_async16_hint).
//
// SW: the swizzled layout: rows of exactly COLS elements (STRIDE == COLS, COLS a
// multiple of 64), 16-byte chunk c of row r stored at chunk c ^ (r % 8). Every 128-byte
// piece of a global row then lands in one 128-byte piece of shared memory (one L2 request
// per piece, where padded rows split the pieces across shared-memory lines), and ldmatrix
// reads of eight rows at one logical chunk still hit eight different bank groups.
template <typename S, int ROWS, int COLS, int STRIDE, int NT, int LD = 0, bool SW = false>
__device__ __forceinline__ void ff_load_tile(S* smem, const S* g, ff_i64_t g_stride,
                                             int rows_valid, int tid, ff_u64_t policy = 0) {
    constexpr int CH = COLS / 8;
    constexpr int TOTAL = ROWS * CH;
    static_assert(!SW || (STRIDE == COLS && COLS % 64 == 0), "swizzled rows are unpadded");
    const ff_u32_t base = ff_smem_u32(smem);
    if (NT % CH == 0 && TOTAL % NT == 0) {
        constexpr int STEP = NT / CH;
        const int r0 = tid / CH;
        const int chunk = tid % CH;
        const int col = chunk * 8;
        const S* src = g + (ff_i64_t)r0 * g_stride + col;
        const ff_i64_t step = (ff_i64_t)STEP * g_stride;
        const ff_u32_t dst = base + (ff_u32_t)(r0 * STRIDE * 2);
#pragma unroll
        for (int i = 0; i < TOTAL / NT; ++i) {
            const int r = r0 + i * STEP;
            const bool ok = r < rows_valid;
            const int pc = SW ? (chunk ^ (r & 7)) : chunk;
            ff_cp_async16_hint<LD>(dst + (ff_u32_t)((i * STEP * STRIDE + pc * 8) * 2),
                                   ok ? src : g, ok ? 16 : 0, policy);
            src += step;
        }
    } else {
#pragma unroll
        for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
            const int c = tid + i * NT;
            if (TOTAL % NT == 0 || c < TOTAL) {
                const int r = c / CH;
                const int chunk = c % CH;
                const int pc = SW ? (chunk ^ (r & 7)) : chunk;
                const bool ok = r < rows_valid;
                const S* src = g + (ok ? (ff_i64_t)r * g_stride : (ff_i64_t)0) + chunk * 8;
                ff_cp_async16_hint<LD>(base + (ff_u32_t)((r * STRIDE + pc * 8) * 2), src,
                                       ok ? 16 : 0, policy);
            }
        }
    }
}

// Whether the K / V tiles of a kernel with head widths D and DV use the swizzled layout of
// ff_load_tile (both multiples of 64; `kv_row_pad` in sdpa.rs is the launchers' copy of this
// rule), and the matching shared-memory row strides (unpadded when swizzled, padded by 8
// elements otherwise).
template <int D, int DV>
struct ff_kv_layout {
    static constexpr bool SW = D % 64 == 0 && DV % 64 == 0;
    static constexpr int KS = SW ? D : D + 8;
    static constexpr int VS = SW ? DV : DV + 8;
};

// ----- per-tile math ------------------------------------------------------------------------

// s[ms][nb][e] += Q (this warp's MS slabs of 16 rows) times K^T for one tile of BN keys.
// Accumulator layout (mma C fragment): e = 0, 1 -> row lane/4, key nb*8 + 2*(lane%4) + e;
// e = 2, 3 -> row lane/4 + 8, same keys.
template <typename T, int D, int MS, int BN, int QS, int KS, bool SW = false>
__device__ __forceinline__ void ff_attn_scores(float (&s)[MS][BN / 8][4], ff_u32_t q_rows,
                                               ff_u32_t k_tile, int lane) {
    ff_zero_frags(s);
    // ldmatrix lane addresses: A (Q) row lane%16, column half lane/16; B (K) key row
    // (lane%8) + 8 * (lane/16), column half (lane/8)%2.
    const ff_u32_t a_addr = q_rows + (ff_u32_t)(((lane & 15) * QS + (lane >> 4) * 8) * 2);
    const int b_row = (lane & 7) + ((lane >> 4) << 3);
    const int b_half = (lane >> 3) & 1;
    const ff_u32_t b_addr =
        k_tile + (ff_u32_t)((b_row * KS + (SW ? 0 : b_half * 8)) * 2);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ff_u32_t a[MS][4];
#pragma unroll
        for (int ms = 0; ms < MS; ++ms) {
            ff_ldmatrix_x4(a[ms], a_addr + (ff_u32_t)((ms * 16 * QS + kk * 16) * 2));
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
            ff_u32_t b[4];
            // Swizzled: rows nn * 16 + b_row keep b_row's chunk permutation (16 % 8 == 0).
            const ff_u32_t b_col =
                SW ? (ff_u32_t)((((2 * kk + b_half) ^ (lane & 7)) * 8) * 2) : (ff_u32_t)(kk * 32);
            ff_ldmatrix_x4(b, b_addr + (ff_u32_t)(nn * 16 * KS * 2) + b_col);
#pragma unroll
            for (int ms = 0; ms < MS; ++ms) {
                ff_attn_mma<T>::mma(s[ms][2 * nn], a[ms], b[0], b[1]);
                ff_attn_mma<T>::mma(s[ms][2 * nn + 1], a[ms], b[2], b[3]);
            }
        }
    }
}

// P (s already exponentiated) rounded to T as mma A fragments: p[ms][kb] covers keys
// 16 * kb .. 16 * kb + 15 of slab ms.
template <typename T, int MS, int BN>
__device__ __forceinline__ void ff_attn_pack(ff_u32_t (&p)[MS][BN / 16][4],
                                             const float (&s)[MS][BN / 8][4]) {
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int kb = 0; kb < BN / 16; ++kb) {
            p[ms][kb][0] = ff_attn_mma<T>::pack(s[ms][2 * kb][0], s[ms][2 * kb][1]);
            p[ms][kb][1] = ff_attn_mma<T>::pack(s[ms][2 * kb][2], s[ms][2 * kb][3]);
            p[ms][kb][2] = ff_attn_mma<T>::pack(s[ms][2 * kb + 1][0], s[ms][2 * kb + 1][1]);
            p[ms][kb][3] = ff_attn_mma<T>::pack(s[ms][2 * kb + 1][2], s[ms][2 * kb + 1][3]);
        }
    }
}

// o[ms][db][e] += P V for one tile of BN keys, P packed by ff_attn_pack.
template <typename T, int DV, int MS, int BN, int VS, bool SW = false>
__device__ __forceinline__ void ff_attn_pv_packed(float (&o)[MS][DV / 8][4],
                                                  const ff_u32_t (&p)[MS][BN / 16][4],
                                                  ff_u32_t v_tile, int lane) {
    // ldmatrix.trans lane addresses: key row (lane%8) + 8 * ((lane/8)%2), column half lane/16.
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int b_half = lane >> 4;
    const ff_u32_t b_addr =
        v_tile + (ff_u32_t)((b_row * VS + (SW ? 0 : b_half * 8)) * 2);
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {
#pragma unroll
        for (int dd = 0; dd < DV / 16; ++dd) {
            ff_u32_t b[4];
            const ff_u32_t b_col =
                SW ? (ff_u32_t)((((2 * dd + b_half) ^ (lane & 7)) * 8) * 2) : (ff_u32_t)(dd * 32);
            ff_ldmatrix_x4_trans(b, b_addr + (ff_u32_t)(kb * 16 * VS * 2) + b_col);
#pragma unroll
            for (int ms = 0; ms < MS; ++ms) {
                ff_attn_mma<T>::mma(o[ms][2 * dd], p[ms][kb], b[0], b[1]);
                ff_attn_mma<T>::mma(o[ms][2 * dd + 1], p[ms][kb], b[2], b[3]);
            }
        }
    }
}

// o[ms][db][e] += P V for one tile of BN keys; P is s (already exponentiated) rounded to T.
template <typename T, int DV, int MS, int BN, int VS, bool SW = false>
__device__ __forceinline__ void ff_attn_pv(float (&o)[MS][DV / 8][4],
                                           const float (&s)[MS][BN / 8][4], ff_u32_t v_tile,
                                           int lane) {
    ff_u32_t p[MS][BN / 16][4];
    ff_attn_pack<T, MS, BN>(p, s);
    ff_attn_pv_packed<T, DV, MS, BN, VS, SW>(o, p, v_tile, lane);
}

// Online softmax step: new running max per row, rescale of o and the partial sums, and
// s <- 2^(s * mul - max). `m` and `l` hold per row (index 2 * ms + hf) the running max in
// base-2 units (same on the row's four lanes) and this lane's partial sum. `mul` is 1 when
// s is already in base-2 units (the masking path) or scale * log2(e) > 0 for raw scores:
// then the max is taken on the raw scores and the scaling folds into the exponent's FFMA.
template <int DV, int MS, int BN>
__device__ __forceinline__ void ff_attn_softmax(float (&s)[MS][BN / 8][4],
                                                float (&o)[MS][DV / 8][4], float (&m)[2 * MS],
                                                float (&l)[2 * MS], float mul) {
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = 2 * ms + hf;
            float mx = FF_ATTN_NEG_INF;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                mx = fmaxf(mx, fmaxf(s[ms][nb][2 * hf], s[ms][nb][2 * hf + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(m[r], mx * mul);
            const float ref = mx == FF_ATTN_NEG_INF ? 0.0f : mx;
            const float alpha = ff_exp2(m[r] - ref);
            m[r] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                const float p0 = ff_exp2(fmaf(s[ms][nb][2 * hf], mul, -ref));
                const float p1 = ff_exp2(fmaf(s[ms][nb][2 * hf + 1], mul, -ref));
                s[ms][nb][2 * hf] = p0;
                s[ms][nb][2 * hf + 1] = p1;
                sum += p0 + p1;
            }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int db = 0; db < DV / 8; ++db) {
                o[ms][db][2 * hf] *= alpha;
                o[ms][db][2 * hf + 1] *= alpha;
            }
        }
    }
}

// An additive mask entry in base-2 units: -inf drops the key, NaN makes the row NaN, and
// finite values are clamped to -2e38 so that 2^x stays finite in f32 (a row of finfo.min
// entries stays a uniform average).
__device__ __forceinline__ float ff_attn_mask_add(float m) {
    return (m == FF_ATTN_NEG_INF || m != m) ? m : fmaxf(m, -2.0e38f) * FF_ATTN_LOG2E;
}

// ----- masking and the online softmax of the prefill kernels ------------------------------
// (attn_prefill.cu, attn_prefill_sm90.cu: the accumulator layout of one m16n8k16 tile is
// also that of each warp's 16 rows of a wgmma m64nNk16 accumulator.)

// Scores to base-2 units, with every mask applied: bounds (key < T_kv), causality, and the
// array mask. `row0` is the query index of this lane's first row (row lane/4 of slab 0),
// `col0` the key index of its first column.
template <typename T, int MS, int BN, int MASK>
__device__ __forceinline__ void ff_attn_mask(float (&s)[MS][BN / 8][4], float scale_log2,
                                             int row0, int col0, int Tq, int Tkv, bool causal,
                                             int diag, const void* mask_ptr, ff_i64_t m_sq,
                                             ff_i64_t m_sk) {
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = row0 + ms * 16 + hf * 8;
            const bool row_ok = row < Tq;
            // Columns col0 + c with c <= limit are inside the keys and the causal band.
            const int limit = (causal ? min(Tkv - 1, row + diag) : Tkv - 1) - col0;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + nb * 8 + e;
                    float x = s[ms][nb][2 * hf + e] * scale_log2;
                    bool keep = nb * 8 + e <= limit;
                    if (MASK != 0 && keep && row_ok) {
                        const ff_i64_t at = (ff_i64_t)row * m_sq + (ff_i64_t)col * m_sk;
                        if (MASK == 1) {
                            keep = ((const ff_u8_t*)mask_ptr)[at] != 0;
                        } else {
                            x += ff_attn_mask_add(
                                T::to_f32(((const typename T::storage*)mask_ptr)[at]));
                        }
                    }
                    s[ms][nb][2 * hf + e] = keep ? x : FF_ATTN_NEG_INF;
                }
            }
        }
    }
}

// Online softmax, first half: new running max per row and s <- 2^(s * mul - ref), with the
// partial sums updated. `m` and `l` hold per row (index 2 * ms + hf) the running max in
// base-2 units (same on the row's four lanes) and this lane's partial sum; `alpha` receives
// the factor the row's accumulators must be multiplied by (2^(old ref - new ref)). `mul` is
// 1 when s is already in base-2 units (the masking path) or scale * log2(e) > 0 for raw
// scores: then the max is taken on the raw scores and the scaling folds into the
// exponent's FFMA.
//
// LAZY keeps a row's reference (its max so far) until the tile's max exceeds it by more than
// FF_ATTN_SLACK (base-2 units): the exponentials stay below 2^SLACK, which f32 sums and
// f16 / bf16 P carry with no loss of relative precision, and most tiles then need no
// rescaling of the accumulators at all. Returns whether this lane's rows moved their
// reference (the accumulators need the rescale).
#define FF_ATTN_SLACK 8.0f

template <int MS, int BN, bool LAZY>
__device__ __forceinline__ bool ff_attn_exp(float (&s)[MS][BN / 8][4], float (&m)[2 * MS],
                                            float (&l)[2 * MS], float (&alpha)[2 * MS],
                                            float mul) {
    bool moved = false;
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = 2 * ms + hf;
            float mx = FF_ATTN_NEG_INF;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                mx = fmaxf(mx, fmaxf(s[ms][nb][2 * hf], s[ms][nb][2 * hf + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m[r], mx * mul);
            if (LAZY) {
                // -inf + SLACK is -inf: a row's first finite score always moves it.
                m_new = m_new > m[r] + FF_ATTN_SLACK ? m_new : m[r];
            }
            // A row whose every score so far is -inf uses 0 as its reference (no inf - inf).
            const float ref = m_new == FF_ATTN_NEG_INF ? 0.0f : m_new;
            alpha[r] = ff_exp2(m[r] - ref);
            moved = moved || m_new != m[r];
            m[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                const float p0 = ff_exp2(fmaf(s[ms][nb][2 * hf], mul, -ref));
                const float p1 = ff_exp2(fmaf(s[ms][nb][2 * hf + 1], mul, -ref));
                s[ms][nb][2 * hf] = p0;
                s[ms][nb][2 * hf + 1] = p1;
                sum += p0 + p1;
            }
            l[r] = l[r] * alpha[r] + sum;
        }
    }
    return moved;
}

// Online softmax, second half: o *= alpha per row. LAZY skips it when no row of the warp
// moved its reference (alpha is then 1 everywhere; the vote keeps the branch uniform).
template <int DV, int MS, bool LAZY>
__device__ __forceinline__ void ff_attn_rescale(float (&o)[MS][DV / 8][4],
                                                const float (&alpha)[2 * MS], bool moved) {
    if (LAZY && !__any_sync(0xffffffffu, moved)) {
        return;
    }
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
            for (int db = 0; db < DV / 8; ++db) {
                o[ms][db][2 * hf] *= alpha[2 * ms + hf];
                o[ms][db][2 * hf + 1] *= alpha[2 * ms + hf];
            }
        }
    }
}
