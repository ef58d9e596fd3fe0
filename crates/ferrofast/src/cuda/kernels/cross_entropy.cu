// Softmax cross-entropy over the last axis, its backward and the fused training pass, for
// f32 / f16 / bf16 logits (T is a prelude tag: ff_f32, ff_f16, ff_bf16) and int64 targets.
//
// Layout: row r of the logits starts at x + x_offset + r * x_row_stride (elements; the last
// axis has stride 1); row r of dx (when written) at dx + r * V. Targets are contiguous int64.
//
// Per row (formulas in ops/cross_entropy.rs): m = max(x), s = sum exp(x - m) (ce_rows: two
// passes over the registers; ce_looped: one online pass, where a block of N_READS logits is
// scanned for its max, the running sum rescaled when the max grows, then the block
// exponentiated), lse = m + log(s) (m when m is infinite), loss = (1 - eps)(m - x[t]) + eps (m - mean x) + log(s) + z lse^2; a NaN
// logit makes the row NaN. Gradient: g * ((1 + 2 z lse) exp(x - lse) - eps / V
// - (1 - eps)[j == t]), rounded once to T. Ignored rows: loss 0, gradient 0, no logit read;
// targets outside [0, V) after wrapping: NaN, no logit read.
//
// Kernels:
//   ce_rows<T, ALIGNED, GRAD, CHUNKS, C>: a row per cluster of C blocks (C = 1: a block),
//     held in registers (CHUNKS vectors of 16 bytes per thread, at most FF_CE_ROWS_THREADS
//     threads a block), so each logit is read from memory once, for the loss alone or with
//     the gradient. Rows up to C * FF_CE_ROWS_THREADS * CHUNKS vectors.
//   ce_stream<T, S, TH>: the loss alone over long aligned rows: persistent blocks stream the rows
//     through a ring of S slots of shared memory (cp.async), online statistics.
//   ce_looped<T, ALIGNED, GRAD>: one block per row, longer rows: the block strides over the
//     row, U vectors per thread in flight; with GRAD the row is read a second time to write
//     dx (from L2 when it is still there).
//   ce_count_valid: 1 / n_valid and n_valid of the targets, for the mean.
//   ce_reduce: the sum (or mean) of the per-row losses, in a fixed order (deterministic).
//
// dx may be x's own buffer (the in-place training pass): every logit is read, by the thread
// that later writes its gradient, before the row's reduction barrier (block or cluster) or
// just before it is overwritten, so x and dx are not declared __restrict__.
//
// ALIGNED: every row start is 16-byte aligned and V % N_READS == 0, so logits are loaded
// and gradients stored as 16-byte vectors; otherwise scalar accesses with bounds checks.
#include "ferrofast_prelude.cuh"
#include "ferrofast_mma.cuh"

#define FF_CE_LOG2E 1.4426950408889634f
#define FF_CE_INF __int_as_float(0x7f800000)
#define FF_CE_NAN __int_as_float(0x7fffffff)
#define FF_CE_LOOPED_THREADS 1024
#define FF_CE_ROWS_THREADS 256
// Vectors in flight per thread in the looped kernel.
#define FF_CE_U 4
// Vectors per thread of one ce_stream item (a ring slot holds TH * 4 * 16 bytes).
#define FF_CE_STREAM_U 4

struct ff_ce_params {
    ff_i64_t x_offset;
    ff_i64_t x_row_stride;
    ff_i64_t n_rows;
    ff_i64_t ignore_index;
    // Stride of the cotangent per row: 1 (one per row) or 0 (one scalar for every row).
    ff_i64_t g_stride;
    int has_ignore;
    int V;
    float one_minus_eps;
    float eps;
    float eps_over_v;
    float z;
    // ce_rows: logits per block of a row's cluster (a multiple of the vector width).
    int slice;
};

template <typename T>
struct ff_ce {
    typedef typename T::storage S;
    static const int N = 16 / sizeof(S);
};

// The running statistics of a row (or of a thread's share of it).
struct ff_ce_stats {
    float m;      // max, -inf when nothing seen
    float s;      // sum of exp(x - m)
    float sum_x;  // sum of x
    int nan;      // a NaN was seen
};

// The statistics of nothing seen yet.
__device__ __forceinline__ ff_ce_stats ff_ce_empty() {
    ff_ce_stats st;
    st.m = -FF_CE_INF;
    st.s = 0.0f;
    st.sum_x = 0.0f;
    st.nan = 0;
    return st;
}

__device__ __forceinline__ float ff_ce_scaled(float s, float from, float to) {
    // s * exp(from - to), where a running sum at -inf is empty.
    return from == -FF_CE_INF ? 0.0f : s * exp2f((from - to) * FF_CE_LOG2E);
}

__device__ __forceinline__ ff_ce_stats ff_ce_merge(ff_ce_stats a, ff_ce_stats b) {
    ff_ce_stats r;
    r.m = fmaxf(a.m, b.m);
    r.s = ff_ce_scaled(a.s, a.m, r.m) + ff_ce_scaled(b.s, b.m, r.m);
    r.sum_x = a.sum_x + b.sum_x;
    r.nan = a.nan | b.nan;
    return r;
}

// Folds N logits (those with index < V; `base` is the first one's index) into `st`.
template <int N>
__device__ __forceinline__ void ff_ce_fold(ff_ce_stats& st, const float (&v)[N], int base, int V) {
    float vm = -FF_CE_INF;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const bool in = base + k < V;
        vm = in ? fmaxf(vm, v[k]) : vm;
        st.sum_x += in ? v[k] : 0.0f;
        st.nan |= in && v[k] != v[k];
    }
    if (vm > st.m) {
        st.s = ff_ce_scaled(st.s, st.m, vm);
        st.m = vm;
    }
    if (st.m != -FF_CE_INF && st.m != FF_CE_INF) {
        const float m = st.m;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            st.s += base + k < V ? exp2f((v[k] - m) * FF_CE_LOG2E) : 0.0f;
        }
    }
}

// Loads logits [base, base + N) of a row in their storage type (past V: -inf), for the
// kernel that keeps the row in registers: 16 bytes a vector whatever the dtype.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_ce_load_raw(const typename T::storage* p, int base, int V,
                                               ff_pack<typename T::storage, ff_ce<T>::N>& pk) {
    const int N = ff_ce<T>::N;
    if constexpr (ALIGNED) {
        if (base < V) {
            pk.vec = *reinterpret_cast<const ff_vec16*>(p + base);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                pk.elem[k] = T::from_f32(-FF_CE_INF);
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            pk.elem[k] = base + k < V ? p[base + k] : T::from_f32(-FF_CE_INF);
        }
    }
}

// Stores gradients [base, base + N) of a row (skipping those past V).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_ce_store(typename T::storage* p, int base, int V,
                                            const float (&d)[ff_ce<T>::N]) {
    typedef typename T::storage S;
    const int N = ff_ce<T>::N;
    if constexpr (ALIGNED) {
        if (base < V) {
            ff_pack<S, N> pk;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                pk.elem[k] = T::from_f32(d[k]);
            }
            *reinterpret_cast<ff_vec16*>(p + base) = pk.vec;
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (base + k < V) {
                p[base + k] = T::from_f32(d[k]);
            }
        }
    }
}

// Merges `st` over the warp's 32 lanes, in place in every lane.
__device__ __forceinline__ void ff_ce_warp_merge(ff_ce_stats& st) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ff_ce_stats o;
        o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
        o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
        o.sum_x = __shfl_xor_sync(0xffffffffu, st.sum_x, off);
        o.nan = __shfl_xor_sync(0xffffffffu, st.nan, off);
        st = ff_ce_merge(st, o);
    }
}

// The row's statistics from every thread's share, returned to every thread. Synchronises
// the block (every thread must call it).
__device__ __forceinline__ ff_ce_stats ff_ce_block_merge(ff_ce_stats st) {
    __shared__ ff_ce_stats part[32];
    __shared__ ff_ce_stats total;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    ff_ce_warp_merge(st);
    if (lane == 0) {
        part[warp] = st;
    }
    __syncthreads();
    if (warp == 0) {
        ff_ce_stats w;
        if (lane < n_warps) {
            w = part[lane];
        } else {
            w = ff_ce_empty();
        }
        ff_ce_warp_merge(w);
        if (lane == 0) {
            total = w;
        }
    }
    __syncthreads();
    return total;
}

// What a row's raw target means: -1 ignored, -2 out of range, else the class.
__device__ __forceinline__ ff_i64_t ff_ce_target(const ff_ce_params& p, ff_i64_t raw) {
    if (p.has_ignore && raw == p.ignore_index) {
        return -1;
    }
    const ff_i64_t t = raw < 0 ? raw + (ff_i64_t)p.V : raw;
    return (t >= 0 && t < (ff_i64_t)p.V) ? t : -2;
}

// The row's log-sum-exp and loss from its statistics and target logit.
__device__ __forceinline__ float ff_ce_loss(const ff_ce_params& p, const ff_ce_stats& st,
                                            float xt, float& lse) {
    if (st.nan) {
        lse = FF_CE_NAN;
        return FF_CE_NAN;
    }
    const bool inf = st.m == FF_CE_INF || st.m == -FF_CE_INF;
    const float log_s = inf ? 0.0f : logf(st.s);
    lse = inf ? st.m : st.m + log_s;
    float loss = p.one_minus_eps * (st.m - xt) + log_s;
    if (p.eps != 0.0f) {
        loss += p.eps * (st.m - st.sum_x / (float)p.V);
    }
    if (p.z != 0.0f) {
        loss += p.z * lse * lse;
    }
    return loss;
}

// The gradient of N logits starting at index `base`.
template <int N>
__device__ __forceinline__ void ff_ce_grad(const float (&v)[N], float (&d)[N], int base,
                                           ff_i64_t t, float a, float c, float at,
                                           float lse) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        d[k] = a * exp2f((v[k] - lse) * FF_CE_LOG2E) - c - (base + k == t ? at : 0.0f);
    }
}

// Per-row cotangent: g[r * g_stride] (1 without g) times *scale (1 without scale).
__device__ __forceinline__ float ff_ce_cotangent(const ff_ce_params& p, const float* g,
                                                 const float* scale, ff_i64_t row) {
    float v = g ? g[row * p.g_stride] : 1.0f;
    return scale ? v * scale[0] : v;
}

// Writes gradients [lo, hi) of a row with one value (ignored rows: 0; out-of-range: NaN).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_ce_fill(typename T::storage* p, int lo, int hi, float value) {
    const int N = ff_ce<T>::N;
    float d[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
        d[k] = value;
    }
    for (int base = lo + threadIdx.x * N; base < hi; base += blockDim.x * N) {
        ff_ce_store<T, ALIGNED>(p, base, hi, d);
    }
}

// A row whose target is ignored (t == -1: loss and gradient 0) or out of range (t == -2:
// NaN) is written here, and true returned; false for a row with a class. The block writes
// gradients [lo, hi) and, when `first`, the loss.
template <typename T, bool ALIGNED, bool GRAD>
__device__ __forceinline__ bool ff_ce_skip_row(ff_i64_t t, float* loss, ff_i64_t row,
                                               typename T::storage* dr, int lo, int hi,
                                               bool first) {
    if (t < 0) {
        if (loss && first && threadIdx.x == 0) {
            loss[row] = t == -1 ? 0.0f : FF_CE_NAN;
        }
        if (GRAD) {
            ff_ce_fill<T, ALIGNED>(dr, lo, hi, t == -1 ? 0.0f : FF_CE_NAN);
        }
        return true;
    }
    return false;
}

// Merges the threads' statistics of a row (synchronising the block), writes the row's loss
// (when `loss` is not null) and returns its log-sum-exp.
__device__ __forceinline__ float ff_ce_finish_row(const ff_ce_params& p, ff_ce_stats st,
                                                  float xt, float* loss, ff_i64_t row) {
    st = ff_ce_block_merge(st);
    float lse;
    const float l = ff_ce_loss(p, st, xt, lse);
    if (loss && threadIdx.x == 0) {
        loss[row] = l;
    }
    return lse;
}

// The factors of a row's gradient (see ff_ce_grad): a on the softmax, c subtracted from
// every logit, at more from the target's.
struct ff_ce_coefs {
    float a, c, at;
};

__device__ __forceinline__ ff_ce_coefs ff_ce_grad_coefs(const ff_ce_params& p, const float* g,
                                                        const float* scale, ff_i64_t row,
                                                        float lse) {
    const float gr = ff_ce_cotangent(p, g, scale, row);
    ff_ce_coefs k;
    k.a = gr * (1.0f + 2.0f * p.z * lse);
    k.c = gr * p.eps_over_v;
    k.at = gr * p.one_minus_eps;
    return k;
}

// The row kernels' parameters: the logits x, int64 targets, per-row losses (or null), the
// logits' gradient dx (null without one), the cotangent g and its scale (or null), scalars.
#define FF_CE_ROW_PARAMS(T)                                                               \
    const typename T::storage* x, const ff_i64_t* __restrict__ targets,                   \
        float* __restrict__ loss, typename T::storage* dx, const float* __restrict__ g,   \
        const float* __restrict__ scale, ff_ce_params p

template <typename T, bool ALIGNED, bool GRAD>
__global__ void __launch_bounds__(FF_CE_LOOPED_THREADS)
    ce_looped(FF_CE_ROW_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_ce<T>::N;
    const ff_i64_t row = blockIdx.x;
    if (row >= p.n_rows) {
        return;
    }
    const int V = p.V;
    const S* xr = x + p.x_offset + row * p.x_row_stride;
    S* dr = GRAD ? dx + row * (ff_i64_t)V : nullptr;
    const ff_i64_t t = ff_ce_target(p, targets[row]);
    if (ff_ce_skip_row<T, ALIGNED, GRAD>(t, loss, row, dr, 0, V, true)) {
        return;
    }
    ff_ce_stats st = ff_ce_empty();
    const int step = blockDim.x * N;
    for (int base0 = threadIdx.x * N; base0 < V; base0 += FF_CE_U * step) {
        ff_pack<S, N> raw[FF_CE_U];
#pragma unroll
        for (int u = 0; u < FF_CE_U; ++u) {
            ff_ce_load_raw<T, ALIGNED>(xr, base0 + u * step, V, raw[u]);
        }
#pragma unroll
        for (int u = 0; u < FF_CE_U; ++u) {
            float v[N];
            ff_unpack<T>(raw[u], v);
            ff_ce_fold<N>(st, v, base0 + u * step, V);
        }
    }
    // The target logit is read before the barrier: with dx == x no thread has written yet.
    const float xt = T::to_f32(xr[t]);
    const float lse = ff_ce_finish_row(p, st, xt, loss, row);
    if (GRAD) {
        const ff_ce_coefs k = ff_ce_grad_coefs(p, g, scale, row, lse);
        for (int base0 = threadIdx.x * N; base0 < V; base0 += FF_CE_U * step) {
            ff_pack<S, N> raw[FF_CE_U];
#pragma unroll
            for (int u = 0; u < FF_CE_U; ++u) {
                ff_ce_load_raw<T, ALIGNED>(xr, base0 + u * step, V, raw[u]);
            }
#pragma unroll
            for (int u = 0; u < FF_CE_U; ++u) {
                float v[N], d[N];
                ff_unpack<T>(raw[u], v);
                ff_ce_grad<N>(v, d, base0 + u * step, t, k.a, k.c, k.at, lse);
                ff_ce_store<T, ALIGNED>(dr, base0 + u * step, V, d);
            }
        }
    }
}

// ----- clusters (sm_90 and later) -------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FF_CE_CLUSTERS 1
#define FF_CE_CLUSTER_DIMS(C) __cluster_dims__(C, 1, 1)
#else
#define FF_CE_CLUSTERS 0
#define FF_CE_CLUSTER_DIMS(C)
#endif

// This block's rank in its cluster.
__device__ __forceinline__ int ff_cluster_rank() {
#if FF_CE_CLUSTERS
    ff_u32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return (int)r;
#else
    return 0;
#endif
}

// Every thread of the cluster arrives (releasing its earlier writes, shared memory included);
// ff_cluster_wait then waits for all of them (acquiring those writes).
__device__ __forceinline__ void ff_cluster_arrive() {
#if FF_CE_CLUSTERS
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void ff_cluster_wait() {
#if FF_CE_CLUSTERS
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The statistics `local` (in this block's shared memory) of block `rank` of the cluster.
__device__ __forceinline__ ff_ce_stats ff_ce_peer_stats(const ff_ce_stats* local, int rank) {
    ff_ce_stats st;
#if FF_CE_CLUSTERS
    ff_u32_t ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                 : "=r"(ra)
                 : "r"(ff_smem_u32(local)), "r"(rank));
    asm volatile("ld.shared::cluster.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(st.m), "=f"(st.s), "=f"(st.sum_x), "=r"(st.nan)
                 : "r"(ra)
                 : "memory");
#else
    st = *local;
#endif
    return st;
}

// acc[k] += exp(v[k] - m) for the N lanes of a vector, with mb = m log2(e).
template <int N>
__device__ __forceinline__ void ff_ce_add_exps(float (&acc)[N], const float (&v)[N], float mb) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        acc[k] += ff_exp2(fmaf(v[k], FF_CE_LOG2E, -mb));
    }
}

// acc[0] + ... + acc[N - 1], in lane order.
template <int N>
__device__ __forceinline__ float ff_ce_lanes_sum(float (&acc)[N]) {
#pragma unroll
    for (int k = 1; k < N; ++k) {
        acc[0] += acc[k];
    }
    return acc[0];
}

// Makes the compiler treat the packed row as rewritten (no instruction): each pass unpacks
// the registers again instead of keeping the previous pass's floats alive, which would take
// two to four times the registers.
template <typename S, int N, int CHUNKS>
__device__ __forceinline__ void ff_ce_fence(ff_pack<S, N> (&raw)[CHUNKS]) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        asm volatile(""
                     : "+r"(raw[c].vec.w[0]), "+r"(raw[c].vec.w[1]), "+r"(raw[c].vec.w[2]),
                       "+r"(raw[c].vec.w[3]));
    }
}

// ----- ce_rows: the row held in registers, split over a cluster of C blocks ------------------
//
// Block `rank` of a row's cluster (blockIdx.x = row * C + rank) holds logits
// [rank * p.slice, min((rank + 1) * p.slice, V)) in registers, CHUNKS 16-byte vectors per
// thread (chunk c of thread i at lo + (c * blockDim.x + i) * N; past the slice -inf), so
// every logit is read from memory once and several blocks share a multiprocessor. Passes
// over the registers: the maximum (NaN-propagating: a NaN makes the row NaN), the sum of
// exponentials (and with label smoothing the sum of the logits), a block merge, with C > 1
// a merge of the cluster's C partial statistics in rank order through distributed shared
// memory (every block gets identical statistics), then with GRAD the gradient, written
// from the registers. C > 1 needs clusters (sm_90); the launcher never asks for it earlier.
template <typename T, bool ALIGNED, bool GRAD, int CHUNKS, int C>
__global__ void __launch_bounds__(FF_CE_ROWS_THREADS, CHUNKS <= 8 ? 4 : 2) FF_CE_CLUSTER_DIMS(C)
    ce_rows(FF_CE_ROW_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_ce<T>::N;
#if !FF_CE_CLUSTERS
    if (C > 1) {
        __trap();
    }
#endif
    const int rank = C > 1 ? ff_cluster_rank() : 0;
    const ff_i64_t row = blockIdx.x / C;
    const int V = p.V;
    const int lo = rank * p.slice;
    const int hi = min(lo + p.slice, V);
    const S* xr = x + p.x_offset + row * p.x_row_stride;
    S* dr = GRAD ? dx + row * (ff_i64_t)V : nullptr;
    const ff_i64_t t = ff_ce_target(p, targets[row]);
    // Every block of the cluster sees the same target, so all of them leave here together
    // (no cluster barrier is left waiting).
    if (ff_ce_skip_row<T, ALIGNED, GRAD>(t, loss, row, dr, lo, hi, rank == 0)) {
        return;
    }
    const int step = blockDim.x * N;
    const int first = lo + threadIdx.x * N;
    ff_pack<S, N> raw[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        ff_ce_load_raw<T, ALIGNED>(xr, first + c * step, hi, raw[c]);
    }
    // The target logit, for the loss: read before the first barrier, so before any block of
    // the cluster writes a gradient over the logits.
    const float xt = rank == 0 && threadIdx.x == 0 ? T::to_f32(xr[t]) : 0.0f;
    float m = -FF_CE_INF;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        float v[N];
        ff_unpack<T>(raw[c], v);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            m = ff_max_nan(m, v[k]);
        }
    }
    ff_ce_fence(raw);
    ff_ce_stats st = ff_ce_empty();
    st.nan = m != m;
    if (!st.nan) {
        st.m = m;
    }
    if (p.eps != 0.0f) {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            float v[N];
            ff_unpack<T>(raw[c], v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                st.sum_x += first + c * step + k < hi ? v[k] : 0.0f;
            }
        }
    }
    ff_ce_fence(raw);
    if (m - m == 0.0f) {
        // Finite maximum: the exponentials, one accumulator per vector lane.
        const float mb = m * FF_CE_LOG2E;
        float s[N] = {};
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            float v[N];
            ff_unpack<T>(raw[c], v);
            ff_ce_add_exps(s, v, mb);
        }
        st.s = ff_ce_lanes_sum(s);
    }
    ff_ce_fence(raw);
    st = ff_ce_block_merge(st);
    if constexpr (C > 1) {
        __shared__ ff_ce_stats mine, all;
        if (threadIdx.x == 0) {
            mine = st;
        }
        ff_cluster_arrive();
        ff_cluster_wait();
        if (threadIdx.x == 0) {
            ff_ce_stats r = ff_ce_peer_stats(&mine, 0);
#pragma unroll
            for (int q = 1; q < C; ++q) {
                r = ff_ce_merge(r, ff_ce_peer_stats(&mine, q));
            }
            all = r;
        }
        // Done reading the peers' shared memory: they may leave once everyone has arrived
        // (the wait at the end).
        ff_cluster_arrive();
        __syncthreads();
        st = all;
    }
    float lse;
    const float l = ff_ce_loss(p, st, xt, lse);
    if (loss && rank == 0 && threadIdx.x == 0) {
        loss[row] = l;
    }
    if constexpr (GRAD) {
        const ff_ce_coefs q = ff_ce_grad_coefs(p, g, scale, row, lse);
        const float lb = lse * FF_CE_LOG2E;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            float v[N], d[N];
            ff_unpack<T>(raw[c], v);
            const int base = first + c * step;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                d[k] = q.a * ff_exp2(fmaf(v[k], FF_CE_LOG2E, -lb)) - q.c;
            }
            if ((ff_u64_t)(t - base) < (ff_u64_t)N) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    d[k] -= base + k == t ? q.at : 0.0f;
                }
            }
            ff_ce_store<T, ALIGNED>(dr, base, hi, d);
        }
    }
    if constexpr (C > 1) {
        ff_cluster_wait();
    }
}

// ----- ce_stream: the loss alone over long aligned rows, through a cp.async ring ------------
//
// Persistent blocks of TH threads (512: one a multiprocessor; 256: two, so one merges a row
// while the other computes); block b takes
// rows b, b + gridDim.x, ... Each row is cut into items of FF_CE_STREAM_U vectors per thread
// (the last one partial); the block's items form one stream, and every thread keeps S - 1
// items of its own vectors in flight through a ring of S slots of shared memory (cp.async,
// one commit group an item), so the loads go on while the block merges a finished row. A
// thread reads only the slots it filled itself: the row's merge is the only barrier. Per
// item the statistics are updated online: its maximum (NaN-propagating), one rescale of the
// running sum when the maximum grows, then its exponentials. Rows are 16-byte aligned with
// V % N == 0; ignored and out-of-range rows are not read.
template <typename T, int S, int TH>
__global__ void __launch_bounds__(TH, 512 / TH) ce_stream(FF_CE_ROW_PARAMS(T)) {
    typedef typename T::storage ST;
    const int N = ff_ce<T>::N;
    const int U = FF_CE_STREAM_U;
    extern __shared__ ff_vec16 ff_ce_ring[];
    const int tid = threadIdx.x;
    const int nvec = p.V / N;
    const int per = TH * U;
    const int chunks = (nvec + per - 1) / per;
    if ((ff_i64_t)blockIdx.x >= p.n_rows) {
        return;
    }
    const ff_i64_t my_rows = (p.n_rows - 1 - blockIdx.x) / gridDim.x + 1;
    const ff_i64_t items = my_rows * chunks;
    // This thread's vector u of slot `slot`.
    const ff_u32_t ring = ff_smem_u32(ff_ce_ring) + tid * 16;
    const ff_u32_t slot_bytes = U * TH * 16;

    // The producer: the next item to load (row, chunk) and its slot.
    ff_i64_t prow = blockIdx.x;
    int pchunk = 0, pslot = 0;
    ff_i64_t pt = ff_ce_target(p, targets[prow]);
    // Issues the loads of the producer's item (nothing past the stream or for a row without
    // a class) and one commit group, then advances.
    auto produce = [&](ff_i64_t it) {
        if (it < items && pt >= 0) {
            const ST* xr = x + p.x_offset + prow * p.x_row_stride;
            const ff_u32_t dst = ring + pslot * slot_bytes;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int j = pchunk * per + u * TH + tid;
                if (j < nvec) {
                    ff_cp_async16(dst + u * TH * 16, xr + (ff_i64_t)j * N, 16);
                }
            }
        }
        ff_cp_async_commit();
        pslot = pslot + 1 == S ? 0 : pslot + 1;
        if (++pchunk == chunks) {
            pchunk = 0;
            prow += gridDim.x;
            if (prow < p.n_rows) {
                pt = ff_ce_target(p, targets[prow]);
            }
        }
    };
#pragma unroll 1
    for (int it = 0; it < S - 1; ++it) {
        produce(it);
    }

    ff_i64_t crow = blockIdx.x;
    int cchunk = 0, cslot = 0;
    ff_i64_t ct = ff_ce_target(p, targets[crow]);
    ff_ce_stats st = ff_ce_empty();
#pragma unroll 1
    for (ff_i64_t it = 0; it < items; ++it) {
        produce(it + S - 1);
        ff_cp_async_wait<S - 1>();
        if (ct >= 0) {
            float v[U][N];
            bool valid[U];
            float gm = -FF_CE_INF;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                valid[u] = cchunk * per + u * TH + tid < nvec;
                ff_pack<ST, N> pk;
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                             : "=r"(pk.vec.w[0]), "=r"(pk.vec.w[1]), "=r"(pk.vec.w[2]),
                               "=r"(pk.vec.w[3])
                             : "r"(ring + cslot * slot_bytes + u * TH * 16)
                             : "memory");
                ff_unpack<T>(pk, v[u]);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    v[u][k] = valid[u] ? v[u][k] : -FF_CE_INF;
                    gm = ff_max_nan(gm, v[u][k]);
                }
            }
            st.nan |= gm != gm;
            if (gm > st.m) {
                st.s = ff_ce_scaled(st.s, st.m, gm);
                st.m = gm;
            }
            if (st.m - st.m == 0.0f) {
                const float mb = st.m * FF_CE_LOG2E;
                float e[N] = {};
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    ff_ce_add_exps(e, v[u], mb);
                }
                st.s += ff_ce_lanes_sum(e);
            }
            if (p.eps != 0.0f) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        st.sum_x += valid[u] ? v[u][k] : 0.0f;
                    }
                }
            }
        }
        cslot = cslot + 1 == S ? 0 : cslot + 1;
        if (++cchunk == chunks) {
            // The row is complete: merge it (rows without a class need no merge) and move on.
            if (ct >= 0) {
                const float xt = tid == 0 ? T::to_f32(x[p.x_offset + crow * p.x_row_stride + ct]) : 0.0f;
                ff_ce_finish_row(p, st, xt, loss, crow);
            } else if (loss && tid == 0) {
                loss[crow] = ct == -1 ? 0.0f : FF_CE_NAN;
            }
            st = ff_ce_empty();
            cchunk = 0;
            crow += gridDim.x;
            if (crow < p.n_rows) {
                ct = ff_ce_target(p, targets[crow]);
            }
        }
    }
    ff_cp_async_wait<0>();
}

// Double-precision sum over a block of 1024 threads, in a fixed order.
__device__ __forceinline__ double ff_ce_block_sum_f64(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    if (lane == 0) {
        part[warp] = v;
    }
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < (int)((blockDim.x + 31) >> 5); ++w) {
            total += part[w];
        }
    }
    return total;
}

// out[0] = 1 / n_valid, out[1] = n_valid (rows whose target is not the ignored index).
// One block.
__global__ void ce_count_valid(const ff_i64_t* __restrict__ targets,
                               ff_i64_t n_rows,
                               int has_ignore,
                               ff_i64_t ignore_index,
                               float* __restrict__ out) {
    double n = 0.0;
    for (ff_i64_t r = threadIdx.x; r < n_rows; r += blockDim.x) {
        n += (has_ignore && targets[r] == ignore_index) ? 0.0 : 1.0;
    }
    n = ff_ce_block_sum_f64(n);
    if (threadIdx.x == 0) {
        out[0] = (float)(1.0 / n);
        out[1] = (float)n;
    }
}

// out[0] = sum of losses[0..n) in f64, divided by count[1] when count is given. One block.
__global__ void ce_reduce(const float* __restrict__ losses,
                          ff_i64_t n,
                          const float* __restrict__ count,
                          float* __restrict__ out) {
    double s = 0.0;
    for (ff_i64_t r = threadIdx.x; r < n; r += blockDim.x) {
        s += (double)losses[r];
    }
    s = ff_ce_block_sum_f64(s);
    if (threadIdx.x == 0) {
        out[0] = (float)(count ? s / (double)count[1] : s);
    }
}
