//! Launcher for `kernels/attn_prefill.cu`: flash-attention forward on the tensor cores
//! (`mma.sync`, sm_80 and later) for many queries per head.
//!
//! Covered: f16 and bf16; `(D, D_v)` in {(64, 64), (80, 80), (96, 96), (128, 128),
//! (192, 128), (256, 256)}; grouped-query heads; no mask, causal (lower-right aligned), bool
//! and additive array masks (read in place through the strides of their broadcast view);
//! sinks; any `T_q`, `T_kv`. q, k and v are read in place when their last axis is contiguous
//! and every row starts 16 bytes aligned (`[B, T, H, D]` memory seen as `[B, H, T, D]`, for
//! one); other layouts are first copied to row-major on the GPU.
//!
//! Not covered (the caller takes another kernel): float32 and float64 inputs (f32 would need
//! tf32 or split-bf16 tiles to keep its accuracy; it goes to the general kernel), other head
//! dims, and sizes past the kernel's 32-bit indices or the grid's limits.
//!
//! On a device of compute capability 9.0 (H100 / H200), the cases the Hopper kernel covers
//! take `kernels/attn_prefill_sm90.cu` instead (see `super::select`);
//! `FERROFAST_PREFILL_KERNEL=mma` in the environment keeps every case on this kernel.

use super::{
    allow_shared_memory, buffer, kv_row_pad, mask_arg, push_inputs, sinks_arg, vector_operand,
    AttnParams, Forward, LseBuffer, MaskKind, OP,
};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{launch_kernel, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaArgs;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `kernels/attn_prefill.cu`: flash-attention forward on the tensor cores (`mma.sync`).
/// Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::new(
        "attn_prefill.cu",
        include_str!("../kernels/attn_prefill.cu"),
    ),
    variants,
};

/// Tile shape of one instantiation: `slabs` groups of 16 query rows per warp, `warps` warps
/// per block (so `16 * slabs * warps` query rows per block) and `keys` keys per tile;
/// `flags` are the kernel's `FLAGS` bits ([`LAZY`], [`PIPE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tiles {
    slabs: usize,
    warps: usize,
    keys: usize,
    flags: u32,
}

impl Tiles {
    /// Query rows per block.
    pub(super) fn rows(self) -> usize {
        16 * self.slabs * self.warps
    }
}

/// Kernel flag: rescale the accumulators only when a row's max grew by more than 2^8.
const LAZY: u32 = 1;
/// Kernel flag: pipelined loop over unmasked key tiles (this tile's softmax interleaved with
/// the previous tile's `P V`).
const PIPE: u32 = 2;

const fn tiles(slabs: usize, warps: usize, keys: usize, flags: u32) -> Tiles {
    Tiles {
        slabs,
        warps,
        keys,
        flags,
    }
}

/// `(D, D_v)` pairs with a kernel, and their tiles. Chosen so the accumulators of a warp
/// (16 * slabs rows of `D_v` outputs plus the scores of one key tile, and with [`PIPE`] the
/// previous tile's packed P) fit in 255 registers without spilling and two blocks share a
/// multiprocessor (about 100 KB of shared memory each). Measured on an H100 (`tile_shapes`
/// below): [`LAZY`] gains 2-4% with a causal mask at D = 128 (none without); [`PIPE`] gains
/// 7% at D = 64, ties at D = 96 and loses 8-15% at D = 128 and 256 (its registers spill, or
/// its key tiles must shrink). D = 80 follows D = 64 and (192, 128) follows D = 128 unmeasured.
const HEAD_DIMS: [((usize, usize), Tiles); 6] = [
    ((64, 64), tiles(2, 4, 64, LAZY | PIPE)),
    ((80, 80), tiles(2, 4, 64, LAZY | PIPE)),
    ((96, 96), tiles(2, 4, 64, LAZY)),
    ((128, 128), tiles(2, 4, 64, LAZY)),
    ((192, 128), tiles(2, 4, 32, LAZY)),
    ((256, 256), tiles(1, 4, 32, LAZY)),
];

/// The tiles of the `(d, dv)` pair, if the kernel takes it.
pub(super) fn tiles_for(d: usize, dv: usize) -> Option<Tiles> {
    HEAD_DIMS
        .iter()
        .find(|(dims, _)| *dims == (d, dv))
        .map(|&(_, t)| t)
}

fn variant(dtype: DType, d: usize, dv: usize, t: Tiles, mask: MaskKind) -> String {
    format!(
        "attn_prefill<{}, {d}, {dv}, {}, {}, {}, {}, {}>",
        type_tag(dtype),
        t.slabs,
        t.warps,
        t.keys,
        mask as i32,
        t.flags
    )
}

/// Every instantiation of `attn_prefill.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for &((d, dv), t) in &HEAD_DIMS {
            for mask in [MaskKind::None, MaskKind::Bool, MaskKind::Additive] {
                out.push(variant(dtype, d, dv, t, mask));
            }
        }
    }
    out
}

/// Bytes of shared memory a block of `t` uses: the Q tile (rows padded by 8 elements) and two
/// K and two V tiles, swizzled and unpadded when `d` and `dv` are multiples of 64, padded by
/// 8 elements otherwise (`SW` in the kernel).
fn shared_bytes(d: usize, dv: usize, t: Tiles, elem: usize) -> usize {
    let rows_q = 16 * t.slabs * t.warps;
    let pad = kv_row_pad(d, dv);
    (rows_q * (d + 8) + 2 * t.keys * (d + pad) + 2 * t.keys * (dv + pad)) * elem
}

/// Flash-attention forward of a validated call on `stream` (chosen by [`super::select()`]):
/// `softmax(scale * q k^T + mask) v` per batch and query head, f32 softmax and
/// accumulation, one rounding to the output dtype. Fully masked rows (no visible key) are 0;
/// a sink adds its weight to the softmax's denominator only. Returns a new row-major array of
/// shape `c.out_shape` and dtype `c.dtype`, produced on `stream`.
///
/// # Errors
/// `Error::Unsupported` for a case the kernel does not cover (see the module docs; the
/// selection never sends one); compile and driver errors.
pub(super) fn run(c: &SdpaArgs, stream: &Stream, with_lse: bool) -> Result<Forward> {
    let (d, dv) = (c.k.shape()[3], c.out_shape[3]);
    let tiles = tiles_for(d, dv).ok_or_else(|| {
        Error::Unsupported(format!(
            "{OP} no mma.sync prefill kernel for D {d}, D_v {dv}"
        ))
    })?;
    run_with(c, stream, tiles, with_lse)
}

/// [`run`] with the given tile shape (any shape whose accumulators and shared memory fit;
/// the table holds the measured choices).
fn run_with(c: &SdpaArgs, stream: &Stream, tiles: Tiles, with_lse: bool) -> Result<Forward> {
    let dtype = c.dtype;
    let unsupported = || {
        Error::Unsupported(format!(
            "{OP} the mma.sync prefill kernel does not take this call ({dtype}, shape {:?})",
            c.out_shape
        ))
    };
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(unsupported());
    }
    let [batch, n_q, t_q, dv] = c.out_shape;
    let d = c.k.shape()[3];
    let m_tiles = t_q.div_ceil(tiles.rows());
    if n_q > 65535 || batch > 65535 || m_tiles > i32::MAX as usize {
        return Err(unsupported());
    }

    let ordinal = stream.ordinal();
    let device = buffer(&c.q, "q", ordinal)?.device().clone();
    buffer(&c.k, "k", ordinal)?;
    buffer(&c.v, "v", ordinal)?;
    let mask = mask_arg(c, ordinal)?;
    let sinks = sinks_arg(c, ordinal)?;
    let n_out = batch * n_q * t_q * dv;
    if n_out == 0 {
        return Forward::empty(c, &device, stream, with_lse);
    }

    let q = vector_operand(&c.q, stream)?;
    let k = vector_operand(&c.k, stream)?;
    let v = vector_operand(&c.v, stream)?;
    let params = AttnParams::new(c, [&q, &k, &v], &mask, sinks)?;

    let name = variant(dtype, d, dv, tiles, mask.kind);
    let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
    let smem = shared_bytes(d, dv, tiles, dtype.size());
    allow_shared_memory(&func, smem, "the attention kernel")?;

    let mut out = CudaBuffer::alloc(&device, stream, dtype, n_out)?;
    let mut lse = LseBuffer::new(c, &device, stream, with_lse)?;
    let cfg = LaunchConfig {
        grid_dim: (m_tiles as u32, n_q as u32, batch as u32),
        block_dim: ((32 * tiles.warps) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let null: u64 = 0;
    let inputs = [
        buffer(&q, "q", ordinal)?,
        buffer(&k, "k", ordinal)?,
        buffer(&v, "v", ordinal)?,
    ];
    let cu = stream.cuda();
    let mut builder = cu.launch_builder(&func);
    push_inputs(&mut builder, inputs, &mask, sinks, &null);
    builder.arg(out.slice_mut());
    lse.push(&mut builder, &null);
    builder.arg(&params);
    // SAFETY: the arguments match the kernel's parameters in order and type. Block (x, h, b)
    // reads q rows m0..m0+BM (below T_q) of head h, and k / v rows below T_kv of head
    // h / group (< N_kv, as N_q = group * N_kv), each through the view's own offset and
    // strides (checked 16-byte aligned with a contiguous last axis, so every 16-byte
    // cp.async stays inside the row); rows past the end are zero-filled without a read. The
    // mask is read at (b, h, i, j) with i < T_q, j < T_kv through its broadcast view's
    // strides, the sinks at h < N_q. The output holds B * N_q * T_q * D_v elements and
    // block (x, h, b) writes rows below T_q of (b, h) only, and the same rows of the
    // `[B, N_q, T_q]` log-sum-exp when it is not null. Shared memory: the kernel uses
    // exactly `smem` bytes, allowed above.
    unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    Forward::new(out, lse, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Array;

    #[test]
    fn every_head_dim_pair_has_variants_and_fits_two_blocks_per_sm() {
        let all = variants();
        assert_eq!(all.len(), 2 * HEAD_DIMS.len() * 3);
        assert!(all.contains(&"attn_prefill<ff_bf16, 128, 128, 2, 4, 64, 0, 1>".to_string()));
        for &((d, dv), t) in &HEAD_DIMS {
            assert!(shared_bytes(d, dv, t, 2) <= 113 * 1024, "({d}, {dv})");
            assert_eq!(tiles_for(d, dv), Some(t));
        }
        assert_eq!(tiles_for(128, 64), None);
        assert_eq!(tiles_for(72, 72), None);
    }

    /// Times tile shapes against each other on a GPU, two interleaved rounds (prints
    /// TFLOP/s and the largest difference from the table's choice): `cargo test --release
    /// --lib -- --ignored tile_shapes`.
    #[test]
    #[ignore]
    fn tile_shapes() {
        use crate::ops::sdpa::{Mask, SdpaArgs};
        use crate::Device;
        let Ok(dev) = Device::cuda(0) else {
            println!("skipping: no CUDA device");
            return;
        };
        let stream = Stream::default_for(&dev).unwrap();
        let cases: Vec<(usize, usize, DType, Vec<Tiles>)> = vec![
            (
                128,
                128,
                DType::BF16,
                vec![
                    tiles(2, 4, 64, 0),
                    tiles(2, 4, 64, LAZY),
                    tiles(2, 4, 64, LAZY | PIPE),
                    tiles(2, 4, 32, LAZY | PIPE),
                    tiles(2, 4, 48, LAZY),
                    tiles(1, 8, 64, LAZY),
                ],
            ),
            (
                64,
                64,
                DType::BF16,
                vec![tiles(2, 4, 64, LAZY), tiles(2, 4, 64, LAZY | PIPE)],
            ),
            (
                80,
                80,
                DType::BF16,
                vec![tiles(2, 4, 64, LAZY), tiles(2, 4, 64, LAZY | PIPE)],
            ),
            (
                96,
                96,
                DType::BF16,
                vec![tiles(2, 4, 64, LAZY), tiles(2, 4, 64, LAZY | PIPE)],
            ),
            (
                256,
                256,
                DType::BF16,
                vec![tiles(1, 4, 32, LAZY), tiles(1, 4, 32, LAZY | PIPE)],
            ),
        ];
        let (b, h, t) = (4, 32, 4096);
        for (d, dv, dtype, candidates) in cases {
            let table = tiles_for(d, dv).unwrap();
            let q = Array::randn(&[b, h, t, d], dtype, 1, &dev).unwrap();
            let k = Array::randn(&[b, h, t, d], dtype, 2, &dev).unwrap();
            let v = Array::randn(&[b, h, t, dv], dtype, 3, &dev).unwrap();
            for causal in [false, true] {
                let mask = if causal { Mask::Causal } else { Mask::None };
                let scale = 1.0 / (d as f32).sqrt();
                let c = SdpaArgs::new(&q, &k, &v, scale, mask, None).unwrap();
                let base = run_with(&c, &stream, table, false).unwrap().out;
                let base = base.to_f64_vec().unwrap();
                let flops = 4.0 * (b * h * t * t) as f64 * (d + dv) as f64
                    / 2.0
                    / if causal { 2.0 } else { 1.0 };
                let mut meds = vec![Vec::new(); candidates.len()];
                for round in 0..2 {
                    for (i, &tl) in candidates.iter().enumerate() {
                        let run = || run_with(&c, &stream, tl, false).unwrap().out;
                        if round == 0 {
                            let out = run().to_f64_vec().unwrap();
                            let diff = out
                                .iter()
                                .zip(&base)
                                .map(|(x, y)| (x - y).abs())
                                .fold(0.0, f64::max);
                            println!(
                                "D{d}/{dv} {dtype} causal {causal} {tl:?}: max diff {diff:.2e}"
                            );
                        }
                        let mut times = Vec::new();
                        for _ in 0..10 {
                            let t0 = std::time::Instant::now();
                            for _ in 0..5 {
                                drop(run());
                            }
                            stream.synchronize().unwrap();
                            times.push(t0.elapsed().as_secs_f64() / 5.0);
                        }
                        times.sort_by(f64::total_cmp);
                        meds[i].push(flops / times[times.len() / 2] / 1e12);
                    }
                }
                for (tl, m) in candidates.iter().zip(&meds) {
                    let r: Vec<String> = m.iter().map(|x| format!("{x:.1}")).collect();
                    println!(
                        "RESULT D{d}/{dv} {dtype} causal {causal} {tl:?}: TFLOP/s rounds [{}]",
                        r.join(", ")
                    );
                }
            }
        }
    }
}
