// Hopper (sm_90a) PTX wrappers shared by the Hopper kernels: the TMA tensor-map parameter,
// mbarriers, TMA loads, register reallocation, and warpgroup MMA (wgmma) with its shared-
// memory matrix descriptors. The wgmma wrappers are generated once per input type by
// FF_DEFINE_WGMMA below.
#pragma once
#include "ferrofast_prelude.cuh"

// A CUtensorMap (opaque, 128 bytes, 64-byte aligned), passed by value as a __grid_constant__
// kernel parameter: TMA reads it through its generic address.
struct __align__(64) ff_tensor_map {
    ff_u64_t opaque[16];
};

__device__ __forceinline__ void ff_mbar_init(ff_u32_t bar, ff_u32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void ff_mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrives on `bar` (counting one of its expected arrivals) and adds `bytes` to the
// transactions the current phase waits for.
__device__ __forceinline__ void ff_mbar_arrive_tx(ff_u32_t bar, ff_u32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void ff_mbar_arrive(ff_u32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void ff_mbar_wait(ff_u32_t bar, ff_u32_t parity) {
    ff_u32_t done;
    do {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (done == 0);
}

__device__ __forceinline__ void ff_tma_prefetch(const ff_tensor_map* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((ff_u64_t)map) : "memory");
}

// One TMA box of a 4-d tensor map (coordinates innermost first) into shared memory at
// `dst`, completing `bytes` transactions on `bar`.
__device__ __forceinline__ void ff_tma_load_4d(ff_u32_t dst, const ff_tensor_map* map,
                                               ff_u32_t bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"((ff_u64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Makes this thread's generic-proxy writes to shared memory visible to the async proxy
// (wgmma operands, bulk copies) of the threads that synchronise with it afterwards.
__device__ __forceinline__ void ff_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// global[dst .. dst + bytes) += shared[src .. src + bytes) as f32, element-wise atomic adds
// done by the bulk-copy unit (16-byte aligned addresses, `bytes` a multiple of 16), in a new
// bulk group of this thread.
__device__ __forceinline__ void ff_bulk_reduce_add_f32(float* dst, ff_u32_t src, ff_u32_t bytes) {
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
        "cp.async.bulk.commit_group;\n" ::"l"((ff_u64_t)dst),
        "r"(src), "r"(bytes)
        : "memory");
}

// Waits until at most N of this thread's bulk groups are still reading shared memory.
template <int N>
__device__ __forceinline__ void ff_bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Waits until at most N of this thread's bulk groups are incomplete.
template <int N>
__device__ __forceinline__ void ff_bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int N>
__device__ __forceinline__ void ff_setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void ff_setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ff_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void ff_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void ff_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins registers an asynchronous wgmma reads or writes: after a wait, the compiler may
// neither read an accumulator early nor reuse an A register before this point.
template <int N>
__device__ __forceinline__ void ff_fence_regs(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            asm volatile("" : "+f"(r[i][e])::"memory");
        }
    }
}

template <int N>
__device__ __forceinline__ void ff_fence_regs(ff_u32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            asm volatile("" : "+r"(r[i][e])::"memory");
        }
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ ff_u64_t ff_wgmma_desc(ff_u32_t addr, ff_u32_t lbo, ff_u32_t sbo) {
    return (ff_u64_t)((addr & 0x3FFFFu) >> 4) | ((ff_u64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((ff_u64_t)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// The wgmma instructions per input type.
template <typename T>
struct ff_wgmma;

// A thread's accumulator operands of an m64nNk16 wgmma: four "+f" per 8-column group
// (N / 8 groups), and their names in the PTX string.
#define FF_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define FF_ACC_N64 FF_ACC4(0), FF_ACC4(1), FF_ACC4(2), FF_ACC4(3), FF_ACC4(4), FF_ACC4(5), FF_ACC4(6), FF_ACC4(7)
#define FF_ACC_N128 FF_ACC_N64, FF_ACC4(8), FF_ACC4(9), FF_ACC4(10), FF_ACC4(11), FF_ACC4(12), FF_ACC4(13), FF_ACC4(14), FF_ACC4(15)
#define FF_REGS_N64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FF_REGS_N128 FF_REGS_N64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// The operand names after the accumulators of an m64nNk16 wgmma: ss (two descriptors),
// rs (four A registers and B's descriptor), then the scale-d predicate's source.
#define FF_SS_OPS_N64 "}, %32, %33, p, 1, 1, "
#define FF_SS_PRED_N64 "%34"
#define FF_SS_OPS_N128 "}, %64, %65, p, 1, 1, "
#define FF_SS_PRED_N128 "%66"
#define FF_RS_OPS_N64 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
#define FF_RS_PRED_N64 "%37"
#define FF_RS_OPS_N128 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
#define FF_RS_PRED_N128 "%69"

// D (64 x N, f32) += A (smem descriptor) * B (smem descriptor); TA / TB 0: K-major, 1:
// MN-major (transposed); scale_d 0 overwrites D.
#define FF_WGMMA_SS(NAME, N, TA, TB, PTX)                                                   \
    __device__ static __forceinline__ void NAME(float (&d)[N / 8][4], ff_u64_t desc_a,     \
                                                ff_u64_t desc_b, int scale_d) {             \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FF_SS_PRED_N##N ", 0;\n"           \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " {"    \
                     FF_REGS_N##N FF_SS_OPS_N##N #TA ", " #TB ";\n}\n"                      \
                     : FF_ACC_N##N                                                          \
                     : "l"(desc_a), "l"(desc_b), "r"(scale_d)                               \
                     : "memory");                                                           \
    }

// D (64 x N, f32) += A (registers, the m16n8k16 A fragment of this warp's 16 rows) * B
// (smem descriptor, MN-major: transposed); scale_d 0 overwrites D.
#define FF_WGMMA_RS(NAME, N, PTX)                                                           \
    __device__ static __forceinline__ void NAME(float (&d)[N / 8][4], const ff_u32_t (&a)[4], \
                                                ff_u64_t desc_b, int scale_d) {             \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FF_RS_PRED_N##N ", 0;\n"           \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " {"    \
                     FF_REGS_N##N FF_RS_OPS_N##N                                            \
                     : FF_ACC_N##N                                                          \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),             \
                       "r"(scale_d)                                                         \
                     : "memory");                                                           \
    }

// ff_wgmma<TAG> for PTX input type PTX ("bf16", "f16"):
//   ss_n64 / ss_n128: 64 x 64 / 64 x 128, A and B from shared memory K-major.
//   ss_n64_mn: 64 x 64, A and B from shared memory MN-major (A stored as K rows of M, B as
//            K rows of N).
//   ss_n64_bmn: 64 x 64, A from shared memory K-major, B MN-major.
//   rs_n64 / rs_n128: 64 x 64 / 64 x 128, A from registers, B MN-major.
#define FF_DEFINE_WGMMA(TAG, PTX)            \
    template <>                              \
    struct ff_wgmma<TAG> {                   \
        FF_WGMMA_SS(ss_n64, 64, 0, 0, PTX)     \
        FF_WGMMA_SS(ss_n128, 128, 0, 0, PTX)   \
        FF_WGMMA_SS(ss_n64_mn, 64, 1, 1, PTX)  \
        FF_WGMMA_SS(ss_n64_bmn, 64, 0, 1, PTX) \
        FF_WGMMA_RS(rs_n64, 64, PTX)           \
        FF_WGMMA_RS(rs_n128, 128, PTX)         \
    };

FF_DEFINE_WGMMA(ff_bf16, "bf16")
FF_DEFINE_WGMMA(ff_f16, "f16")
