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

// A CUtensorMap (opaque, 128 bytes, 64-byte aligned), passed by value as a __grid_constant__
// kernel parameter: TMA reads it through its generic address.
struct __align__(64) ff_tensor_map {
    ff_u64_t opaque[16];
};

// ----- mbarrier, TMA, wgmma wrappers --------------------------------------------------------

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

// The wgmma instructions per input type (generated operand lists: one "+f" per accumulator
// register of the thread).
template <typename T>
struct ff_wgmma;

template <>
struct ff_wgmma<ff_bf16> {
    // D (64 x 128, f32) += A (smem descriptor) * B (smem descriptor), both K-major;
    // scale_d 0 overwrites D.
    __device__ static __forceinline__ void ss_n128(float (&d)[16][4], ff_u64_t desc_a,
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, "
            "%40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, "
            "%56, %57, %58, %59, %60, %61, %62, %63"
            "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
              "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
              "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
              "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
              "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
              "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
              "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
              "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
              "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d)
            : "memory");
    }
    // D (64 x 64, f32) += A (registers, the m16n8k16 A fragment of this warp's 16 rows)
    // * B (smem descriptor, MN-major: transposed).
    __device__ static __forceinline__ void rs_n64(float (&d)[8][4], const ff_u32_t (&a)[4],
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31"
            "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
              "r"(scale_d)
            : "memory");
    }
    // D (64 x 128, f32) += A (registers, the m16n8k16 A fragment of this warp's 16 rows)
    // * B (smem descriptor, MN-major: transposed).
    __device__ static __forceinline__ void rs_n128(float (&d)[16][4], const ff_u32_t (&a)[4],
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, "
            "%40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, "
            "%56, %57, %58, %59, %60, %61, %62, %63"
            "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
              "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
              "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
              "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
              "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
              "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
              "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
              "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
              "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
              "r"(scale_d)
            : "memory");
    }
};

template <>
struct ff_wgmma<ff_f16> {
    // D (64 x 128, f32) += A (smem descriptor) * B (smem descriptor), both K-major;
    // scale_d 0 overwrites D.
    __device__ static __forceinline__ void ss_n128(float (&d)[16][4], ff_u64_t desc_a,
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, "
            "%40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, "
            "%56, %57, %58, %59, %60, %61, %62, %63"
            "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
              "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
              "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
              "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
              "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
              "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
              "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
              "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
              "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d)
            : "memory");
    }
    // D (64 x 64, f32) += A (registers, the m16n8k16 A fragment of this warp's 16 rows)
    // * B (smem descriptor, MN-major: transposed).
    __device__ static __forceinline__ void rs_n64(float (&d)[8][4], const ff_u32_t (&a)[4],
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31"
            "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
              "r"(scale_d)
            : "memory");
    }
    // D (64 x 128, f32) += A (registers, the m16n8k16 A fragment of this warp's 16 rows)
    // * B (smem descriptor, MN-major: transposed).
    __device__ static __forceinline__ void rs_n128(float (&d)[16][4], const ff_u32_t (&a)[4],
                                                 ff_u64_t desc_b, int scale_d) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, "
            "%8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, "
            "%24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, "
            "%40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, "
            "%56, %57, %58, %59, %60, %61, %62, %63"
            "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
              "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
              "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
              "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
              "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
              "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
              "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
              "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
              "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
              "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
              "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
              "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
              "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
              "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
              "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
              "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
              "r"(scale_d)
            : "memory");
    }
};
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
// [B, N_q, T_q, D]. PVN: the N of each P V wgmma (64: one per 64-column panel of V; 128: one
// spanning both panels of D = 128 through the descriptor's leading byte offset).
template <typename T, int D, int PVN, int FLAGS>
__global__ void __launch_bounds__(384, 1)
    attn_prefill_sm90(const __grid_constant__ ff_tensor_map tm_q,
                      const __grid_constant__ ff_tensor_map tm_k,
                      const __grid_constant__ ff_tensor_map tm_v,
                      typename T::storage* __restrict__ out, int n_heads, int group, int Tq,
                      int Tkv, int causal, float scale_log2) {
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
#pragma unroll
    for (int db = 0; db < DV / 8; ++db) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            o[0][db][e] = 0.0f;
        }
    }
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
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
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
