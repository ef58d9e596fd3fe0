//! Launchers of `kernels/attn_backward_sm90.cu`: the attention backward's fused pass (dK,
//! dV and dQ in one kernel, dQ added into an f32 scratch by bulk reductions, then converted)
//! or its two deterministic passes (dK / dV, then dQ) on Hopper (compute capability 9.0, compiled for `sm_90a`) with TMA loads and
//! warpgroup MMA, for f16 / bf16 with `D = D_v` in {64, 128} (every mask kind, sinks,
//! grouped-query heads). The delta and dsinks kernels around them are the ones every
//! backward shares (`super::run_tiles`).
//!
//! `super::super::select::select_backward` gives them both head dims on Hopper (faster than
//! `mma.sync` at each: `docs/perf-notes.md`); `FERROFAST_BACKWARD_KERNEL=mma` keeps them off.
//!
//! Inputs are read through tensor maps (`super::super::prefill_sm90::tensor_map`): in place
//! when a map can describe them (last axis contiguous, 16-byte aligned rows, non-negative
//! strides), else from a row-major copy.

use super::super::prefill_sm90::{tensor_map, tma_operand, TensorMapArg};
use super::super::{buffer, push_mask, to_i32, AttnParams, OP};
use super::{grid, grid_yz, Grads, Inputs};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, driver_error, guarded, launch_kernel};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaVjpArgs;
use crate::Array;
use cudarc::driver::{DevicePtr, PushKernelArg};

/// `kernels/attn_backward_sm90.cu`, built for `sm_90a` only. Every instantiation a launch can
/// ask for is in `variants`.
pub(in crate::cuda::sdpa) const REGISTERED: Registered = Registered {
    file: KernelFile::for_arch(
        "attn_backward_sm90.cu",
        include_str!("../../kernels/attn_backward_sm90.cu"),
        "sm_90a",
    ),
    variants,
};

/// Threads per block of both kernels: two warpgroups.
const THREADS: u32 = 256;
/// Keys per dK / dV block and query rows per dQ block.
const BLOCK_ROWS: usize = 128;
/// Query rows per tile of the dK / dV kernel and keys per tile of the dQ kernel.
const TILE_ROWS: usize = 64;

/// The environment variable that sets the kernels' pipeline depth (`2` or `3` stages).
const STAGES_KNOB: &str = "FERROFAST_SM90_BWD_STAGES";

/// Pipeline stages of both kernels: 2, or 3 when [`STAGES_KNOB`] says `3`.
fn stages() -> usize {
    if std::env::var(STAGES_KNOB).is_ok_and(|v| v.trim() == "3") {
        3
    } else {
        2
    }
}

/// Whether the kernels take `(d, dv)`.
pub(crate) fn takes(d: usize, dv: usize) -> bool {
    d == dv && matches!(d, 64 | 128)
}

fn dkdv_variant(dtype: DType, d: usize, stages: usize, fused: bool) -> String {
    format!(
        "attn_bwd_sm90_dkdv<{}, {d}, {stages}, {fused}>",
        type_tag(dtype)
    )
}

fn convert_variant(dtype: DType, d: usize) -> String {
    format!("attn_bwd_sm90_dq_convert<{}, {d}>", type_tag(dtype))
}

fn dq_variant(dtype: DType, d: usize, stages: usize) -> String {
    format!("attn_bwd_sm90_dq<{}, {d}, {stages}>", type_tag(dtype))
}

/// Every instantiation of `attn_backward_sm90.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut v = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for stages in [2, 3] {
                v.push(dkdv_variant(dtype, d, stages, false));
                v.push(dkdv_variant(dtype, d, stages, true));
                v.push(dq_variant(dtype, d, stages));
            }
            v.push(convert_variant(dtype, d));
        }
    }
    v
}

/// Shared memory of the dK / dV kernel (its `FF_SM90_BWD_KV_SMEM`): alignment slack, the K
/// and V tiles of 128 keys, `stages` stages of 64-row Q and dO tiles, (fused) the dS^T tile
/// and the dQ tile(s) (48 KiB), two warpgroups' double buffers of 64 lse2 and 64 delta, the
/// mbarriers.
fn dkdv_shared_bytes(d: usize, stages: usize, fused: bool) -> usize {
    let dq_tiles = if fused { 128 * 64 * 2 + 32768 } else { 0 };
    1024 + 2 * 128 * d * 2
        + stages * 2 * 64 * d * 2
        + dq_tiles
        + 2 * 2 * 2 * 64 * 4
        + (1 + 2 * stages) * 8
}

/// Shared memory of the dQ kernel (its `FF_SM90_BWD_Q_SMEM`): alignment slack, the Q and dO
/// tiles of 128 rows, `stages` stages of 64-key K and V tiles, the mbarriers.
fn dq_shared_bytes(d: usize, stages: usize) -> usize {
    1024 + 2 * 128 * d * 2 + stages * 2 * 64 * d * 2 + (1 + 2 * stages) * 8
}

/// dK / dV and dQ of a validated call (`c`, the call's shared inputs `x`, `d_out` the dense
/// cotangent `x.d_out` holds) on the Hopper kernels: the fused pass when `fused` (dQ summed
/// in an f32 scratch of `B * N_q * ceil(T_q / 64) * 64 * D` floats by bulk reductions, in an
/// order that varies between runs), else the two deterministic passes.
///
/// # Errors
/// `Error::Unsupported` for a call the kernels do not take (the selection never sends one),
/// grids past CUDA's limits, or a tensor map the driver rejects; compile and driver errors.
pub(super) fn passes(c: &SdpaVjpArgs, x: &Inputs<'_>, d_out: &Array, fused: bool) -> Result<Grads> {
    let f = &c.fwd;
    if !matches!(x.dtype, DType::F16 | DType::BF16) || !takes(x.d, x.dv) {
        return Err(Error::Unsupported(format!(
            "{OP} the Hopper backward kernels do not take {} with D {} and D_v {}",
            x.dtype, x.d, x.dv
        )));
    }
    let ordinal = x.stream.ordinal();
    let (q, k, v) = (
        tma_operand(&f.q, x.stream)?,
        tma_operand(&f.k, x.stream)?,
        tma_operand(&f.v, x.stream)?,
    );
    let params = AttnParams::new(f, [&q, &k, &v], &x.mask, None)?;
    let (qb, kb, vb) = (
        buffer(&q, "q", ordinal)?,
        buffer(&k, "k", ordinal)?,
        buffer(&v, "v", ordinal)?,
    );
    let (gy_kv, gy_q, gz) = (grid_yz(x.nkv)?, grid_yz(x.nq)?, grid_yz(x.b)?);
    let cu = x.stream.cuda();
    let elem = x.dtype.size() as u64;
    // Encoding a tensor map needs the device's context current on this thread.
    guarded("binding the CUDA context", || {
        x.device
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the CUDA context", e))
    })?;
    // The device addresses; the records make the stream wait for pending writes now and
    // record the kernels' reads when dropped after the launches.
    let (q_ptr, _q_rec) = qb.slice().device_ptr(cu);
    let (k_ptr, _k_rec) = kb.slice().device_ptr(cu);
    let (v_ptr, _v_rec) = vb.slice().device_ptr(cu);
    let (g_ptr, _g_rec) = x.d_out.slice().device_ptr(cu);
    let at = |a: &Array, ptr: u64| ptr + a.offset() as u64 * elem;
    // Query-side maps (q, dO) and key-side maps (k, v) with `q_rows` / `k_rows` row boxes.
    let maps = |q_rows: u32, k_rows: u32| -> Result<[TensorMapArg; 4]> {
        Ok([
            tensor_map(&q, at(&q, q_ptr), x.dtype, q_rows)?,
            tensor_map(&k, at(&k, k_ptr), x.dtype, k_rows)?,
            tensor_map(&v, at(&v, v_ptr), x.dtype, k_rows)?,
            tensor_map(d_out, at(d_out, g_ptr), x.dtype, q_rows)?,
        ])
    };
    let null: u64 = 0;
    let mut g = Grads::alloc(x)?;
    let stages = stages();
    // The fused pass's dQ scratch, zeroed: ceil(T_q / 64) tiles of 64 x D floats a query head.
    let q_tiles = x.tq.div_ceil(TILE_ROWS);
    let mut dq_acc = if fused {
        let len = [x.nq, q_tiles, TILE_ROWS, x.d]
            .iter()
            .try_fold(x.b, |n, &m| n.checked_mul(m))
            .ok_or_else(|| Error::Shape(format!("{OP} the dQ scratch's size overflows usize")))?;
        let acc = CudaBuffer::alloc_zeroed(&x.device, x.stream, DType::F32, len)?;
        Some(acc)
    } else {
        None
    };

    // dK and dV (and, fused, dQ's f32 sums): one block per 128 keys, query tiles of 64 rows.
    {
        let [tm_q, tm_k, tm_v, tm_g] = maps(TILE_ROWS as u32, BLOCK_ROWS as u32)?;
        let name = dkdv_variant(x.dtype, x.d, stages, fused);
        let (func, cfg) = x.kernel(
            &REGISTERED.file,
            &name,
            dkdv_shared_bytes(x.d, stages, fused),
            "the Hopper attention backward kernel",
            (grid(x.tkv.div_ceil(BLOCK_ROWS))?, gy_kv, gz),
            THREADS,
        )?;
        let mut builder = cu.launch_builder(&func);
        builder.arg(&tm_q).arg(&tm_k).arg(&tm_v).arg(&tm_g);
        push_mask(&mut builder, &x.mask, &null);
        builder
            .arg(x.lse.slice())
            .arg(x.delta.slice())
            .arg(g.dk.slice_mut())
            .arg(g.dv.slice_mut());
        match dq_acc.as_mut() {
            Some(acc) => builder.arg(acc.slice_mut()),
            None => builder.arg(&null),
        };
        builder.arg(&params).arg(&x.scale);
        // SAFETY: the arguments match attn_bwd_sm90_dkdv's parameters in order and type
        // (four 128-byte tensor maps by value, the mask pointer or null, lse, delta, dk,
        // dv, the dQ scratch or null, the parameter block, the scale). The tensor maps
        // describe exactly the q, k, v and d_out views (shapes and byte strides of their
        // live buffers at their offsets), so every TMA copy reads inside them; boxes past
        // T are zero-filled without a read. The mask is read at (b, h, i, j) with
        // i < T_q, j < T_kv through its broadcast strides; lse and delta
        // ([B, N_q, T_q] f32) at rows below T_q. Block (key tile, g, b) writes keys below
        // T_kv of kv head (b, g) of dk and dv (B * N_kv * T_kv * D elements each) and,
        // fused, adds into tiles (b, h, i) with h of group g and i < ceil(T_q / 64) of the
        // scratch, which holds exactly those tiles. Shared memory: exactly `cfg`'s bytes,
        // allowed by `Inputs::kernel`.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }

    if let Some(acc) = dq_acc {
        let name = convert_variant(x.dtype, x.d);
        let func = jit::function(&x.device, &REGISTERED.file, &name, &[])?;
        let heads = i64::try_from(x.b * x.nq).map_err(|_| {
            Error::Unsupported(format!(
                "{OP} {} query heads exceed the kernels' range",
                x.b * x.nq
            ))
        })?;
        let tq = to_i32(x.tq, "a query length")?;
        let float4s = acc.len() / 4;
        let blocks = float4s
            .div_ceil(THREADS as usize)
            .min(x.device.sm_count() as usize * 16);
        let cfg = runtime::grid_1d(grid(blocks.max(1))?, THREADS, 0);
        let mut builder = cu.launch_builder(&func);
        builder
            .arg(acc.slice())
            .arg(g.dq.slice_mut())
            .arg(&heads)
            .arg(&tq)
            .arg(&x.scale);
        // SAFETY: the arguments match attn_bwd_sm90_dq_convert's parameters. The scratch
        // holds B * N_q * ceil(T_q / 64) tiles of 64 x D floats, read once each; dq
        // (B * N_q * T_q * D elements) is written at rows below T_q of each head.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
        return Ok(g);
    }

    // dQ: one block per 128 queries, key tiles of 64.
    {
        let [tm_q, tm_k, tm_v, tm_g] = maps(BLOCK_ROWS as u32, TILE_ROWS as u32)?;
        let name = dq_variant(x.dtype, x.d, stages);
        let (func, cfg) = x.kernel(
            &REGISTERED.file,
            &name,
            dq_shared_bytes(x.d, stages),
            "the Hopper attention backward kernel",
            (grid(x.tq.div_ceil(BLOCK_ROWS))?, gy_q, gz),
            THREADS,
        )?;
        let mut builder = cu.launch_builder(&func);
        builder.arg(&tm_q).arg(&tm_k).arg(&tm_v).arg(&tm_g);
        push_mask(&mut builder, &x.mask, &null);
        x.push_rows(&mut builder, false, [&mut g.dq], &params);
        // SAFETY: the arguments match attn_bwd_sm90_dq's parameters; inputs as for the
        // dK / dV kernel above. Block (query tile, h, b) reads k / v head h / group of
        // batch b and writes rows below T_q of head (b, h) of dq only (B * N_q * T_q * D
        // elements). Shared memory: exactly `cfg`'s bytes, allowed by
        // `Inputs::kernel`.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_and_shared_memory_fit() {
        let all = variants();
        assert_eq!(all.len(), 28);
        assert!(all.contains(&"attn_bwd_sm90_dkdv<ff_bf16, 128, 2, true>".to_string()));
        assert!(all.contains(&"attn_bwd_sm90_dkdv<ff_f16, 64, 3, false>".to_string()));
        assert!(all.contains(&"attn_bwd_sm90_dq<ff_f16, 64, 3>".to_string()));
        assert!(all.contains(&"attn_bwd_sm90_dq_convert<ff_bf16, 128>".to_string()));
        for d in [64, 128] {
            for stages in [2, 3] {
                for fused in [false, true] {
                    assert!(dkdv_shared_bytes(d, stages, fused) <= 227 * 1024);
                }
                assert!(dq_shared_bytes(d, stages) <= 227 * 1024);
            }
        }
        assert_eq!(dkdv_shared_bytes(128, 2, false), 1024 + 131_072 + 2048 + 40);
        assert_eq!(
            dkdv_shared_bytes(128, 2, true),
            1024 + 131_072 + 49_152 + 2048 + 40
        );
        assert!(takes(64, 64) && takes(128, 128));
        assert!(!takes(128, 64) && !takes(96, 96) && !takes(256, 256));
    }
}
