// The gated delta rule (ops/gated_delta.rs has the recurrence), its backward, and the sum of
// the backward's per-block partial gradients.
//
// Element types: TI for q, k, v (read as f32; out is written in TI), TG for gamma and beta
// (prelude tags). The state, the initial state, the mask (nonzero = taken), d_out and
// d_state are contiguous f32. Every input is contiguous and row-major:
//   q, k        [B, T, Hk, Dk]      v, out, d_out   [B, T, Hv, Dv]
//   gamma       [B, T, Hv] or [B, T, Hv, Dk]        beta [B, T, Hv]      mask [B, T]
//   state       [B, Hv, Dv, Dk]
//
// Thread layout: four lanes own one state row (eight rows a warp); lane j of a row holds the
// columns 16 v + 4 j + e (v < NV, e < 4), so a row of Dk <= 16 NV floats is 4 NV registers a
// lane and a row's dot products take two shuffles. Rows evolve independently; only the
// backward's key-side gradients (dq, dk, dgamma, dbeta) sum over rows. The inputs of
// `stage` steps at a time are loaded by the whole block into shared memory as f32
// (ff_gd_stage), so a step's critical path holds no global load.
//
// gd_forward: a block of four warps steps 32 rows of one head through every step.
// gd_backward: a block steps RB <= 8 * warps rows of one head. It runs the forward once,
//   keeping the rows at the start of every chunk of C steps (ckpt), then walks the chunks
//   backwards: the chunk is replayed from its checkpoint keeping the rows before each step
//   (scratch), and its steps are walked in reverse. Per step, the rows' shares of dq, dk and
//   dgamma are summed over the warp with shuffles and over the block in shared memory, in a
//   fixed order, and written as this row block's partial ([nrb][B, T, Hv, ...] f32). Each
//   lane reads back only what it wrote to ckpt and scratch, so they need no barrier.
// gd_sum: out[o][c] = sum over r < R, g < G of in[r][o G + g][c]: the row blocks' partials
//   and the value heads sharing a key head, in a fixed order (deterministic).
#include "ferrofast_prelude.cuh"

struct ff_gd_params {
    ff_i64_t t;        // steps
    int hk;            // key heads
    int hv;            // value heads
    int dk;            // key head size
    int dv;            // value head size
    int group;         // hv / hk
    int per_key;       // gamma has a value per key dimension
    int rb;            // rows per block of the backward
    int nrb;           // row blocks per head of the backward
    int chunk;         // steps per checkpoint of the backward
    int n_chunks;      // checkpoints per head of the backward
    int stage;         // steps staged in shared memory at a time
};

// The row's state columns held by this lane, from an f32 row of n floats (zeros past n).
__device__ __forceinline__ void ff_gd_load_row(const float* p, int c, int n, float out[4]) {
    if (c + 3 < n && (n & 3) == 0) {
        float4 x = *reinterpret_cast<const float4*>(p + c);
        out[0] = x.x;
        out[1] = x.y;
        out[2] = x.z;
        out[3] = x.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            out[e] = c + e < n ? p[c + e] : 0.0f;
        }
    }
}

__device__ __forceinline__ void ff_gd_store_row(float* p, int c, int n, const float x[4]) {
    if (c + 3 < n && (n & 3) == 0) {
        *reinterpret_cast<float4*>(p + c) = make_float4(x[0], x[1], x[2], x[3]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (c + e < n) {
                p[c + e] = x[e];
            }
        }
    }
}

// This lane's columns of state row `srow` (in floats) of src into s; zeros when src is null
// or the row is not active.
template <int NV>
__device__ __forceinline__ void ff_gd_load_rows(float s[NV][4], const float* src, ff_i64_t srow,
                                                int j, int dk, bool active) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        if (active && src != nullptr) {
            ff_gd_load_row(src + srow, 16 * i + 4 * j, dk, s[i]);
        } else {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
        }
    }
}

// Sum over the four lanes of a row.
__device__ __forceinline__ float ff_gd_row_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Sum over the eight rows of a warp (lanes with the same j).
__device__ __forceinline__ float ff_gd_col_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    x += __shfl_xor_sync(0xffffffffu, x, 8);
    x += __shfl_xor_sync(0xffffffffu, x, 16);
    return x;
}

// What a step reads that every row of a head shares.
struct ff_gd_head {
    ff_i64_t bt0;   // b * T
    int h;          // value head
    int kh;         // key head
};

// Step inputs are staged in shared memory, `stage` steps at a time, as f32. One step's
// segment: k[DKP] q[DKP] g[DKP] (g[0] only for a scalar decay) v[R] beta taken d_out[R]
// (the backward only), rounded up to a multiple of 4 floats. Columns past Dk are zero; a
// masked-out step reads nothing but its mask (its segment is zeros with taken = 0).
struct ff_gd_seg {
    int dkp;     // 16 NV
    int r;       // rows of the block
    int v;       // offset of v
    int beta;    // offset of beta
    int taken;   // offset of the taken flag
    int d_out;   // offset of d_out
    int len;     // floats a step
};

__device__ __forceinline__ ff_gd_seg ff_gd_make_seg(int dkp, int r, bool with_d_out) {
    ff_gd_seg g;
    g.dkp = dkp;
    g.r = r;
    g.v = 3 * dkp;
    g.beta = g.v + r;
    g.taken = g.beta + 1;
    g.d_out = g.taken + 1;
    g.len = ((g.d_out + (with_d_out ? r : 0)) + 3) & ~3;
    return g;
}

// Loads steps t0 .. t0 + n of the block's head (rows row0 .. row0 + R) into sm.
template <typename TI, typename TG>
__device__ __forceinline__ void ff_gd_stage(float* sm, const ff_gd_seg& sg, const ff_gd_params& p,
                                            const ff_gd_head& hd, ff_i64_t t0, int n, int row0,
                                            const typename TI::storage* __restrict__ q,
                                            const typename TI::storage* __restrict__ k,
                                            const typename TI::storage* __restrict__ v,
                                            const typename TG::storage* __restrict__ gamma,
                                            const typename TG::storage* __restrict__ beta,
                                            const float* __restrict__ mask,
                                            const float* __restrict__ d_out) {
    const int total = n * sg.len;
    for (int x = threadIdx.x; x < total; x += blockDim.x) {
        const int st = x / sg.len;
        const int off = x - st * sg.len;
        const ff_i64_t t = t0 + st;
        const bool taken = mask == nullptr || mask[hd.bt0 + t] != 0.0f;
        const ff_i64_t bth = (hd.bt0 + t) * p.hv + hd.h;
        const ff_i64_t qk = ((hd.bt0 + t) * p.hk + hd.kh) * p.dk;
        float val = 0.0f;
        if (off == sg.taken) {
            val = taken ? 1.0f : 0.0f;
        } else if (taken) {
            if (off < sg.dkp) {
                if (off < p.dk) val = TI::to_f32(k[qk + off]);
            } else if (off < 2 * sg.dkp) {
                const int c = off - sg.dkp;
                if (c < p.dk) val = TI::to_f32(q[qk + c]);
            } else if (off < 3 * sg.dkp) {
                const int c = off - 2 * sg.dkp;
                if (p.per_key) {
                    if (c < p.dk) val = TG::to_f32(gamma[bth * p.dk + c]);
                } else if (c == 0) {
                    val = TG::to_f32(gamma[bth]);
                }
            } else if (off < sg.beta) {
                const int row = row0 + off - sg.v;
                if (row < p.dv) val = TI::to_f32(v[bth * p.dv + row]);
            } else if (off == sg.beta) {
                val = TG::to_f32(beta[bth]);
            } else if (d_out != nullptr && off >= sg.d_out && off < sg.d_out + sg.r) {
                const int row = row0 + off - sg.d_out;
                if (row < p.dv) val = d_out[bth * p.dv + row];
            }
        }
        sm[x] = val;
    }
}

__device__ __forceinline__ void ff_gd_ld4(const float* p, float out[4]) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    out[0] = x.x;
    out[1] = x.y;
    out[2] = x.z;
    out[3] = x.w;
}

// The step's decay for this lane's columns of group i.
template <int NV>
__device__ __forceinline__ void ff_gd_decay(const float* x, const ff_gd_seg& sg, int per_key,
                                            int i, int j, float gg[4]) {
    if (per_key) {
        ff_gd_ld4(x + 2 * sg.dkp + 16 * i + 4 * j, gg);
    } else {
        gg[0] = gg[1] = gg[2] = gg[3] = x[2 * sg.dkp];
    }
}

// One taken step of the recurrence on the row held in s (4 NV columns a lane), its inputs
// the staged segment x; rl is the row within the block. With Q, returns the row's output
// S q (the same in the row's four lanes).
template <int NV, bool Q>
__device__ __forceinline__ float ff_gd_step(float s[NV][4], const float* x, const ff_gd_seg& sg,
                                            int per_key, int j, bool active, int rl) {
    const float bt = x[sg.beta];
    const float vv = active ? x[sg.v + rl] : 0.0f;
    // Four accumulators a dot product (one per column of a group): short dependency chains.
    float kv4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        float kk[4], gg[4];
        ff_gd_ld4(x + 16 * i + 4 * j, kk);
        ff_gd_decay<NV>(x, sg, per_key, i, j, gg);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[i][e] *= gg[e];
            kv4[e] += s[i][e] * kk[e];
        }
    }
    const float kv = ff_gd_row_sum((kv4[0] + kv4[1]) + (kv4[2] + kv4[3]));
    const float delta = active ? (vv - kv) * bt : 0.0f;
    float o4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        float kk[4], qq[4];
        ff_gd_ld4(x + 16 * i + 4 * j, kk);
        if (Q) {
            ff_gd_ld4(x + sg.dkp + 16 * i + 4 * j, qq);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[i][e] += delta * kk[e];
            if (Q) {
                o4[e] += s[i][e] * qq[e];
            }
        }
    }
    return Q ? ff_gd_row_sum((o4[0] + o4[1]) + (o4[2] + o4[3])) : 0.0f;
}

// grid (B * Hv, ceil(Dv / 32)), 128 threads; dynamic shared memory p.stage segments.
template <typename TI, typename TG, int NV>
__global__ void __launch_bounds__(128) gd_forward(
    const typename TI::storage* __restrict__ q, const typename TI::storage* __restrict__ k,
    const typename TI::storage* __restrict__ v, const typename TG::storage* __restrict__ gamma,
    const typename TG::storage* __restrict__ beta, const float* __restrict__ state0,
    const float* __restrict__ mask, typename TI::storage* __restrict__ out,
    float* __restrict__ state, ff_gd_params p) {
    extern __shared__ __align__(16) float sm[];
    const int lane = threadIdx.x & 31;
    const int j = lane & 3;
    const int row0 = blockIdx.y * 32;
    const int rl = (threadIdx.x >> 5) * 8 + (lane >> 2);
    const int row = row0 + rl;
    const bool active = row < p.dv;
    const ff_i64_t bh = blockIdx.x;
    ff_gd_head hd;
    hd.bt0 = (bh / p.hv) * p.t;
    hd.h = (int)(bh % p.hv);
    hd.kh = hd.h / p.group;
    const ff_i64_t srow = (bh * p.dv + row) * p.dk;
    const ff_gd_seg sg = ff_gd_make_seg(16 * NV, 32, false);

    // The state's loads are issued first: the first steps' inputs are staged while they are
    // in flight (at one step, decode, these are the kernel's only long waits).
    float s[NV][4];
    ff_gd_load_rows<NV>(s, state0, srow, j, p.dk, active);
    if (p.t > 0) {
        const int n = p.t < p.stage ? (int)p.t : p.stage;
        ff_gd_stage<TI, TG>(sm, sg, p, hd, 0, n, row0, q, k, v, gamma, beta, mask, nullptr);
    }
    for (ff_i64_t t0 = 0; t0 < p.t; t0 += p.stage) {
        const int n = p.t - t0 < p.stage ? (int)(p.t - t0) : p.stage;
        if (t0 > 0) {
            __syncthreads();
            ff_gd_stage<TI, TG>(sm, sg, p, hd, t0, n, row0, q, k, v, gamma, beta, mask, nullptr);
        }
        __syncthreads();
        for (int st = 0; st < n; ++st) {
            const float* x = sm + st * sg.len;
            const ff_i64_t o_at = ((hd.bt0 + t0 + st) * p.hv + hd.h) * p.dv + row;
            float o = 0.0f;
            if (x[sg.taken] != 0.0f) {
                o = ff_gd_step<NV, true>(s, x, sg, p.per_key, j, active, rl);
            }
            if (active && j == 0) {
                out[o_at] = TI::from_f32(o);
            }
        }
    }
    if (active) {
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            ff_gd_store_row(state + srow, 16 * i + 4 * j, p.dk, s[i]);
        }
    }
}

// The per-warp sums of one step, double-buffered, after the staged steps: [2][warps][3]
// [16 NV] floats for dq, dk, dgamma (per key) then [2][warps][2] for dbeta and the scalar
// dgamma.
template <int NV>
struct ff_gd_red {
    static const int W = 16 * NV;
    __device__ static float* vec(float* red, int buf, int warps, int warp, int which) {
        return red + ((buf * warps + warp) * 3 + which) * W;
    }
    __device__ static float* scalars(float* red, int buf, int warps, int warp) {
        return red + 2 * warps * 3 * W + (buf * warps + warp) * 2;
    }
};

// grid (B * Hv, nrb), 32 * ceil(rb / 8) threads (at most 512, 256 when NV = 16); dynamic
// shared memory p.stage segments (with d_out) then (2 * warps * (3 * 16 NV + 2)) floats.
template <typename TI, typename TG, int NV>
__global__ void __launch_bounds__(NV >= 16 ? 256 : 512) gd_backward(
    const typename TI::storage* __restrict__ q, const typename TI::storage* __restrict__ k,
    const typename TI::storage* __restrict__ v, const typename TG::storage* __restrict__ gamma,
    const typename TG::storage* __restrict__ beta, const float* __restrict__ state0,
    const float* __restrict__ mask, const float* __restrict__ d_out,
    const float* __restrict__ d_state, float* __restrict__ ckpt, float* __restrict__ scratch,
    float* __restrict__ part_q, float* __restrict__ part_k, float* __restrict__ part_g,
    float* __restrict__ part_b, float* __restrict__ dv_out, float* __restrict__ dstate0,
    ff_gd_params p) {
    extern __shared__ __align__(16) float sm[];
    typedef ff_gd_red<NV> R;
    const int DKP = 16 * NV;
    const int warps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int j = lane & 3;
    const int rl = warp * 8 + (lane >> 2);
    const int row0 = blockIdx.y * p.rb;
    const int row = row0 + rl;
    const bool active = rl < p.rb && row < p.dv;
    const ff_i64_t bh = blockIdx.x;
    ff_gd_head hd;
    hd.bt0 = (bh / p.hv) * p.t;
    hd.h = (int)(bh % p.hv);
    hd.kh = hd.h / p.group;
    const ff_i64_t srow = (bh * p.dv + row) * p.dk;
    const ff_gd_seg sg = ff_gd_make_seg(DKP, 8 * warps, true);
    float* red = sm + p.stage * sg.len;
    // This block's checkpoint and scratch slots: 8 * warps rows of DKP floats each.
    const ff_i64_t slot = (ff_i64_t)warps * 8 * DKP;
    const ff_i64_t blk = bh * p.nrb + blockIdx.y;
    float* my_ckpt = ckpt + blk * p.n_chunks * slot + (ff_i64_t)rl * DKP;
    float* my_scratch = scratch + blk * p.chunk * slot + (ff_i64_t)rl * DKP;
    const int gk = p.per_key ? p.dk : 1;
    const ff_i64_t rb_off = (ff_i64_t)blockIdx.y * ((ff_i64_t)gridDim.x * p.t);  // B T Hv

    float s[NV][4];
    ff_gd_load_rows<NV>(s, state0, srow, j, p.dk, active);
    // The forward, keeping the rows at the start of every chunk.
    for (int ch = 0; ch < p.n_chunks; ++ch) {
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            *reinterpret_cast<float4*>(my_ckpt + ch * slot + 16 * i + 4 * j) =
                make_float4(s[i][0], s[i][1], s[i][2], s[i][3]);
        }
        if (ch + 1 < p.n_chunks) {
            const ff_i64_t c1 = (ff_i64_t)(ch + 1) * p.chunk;
            for (ff_i64_t t0 = (ff_i64_t)ch * p.chunk; t0 < c1; t0 += p.stage) {
                const int n = c1 - t0 < p.stage ? (int)(c1 - t0) : p.stage;
                __syncthreads();
                ff_gd_stage<TI, TG>(sm, sg, p, hd, t0, n, row0, q, k, v, gamma, beta, mask,
                                    nullptr);
                __syncthreads();
                for (int st = 0; st < n; ++st) {
                    const float* x = sm + st * sg.len;
                    if (x[sg.taken] != 0.0f) {
                        ff_gd_step<NV, false>(s, x, sg, p.per_key, j, active, rl);
                    }
                }
            }
        }
    }

    // ds: the gradient of the rows after the step being walked.
    float ds[NV][4];
    ff_gd_load_rows<NV>(ds, d_state, srow, j, p.dk, active);
    int buf = 0;
    for (int ch = p.n_chunks - 1; ch >= 0; --ch) {
        const ff_i64_t c0 = (ff_i64_t)ch * p.chunk;
        const ff_i64_t c1 = c0 + p.chunk < p.t ? c0 + p.chunk : p.t;
        // Replay the chunk, keeping the rows before each step.
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            ff_gd_ld4(my_ckpt + ch * slot + 16 * i + 4 * j, s[i]);
        }
        for (ff_i64_t t0 = c0; t0 < c1; t0 += p.stage) {
            const int n = c1 - t0 < p.stage ? (int)(c1 - t0) : p.stage;
            __syncthreads();
            ff_gd_stage<TI, TG>(sm, sg, p, hd, t0, n, row0, q, k, v, gamma, beta, mask,
                                nullptr);
            __syncthreads();
            for (int st = 0; st < n; ++st) {
                const ff_i64_t t = t0 + st;
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    *reinterpret_cast<float4*>(my_scratch + (t - c0) * slot + 16 * i + 4 * j) =
                        make_float4(s[i][0], s[i][1], s[i][2], s[i][3]);
                }
                const float* x = sm + st * sg.len;
                if (t + 1 < c1 && x[sg.taken] != 0.0f) {
                    ff_gd_step<NV, false>(s, x, sg, p.per_key, j, active, rl);
                }
            }
        }
        // Walk the chunk's steps in reverse, staged from its end.
        for (ff_i64_t hi = c1; hi > c0;) {
            const ff_i64_t lo = hi - c0 > p.stage ? hi - p.stage : c0;
            const int n = (int)(hi - lo);
            __syncthreads();
            ff_gd_stage<TI, TG>(sm, sg, p, hd, lo, n, row0, q, k, v, gamma, beta, mask, d_out);
            __syncthreads();
            for (int st = n - 1; st >= 0; --st) {
                const ff_i64_t t = lo + st;
                const float* x = sm + st * sg.len;
                const ff_i64_t bth = (hd.bt0 + t) * p.hv + hd.h;
                if (x[sg.taken] == 0.0f) {
                    // Nothing flows through a masked step but the state's gradient.
                    for (int y = threadIdx.x; y < 2 * p.dk + gk + 1; y += blockDim.x) {
                        if (y < p.dk) {
                            part_q[(rb_off + bth) * p.dk + y] = 0.0f;
                        } else if (y < 2 * p.dk) {
                            part_k[(rb_off + bth) * p.dk + y - p.dk] = 0.0f;
                        } else if (y < 2 * p.dk + gk) {
                            part_g[(rb_off + bth) * gk + y - 2 * p.dk] = 0.0f;
                        } else {
                            part_b[rb_off + bth] = 0.0f;
                        }
                    }
                    if (active && j == 0) {
                        dv_out[bth * p.dv + row] = 0.0f;
                    }
                    continue;
                }
                float sp[NV][4];
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    ff_gd_ld4(my_scratch + (t - c0) * slot + 16 * i + 4 * j, sp[i]);
                }
                const float bt = x[sg.beta];
                const float vv = active ? x[sg.v + rl] : 0.0f;
                const float d_o = active ? x[sg.d_out + rl] : 0.0f;
                // kv = (S_prev * g) . k
                float kv4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    float kk[4], gg[4];
                    ff_gd_ld4(x + 16 * i + 4 * j, kk);
                    ff_gd_decay<NV>(x, sg, p.per_key, i, j, gg);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        kv4[e] += sp[i][e] * gg[e] * kk[e];
                    }
                }
                const float kv = ff_gd_row_sum((kv4[0] + kv4[1]) + (kv4[2] + kv4[3]));
                const float resid = vv - kv;
                const float delta = active ? resid * bt : 0.0f;
                // dS += d_o q; dq share d_o S_new; d_delta = dS . k
                float dd4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    const int c = 16 * i + 4 * j;
                    float kk[4], qq[4], gg[4];
                    ff_gd_ld4(x + c, kk);
                    ff_gd_ld4(x + DKP + c, qq);
                    ff_gd_decay<NV>(x, sg, p.per_key, i, j, gg);
                    float xq[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float sn = sp[i][e] * gg[e] + delta * kk[e];
                        ds[i][e] += d_o * qq[e];
                        xq[e] = active ? d_o * sn : 0.0f;
                        dd4[e] += ds[i][e] * kk[e];
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        xq[e] = ff_gd_col_sum(xq[e]);
                    }
                    if (lane < 4) {
                        float* dst = R::vec(red, buf, warps, warp, 0);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            dst[c + e] = xq[e];
                        }
                    }
                }
                const float dd = ff_gd_row_sum((dd4[0] + dd4[1]) + (dd4[2] + dd4[3]));
                const float dvi = dd * bt;
                const float db_row = active ? dd * resid : 0.0f;
                // dk share delta dS - dv_i A; dA = dS - dv_i k; dg share dA * S_prev;
                // dS = dA * g
                float gsum = 0.0f;
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    const int c = 16 * i + 4 * j;
                    float kk[4], gg[4];
                    ff_gd_ld4(x + c, kk);
                    ff_gd_decay<NV>(x, sg, p.per_key, i, j, gg);
                    float xk[4], xg[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float a = sp[i][e] * gg[e];
                        xk[e] = active ? delta * ds[i][e] - dvi * a : 0.0f;
                        const float da = ds[i][e] - dvi * kk[e];
                        xg[e] = active ? da * sp[i][e] : 0.0f;
                        ds[i][e] = da * gg[e];
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        xk[e] = ff_gd_col_sum(xk[e]);
                    }
                    if (p.per_key) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            xg[e] = ff_gd_col_sum(xg[e]);
                        }
                    } else {
                        gsum += (xg[0] + xg[1]) + (xg[2] + xg[3]);
                    }
                    if (lane < 4) {
                        float* dk_dst = R::vec(red, buf, warps, warp, 1);
                        float* dg_dst = R::vec(red, buf, warps, warp, 2);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            dk_dst[c + e] = xk[e];
                            if (p.per_key) {
                                dg_dst[c + e] = xg[e];
                            }
                        }
                    }
                }
                // The warp's dbeta (one value a row, from its lane 0) and scalar dgamma.
                const float wb = ff_warp_sum(j == 0 ? db_row : 0.0f);
                const float wg = ff_warp_sum(gsum);
                if (lane == 0) {
                    float* sc = R::scalars(red, buf, warps, warp);
                    sc[0] = wb;
                    sc[1] = wg;
                }
                if (active && j == 0) {
                    dv_out[bth * p.dv + row] = dvi;
                }
                __syncthreads();
                // The block's sums, warps in order.
                for (int y = threadIdx.x; y < 2 * p.dk + gk + 1; y += blockDim.x) {
                    float acc = 0.0f;
                    if (y < 2 * p.dk + (p.per_key ? p.dk : 0)) {
                        const int which = y / p.dk;
                        const int c = y - which * p.dk;
                        for (int w = 0; w < warps; ++w) {
                            acc += R::vec(red, buf, warps, w, which)[c];
                        }
                        float* dst = which == 0 ? part_q : which == 1 ? part_k : part_g;
                        dst[(rb_off + bth) * (which == 2 ? gk : p.dk) + c] = acc;
                    } else if (y < 2 * p.dk + gk) {
                        for (int w = 0; w < warps; ++w) {
                            acc += R::scalars(red, buf, warps, w)[1];
                        }
                        part_g[rb_off + bth] = acc;
                    } else {
                        for (int w = 0; w < warps; ++w) {
                            acc += R::scalars(red, buf, warps, w)[0];
                        }
                        part_b[rb_off + bth] = acc;
                    }
                }
                buf ^= 1;
            }
            hi = lo;
        }
    }
    if (dstate0 != nullptr && active) {
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            ff_gd_store_row(dstate0 + srow, 16 * i + 4 * j, p.dk, ds[i]);
        }
    }
}

// out[o][c] = sum_{r < R} sum_{g < G} in[r * plane + (o * G + g) * width + c], o < n_out,
// c < width; one thread per output, grid-strided.
__global__ void gd_sum(const float* __restrict__ in, float* __restrict__ out, ff_i64_t n_out,
                       int width, int groups, int parts, ff_i64_t plane) {
    const ff_i64_t n = n_out * width;
    for (ff_i64_t x = (ff_i64_t)blockIdx.x * blockDim.x + threadIdx.x; x < n;
         x += (ff_i64_t)gridDim.x * blockDim.x) {
        const ff_i64_t o = x / width;
        const int c = (int)(x - o * width);
        float acc = 0.0f;
        for (int r = 0; r < parts; ++r) {
            for (int g = 0; g < groups; ++g) {
                acc += in[r * plane + (o * groups + g) * width + c];
            }
        }
        out[x] = acc;
    }
}
