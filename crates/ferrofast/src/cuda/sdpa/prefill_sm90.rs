//! Launcher for `kernels/attn_prefill_sm90.cu`: the Hopper (compute capability 9.0, compiled
//! for `sm_90a`) flash-attention forward with TMA loads, an mbarrier pipeline, warp
//! specialisation and warpgroup MMA (`wgmma`).
//!
//! **The default prefill on compute capability 9.0** (H100, H200) for the cases it covers
//! (`super::select` decides); everything else uses the `mma.sync` kernel of `prefill.rs`. The
//! environment variable `FERROFAST_PREFILL_KERNEL=mma` sends every case to the `mma.sync`
//! kernel (for comparisons and tests). A second knob,
//! `FERROFAST_SM90_PV_N=128`, makes each `P V` product one `m64n128k16` wgmma spanning both
//! 64-column panels of V (through the descriptor's leading byte offset) instead of two
//! `m64n64k16` ones; it exists to measure that variant.
//!
//! Covered: f16 and bf16; `D = D_v` in {64, 128}; no mask or causal (lower-right aligned);
//! no sinks; grouped-query and multi-query heads; any `T_q`, `T_kv` (ragged ends are
//! zero-filled by TMA and masked). Inputs are read in place when a tensor map can describe
//! them (last axis contiguous, 16-byte aligned rows, non-negative strides), else copied to
//! row-major first.
//!
//! # Design
//!
//! - **Tiles.** One block per (128 query rows, query head, batch); 128 keys per key tile.
//!   Shared memory holds the Q tile and a ring of two stages each of K and V (160 KB at
//!   D = 128, 80 KB at D = 64), all in the 128-byte swizzled layout TMA writes and wgmma
//!   reads: 64-column panels, 1024-byte aligned.
//! - **Warpgroups.** Three per block (384 threads). Warpgroup 0 is the producer: it drops to
//!   24 registers per thread (`setmaxnreg.dec`) and one thread issues every TMA copy
//!   (`cp.async.bulk.tensor.4d` through tensor maps over `[B, H, T, D]` built on the host
//!   with `cuTensorMapEncodeTiled`, passed as `__grid_constant__` parameters), waiting on a
//!   stage's "empty" mbarrier before refilling it. Warpgroups 1 and 2 are consumers with 240
//!   registers per thread (`setmaxnreg.inc`), 64 query rows each.
//! - **Per key tile (consumer).** Wait on the K stage's "full" mbarrier (transaction bytes);
//!   `S = Q K^T` as eight (D = 128) `wgmma.m64n128k16` with both operands read from shared
//!   memory through K-major descriptors; release K; mask only the tiles that cross the
//!   causal diagonal or the end of the keys; online softmax in f32 in base-2 units with lazy
//!   rescaling (the steps of the `mma.sync` kernel, shared through `mma.cuh`: the wgmma
//!   accumulator of each warp has the m16n8k16 fragment layout); P rounded to f16 / bf16 in
//!   registers; wait for V; `O += P V` with wgmma taking P from registers and V from shared
//!   memory through an MN-major (transposed) descriptor; release V.
//! - **Registers.** A consumer thread holds S (64 f32), O (`D_v / 2` f32), P (32 words) and
//!   the softmax state; NVRTC / ptxas report 168 registers at launch (the 384-thread bound)
//!   and no spills for every variant.

use super::select::SM90_ROWS as BM;
use super::{allow_shared_memory, buffer, mask_arg, strides4, vector_operand, AttnParams, OP};
use crate::cuda::copy::{copy_cast, type_tag};
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{driver_error, guarded, launch_kernel, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaArgs;
use crate::Array;
use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// `kernels/attn_prefill_sm90.cu`: flash-attention forward for Hopper (TMA, wgmma), built
/// for `sm_90a` only.
/// Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::for_arch(
        "attn_prefill_sm90.cu",
        include_str!("../kernels/attn_prefill_sm90.cu"),
        "sm_90a",
    ),
    variants,
};

/// The environment variable that selects the N of the `P V` wgmma (64 or 128).
const PV_N_KNOB: &str = "FERROFAST_SM90_PV_N";

/// Threads per block: one producer and two consumer warpgroups.
const THREADS: u32 = 384;
/// Kernel flag: lazy rescaling.
const LAZY: u32 = 1;

fn pv_n(d: usize) -> usize {
    if d == 128 && std::env::var(PV_N_KNOB).is_ok_and(|v| v == "128") {
        128
    } else {
        64
    }
}

fn variant(dtype: DType, d: usize, pvn: usize) -> String {
    format!("attn_prefill_sm90<{}, {d}, {pvn}, {LAZY}>", type_tag(dtype))
}

/// Every instantiation of `attn_prefill_sm90.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for (d, pvns) in [(64, &[64][..]), (128, &[64, 128][..])] {
            for &pvn in pvns {
                out.push(variant(dtype, d, pvn));
            }
        }
    }
    out
}

/// Bytes of dynamic shared memory of a block (the kernel's `FF_SM90_SMEM_BYTES`): alignment
/// slack, the Q tile, two K and two V stages, nine mbarriers.
fn shared_bytes(d: usize) -> usize {
    1024 + 128 * d * 2 * 5 + 9 * 8
}

/// A `CUtensorMap` as a kernel argument (the kernel's `ff_tensor_map`, 128 bytes).
#[repr(transparent)]
pub(super) struct TensorMapArg(CUtensorMap);

// SAFETY: `CUtensorMap` is a plain `repr(C)` block of 16 u64 the kernel takes by value.
unsafe impl DeviceRepr for TensorMapArg {}

/// A tiled tensor map over the `[B, H, T, D]` operand `a` (16-bit elements, last axis
/// contiguous, strides multiples of 16 bytes) at device address `address` (its first
/// element): boxes of 64 x `box_rows` x 1 x 1 elements (`box_rows` at most 256), 128-byte
/// swizzle, zero fill out of bounds.
///
/// # Errors
/// `Error::Unsupported` for a layout a tensor map cannot describe ([`tma_operand`] copies
/// those first, so this is not expected) and when the driver rejects the description.
pub(super) fn tensor_map(
    a: &Array,
    address: u64,
    dtype: DType,
    box_rows: u32,
) -> Result<TensorMapArg> {
    let rejected = |why: &str| {
        Error::Unsupported(format!(
            "{OP} the Hopper kernel cannot describe an operand of shape {:?}, strides {:?}: {why}",
            a.shape(),
            a.strides()
        ))
    };
    let shape = a.shape();
    let s = strides4(a);
    let elem = dtype.size() as u64;
    // Dimensions innermost first: D, T, H, B.
    let dims: [u64; 4] = [shape[3], shape[2], shape[1], shape[0]].map(|x| x as u64);
    // Byte strides of T, H, B; a size-1 axis (stride 0 in `strides4`) gets the stride it
    // would have in a packed tensor, as the driver wants strides that are multiples of 16.
    let mut strides = [0u64; 3];
    let mut packed = dims[0] * elem;
    for i in 0..3 {
        let st = s[2 - i];
        if st < 0 {
            return Err(rejected("negative stride"));
        }
        strides[i] = if dims[i + 1] <= 1 || st == 0 {
            packed.next_multiple_of(16)
        } else {
            st as u64 * elem
        };
        packed = strides[i] * dims[i + 1];
    }
    if strides.iter().any(|&x| x % 16 != 0 || x >= 1 << 40) || !address.is_multiple_of(16) {
        return Err(rejected("strides must be multiples of 16 bytes below 2^40"));
    }
    let data_type = match dtype {
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let boxes: [u32; 4] = [64, box_rows, 1, 1];
    let element_strides: [u32; 4] = [1; 4];
    // SAFETY: an all-zero CUtensorMap is a valid value to be overwritten by the driver.
    let mut map: CUtensorMap = unsafe { std::mem::zeroed() };
    let status = guarded("encoding a TMA tensor map", || {
        // SAFETY: every pointer is to a live local array of the rank (4) or rank - 1 (3)
        // entries the call reads; the driver writes only `map`. It does not access the
        // global memory at `address`.
        Ok(unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                data_type,
                4,
                address as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        })
    })?;
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(rejected(&format!("the driver answered {status:?}")));
    }
    Ok(TensorMapArg(map))
}

/// An operand as a tensor map can describe it: `a` itself when it is vector-readable (unit
/// feature stride, 16-byte aligned rows) with no negative stride, else a row-major copy on
/// `stream`.
pub(super) fn tma_operand(a: &Array, stream: &Stream) -> Result<Array> {
    if a.strides()[..3].iter().any(|&s| s < 0) {
        return copy_cast(a, a.dtype(), Some(stream));
    }
    vector_operand(a, stream)
}

/// Flash-attention forward of a validated call on `stream` with the Hopper kernel (chosen by
/// [`super::select()`]; see the module docs): same contract and results (to rounding) as the
/// `mma.sync` kernel. Returns a new row-major array of shape `c.out_shape` and dtype
/// `c.dtype`, produced on `stream`.
///
/// # Errors
/// `Error::Unsupported` for a case the kernel does not cover (the selection never sends
/// one) or a tensor map the driver rejects; compile and driver errors.
pub(super) fn run(c: &SdpaArgs, stream: &Stream) -> Result<Array> {
    let dtype = c.dtype;
    let [batch, n_q, t_q, dv] = c.out_shape;
    let d = c.k.shape()[3];
    if !matches!(dtype, DType::F16 | DType::BF16)
        || d != dv
        || !matches!(d, 64 | 128)
        || c.mask.is_some()
        || c.sinks.is_some()
    {
        return Err(Error::Unsupported(format!(
            "{OP} the Hopper prefill kernel does not take this call ({dtype}, D {d}, D_v {dv}, \
             mask {}, sinks {})",
            c.mask.is_some(),
            c.sinks.is_some()
        )));
    }
    let ordinal = stream.ordinal();
    let device = buffer(&c.q, "q", ordinal)?.device().clone();
    let m_tiles = t_q.div_ceil(BM);
    let grid = (
        u32::try_from(m_tiles).ok(),
        u16::try_from(n_q).ok(),
        u16::try_from(batch).ok(),
    );
    let (Some(gx), Some(gy), Some(gz)) = grid else {
        return Err(Error::Unsupported(format!(
            "{OP} {m_tiles} x {n_q} x {batch} blocks exceed the CUDA grid's limits"
        )));
    };

    let q = tma_operand(&c.q, stream)?;
    let k = tma_operand(&c.k, stream)?;
    let v = tma_operand(&c.v, stream)?;
    let params = AttnParams::new(c, [&q, &k, &v], &mask_arg(c, ordinal)?, None)?;
    let (qb, kb, vb) = (
        buffer(&q, "q", ordinal)?,
        buffer(&k, "k", ordinal)?,
        buffer(&v, "v", ordinal)?,
    );
    let cu = stream.cuda();
    let elem = dtype.size() as u64;
    // Encoding a tensor map needs the device's context current on this thread, which no
    // earlier call on it may have made so (a thread whose first CUDA work is this call).
    guarded("binding the CUDA context", || {
        device
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the CUDA context", e))
    })?;
    // The device addresses; the records make `stream` wait for pending writes now and
    // record the kernel's reads when dropped after the launch.
    let (q_ptr, _q_rec) = qb.slice().device_ptr(cu);
    let (k_ptr, _k_rec) = kb.slice().device_ptr(cu);
    let (v_ptr, _v_rec) = vb.slice().device_ptr(cu);
    let maps = (
        tensor_map(&q, q_ptr + q.offset() as u64 * elem, dtype, BM as u32),
        tensor_map(&k, k_ptr + k.offset() as u64 * elem, dtype, BM as u32),
        tensor_map(&v, v_ptr + v.offset() as u64 * elem, dtype, BM as u32),
    );
    let (tm_q, tm_k, tm_v) = (maps.0?, maps.1?, maps.2?);

    let name = variant(dtype, d, pv_n(d));
    let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
    let smem = shared_bytes(d);
    allow_shared_memory(&func, smem, "the Hopper attention kernel")?;

    let n_out = batch * n_q * t_q * dv;
    let mut out = CudaBuffer::alloc(&device, stream, dtype, n_out)?;
    let cfg = LaunchConfig {
        grid_dim: (gx, u32::from(gy), u32::from(gz)),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut builder = cu.launch_builder(&func);
    builder
        .arg(&tm_q)
        .arg(&tm_k)
        .arg(&tm_v)
        .arg(out.slice_mut())
        .arg(&params);
    // SAFETY: the arguments match the kernel's parameters in order and type (three 128-byte
    // tensor maps by value, the output pointer, six scalars). The tensor maps describe
    // exactly the q, k and v views (shape and byte strides, from their live buffers at their
    // offsets), so every TMA copy reads inside them; boxes past T are zero-filled by the
    // hardware without reading. Block (x, h, b) reads q head h and k / v head h / group
    // (< N_kv, as N_q = group * N_kv) of batch b. The output holds B * N_q * T_q * D
    // elements and block (x, h, b) writes rows below T_q of (b, h) only. Shared memory: the
    // kernel uses exactly `smem` bytes, allowed above.
    unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    Array::from_cuda_buffer(out, &c.out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_and_shared_memory_fit_the_kernel() {
        let all = variants();
        assert_eq!(all.len(), 6);
        assert!(all.contains(&"attn_prefill_sm90<ff_bf16, 128, 64, 1>".to_string()));
        assert!(all.contains(&"attn_prefill_sm90<ff_f16, 128, 128, 1>".to_string()));
        // One block per multiprocessor: at most 227 KB of shared memory.
        assert_eq!(shared_bytes(128), 164_936);
        assert!(shared_bytes(128) <= 227 * 1024);
    }
}
