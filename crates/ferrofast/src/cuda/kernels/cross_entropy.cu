// Softmax cross-entropy over the last axis, its backward and the fused training pass, for
// f32 / f16 / bf16 logits (T is a prelude tag: ff_f32, ff_f16, ff_bf16) and int64 targets.
//
// Layout: row r of the logits starts at x + x_offset + r * x_row_stride (elements; the last
// axis has stride 1); row r of dx (when written) at dx + r * V. Targets are contiguous int64.
//
// Per row (formulas in ops/cross_entropy.rs): m = max(x) (NaN ignored), s = sum exp(x - m)
// in one online pass (a block of N_READS logits is scanned for its max, the running sum is
// rescaled when the max grows, then the block is exponentiated), lse = m + log(s) (m when m
// is infinite), loss = (1 - eps)(m - x[t]) + eps (m - mean x) + log(s) + z lse^2; a NaN
// logit makes the row NaN. Gradient: g * ((1 + 2 z lse) exp(x - lse) - eps / V
// - (1 - eps)[j == t]), rounded once to T. Ignored rows: loss 0, gradient 0, no logit read;
// targets outside [0, V) after wrapping: NaN, no logit read.
//
// Kernels (one block per row):
//   ce_looped<T, ALIGNED, GRAD>: the block strides over the row, U vectors per thread in
//     flight; with GRAD the row is read a second time to write dx (from L2 when it is still
//     there).
//   ce_regs<T, ALIGNED, CHUNKS>: the gradient pass with the row held in registers
//     (CHUNKS vectors of 16 bytes per thread, at most FF_CE_REGS_THREADS threads): each logit
//     is read from memory once.
//   ce_count_valid: 1 / n_valid and n_valid of the targets, for the mean.
//   ce_reduce: the sum (or mean) of the per-row losses, in a fixed order (deterministic).
//
// dx may be x's own buffer (the in-place training pass): every logit is read, by the thread
// that later writes its gradient, before the block's reduction barrier or just before it is
// overwritten, so x and dx are not declared __restrict__.
//
// ALIGNED: every row start is 16-byte aligned and V % N_READS == 0, so logits are loaded
// and gradients stored as 16-byte vectors; otherwise scalar accesses with bounds checks.
#include "ferrofast_prelude.cuh"

#define FF_CE_LOG2E 1.4426950408889634f
#define FF_CE_INF __int_as_float(0x7f800000)
#define FF_CE_NAN __int_as_float(0x7fffffff)
#define FF_CE_LOOPED_THREADS 1024
#define FF_CE_REGS_THREADS 1024
// Vectors in flight per thread in the looped kernel.
#define FF_CE_U 4

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

// Writes a whole gradient row of one value (ignored rows: 0; out-of-range: NaN).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void ff_ce_fill(typename T::storage* p, int V, float value) {
    const int N = ff_ce<T>::N;
    float d[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
        d[k] = value;
    }
    for (int base = threadIdx.x * N; base < V; base += blockDim.x * N) {
        ff_ce_store<T, ALIGNED>(p, base, V, d);
    }
}

// A row whose target is ignored (t == -1: loss and gradient 0) or out of range (t == -2:
// NaN) is written whole here, and true returned; false for a row with a class.
template <typename T, bool ALIGNED, bool GRAD>
__device__ __forceinline__ bool ff_ce_skip_row(ff_i64_t t, float* loss, ff_i64_t row,
                                               typename T::storage* dr, int V) {
    if (t < 0) {
        if (loss && threadIdx.x == 0) {
            loss[row] = t == -1 ? 0.0f : FF_CE_NAN;
        }
        if (GRAD) {
            ff_ce_fill<T, ALIGNED>(dr, V, t == -1 ? 0.0f : FF_CE_NAN);
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
    if (ff_ce_skip_row<T, ALIGNED, GRAD>(t, loss, row, dr, V)) {
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

template <typename T, bool ALIGNED, int CHUNKS>
__global__ void __launch_bounds__(FF_CE_REGS_THREADS, 1)
    ce_regs(FF_CE_ROW_PARAMS(T)) {
    typedef typename T::storage S;
    const int N = ff_ce<T>::N;
    const ff_i64_t row = blockIdx.x;
    if (row >= p.n_rows) {
        return;
    }
    const int V = p.V;
    const S* xr = x + p.x_offset + row * p.x_row_stride;
    S* dr = dx + row * (ff_i64_t)V;
    const ff_i64_t t = ff_ce_target(p, targets[row]);
    if (ff_ce_skip_row<T, ALIGNED, true>(t, loss, row, dr, V)) {
        return;
    }
    const int step = blockDim.x * N;
    // The row stays in registers in its storage type (4 registers a chunk).
    ff_pack<S, N> raw[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        ff_ce_load_raw<T, ALIGNED>(xr, threadIdx.x * N + c * step, V, raw[c]);
    }
    const float xt = T::to_f32(xr[t]);
    ff_ce_stats st = ff_ce_empty();
    // Two passes over the registers: the thread's maximum, then its sum of exponentials
    // (logits past V are -inf and add nothing).
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        float v[N];
        ff_unpack<T>(raw[c], v);
        const int base = threadIdx.x * N + c * step;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            st.m = fmaxf(st.m, v[k]);
            st.sum_x += base + k < V ? v[k] : 0.0f;
            st.nan |= v[k] != v[k];
        }
    }
    if (st.m != -FF_CE_INF && st.m != FF_CE_INF) {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            float v[N];
            ff_unpack<T>(raw[c], v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                st.s += exp2f((v[k] - st.m) * FF_CE_LOG2E);
            }
        }
    }
    const float lse = ff_ce_finish_row(p, st, xt, loss, row);
    const ff_ce_coefs k = ff_ce_grad_coefs(p, g, scale, row, lse);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        float v[N], d[N];
        ff_unpack<T>(raw[c], v);
        const int base = threadIdx.x * N + c * step;
        ff_ce_grad<N>(v, d, base, t, k.a, k.c, k.at, lse);
        ff_ce_store<T, ALIGNED>(dr, base, V, d);
    }
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
