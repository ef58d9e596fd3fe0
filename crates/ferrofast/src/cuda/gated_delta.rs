//! Launchers for `kernels/gated_delta.cu`: `gated_delta_update` and its backward on a CUDA
//! device, for key head sizes up to [`MAX_DK`] and any value head size.
//!
//! The forward (`gd_forward`) steps the state sequentially with four lanes a state row and
//! 32 rows a block, the state in registers, the block staging the inputs of 16 steps (8 at
//! `Dk > 128`) in shared memory at a time: at one step (decode) it reads and writes the
//! state once. The backward (`gd_backward`) runs a block per (batch, value head, up to 128
//! rows): the forward again keeping a checkpoint every `C ≈ sqrt(T)` steps, then the chunks in
//! reverse, each replayed from its checkpoint into a scratch buffer of its `C` states. Its
//! key-side gradients are per-row-block partials summed by `gd_sum` in a fixed order, with the
//! value heads sharing a key head (deterministic, no atomics). Workspace: `(T / C + C)` states
//! of each head plus the partials, `[row blocks, B, T, Hv, 2 Dk + Dk_gamma + 1]` floats.
//!
//! Inputs are read in their own dtype when `q`, `k`, `v` share one of f32 / f16 / bf16 (and
//! `gamma`, `beta` share it or are f32); anything else is converted to f32 first. The
//! arithmetic is f32 throughout, as on the CPU.
//!
//! Prefill in bf16 runs the chunked form instead (`kernels/gated_delta_chunked.cu`, the
//! derivation in `cpu/gated_delta/chunked.rs`): `gdc_prep` turns every 64-step chunk into
//! `W`, `U` and the decay-weighted `Q K^T` on tensor cores, all chunks in parallel, and
//! `gdc_state` walks the chunks in order, a block per (batch, value head, 16 NW value rows)
//! with the state in mma accumulators. It applies to bf16 `q`, `k`, `v`, a scalar decay, `Dk`
//! and `Dv` of 64 or 128, and is chosen from [`CHUNKED_MIN_T`] steps on
//! (`FERROFAST_GATED_DELTA_KERNEL` forces either form where both apply). Its products take
//! bf16 operands with f32 sums, so its state is as precise as its bf16 inputs rather than
//! f32 to the last bit. Workspace: `(2 · 64 · (Dk + Dv) + 2 · 64 · 64 + 1024)` bytes a chunk
//! of each head.
//!
//! The backward takes the chunked form under the same rule ([`vjp_chunked`]): `gdc_prep`
//! keeping `M` and `gdc_state` keeping every chunk's starting state, `gdc_bstate` walking the
//! chunks in reverse (the state's gradient in mma accumulators; `dΔ` and the gradient at every
//! chunk's end kept), then `gdc_bgrad`, every chunk's input gradients in parallel. Its
//! products take bf16 operands with f32 sums as the forward's do. Workspace, a chunk of each
//! head: the forward's plus `M` (16 KiB), two `[Dv, Dk]` f32 states and `dΔ` (`64 · Dv`
//! bf16): about 150 KiB at Dk = Dv = 128.

use super::copy::{copy_cast, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{allow_dynamic_shared_memory, grid_1d, launch_kernel, CudaDevice, Stream};
use crate::array::checked_size;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gated_delta::{Form, GatedDeltaArgs, GatedDeltaGrads, GatedDeltaVjpArgs};
use crate::Array;
use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

/// `kernels/gated_delta.cu`. Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("gated_delta.cu", include_str!("kernels/gated_delta.cu")),
    variants: all_variants,
};

/// `kernels/gated_delta_chunked.cu`: the chunked forward.
pub(crate) const REGISTERED_CHUNKED: Registered = Registered {
    file: KernelFile::new(
        "gated_delta_chunked.cu",
        include_str!("kernels/gated_delta_chunked.cu"),
    ),
    variants: chunked_variants,
};

/// Steps from which bf16 prefill takes the chunked form by default.
pub(crate) const CHUNKED_MIN_T: usize = 64;
/// Steps per chunk of the chunked form (`FF_GDC_C`).
const CHUNK: usize = 64;
/// f32 factors per chunk (`FF_GDC_F`).
const CHUNK_FACTORS: usize = 256;
/// Head sizes (`Dk`, and separately `Dv`) the chunked kernels are instantiated for.
const CHUNK_DIMS: [usize; 2] = [64, 128];
/// Warps a `gdc_state` block may have (16 value rows each).
const CHUNK_WARPS: [usize; 2] = [4, 8];
/// The gamma / beta types of the chunked kernels (q, k, v are bf16).
const CHUNK_TG: [DType; 2] = [DType::BF16, DType::F32];

fn prep_variant(tg: DType, dk: usize, dv: usize) -> String {
    format!("gdc_prep<{}, {dk}, {dv}>", type_tag(tg))
}

fn state_variant(dk: usize, dv: usize, nw: usize) -> String {
    format!("gdc_state<{dk}, {dv}, {nw}>")
}

fn bstate_variant(dk: usize, dv: usize, nw: usize) -> String {
    format!("gdc_bstate<{dk}, {dv}, {nw}>")
}

fn bgrad_variant(tg: DType, dk: usize, dv: usize) -> String {
    format!("gdc_bgrad<{}, {dk}, {dv}>", type_tag(tg))
}

/// Every instantiation of `gated_delta_chunked.cu` a launch can ask for.
fn chunked_variants() -> Vec<String> {
    let mut out = Vec::new();
    for dk in CHUNK_DIMS {
        for dv in CHUNK_DIMS {
            for tg in CHUNK_TG {
                out.push(prep_variant(tg, dk, dv));
                out.push(bgrad_variant(tg, dk, dv));
            }
            for nw in CHUNK_WARPS {
                if dv.is_multiple_of(16 * nw) {
                    out.push(state_variant(dk, dv, nw));
                    out.push(bstate_variant(dk, dv, nw));
                }
            }
        }
    }
    out
}

/// Dynamic shared memory of `gdc_prep`, in bytes: K, Q, V tiles (bf16, rows padded by 8),
/// L and then M over it (`[64][65]` f32), the solve's `[3][16][16]` f32 scratch and seven
/// per-step arrays: 74 KiB at Dk = Dv = 128, three blocks a multiprocessor on sm_90.
fn prep_smem(dk: usize, dv: usize) -> usize {
    (2 * CHUNK * (dk + 8) + CHUNK * (dv + 8)) * 2 + (CHUNK * (CHUNK + 1) + 768 + 7 * CHUNK) * 4
}

/// Dynamic shared memory of `gdc_state` with `nw` warps, in bytes: two stages of W, Q, K
/// (`[64][Dk + 8]`), Q K^T (`[64][72]`), the U tile (`[64][16 nw + 8]`) and the factors,
/// then a `[64][24]` bf16 tile per warp (`ff_gdc_stage`).
fn state_smem(dk: usize, nw: usize) -> usize {
    let stage =
        3 * CHUNK * (dk + 8) + CHUNK * (CHUNK + 8) + CHUNK * (16 * nw + 8) + 2 * CHUNK_FACTORS;
    (2 * stage + nw * CHUNK * 24) * 2
}

/// Dynamic shared memory of `gdc_bstate` with `nw` warps, in bytes: two stages of W, Q, K
/// (`[64][Dk + 8]`), `Γ Q K^T` (`[64][72]`), the dO tile (`[64][16 nw + 8]`) and the
/// factors, then a `[64][24]` bf16 tile per warp (`ff_gdc_bstage`).
fn bstate_smem(dk: usize, nw: usize) -> usize {
    let stage =
        3 * CHUNK * (dk + 8) + CHUNK * (CHUNK + 8) + CHUNK * (16 * nw + 8) + 2 * CHUNK_FACTORS;
    (2 * stage + nw * CHUNK * 24) * 2
}

/// Dynamic shared memory of `gdc_bgrad`, in bytes (`ff_gdc_bgrad_smem`): seven bf16 tiles
/// (`[64][Dk + 8]` three, `[64][Dv + 8]` four), S and dS' (`[Dv][Dk + 8]` bf16 each) sharing
/// their space with four f32 `[64][65]` arrays, one more such array and 21 per-step arrays.
fn bgrad_smem(dk: usize, dv: usize) -> usize {
    let tiles = (3 * CHUNK * (dk + 8) + 4 * CHUNK * (dv + 8)) * 2;
    let shared = (2 * dv * (dk + 8) * 2).max(4 * CHUNK * (CHUNK + 1) * 4);
    tiles + shared + CHUNK * (CHUNK + 1) * 4 + (21 * CHUNK + 8) * 4
}

/// Warps of a `gdc_state` / `gdc_bstate` block for `heads` (batch x value heads) of `dv`
/// value rows on a device of `sms` multiprocessors with `max_smem` bytes of shared memory a
/// block, `smem(nw)` the kernel's shared memory with `nw` warps: eight (one block a head) when
/// that about fills the GPU and fits, else four (more blocks).
fn walk_warps(
    heads: usize,
    dv: usize,
    sms: usize,
    max_smem: usize,
    smem: impl Fn(usize) -> usize,
) -> usize {
    if dv.is_multiple_of(128) && 4 * heads >= 3 * sms && smem(8) <= max_smem {
        8
    } else {
        4
    }
}

/// Whether `run` (`backward`: `vjp`) takes the chunked form for `a` read as `x` on `device`.
fn uses_chunks(a: &GatedDeltaArgs, x: &Dense, device: &CudaDevice, backward: bool) -> bool {
    let smem = device.max_shared_optin();
    let fits = a.chunkable()
        && a.b * a.hv > 0
        && (!backward || (bstate_smem(a.dk, 4) <= smem && bgrad_smem(a.dk, a.dv) <= smem))
        && state_smem(a.dk, 4) <= smem
        && prep_smem(a.dk, a.dv) <= smem
        && x.ti == DType::BF16
        && CHUNK_TG.contains(&x.gamma.dtype())
        && CHUNK_DIMS.contains(&a.dk)
        && CHUNK_DIMS.contains(&a.dv)
        && a.b.saturating_mul(a.hv) <= 65535
        && a.t > 0;
    fits && match Form::from_env() {
        Form::Sequential => false,
        Form::Chunked => true,
        Form::Auto => a.t >= CHUNKED_MIN_T,
    }
}

/// `ff_gdc_params` in `kernels/gated_delta_chunked.cu`, same C layout, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GdcParams {
    t: i64,
    hk: i32,
    hv: i32,
    group: i32,
    n_chunks: i32,
}

// SAFETY: `GdcParams` is `repr(C)` plain data whose layout matches `ff_gdc_params`.
unsafe impl DeviceRepr for GdcParams {}

/// The chunked form's per-chunk workspace, written by `gdc_prep` for every chunk of every
/// head: `W`, `U`, the decay-weighted `Q K^T` (bf16) and the per-step factors (f32).
struct ChunkWork {
    w: CudaBuffer,
    u: CudaBuffer,
    qk: CudaBuffer,
    f: CudaBuffer,
    p: GdcParams,
}

/// The launch of a per-chunk kernel (`gdc_prep`, `gdc_bgrad`): a block of 128 threads per
/// (chunk, batch · value head) with `smem` bytes of shared memory.
fn chunk_grid(op: &str, n_chunks: usize, heads: usize, smem: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            u32_dim(op, "chunks", n_chunks, i32::MAX as u32)?,
            u32_dim(op, "B * Hv", heads, 65535)?,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// The launch of a walk over the chunks (`gdc_state`, `gdc_bstate`): a block of `nw` warps
/// per (batch · value head, 16 nw value rows) with `smem` bytes of shared memory.
fn walk_grid(op: &str, heads: usize, dv: usize, nw: usize, smem: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            u32_dim(op, "B * Hv", heads, i32::MAX as u32)?,
            u32_dim(op, "row blocks", dv / (16 * nw), 65535)?,
            1,
        ),
        block_dim: (32 * nw as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// Runs `gdc_prep` over every chunk of `x`; `m`, when given (`[B Hv, chunks, 64, 64]` f32),
/// also receives every chunk's `M = (I + L)^{-1}` for the backward.
fn chunk_prep(
    op: &str,
    a: &GatedDeltaArgs,
    x: &Dense,
    m: Option<&mut CudaBuffer>,
    stream: &Stream,
) -> Result<ChunkWork> {
    let device = buffer(op, "q", &x.q)?.device().clone();
    let heads = a.b * a.hv;
    let n_chunks = a.t.div_ceil(CHUNK);
    let p = GdcParams {
        t: i64::try_from(a.t).map_err(|_| Error::Shape(format!("[{op}] T overflows i64")))?,
        hk: i32_size(op, "Hk", a.hk)?,
        hv: i32_size(op, "Hv", a.hv)?,
        group: i32_size(op, "Hv / Hk", a.group())?,
        n_chunks: i32_size(op, "chunks", n_chunks)?,
    };
    let ws = |cols: usize, dtype: DType| -> Result<CudaBuffer> {
        CudaBuffer::alloc(
            &device,
            stream,
            dtype,
            checked_size(&[heads, n_chunks, cols])?,
        )
    };
    let mut work = ChunkWork {
        w: ws(CHUNK * a.dk, DType::BF16)?,
        u: ws(CHUNK * a.dv, DType::BF16)?,
        qk: ws(CHUNK * CHUNK, DType::BF16)?,
        f: ws(CHUNK_FACTORS, DType::F32)?,
        p,
    };
    let null: u64 = 0;
    let name = prep_variant(x.gamma.dtype(), a.dk, a.dv);
    let func = jit::function(&device, &REGISTERED_CHUNKED.file, &name, &[])?;
    let smem = prep_smem(a.dk, a.dv);
    allow_dynamic_shared_memory(&func, smem, &name)?;
    let cu = stream.cuda();
    let mut b = cu.launch_builder(&func);
    x.push_chunked(op, &mut b, &null)?;
    b.arg(work.w.slice_mut())
        .arg(work.u.slice_mut())
        .arg(work.qk.slice_mut())
        .arg(work.f.slice_mut());
    match m {
        Some(m) => b.arg(m.slice_mut()),
        None => b.arg(&null),
    };
    b.arg(&work.p);
    let cfg = chunk_grid(op, n_chunks, heads, smem)?;
    // SAFETY: the arguments match gdc_prep's parameters in order and type (`GdcParams` is
    // `ff_gdc_params`); q, k, v are dense bf16 ([B, T, Hk, Dk], [B, T, Hv, Dv]), gamma and
    // beta dense [B, T, Hv] of the kernel's TG, the mask dense f32 [B, T] or null. Block
    // (chunk, bh) reads steps < T of its head and writes its chunk's slots of w, u, qk, f
    // and m (allocated as [B Hv, n_chunks, ...] above; m may be null); `smem` is
    // `prep_smem`.
    unsafe { launch_kernel(&name, &mut b, cfg) }?;
    Ok(work)
}

/// Runs `gdc_state` over the chunks `work` prepared: the outputs into `out` (`[B, T, Hv,
/// Dv]` bf16), the final state into `state` (`[B, Hv, Dv, Dk]` f32) and the state at every
/// chunk's start into `ckpt` (`[B Hv, chunks, Dv, Dk]` f32), each where given.
#[allow(clippy::too_many_arguments)]
fn chunk_walk(
    op: &str,
    a: &GatedDeltaArgs,
    x: &Dense,
    work: &ChunkWork,
    out: Option<&mut CudaBuffer>,
    state: Option<&mut CudaBuffer>,
    ckpt: Option<&mut CudaBuffer>,
    stream: &Stream,
) -> Result<()> {
    let device = buffer(op, "q", &x.q)?.device().clone();
    let heads = a.b * a.hv;
    let nw = walk_warps(
        heads,
        a.dv,
        device.sm_count() as usize,
        device.max_shared_optin(),
        |nw| state_smem(a.dk, nw),
    );
    let name = state_variant(a.dk, a.dv, nw);
    let func = jit::function(&device, &REGISTERED_CHUNKED.file, &name, &[])?;
    let smem = state_smem(a.dk, nw);
    allow_dynamic_shared_memory(&func, smem, &name)?;
    let has_mask = i32::from(x.mask.is_some());
    let null: u64 = 0;
    let cu = stream.cuda();
    let mut b = cu.launch_builder(&func);
    b.arg(buffer(op, "q", &x.q)?.slice())
        .arg(buffer(op, "k", &x.k)?.slice())
        .arg(work.w.slice())
        .arg(work.u.slice())
        .arg(work.qk.slice())
        .arg(work.f.slice());
    match &x.state0 {
        Some(s) => b.arg(buffer(op, "initial_state", s)?.slice()),
        None => b.arg(&null),
    };
    b.arg(&has_mask);
    for buf in [out, state, ckpt] {
        match buf {
            Some(o) => b.arg(o.slice_mut()),
            None => b.arg(&null),
        };
    }
    b.arg(&work.p);
    let cfg = walk_grid(op, heads, a.dv, nw, smem)?;
    // SAFETY: the arguments match gdc_state's parameters in order and type; w, u, qk, f
    // were written by gdc_prep on this stream for every (bh, chunk); block (bh, y) reads
    // value rows y 16 nw .. + 16 nw < Dv (Dv is a multiple of 16 nw) and steps < T of its
    // head, writes those rows of out ([B, T, Hv, Dv] bf16), of the state ([B, Hv, Dv, Dk]
    // f32) and of every chunk's checkpoint ([B Hv, chunks, Dv, Dk] f32), each buffer
    // allocated by the caller at that size or null (not written); `smem` is `state_smem`.
    unsafe { launch_kernel(&name, &mut b, cfg) }?;
    Ok(())
}

/// The chunked forward into `out` (`[B, T, Hv, Dv]` bf16) and `state` (`[B, Hv, Dv, Dk]`
/// f32), for a call [`uses_chunks`] accepted.
fn run_chunked(
    a: &GatedDeltaArgs,
    x: &Dense,
    out: &mut CudaBuffer,
    state: &mut CudaBuffer,
    stream: &Stream,
) -> Result<()> {
    const OP: &str = "gated_delta_update";
    let work = chunk_prep(OP, a, x, None, stream)?;
    chunk_walk(OP, a, x, &work, Some(out), Some(state), None, stream)
}

/// The chunked backward for a call [`uses_chunks`] accepted: the forward's prep (keeping `M`)
/// and walk (keeping every chunk's starting state), `gdc_bstate` (the chunks in reverse:
/// `dΔ` and the state's gradient at every chunk's end) and `gdc_bgrad` (every chunk's input
/// gradients in parallel).
fn vjp_chunked(args: &GatedDeltaVjpArgs, x: &Dense, stream: &Stream) -> Result<GatedDeltaGrads> {
    const OP: &str = "gated_delta_update_vjp";
    let a = &args.fwd;
    let device = buffer(OP, "q", &x.q)?.device().clone();
    let d_out = dense(&args.d_out, DType::BF16, stream)?;
    let d_state = args
        .d_state
        .as_ref()
        .map(|s| dense(s, DType::F32, stream))
        .transpose()?;
    let heads = a.b * a.hv;
    let n_chunks = a.t.div_ceil(CHUNK);
    let f32buf = |shape: &[usize]| -> Result<CudaBuffer> {
        CudaBuffer::alloc(&device, stream, DType::F32, checked_size(shape)?)
    };
    let mut m = f32buf(&[heads, n_chunks, CHUNK, CHUNK])?;
    let work = chunk_prep(OP, a, x, Some(&mut m), stream)?;
    let mut ckpt = f32buf(&[heads, n_chunks, a.dv, a.dk])?;
    chunk_walk(OP, a, x, &work, None, None, Some(&mut ckpt), stream)?;

    let mut dckpt = f32buf(&[heads, n_chunks, a.dv, a.dk])?;
    let mut dd = CudaBuffer::alloc(
        &device,
        stream,
        DType::BF16,
        checked_size(&[heads, n_chunks, CHUNK, a.dv])?,
    )?;
    let mut dstate0 = match a.state0 {
        Some(_) => Some(f32buf(&a.state_shape())?),
        None => None,
    };
    let null: u64 = 0;
    let has_mask = i32::from(x.mask.is_some());
    let cu = stream.cuda();
    {
        let nw = walk_warps(
            heads,
            a.dv,
            device.sm_count() as usize,
            device.max_shared_optin(),
            |nw| bstate_smem(a.dk, nw),
        );
        let name = bstate_variant(a.dk, a.dv, nw);
        let func = jit::function(&device, &REGISTERED_CHUNKED.file, &name, &[])?;
        let smem = bstate_smem(a.dk, nw);
        allow_dynamic_shared_memory(&func, smem, &name)?;
        let mut b = cu.launch_builder(&func);
        b.arg(buffer(OP, "q", &x.q)?.slice())
            .arg(buffer(OP, "k", &x.k)?.slice())
            .arg(work.w.slice())
            .arg(work.qk.slice())
            .arg(work.f.slice())
            .arg(buffer(OP, "d_out", &d_out)?.slice());
        match &d_state {
            Some(s) => b.arg(buffer(OP, "d_state", s)?.slice()),
            None => b.arg(&null),
        };
        b.arg(&has_mask).arg(dd.slice_mut()).arg(dckpt.slice_mut());
        match &mut dstate0 {
            Some(d) => b.arg(d.slice_mut()),
            None => b.arg(&null),
        };
        b.arg(&work.p);
        let cfg = walk_grid(OP, heads, a.dv, nw, smem)?;
        // SAFETY: the arguments match gdc_bstate's parameters in order and type; w, qk, f
        // were written by gdc_prep on this stream; d_out is dense bf16 [B, T, Hv, Dv],
        // d_state dense f32 [B, Hv, Dv, Dk] or null. Block (bh, y) reads value rows y 16 nw
        // .. + 16 nw < Dv and steps < T of its head and writes those rows of dd ([B Hv,
        // chunks, 64, Dv] bf16), dckpt ([B Hv, chunks, Dv, Dk] f32) and dstate0 (the state's
        // shape, or null), all allocated above; `smem` is `bstate_smem`.
        unsafe { launch_kernel(&name, &mut b, cfg) }?;
    }
    let bth = checked_size(&[a.b, a.t, a.hv])?;
    let mut part_q = f32buf(&[bth, a.dk])?;
    let mut part_k = f32buf(&[bth, a.dk])?;
    let mut dv = f32buf(&[bth, a.dv])?;
    let mut dgamma = f32buf(&[bth])?;
    let mut dbeta = f32buf(&[bth])?;
    {
        let name = bgrad_variant(x.gamma.dtype(), a.dk, a.dv);
        let func = jit::function(&device, &REGISTERED_CHUNKED.file, &name, &[])?;
        let smem = bgrad_smem(a.dk, a.dv);
        allow_dynamic_shared_memory(&func, smem, &name)?;
        let mut b = cu.launch_builder(&func);
        x.push_chunked(OP, &mut b, &null)?;
        b.arg(work.w.slice())
            .arg(work.u.slice())
            .arg(m.slice())
            .arg(ckpt.slice())
            .arg(dckpt.slice())
            .arg(dd.slice())
            .arg(buffer(OP, "d_out", &d_out)?.slice())
            .arg(part_q.slice_mut())
            .arg(part_k.slice_mut())
            .arg(dv.slice_mut())
            .arg(dgamma.slice_mut())
            .arg(dbeta.slice_mut())
            .arg(&work.p);
        let cfg = chunk_grid(OP, n_chunks, heads, smem)?;
        // SAFETY: the arguments match gdc_bgrad's parameters in order and type; the
        // inputs are dense as for gdc_prep, w / u / m written by gdc_prep, ckpt by
        // gdc_state, dckpt / dd by gdc_bstate, all on this stream for every (bh, chunk).
        // Block (chunk, bh) writes steps < T of its chunk and head in dq / dk ([B, T, Hv,
        // Dk] f32), dv ([B, T, Hv, Dv]), dgamma and dbeta ([B, T, Hv]), allocated above;
        // `smem` is `bgrad_smem`.
        unsafe { launch_kernel(&name, &mut b, cfg) }?;
    }
    let qk_rows = a.b * a.t * a.hk;
    let group = a.group();
    let f32_array = |buf: CudaBuffer, like: &Array| -> Result<Array> {
        cast(
            Array::from_cuda_buffer(buf, like.shape())?,
            like.dtype(),
            stream,
        )
    };
    Ok(GatedDeltaGrads {
        dq: sum_parts(&part_q, (qk_rows, a.dk), (group, 1), &a.q, stream)?,
        dk: sum_parts(&part_k, (qk_rows, a.dk), (group, 1), &a.k, stream)?,
        dv: f32_array(dv, &a.v)?,
        dgamma: f32_array(dgamma, &a.gamma)?,
        dbeta: f32_array(dbeta, &a.beta)?,
        dstate0: match dstate0 {
            Some(d) => Some(Array::from_cuda_buffer(d, &a.state_shape())?),
            None => None,
        },
    })
}

/// The largest key head size the kernels take (16 float4 column groups of four lanes).
pub(crate) const MAX_DK: usize = 256;
/// Float4 groups a lane holds, the template's `NV`: the smallest with `16 NV >= Dk`.
const NVS: [usize; 5] = [1, 2, 4, 8, 16];
/// Threads of a `gd_forward` block (four warps of eight rows).
const FWD_THREADS: u32 = 128;
/// State rows a `gd_forward` block steps.
const FWD_ROWS: usize = 32;
/// Threads of `gd_sum`.
const SUM_THREADS: u32 = 256;
const SUM: &str = "gd_sum";

/// The (q / k / v, gamma / beta) element types the kernels are instantiated for.
const TYPES: [(DType, DType); 5] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
];

fn variant(kernel: &str, ti: DType, tg: DType, nv: usize) -> String {
    format!("{kernel}<{}, {}, {nv}>", type_tag(ti), type_tag(tg))
}

/// Every instantiation of `gated_delta.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for (ti, tg) in TYPES {
        for nv in NVS {
            out.push(variant("gd_forward", ti, tg, nv));
            out.push(variant("gd_backward", ti, tg, nv));
        }
    }
    out.push(SUM.to_string());
    out
}

/// `ff_gd_params` in `kernels/gated_delta.cu`, same C layout, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GdParams {
    t: i64,
    hk: i32,
    hv: i32,
    dk: i32,
    dv: i32,
    group: i32,
    per_key: i32,
    rb: i32,
    nrb: i32,
    chunk: i32,
    n_chunks: i32,
    stage: i32,
}

// SAFETY: `GdParams` is `repr(C)` plain data whose layout matches `ff_gd_params`.
unsafe impl DeviceRepr for GdParams {}

/// Steps whose inputs a block stages in shared memory at a time (`ff_gd_params::stage`).
fn stage_steps(nv: usize) -> usize {
    if nv >= 16 {
        8
    } else {
        16
    }
}

/// Floats of one staged step (`ff_gd_make_seg`): k, q and decay (`16 NV` each), `rows`
/// values of v, beta, the taken flag and, for the backward, `rows` of d_out; rounded up to a
/// multiple of 4.
fn seg_len(nv: usize, rows: usize, with_d_out: bool) -> usize {
    (3 * 16 * nv + rows + 2 + if with_d_out { rows } else { 0 }).div_ceil(4) * 4
}

/// Dynamic shared memory of `gd_forward` staging `stage` steps at a time, in bytes.
fn forward_smem(nv: usize, stage: usize) -> usize {
    stage * seg_len(nv, FWD_ROWS, false) * 4
}

/// Dynamic shared memory of `gd_backward` with `warps` warps, in bytes: the staged steps,
/// then the double-buffered per-warp sums.
fn backward_smem(nv: usize, warps: usize) -> usize {
    (stage_steps(nv) * seg_len(nv, 8 * warps, true) + 2 * warps * (3 * 16 * nv + 2)) * 4
}

/// The template's `NV` for key heads of `dk`.
fn nv_for(op: &str, dk: usize) -> Result<usize> {
    NVS.into_iter().find(|&nv| 16 * nv >= dk).ok_or_else(|| {
        Error::Unsupported(format!(
            "[{op}] the CUDA kernels take key heads of up to {MAX_DK} (Dk = {dk}); run it on \
             the CPU"
        ))
    })
}

/// The element types the kernels read the inputs in.
fn types(a: &GatedDeltaArgs) -> (DType, DType) {
    let native = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    let (q, k, v) = (a.q.dtype(), a.k.dtype(), a.v.dtype());
    let ti = if q == k && k == v && native(q) {
        q
    } else {
        DType::F32
    };
    let (g, b) = (a.gamma.dtype(), a.beta.dtype());
    let tg = if g == b && g == ti { ti } else { DType::F32 };
    (ti, tg)
}

/// `a` as a row-major array of `dtype` starting at its buffer's first element: `a` itself
/// when it already is, else a copy made on `stream`.
fn dense(a: &Array, dtype: DType, stream: &Stream) -> Result<Array> {
    if a.dtype() == dtype && a.is_contiguous() && a.offset() == 0 {
        Ok(a.clone())
    } else {
        copy_cast(a, dtype, Some(stream))
    }
}

fn buffer<'a>(op: &str, name: &str, a: &'a Array) -> Result<&'a CudaBuffer> {
    a.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "[{op}] the CUDA kernel got {name} on {}",
            a.device()
        ))
    })
}

/// The inputs as the kernels read them.
struct Dense {
    q: Array,
    k: Array,
    v: Array,
    gamma: Array,
    beta: Array,
    state0: Option<Array>,
    mask: Option<Array>,
    ti: DType,
}

impl Dense {
    fn new(a: &GatedDeltaArgs, stream: &Stream) -> Result<Dense> {
        let (ti, tg) = types(a);
        Ok(Dense {
            q: dense(&a.q, ti, stream)?,
            k: dense(&a.k, ti, stream)?,
            v: dense(&a.v, ti, stream)?,
            gamma: dense(&a.gamma, tg, stream)?,
            beta: dense(&a.beta, tg, stream)?,
            state0: a
                .state0
                .as_ref()
                .map(|s| dense(s, DType::F32, stream))
                .transpose()?,
            mask: a
                .mask
                .as_ref()
                .map(|m| dense(m, DType::F32, stream))
                .transpose()?,
            ti,
        })
    }
}

impl Dense {
    /// Pushes the kernels' first seven parameters: q, k, v, gamma, beta, the initial state
    /// and the mask (a null pointer, `null`, for an absent one).
    fn push<'a>(&'a self, op: &str, b: &mut LaunchArgs<'a>, null: &'a u64) -> Result<()> {
        self.push_steps(op, b)?;
        for (name, a) in [("initial_state", &self.state0), ("mask", &self.mask)] {
            match a {
                Some(a) => b.arg(buffer(op, name, a)?.slice()),
                None => b.arg(null),
            };
        }
        Ok(())
    }

    /// Pushes q, k, v, gamma and beta.
    fn push_steps<'a>(&'a self, op: &str, b: &mut LaunchArgs<'a>) -> Result<()> {
        for (name, a) in [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("gamma", &self.gamma),
            ("beta", &self.beta),
        ] {
            b.arg(buffer(op, name, a)?.slice());
        }
        Ok(())
    }

    /// Pushes the chunked kernels' first six parameters: q, k, v, gamma, beta and the mask
    /// (`null` when absent).
    fn push_chunked<'a>(&'a self, op: &str, b: &mut LaunchArgs<'a>, null: &'a u64) -> Result<()> {
        self.push_steps(op, b)?;
        match &self.mask {
            Some(m) => b.arg(buffer(op, "mask", m)?.slice()),
            None => b.arg(null),
        };
        Ok(())
    }
}

fn u32_dim(op: &str, what: &str, n: usize, limit: u32) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= limit)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "[{op}] {what} ({n}) exceed the CUDA grid's limit of {limit}"
            ))
        })
}

fn i32_size(op: &str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        Error::Unsupported(format!(
            "[{op}] {what} ({n}) exceeds the CUDA kernels' 32-bit limit"
        ))
    })
}

/// The parameters both kernels share.
fn params(op: &str, a: &GatedDeltaArgs) -> Result<GdParams> {
    Ok(GdParams {
        t: i64::try_from(a.t).map_err(|_| Error::Shape(format!("[{op}] T overflows i64")))?,
        hk: i32_size(op, "Hk", a.hk)?,
        hv: i32_size(op, "Hv", a.hv)?,
        dk: i32_size(op, "Dk", a.dk)?,
        dv: i32_size(op, "Dv", a.dv)?,
        group: i32_size(op, "Hv / Hk", a.group())?,
        per_key: i32::from(a.per_key_gamma),
        ..GdParams::default()
    })
}

/// Runs a validated `gated_delta_update` call on `stream`: `(out, state)`.
///
/// # Errors
/// `Error::Unsupported` for `Dk > 256` or sizes past the kernels' 32-bit limits; compile,
/// allocation and driver errors.
pub(crate) fn run(a: &GatedDeltaArgs, stream: &Stream) -> Result<(Array, Array)> {
    const OP: &str = "gated_delta_update";
    let nv = nv_for(OP, a.dk)?;
    let p = params(OP, a)?;
    let x = Dense::new(a, stream)?;
    let qb = buffer(OP, "q", &x.q)?;
    let device = qb.device().clone();
    let out_shape = a.out_shape();
    let mut out = CudaBuffer::alloc(&device, stream, x.ti, checked_size(&out_shape)?)?;
    let mut state =
        CudaBuffer::alloc(&device, stream, DType::F32, checked_size(&a.state_shape())?)?;
    let heads = a.b * a.hv;
    if uses_chunks(a, &x, &device, false) {
        run_chunked(a, &x, &mut out, &mut state, stream)?;
    } else if heads > 0 && a.dv > 0 {
        let mut p = p;
        // Short calls (decode) stage only their steps: less shared memory a block, more
        // blocks resident, more of the state in flight.
        let stage = stage_steps(nv).min(a.t.max(1));
        p.stage = stage as i32;
        let smem = forward_smem(nv, stage);
        let grid = (
            u32_dim(OP, "B * Hv", heads, i32::MAX as u32)?,
            u32_dim(OP, "row blocks", a.dv.div_ceil(FWD_ROWS), 65535)?,
            1,
        );
        let name = variant("gd_forward", x.ti, x.gamma.dtype(), nv);
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        allow_dynamic_shared_memory(&func, smem, &name)?;
        let null: u64 = 0;
        let cu = stream.cuda();
        let mut b = cu.launch_builder(&func);
        x.push(OP, &mut b, &null)?;
        b.arg(out.slice_mut()).arg(state.slice_mut()).arg(&p);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match gd_forward's parameters in order and type
        // (`GdParams` is `ff_gd_params`). Every input is dense and row-major from its
        // buffer's start (`Dense`) with the shapes the Args validated; the kernel reads
        // rows < Dv and columns < Dk of them and of the initial state, and writes out
        // ([B, T, Hv, Dv], `out_shape`) and the state ([B, Hv, Dv, Dk]) within bounds;
        // it stages `stage` steps in `smem` bytes of shared memory (`forward_smem`).
        unsafe { launch_kernel(&name, &mut b, cfg) }?;
    }
    let out = Array::from_cuda_buffer(out, &out_shape)?;
    let out = if x.ti == a.out_dtype {
        out
    } else {
        copy_cast(&out, a.out_dtype, Some(stream))?
    };
    Ok((out, Array::from_cuda_buffer(state, &a.state_shape())?))
}

/// Steps per checkpoint of the backward for `t` steps: about `sqrt(t)`, at least 8 (the
/// CPU's rule).
fn ckpt_chunk(t: usize) -> usize {
    ((t as f64).sqrt().ceil() as usize).clamp(8, 256)
}

/// The backward's row blocks: `(rows per block, blocks per head, warps per block)`. A block
/// holds up to 128 rows (16 warps, the state and its gradient in registers: 64 floats a lane
/// at Dk <= 128), 56 at Dk > 128 (seven warps, 128 floats a lane).
fn row_blocks(dv: usize, nv: usize) -> (usize, usize, usize) {
    let max_rows = if nv >= 16 { 56 } else { 128 };
    let rb = dv.div_ceil(8).max(1).saturating_mul(8).min(max_rows);
    (rb, dv.div_ceil(rb), rb.div_ceil(8))
}

/// `a` (f32) converted to `dtype` on `stream`; `a` itself when it already is.
fn cast(a: Array, dtype: DType, stream: &Stream) -> Result<Array> {
    if dtype == DType::F32 {
        Ok(a)
    } else {
        copy_cast(&a, dtype, Some(stream))
    }
}

/// `out[o][c] = sum_r sum_g part[r][o * groups + g][c]` for `o < n_out`, `c < width`: the
/// gradient of `like`, in its shape and dtype.
fn sum_parts(
    part: &CudaBuffer,
    (n_out, width): (usize, usize),
    (groups, parts): (usize, usize),
    like: &Array,
    stream: &Stream,
) -> Result<Array> {
    const OP: &str = "gated_delta_update_vjp";
    let device = part.device().clone();
    let n = n_out
        .checked_mul(width)
        .ok_or_else(|| Error::Shape(format!("[{OP}] gradient size overflows usize")))?;
    let mut out = CudaBuffer::alloc(&device, stream, DType::F32, n)?;
    if n > 0 {
        let func = jit::function(&device, &REGISTERED.file, SUM, &[])?;
        let blocks = n.div_ceil(SUM_THREADS as usize).min(1 << 16) as u32;
        let n_out_i = n_out as i64;
        let width_i = i32_size(OP, "a gradient row", width)?;
        let groups_i = i32_size(OP, "Hv / Hk", groups)?;
        let parts_i = i32_size(OP, "row blocks", parts)?;
        let plane = (n_out * groups * width) as i64;
        let cu = stream.cuda();
        let mut b = cu.launch_builder(&func);
        b.arg(part.slice())
            .arg(out.slice_mut())
            .arg(&n_out_i)
            .arg(&width_i)
            .arg(&groups_i)
            .arg(&parts_i)
            .arg(&plane);
        // SAFETY: gd_sum(in, out, n_out, width, groups, parts, plane) reads
        // in[r * plane + (o * groups + g) * width + c] for r < parts, o < n_out,
        // g < groups, c < width: inside the partials buffer of parts * plane floats, every
        // element written by gd_backward on this stream; it writes out[0..n).
        unsafe { launch_kernel("gd_sum", &mut b, grid_1d(blocks, SUM_THREADS, 0)) }?;
    }
    cast(
        Array::from_cuda_buffer(out, like.shape())?,
        like.dtype(),
        stream,
    )
}

/// Runs a validated `gated_delta_update_vjp` call on `stream`.
///
/// # Errors
/// As [`run`].
pub(crate) fn vjp(args: &GatedDeltaVjpArgs, stream: &Stream) -> Result<GatedDeltaGrads> {
    const OP: &str = "gated_delta_update_vjp";
    let a = &args.fwd;
    let nv = nv_for(OP, a.dk)?;
    if args.is_trivial() {
        return args.trivial_grads(|d| copy_cast(d, DType::F32, Some(stream)));
    }
    let mut p = params(OP, a)?;
    let x = Dense::new(a, stream)?;
    let device = buffer(OP, "q", &x.q)?.device().clone();
    if uses_chunks(a, &x, &device, true) {
        return vjp_chunked(args, &x, stream);
    }
    let d_out = dense(&args.d_out, DType::F32, stream)?;
    let d_state = args
        .d_state
        .as_ref()
        .map(|s| dense(s, DType::F32, stream))
        .transpose()?;

    let (rb, nrb, warps) = row_blocks(a.dv, nv);
    let chunk = ckpt_chunk(a.t);
    let n_chunks = a.t.div_ceil(chunk);
    p.rb = i32_size(OP, "rows", rb)?;
    p.nrb = i32_size(OP, "row blocks", nrb)?;
    p.chunk = i32_size(OP, "chunk", chunk)?;
    p.n_chunks = i32_size(OP, "chunks", n_chunks)?;
    p.stage = stage_steps(nv) as i32;
    let heads = a.b * a.hv;
    let slot = warps * 8 * 16 * nv;
    let gk = if a.per_key_gamma { a.dk } else { 1 };
    let bth = checked_size(&[a.b, a.t, a.hv])?;
    let f32buf = |shape: &[usize]| -> Result<CudaBuffer> {
        CudaBuffer::alloc(&device, stream, DType::F32, checked_size(shape)?)
    };
    let mut ckpt = f32buf(&[heads, nrb, n_chunks, slot])?;
    let mut scratch = f32buf(&[heads, nrb, chunk, slot])?;
    let mut part_q = f32buf(&[nrb, bth, a.dk])?;
    let mut part_k = f32buf(&[nrb, bth, a.dk])?;
    let mut part_g = f32buf(&[nrb, bth, gk])?;
    let mut part_b = f32buf(&[nrb, bth])?;
    let mut dv = f32buf(&[bth, a.dv])?;
    let mut dstate0 = match a.state0 {
        Some(_) => Some(f32buf(&a.state_shape())?),
        None => None,
    };

    let name = variant("gd_backward", x.ti, x.gamma.dtype(), nv);
    let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
    let smem = backward_smem(nv, warps);
    allow_dynamic_shared_memory(&func, smem, &name)?;
    let grid = (
        u32_dim(OP, "B * Hv", heads, i32::MAX as u32)?,
        u32_dim(OP, "row blocks", nrb, 65535)?,
        1,
    );
    let null: u64 = 0;
    let cu = stream.cuda();
    let mut b = cu.launch_builder(&func);
    x.push(OP, &mut b, &null)?;
    b.arg(buffer(OP, "d_out", &d_out)?.slice());
    match &d_state {
        Some(s) => b.arg(buffer(OP, "d_state", s)?.slice()),
        None => b.arg(&null),
    };
    b.arg(ckpt.slice_mut())
        .arg(scratch.slice_mut())
        .arg(part_q.slice_mut())
        .arg(part_k.slice_mut())
        .arg(part_g.slice_mut())
        .arg(part_b.slice_mut())
        .arg(dv.slice_mut());
    match &mut dstate0 {
        Some(d) => b.arg(d.slice_mut()),
        None => b.arg(&null),
    };
    b.arg(&p);
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the arguments match gd_backward's parameters in order and type (`GdParams`
    // is `ff_gd_params`). Inputs are dense row-major (`Dense`, `dense`) with the validated
    // shapes; block (bh, y) uses ckpt / scratch slots bh * nrb + y of n_chunks / chunk
    // states of `slot` floats (allocated above), writes the partials at row block y of
    // [nrb, B T Hv, width] and dv / dstate0 rows < Dv; shared memory is `smem` bytes as
    // the kernel lays it out for `warps` warps.
    unsafe { launch_kernel(&name, &mut b, cfg) }?;

    let qk_rows = a.b * a.t * a.hk;
    let group = a.group();
    Ok(GatedDeltaGrads {
        dq: sum_parts(&part_q, (qk_rows, a.dk), (group, nrb), &a.q, stream)?,
        dk: sum_parts(&part_k, (qk_rows, a.dk), (group, nrb), &a.k, stream)?,
        dv: cast(
            Array::from_cuda_buffer(dv, a.v.shape())?,
            a.v.dtype(),
            stream,
        )?,
        dgamma: sum_parts(&part_g, (bth, gk), (1, nrb), &a.gamma, stream)?,
        dbeta: sum_parts(&part_b, (bth, 1), (1, nrb), &a.beta, stream)?,
        dstate0: match dstate0 {
            Some(d) => Some(Array::from_cuda_buffer(d, &a.state_shape())?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launch_has_a_variant() {
        let all = all_variants();
        for dk in [1usize, 15, 16, 17, 64, 100, 128, 129, 200, 256] {
            let nv = nv_for("t", dk).unwrap();
            assert!(16 * nv >= dk && (nv == 1 || 8 * nv < dk), "{dk} {nv}");
            for (ti, tg) in TYPES {
                assert!(all.contains(&variant("gd_forward", ti, tg, nv)));
                assert!(all.contains(&variant("gd_backward", ti, tg, nv)));
            }
        }
        assert!(nv_for("t", 257).is_err());
        assert!(all.contains(&SUM.to_string()));
    }

    #[test]
    fn chunked_launches_have_variants_and_fit() {
        let all = chunked_variants();
        for dk in CHUNK_DIMS {
            for dv in CHUNK_DIMS {
                for tg in CHUNK_TG {
                    assert!(all.contains(&prep_variant(tg, dk, dv)));
                }
                // Within the 227 KiB a block may have on sm_90 (and the 163 KiB of sm_80 for
                // the prep kernel and four-warp state blocks).
                assert!(prep_smem(dk, dv) <= 160 * 1024, "{dk} {dv}");
                for heads in [1usize, 8, 95, 96, 128, 4096] {
                    let nw = walk_warps(heads, dv, 132, 227 * 1024, |nw| state_smem(dk, nw));
                    assert!(all.contains(&state_variant(dk, dv, nw)), "{dk} {dv} {nw}");
                    assert_eq!(dv % (16 * nw), 0);
                    assert!(state_smem(dk, nw) <= 227 * 1024, "{dk} {nw}");
                    // An sm_80 block (163 KiB) gets four warps.
                    let nw80 = walk_warps(heads, dv, 108, 163 * 1024, |nw| state_smem(dk, nw));
                    assert!(state_smem(dk, nw80) <= 163 * 1024, "{dk} {nw80}");
                    // The backward's reverse walk likewise.
                    let nw = walk_warps(heads, dv, 132, 227 * 1024, |nw| bstate_smem(dk, nw));
                    assert!(all.contains(&bstate_variant(dk, dv, nw)), "{dk} {dv} {nw}");
                    assert!(bstate_smem(dk, nw) <= 227 * 1024, "{dk} {nw}");
                }
                for tg in CHUNK_TG {
                    assert!(all.contains(&bgrad_variant(tg, dk, dv)));
                }
                // The per-chunk gradients need sm_90's 227 KiB at Dk = Dv = 128.
                assert!(bgrad_smem(dk, dv) <= 227 * 1024, "{dk} {dv}");
                if dk == 64 && dv == 64 {
                    assert!(bgrad_smem(dk, dv) <= 163 * 1024);
                }
            }
        }
    }

    #[test]
    fn forward_staging_fits_without_opt_in() {
        for nv in NVS {
            let smem = forward_smem(nv, stage_steps(nv));
            assert!(smem <= 48 * 1024, "{nv}: {smem}");
            assert_eq!(seg_len(nv, FWD_ROWS, false) % 4, 0);
        }
    }

    #[test]
    fn row_blocks_cover_the_rows() {
        for dv in [1usize, 7, 8, 9, 64, 100, 128, 129, 255, 256, 1000] {
            for nv in NVS {
                let (rb, nrb, warps) = row_blocks(dv, nv);
                assert!(rb * nrb >= dv && rb * (nrb - 1) < dv, "{dv} {nv}");
                assert!(warps * 8 >= rb && warps <= if nv >= 16 { 7 } else { 16 });
                // Within the 227 KiB a block may have on sm_80 and sm_90.
                let smem = backward_smem(nv, warps);
                assert!(smem <= 160 * 1024, "{dv} {nv}: {smem}");
            }
        }
    }
}
