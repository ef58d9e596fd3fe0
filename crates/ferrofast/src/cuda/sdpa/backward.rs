//! Launchers of the attention backward pass: `kernels/attn_backward_sm90.cu` on Hopper's
//! warpgroup MMAs (compute capability 9.0, f16 / bf16, `D = D_v = 128` by default and 64
//! on request: [`sm90`]),
//! `kernels/attn_backward_mma.cu` on the tensor cores with `mma.sync` (f16 / bf16, the head
//! dims of [`mma_tiles`]) and `kernels/attn_backward.cu` on the SIMT cores (every other
//! case), chosen by [`super::select::select_backward`]. Both start
//! with `delta = rowsum(dO * O)` and end with the sinks' gradient (SIMT kernels of
//! `attn_backward.cu`); between them dK / dV per key tile and dQ per query tile. Each block
//! owns what it writes: results are deterministic.

use super::select::{select_backward, BackwardKernel, Knobs, Problem};
use super::{
    allow_shared_memory, buffer, launch_kernel, mask_arg, push_inputs, push_mask, sinks_arg,
    to_i32, vector_operand, AttnParams, MaskArg, DTYPES, OP,
};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, CudaDevice, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaVjpArgs;
use crate::Array;
use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg};
use std::sync::Arc;

mod sm90;
pub(crate) use sm90::takes as sm90_takes;
pub(super) use sm90::REGISTERED as REGISTERED_SM90;

/// `kernels/attn_backward.cu`. Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::new(
        "attn_backward.cu",
        include_str!("../kernels/attn_backward.cu"),
    ),
    variants,
};

/// `kernels/attn_backward_mma.cu`. Every instantiation a launch can ask for is in
/// `mma_variants`.
pub(super) const REGISTERED_MMA: Registered = Registered {
    file: KernelFile::new(
        "attn_backward_mma.cu",
        include_str!("../kernels/attn_backward_mma.cu"),
    ),
    variants: mma_variants,
};

/// Tiles of the tensor-core backward for one `(D, D_v)` pair: the dK / dV kernel's warps
/// (16 keys each) and query rows per step, whether dK and dV run as two launches (wide
/// heads, whose two accumulators do not fit in registers together), and the dQ kernel's
/// warps, slabs of 16 queries per warp, and keys per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MmaTiles {
    kv_warps: usize,
    kv_rows: usize,
    split: bool,
    q_warps: usize,
    q_slabs: usize,
    q_keys: usize,
}

impl MmaTiles {
    /// Queries per block of the dQ kernel.
    fn q_rows(self) -> usize {
        16 * self.q_slabs * self.q_warps
    }
}

const fn mma(
    kv_warps: usize,
    kv_rows: usize,
    split: bool,
    q_warps: usize,
    q_slabs: usize,
    q_keys: usize,
) -> MmaTiles {
    MmaTiles {
        kv_warps,
        kv_rows,
        split,
        q_warps,
        q_slabs,
        q_keys,
    }
}

/// `(D, D_v)` pairs with a tensor-core backward, and their tiles: steps whose accumulators
/// fit in 255 registers without spilling (ptxas, sm_90: `scripts/kernel-regs`), chosen by
/// `backward_tile_shapes` below on an H200 (bf16 B4 H32 T4096): at D 128 the dQ kernel is
/// fastest with 4 warps of two 16-query slabs over 32-key steps (144.9 TFLOP/s, causal
/// 140.5), against 139.6 / 135.2 with 8 warps of one slab and 133.3 / 130.4 with 4 warps
/// over 64-key steps; dK and dV split lose 12%. D 64 is fastest with 4-warp blocks of one
/// slab (110.6 against 96.5 with two slabs and 98.1 with 8 warps); D 256 7% faster with
/// 8-warp blocks (115.2 against 107.3). D 80 follows D 64, D 96 and (192, 128) follow the
/// one-slab D 128 tiles, unmeasured.
const MMA_HEAD_DIMS: [((usize, usize), MmaTiles); 6] = [
    ((64, 64), mma(4, 64, false, 4, 1, 64)),
    ((80, 80), mma(4, 64, false, 4, 1, 64)),
    ((96, 96), mma(4, 32, false, 8, 1, 32)),
    ((128, 128), mma(4, 32, false, 4, 2, 32)),
    ((192, 128), mma(4, 32, false, 4, 1, 32)),
    ((256, 256), mma(8, 16, true, 8, 1, 32)),
];

/// The tensor-core tiles of the `(d, dv)` pair, if the kernels take it.
pub(crate) fn mma_tiles(d: usize, dv: usize) -> Option<MmaTiles> {
    MMA_HEAD_DIMS
        .iter()
        .find(|(dims, _)| *dims == (d, dv))
        .map(|&(_, t)| t)
}

/// The dQ tiles a grid gets: `t`, or for two-slab tiles on a grid of fewer than four blocks
/// per multiprocessor the one-slab tiles of as many rows with twice the warps (two slabs
/// per warp halve the warps in flight; on small grids that costs more than the shared
/// fragments gain: B1 H16 T1024 D128 bf16 226 against 195 us on an H200, runs 38 and 40,
/// where B4 H32 T4096 gains 8%). `blocks(t)` is the dQ grid of tiles `t`.
fn dq_tiles_for_grid(t: MmaTiles, blocks: impl Fn(MmaTiles) -> usize, sms: usize) -> MmaTiles {
    if t.q_slabs == 2 && blocks(t) < 4 * sms {
        MmaTiles {
            q_warps: 2 * t.q_warps,
            q_slabs: 1,
            ..t
        }
    } else {
        t
    }
}

/// The dK / dV launches of `t` by their kernel's WANT: 3 (both), or 1 (dK) and 2 (dV) when
/// split.
fn kv_wants(t: MmaTiles) -> &'static [u32] {
    if t.split {
        &[1, 2]
    } else {
        &[3]
    }
}

fn dkdv_variant(dtype: DType, d: usize, dv: usize, t: MmaTiles, want: u32) -> String {
    format!(
        "attn_bwd_mma_dkdv<{}, {d}, {dv}, {}, {}, {want}>",
        type_tag(dtype),
        t.kv_rows,
        t.kv_warps
    )
}

fn dq_variant(dtype: DType, d: usize, dv: usize, t: MmaTiles) -> String {
    format!(
        "attn_bwd_mma_dq<{}, {d}, {dv}, {}, {}, {}>",
        type_tag(dtype),
        t.q_keys,
        t.q_warps,
        t.q_slabs
    )
}

/// Every instantiation of `attn_backward_mma.cu` a launch can ask for.
fn mma_variants() -> Vec<String> {
    let mut v = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for &((d, dv), t) in &MMA_HEAD_DIMS {
            for &want in kv_wants(t) {
                v.push(dkdv_variant(dtype, d, dv, t, want));
            }
            v.push(dq_variant(dtype, d, dv, t));
            let small = dq_tiles_for_grid(t, |_| 0, 1);
            if small != t {
                v.push(dq_variant(dtype, d, dv, small));
            }
        }
    }
    v
}

/// Shared memory (bytes, 16-bit elements) of the dK / dV kernel: the key tile's K (and V
/// when dK is computed) and two buffers of the query tile's q and dO (rows padded by 8
/// elements), and two buffers of the rows' lse and delta.
fn dkdv_shared_bytes(t: MmaTiles, d: usize, dv: usize, want: u32) -> usize {
    let keys = 16 * t.kv_warps;
    let v_rows = if want & 1 != 0 { keys } else { 0 };
    2 * (keys * (d + 8) + v_rows * (dv + 8) + 2 * t.kv_rows * (d + 8 + dv + 8)) + 4 * 4 * t.kv_rows
}

/// Shared memory (bytes) of the dQ kernel: the query tile's q and dO and two buffers of the
/// key tile's K and V (rows padded by 8 elements).
fn dq_shared_bytes(t: MmaTiles, d: usize, dv: usize) -> usize {
    2 * (t.q_rows() * (d + 8 + dv + 8) + 2 * t.q_keys * (d + 8 + dv + 8))
}

/// Threads per block of every backward kernel (`FF_BWD_THREADS`).
const THREADS: u32 = 128;
/// Query / key tile sizes, largest first: the largest whose shared memory fits is used.
const TILES: [usize; 3] = [32, 16, 8];
/// The shared memory a block may use (the sm_90 limit; older devices refuse larger
/// requests when the size is set, with a driver error).
const MAX_SHARED: usize = 227 * 1024;

/// Every instantiation of `attn_backward.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut v = Vec::new();
    for dtype in DTYPES {
        let t = type_tag(dtype);
        v.push(format!("attn_bwd_delta<{t}>"));
        v.push(format!("attn_bwd_dsinks<{t}>"));
        for tile in TILES {
            v.push(format!("attn_bwd_dkdv<{t}, {tile}>"));
            v.push(format!("attn_bwd_dq<{t}, {tile}>"));
        }
    }
    v
}

/// Shared memory (bytes) of a dK/dV block with query and key tiles of `tile` rows: the q, dO,
/// k and v tiles (rows padded by one float), P and dS, the rows' lse and delta, and the dK and
/// dV accumulators (the dQ kernel needs less).
fn shared_bytes(tile: usize, d: usize, dv: usize) -> usize {
    let floats = 2 * tile * (d + 1)
        + 2 * tile * (dv + 1)
        + 2 * tile * (tile + 1)
        + 2 * tile
        + tile * (d + dv);
    4 * floats
}

/// `a` as a row-major array with no offset on `stream`'s device: itself, or a copy.
fn dense(a: &Array, stream: &Stream) -> Result<Array> {
    if a.is_contiguous() && a.offset() == 0 {
        Ok(a.clone())
    } else {
        a.to_stream(stream)
    }
}

/// `n` blocks as a grid size, or an error past the CUDA limit.
fn grid(n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| Error::Unsupported(format!("{OP} {n} blocks exceed the CUDA grid limit")))
}

/// The inputs every backward launch shares, on one device.
struct Inputs<'a> {
    device: Arc<CudaDevice>,
    stream: &'a Stream,
    dtype: DType,
    d: usize,
    dv: usize,
    b: usize,
    nq: usize,
    nkv: usize,
    tq: usize,
    tkv: usize,
    d_out: &'a CudaBuffer,
    lse: &'a CudaBuffer,
    delta: &'a CudaBuffer,
    mask: MaskArg<'a>,
    scale: f32,
}

impl<'a> Inputs<'a> {
    /// Backward kernel `name` of `file`, allowed `smem` bytes of dynamic shared memory (`what`
    /// names it in the error), with its launch configuration: `grid_dim` blocks of `threads`
    /// threads.
    fn kernel(
        &self,
        file: &KernelFile,
        name: &str,
        smem: usize,
        what: &str,
        grid_dim: (u32, u32, u32),
        threads: u32,
    ) -> Result<(CudaFunction, LaunchConfig)> {
        let func = jit::function(&self.device, file, name, &[])?;
        allow_shared_memory(&func, smem, what)?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        Ok((func, cfg))
    }

    /// Pushes the arguments a dK / dV or dQ kernel takes after its operands and mask: `d_out`
    /// (when `with_d_out`), lse, delta, the gradients `outs`, `params` and the scale.
    fn push_rows<'b>(
        &'b self,
        builder: &mut LaunchArgs<'b>,
        with_d_out: bool,
        outs: impl IntoIterator<Item = &'b mut CudaBuffer>,
        params: &'b AttnParams,
    ) where
        'a: 'b,
    {
        if with_d_out {
            builder.arg(self.d_out.slice());
        }
        builder.arg(self.lse.slice()).arg(self.delta.slice());
        for out in outs {
            builder.arg(out.slice_mut());
        }
        builder.arg(params).arg(&self.scale);
    }
}

/// A grid's y or z dimension for `n` heads or batches.
///
/// # Errors
/// `Error::Unsupported` past CUDA's 65535.
fn grid_yz(n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&v| v <= 65535)
        .ok_or_else(|| Error::Unsupported(format!("{OP} {n} heads or batches exceed the grid")))
}

/// The gradients of q, k and v as new row-major buffers.
struct Grads {
    dq: CudaBuffer,
    dk: CudaBuffer,
    dv: CudaBuffer,
}

impl Grads {
    fn alloc(x: &Inputs<'_>) -> Result<Grads> {
        let alloc = |n: usize| CudaBuffer::alloc(&x.device, x.stream, x.dtype, n);
        Ok(Grads {
            dq: alloc(x.b * x.nq * x.tq * x.d)?,
            dk: alloc(x.b * x.nkv * x.tkv * x.d)?,
            dv: alloc(x.b * x.nkv * x.tkv * x.dv)?,
        })
    }
}

/// Runs the backward pass of a validated call on `stream`: `(dq, dk, dv, dsinks)` in the
/// call's dtype (the caller casts them to the primals' dtypes).
///
/// # Errors
/// `Error::Unsupported` for dtypes other than f32 / f16 / bf16, head dims whose tiles do not
/// fit in shared memory, and sizes past the kernels' 32-bit limits; compile and driver
/// errors.
pub(super) fn run(
    c: &SdpaVjpArgs,
    stream: &Stream,
) -> Result<(Array, Array, Array, Option<Array>)> {
    run_tiles(c, stream, None)
}

/// [`run`], with the tensor-core tiles `tiles` instead of the table's when the call takes
/// the tensor-core kernels.
fn run_tiles(
    c: &SdpaVjpArgs,
    stream: &Stream,
    tiles: Option<MmaTiles>,
) -> Result<(Array, Array, Array, Option<Array>)> {
    let f = &c.fwd;
    let dtype = f.dtype;
    let ordinal = stream.ordinal();
    let device = runtime::device(ordinal)?;
    let [b, nq, tq, dv] = f.out_shape;
    let (nkv, tkv, d) = (f.k.shape()[1], f.k.shape()[2], f.k.shape()[3]);
    let rows = b * nq * tq;
    let zeros = |shape: &[usize], dt: DType| -> Result<Array> {
        Array::zeros(shape, dt, &crate::Device::Cpu)?.to_stream(stream)
    };
    if rows == 0 || tkv == 0 {
        // No query or no key: no probability anywhere, every gradient is 0.
        return Ok((
            zeros(f.q.shape(), dtype)?,
            zeros(f.k.shape(), dtype)?,
            zeros(f.v.shape(), dtype)?,
            f.sinks.as_ref().map(|_| zeros(&[nq], dtype)).transpose()?,
        ));
    }
    let kernel = select_backward(&Problem::of(f), &device.arch(), Knobs::from_env());

    let out = dense(&c.out, stream)?;
    let d_out = dense(&c.d_out, stream)?;
    let lse = dense(&c.lse, stream)?;
    let (out_b, g_b, lse_b) = (
        buffer(&out, "out", ordinal)?,
        buffer(&d_out, "d_out", ordinal)?,
        buffer(&lse, "lse", ordinal)?,
    );
    let sinks = sinks_arg(f, ordinal)?;
    let t = type_tag(dtype);
    let cu = stream.cuda();

    // delta.
    let mut delta = CudaBuffer::alloc(&device, stream, DType::F32, rows)?;
    {
        let name = format!("attn_bwd_delta<{t}>");
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        let rows64 = rows as i64;
        let dv32 = to_i32(dv, "a value head dimension")?;
        let cfg = runtime::grid_1d(grid(rows.div_ceil(THREADS as usize / 32))?, THREADS, 0);
        let mut builder = cu.launch_builder(&func);
        builder
            .arg(out_b.slice())
            .arg(g_b.slice())
            .arg(delta.slice_mut())
            .arg(&rows64)
            .arg(&dv32);
        // SAFETY: the arguments match attn_bwd_delta's parameters. out and d_out are
        // row-major with no offset and hold rows * D_v elements; delta holds rows floats;
        // warp w of block x reads and writes row 4x + w < rows only.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }

    let x = Inputs {
        device: device.clone(),
        stream,
        dtype,
        d,
        dv,
        b,
        nq,
        nkv,
        tq,
        tkv,
        d_out: g_b,
        lse: lse_b,
        delta: &delta,
        mask: mask_arg(f, ordinal)?,
        scale: f.scale,
    };
    let grads = match (kernel, mma_tiles(d, dv)) {
        (BackwardKernel::Sm90, _) if tiles.is_none() => sm90::passes(c, &x, &d_out, false)?,
        (BackwardKernel::Sm90Fused, _) if tiles.is_none() => sm90::passes(c, &x, &d_out, true)?,
        (BackwardKernel::Mma | BackwardKernel::Sm90 | BackwardKernel::Sm90Fused, Some(table)) => {
            let tiles = match tiles {
                Some(t) => t,
                None => {
                    let sms = device.sm_count() as usize;
                    dq_tiles_for_grid(table, |t| b * nq * tq.div_ceil(t.q_rows()), sms)
                }
            };
            mma_passes(c, &x, tiles)?
        }
        _ => simt_passes(c, &x)?,
    };

    // The sinks' gradient.
    let dsinks = match sinks {
        None => None,
        Some((s, _, _)) => {
            let mut ds = CudaBuffer::alloc(&device, stream, DType::F32, nq)?;
            let name = format!("attn_bwd_dsinks<{t}>");
            let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
            let params = AttnParams::new(f, [&f.q, &f.k, &f.v], &x.mask, sinks)?;
            let batch = to_i32(b, "a batch size")?;
            let cfg = runtime::grid_1d(grid(nq)?, THREADS, 0);
            let mut builder = cu.launch_builder(&func);
            builder
                .arg(s.slice())
                .arg(lse_b.slice())
                .arg(delta.slice())
                .arg(ds.slice_mut())
                .arg(&params)
                .arg(&batch);
            // SAFETY: the arguments match attn_bwd_dsinks' parameters. Block h < N_q reads
            // sinks[h] through the sinks' offset and stride, lse and delta at rows
            // (b * N_q + h) * T_q + i with b < B, i < T_q, and writes dsinks[h] (N_q floats).
            unsafe { launch_kernel(&name, &mut builder, cfg) }?;
            Some(Array::from_cuda_buffer(ds, &[nq])?.astype(dtype)?)
        }
    };
    Ok((
        Array::from_cuda_buffer(grads.dq, f.q.shape())?,
        Array::from_cuda_buffer(grads.dk, f.k.shape())?,
        Array::from_cuda_buffer(grads.dv, f.v.shape())?,
        dsinks,
    ))
}

/// dK / dV and dQ on the SIMT kernels (any shape and strides).
fn simt_passes(c: &SdpaVjpArgs, x: &Inputs<'_>) -> Result<Grads> {
    let f = &c.fwd;
    let ordinal = x.stream.ordinal();
    let tile = TILES
        .into_iter()
        .find(|&t| shared_bytes(t, x.d, x.dv) <= MAX_SHARED)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{OP} the CUDA backward pass takes head dims whose tiles fit in shared memory; \
                 D {} and D_v {} do not",
                x.d, x.dv
            ))
        })?;
    let smem = shared_bytes(tile, x.d, x.dv);
    let (q, k, v) = (
        buffer(&f.q, "q", ordinal)?,
        buffer(&f.k, "k", ordinal)?,
        buffer(&f.v, "v", ordinal)?,
    );
    let sinks = sinks_arg(f, ordinal)?;
    let params = AttnParams::new(f, [&f.q, &f.k, &f.v], &x.mask, sinks)?;
    let t = type_tag(x.dtype);
    let null: u64 = 0;
    let mut g = Grads::alloc(x)?;
    let passes: [(&str, usize, Vec<&mut CudaBuffer>); 2] = [
        (
            "attn_bwd_dkdv",
            x.b * x.nkv * x.tkv.div_ceil(tile),
            vec![&mut g.dk, &mut g.dv],
        ),
        (
            "attn_bwd_dq",
            x.b * x.nq * x.tq.div_ceil(tile),
            vec![&mut g.dq],
        ),
    ];
    for (kernel, blocks, outs) in passes {
        let name = format!("{kernel}<{t}, {tile}>");
        let (func, cfg) = x.kernel(
            &REGISTERED.file,
            &name,
            smem,
            "the attention backward kernel",
            (grid(blocks)?, 1, 1),
            THREADS,
        )?;
        let mut builder = x.stream.cuda().launch_builder(&func);
        push_inputs(&mut builder, [q, k, v], &x.mask, sinks, &null);
        x.push_rows(&mut builder, true, outs, &params);
        // SAFETY: the arguments match attn_bwd_dkdv's (outputs dk, dv) and attn_bwd_dq's
        // (output dq) parameters. q, k, v and the mask are read at indices below their
        // views' shapes through their own offsets and strides (as the forward reads them);
        // d_out, lse and delta are row-major with no offset and read at rows below
        // B * N_q * T_q. Block (b, g, key tile) writes keys below T_kv of kv head (b, g) in
        // dk and dv (B * N_kv * T_kv * D and * D_v elements); block (b, h, query tile) writes
        // rows below T_q of head (b, h) in dq (B * N_q * T_q * D elements). Shared memory:
        // at most `cfg`'s bytes, allowed by `Inputs::kernel`.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    Ok(g)
}

/// dK / dV and dQ on the tensor cores (`attn_backward_mma.cu`).
fn mma_passes(c: &SdpaVjpArgs, x: &Inputs<'_>, tiles: MmaTiles) -> Result<Grads> {
    let f = &c.fwd;
    let ordinal = x.stream.ordinal();
    // The kernels load 16-byte vectors of q, k and v rows: read in place or copied.
    let (q, k, v) = (
        vector_operand(&f.q, x.stream)?,
        vector_operand(&f.k, x.stream)?,
        vector_operand(&f.v, x.stream)?,
    );
    let params = AttnParams::new(f, [&q, &k, &v], &x.mask, None)?;
    let (qb, kb, vb) = (
        buffer(&q, "q", ordinal)?,
        buffer(&k, "k", ordinal)?,
        buffer(&v, "v", ordinal)?,
    );
    let null: u64 = 0;
    let mut g = Grads::alloc(x)?;
    let (d, dv) = (x.d, x.dv);

    for &want in kv_wants(tiles) {
        let name = dkdv_variant(x.dtype, d, dv, tiles, want);
        let (func, cfg) = x.kernel(
            &REGISTERED_MMA.file,
            &name,
            dkdv_shared_bytes(tiles, d, dv, want),
            "the attention backward kernel",
            (
                grid(x.tkv.div_ceil(16 * tiles.kv_warps))?,
                grid_yz(x.nkv)?,
                grid_yz(x.b)?,
            ),
            (32 * tiles.kv_warps) as u32,
        )?;
        let mut builder = x.stream.cuda().launch_builder(&func);
        builder.arg(qb.slice()).arg(kb.slice()).arg(vb.slice());
        push_mask(&mut builder, &x.mask, &null);
        x.push_rows(&mut builder, true, [&mut g.dk, &mut g.dv], &params);
        // SAFETY: the arguments match attn_bwd_mma_dkdv's parameters. q, k and v are read
        // through their views' offsets and strides (last axis contiguous, rows 16-byte
        // aligned: `vector_operand`), at rows below T_q / T_kv (rows past the end are
        // zero-filled without a read); the mask at (b, h, i, j) with i < T_q, j < T_kv through
        // its broadcast strides. d_out ([B, N_q, T_q, D_v], 16-byte rows as D_v is a multiple
        // of 16), lse and delta are row-major with no offset. Block (key tile, g, b) writes
        // keys below T_kv of kv head (b, g) in dk and dv only (B * N_kv * T_kv * D and * D_v
        // elements). Shared memory: exactly `cfg`'s bytes, allowed by `Inputs::kernel`.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }

    let name = dq_variant(x.dtype, d, dv, tiles);
    let (func, cfg) = x.kernel(
        &REGISTERED_MMA.file,
        &name,
        dq_shared_bytes(tiles, d, dv),
        "the attention backward kernel",
        (
            grid(x.tq.div_ceil(tiles.q_rows()))?,
            grid_yz(x.nq)?,
            grid_yz(x.b)?,
        ),
        (32 * tiles.q_warps) as u32,
    )?;
    let mut builder = x.stream.cuda().launch_builder(&func);
    builder.arg(qb.slice()).arg(kb.slice()).arg(vb.slice());
    push_mask(&mut builder, &x.mask, &null);
    x.push_rows(&mut builder, true, [&mut g.dq], &params);
    // SAFETY: the arguments match attn_bwd_mma_dq's parameters; inputs as for the dK / dV
    // kernel above. Block (query tile, h, b) writes rows below T_q of head (b, h) in dq only
    // (B * N_q * T_q * D elements). Shared memory: exactly `cfg`'s bytes, allowed by
    // `Inputs::kernel`.
    unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_up_to_256_take_the_largest_tile() {
        for (d, dv) in [(64, 64), (128, 128), (192, 128), (256, 256)] {
            assert!(shared_bytes(32, d, dv) <= MAX_SHARED, "D {d} D_v {dv}");
        }
        assert!(shared_bytes(8, 1024, 1024) <= MAX_SHARED);
        assert_eq!(variants().len(), 3 * (2 + 2 * TILES.len()));
    }

    #[test]
    fn small_grids_take_one_slab_dq_tiles() {
        let t = mma_tiles(128, 128).unwrap();
        assert_eq!(t.q_slabs, 2);
        let grid =
            |b: usize, h: usize, tq: usize| move |t: MmaTiles| b * h * tq.div_ceil(t.q_rows());
        // H200: 132 multiprocessors. B1 H16 T1024: 128 blocks -> one slab, 8 warps, same rows.
        let small = dq_tiles_for_grid(t, grid(1, 16, 1024), 132);
        assert_eq!(
            (small.q_warps, small.q_slabs, small.q_rows()),
            (8, 1, t.q_rows())
        );
        // B4 H32 T4096: 4096 blocks -> the table's tiles.
        assert_eq!(dq_tiles_for_grid(t, grid(4, 32, 4096), 132), t);
        // One-slab tiles are never changed.
        let one = mma_tiles(64, 64).unwrap();
        assert_eq!(dq_tiles_for_grid(one, grid(1, 1, 16), 132), one);
    }

    #[test]
    fn tensor_core_tiles_fit_in_shared_memory() {
        for &((d, dv), t) in &MMA_HEAD_DIMS {
            for &want in kv_wants(t) {
                assert!(
                    dkdv_shared_bytes(t, d, dv, want) <= MAX_SHARED,
                    "({d}, {dv})"
                );
            }
            assert!(dq_shared_bytes(t, d, dv) <= MAX_SHARED, "({d}, {dv})");
            assert_eq!(mma_tiles(d, dv), Some(t));
        }
        assert_eq!(mma_tiles(32, 32), None);
        let all = mma_variants();
        // Per dtype: dK/dV and dQ for six pairs, the split dK and dV of D 256, and D 128's
        // one-slab dQ for small grids.
        assert_eq!(all.len(), 2 * (2 * 6 + 1 + 1));
        assert!(all.contains(&"attn_bwd_mma_dq<ff_f16, 128, 128, 32, 8, 1>".to_string()));
        assert!(all.contains(&"attn_bwd_mma_dkdv<ff_bf16, 128, 128, 32, 4, 3>".to_string()));
        assert!(all.contains(&"attn_bwd_mma_dkdv<ff_f16, 256, 256, 16, 8, 2>".to_string()));
        assert!(all.contains(&"attn_bwd_mma_dq<ff_bf16, 64, 64, 64, 4, 1>".to_string()));
        assert!(all.contains(&"attn_bwd_mma_dq<ff_bf16, 128, 128, 32, 4, 2>".to_string()));
    }

    /// Times tensor-core tile shapes against each other on a GPU, two interleaved rounds
    /// (prints TFLOP/s counted as 2.5 forwards and the largest difference from the table's
    /// choice): `cargo test --release --lib -- --ignored backward_tile_shapes`.
    #[test]
    #[ignore]
    fn backward_tile_shapes() {
        use crate::ops::sdpa::{Mask, SdpaArgs};
        use crate::Device;
        let Ok(dev) = Device::cuda(0) else {
            println!("skipping: no CUDA device");
            return;
        };
        let stream = Stream::default_for(&dev).unwrap();
        let cases: Vec<(usize, usize, Vec<MmaTiles>)> = vec![
            (
                128,
                128,
                vec![
                    mma(4, 32, false, 4, 2, 32),
                    mma(4, 32, false, 8, 1, 32),
                    mma(4, 32, false, 4, 1, 64),
                ],
            ),
            (
                64,
                64,
                vec![
                    mma(4, 64, false, 4, 1, 64),
                    mma(4, 64, false, 4, 2, 64),
                    mma(4, 64, false, 8, 2, 32),
                ],
            ),
            (
                256,
                256,
                vec![mma(4, 32, true, 4, 1, 32), mma(8, 16, true, 8, 1, 32)],
            ),
        ];
        let (b, h, t) = (4, 32, 4096);
        for (d, dv, candidates) in cases {
            let table = mma_tiles(d, dv).unwrap();
            let dtype = DType::BF16;
            let q = Array::randn(&[b, h, t, d], dtype, 1, &dev).unwrap();
            let k = Array::randn(&[b, h, t, d], dtype, 2, &dev).unwrap();
            let v = Array::randn(&[b, h, t, dv], dtype, 3, &dev).unwrap();
            let g = Array::randn(&[b, h, t, dv], dtype, 4, &dev).unwrap();
            for causal in [false, true] {
                let mask = if causal { Mask::Causal } else { Mask::None };
                let scale = 1.0 / (d as f32).sqrt();
                let fwd = SdpaArgs::new(&q, &k, &v, scale, mask, None).unwrap();
                let (out, lse) = super::super::run_with_lse(&fwd, &stream).unwrap();
                let c = SdpaVjpArgs::new(fwd.clone(), &out, &lse, &g).unwrap();
                let flat = |r: (Array, Array, Array, Option<Array>)| -> Vec<f64> {
                    let mut all = r.0.to_f64_vec().unwrap();
                    all.extend(r.1.to_f64_vec().unwrap());
                    all.extend(r.2.to_f64_vec().unwrap());
                    all
                };
                let base = flat(run_tiles(&c, &stream, Some(table)).unwrap());
                let flops = 2.5 * 4.0 * (b * h * t * t) as f64 * (d + dv) as f64
                    / 2.0
                    / if causal { 2.0 } else { 1.0 };
                let mut meds = vec![Vec::new(); candidates.len()];
                for round in 0..2 {
                    for (i, &tl) in candidates.iter().enumerate() {
                        let run = || run_tiles(&c, &stream, Some(tl)).unwrap();
                        if round == 0 {
                            let got = flat(run());
                            let diff = got
                                .iter()
                                .zip(&base)
                                .map(|(x, y)| (x - y).abs())
                                .fold(0.0, f64::max);
                            println!("D{d}/{dv} causal {causal} {tl:?}: max diff {diff:.2e}");
                        }
                        let mut times = Vec::new();
                        for _ in 0..5 {
                            let t0 = std::time::Instant::now();
                            for _ in 0..3 {
                                drop(run());
                            }
                            stream.synchronize().unwrap();
                            times.push(t0.elapsed().as_secs_f64() / 3.0);
                        }
                        times.sort_by(f64::total_cmp);
                        meds[i].push(flops / times[times.len() / 2] / 1e12);
                    }
                }
                for (tl, m) in candidates.iter().zip(&meds) {
                    let r: Vec<String> = m.iter().map(|x| format!("{x:.1}")).collect();
                    println!(
                        "RESULT bwd D{d}/{dv} causal {causal} {tl:?}: TFLOP/s rounds [{}]",
                        r.join(", ")
                    );
                }
            }
        }
    }
}
