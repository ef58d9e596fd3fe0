//! Launchers of `kernels/attn_decode.cu`: attention decode (`T_q <= 8`) with split-KV and
//! its combine kernel, on the tensor cores (`attn_decode_mma`) or SIMT (`attn_decode`).
//!
//! The query heads of a GQA group and all query positions share one read of each key/value
//! row; the keys are split into ranges (merged by the combine kernel) when the (batch, kv
//! head) pairs alone would not fill the GPU. The tensor-core kernel takes up to 16 query
//! rows per block and streams K/V tiles through per-warp cp.async pipelines in shared
//! memory; the SIMT kernel loads K and V into registers with 16-byte loads. K and V must have
//! unit stride along the features and 16-byte aligned rows; other layouts are first copied
//! to row-major on the GPU. q, the mask and the sinks are read through their strides.
//!
//! Tuning knobs (environment variables, read once per process; for measurements, not for
//! production): `FERROFAST_DECODE_SPLITS=N` fixes the number of key ranges of the tensor-core
//! decode (1 to 256; the planner's choice otherwise); `FERROFAST_DECODE_STAGES=N` (2 to 8),
//! `FERROFAST_DECODE_WARPS=N` (1, 2, 4 or 8), `FERROFAST_DECODE_TILE=N` (keys per warp tile:
//! 16, 32 or 64) and `FERROFAST_DECODE_LOAD=N` (L2 hint of its K / V copies: 0 none,
//! 1 256-byte prefetch, 2 evict-first, 3 both) replace the table's values; together they may
//! ask for at most 226 KiB of shared memory per block, else the table's values run.

use super::{
    allow_shared_memory, buffer, kv_row_pad, launch_kernel, mask_arg, push_inputs, resident_blocks,
    sinks_arg, to_i32, vector_operand, AttnParams, DTYPES, OP,
};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaArgs;
use crate::Array;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `kernels/attn_decode.cu`: attention decode (split-KV) and its combine kernel.
/// Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::new("attn_decode.cu", include_str!("../kernels/attn_decode.cu")),
    variants,
};

/// Longest query sequence the decode kernel takes.
pub(super) const DECODE_MAX_TQ: usize = 8;
/// Widest head (max of `D`, `D_v`) the decode kernel takes.
pub(super) const DECODE_MAX_WIDTH: usize = 256;
/// Threads per block of both decode kernels (`FF_DECODE_THREADS`).
const DECODE_THREADS: u32 = 128;
/// Most splits the combine kernel merges (`FF_DECODE_MAX_SPLITS`).
const MAX_SPLITS: usize = 256;
/// Fewest keys a split is given (shorter ranges cost more in the combine than they gain).
const MIN_SPLIT_KEYS: usize = 256;
/// Split lengths are multiples of this.
const SPLIT_ALIGN: usize = 64;
/// Waves of decode blocks aimed for when splitting the keys.
const TARGET_WAVES: u64 = 2;

/// `(D, D_v)` pairs the tensor-core decode kernel takes, with its warps per block and
/// cp.async stages per warp (16-key tiles, L2 hint [`MMA_LOAD`]). Stages are chosen so that
/// two blocks share a multiprocessor (about 110 KB of shared memory each) except for D = 128
/// (8 warps of 2 stages, one block of about 135 KB) and D = 256 (one block of about 210 KB):
/// about 100 KB of K and V in flight per multiprocessor either way.
///
/// Measured on an H200 for bf16 B8 H32/8 T_kv 32768 D128 (median of the bench, us): 277 for
/// this table without the L2 hint, 273 with it; 2 stages 276, 4 stages 281; 8 warps of 2
/// stages (one block per multiprocessor) 271; 2 warps 284; 32-key tiles 277 (4 warps, 2
/// stages) and 283 (2 warps); 64-key tiles (2 warps) 362. PyTorch 2.11 (cuDNN) 257 in the
/// same run. On an H100 (run 16), 8 warps of 2 stages 371 / 372 against 383 / 383 for 4 warps
/// of 3 stages, PyTorch 366: hence the D = 128 row. Those figures are from padded K / V rows;
/// with the swizzled rows (H100, run 23) the D = 128 row measures 358 us, 3 stages 359, 4 warps
/// of 3 stages 365, 4 warps of 32-key tiles 360-362, PyTorch 366 in the same call.
const MMA_HEAD_DIMS: [((usize, usize), MmaTiles); 6] = [
    ((64, 64), MmaTiles::new(4, 5)),
    ((80, 80), MmaTiles::new(4, 4)),
    ((96, 96), MmaTiles::new(4, 4)),
    ((128, 128), MmaTiles::new(8, 2)),
    ((192, 128), MmaTiles::new(4, 2)),
    ((256, 256), MmaTiles::new(4, 3)),
];

/// Warps per block, pipeline stages per warp, keys per warp tile and the L2 hint of the K / V
/// copies (`LD` in the kernel) of one tensor-core decode instantiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MmaTiles {
    warps: usize,
    stages: usize,
    keys: usize,
    load: usize,
}

impl MmaTiles {
    const fn new(warps: usize, stages: usize) -> Self {
        MmaTiles {
            warps,
            stages,
            keys: MMA_KEYS,
            load: MMA_LOAD,
        }
    }
}

/// Query rows per tensor-core decode block (the M of the mma) and keys per warp tile (the
/// table's; the kernel takes multiples of 16).
const MMA_ROWS: usize = 16;
const MMA_KEYS: usize = 16;
/// The L2 hint of the tensor-core decode's K / V copies (`LD` of the kernel): none. With
/// padded shared-memory rows, evict-first lines with 256-byte prefetch (3) were 1.5-5% faster
/// than none; with the swizzled rows every hint measured the same on an H100 (358-359 us for
/// B8 T_kv 32768), and hints that evict early cost a cache that fits in L2 (B1 T_kv 8192:
/// 19.0 us without, 24.3 us with).
const MMA_LOAD: usize = 0;
/// Most dynamic shared memory a tensor-core decode block may use (sm_80 and sm_90 allow
/// 227 KB per block; the kernel's static arrays take 512 bytes more).
const MMA_MAX_SHARED: usize = 226 * 1024;
/// Fewest keys a split of the tensor-core kernel is given.
const MMA_MIN_SPLIT_KEYS: usize = 512;

/// How the decode kernel covers a head: `LPK` lanes per key row, `VPL` 16-byte vectors per
/// lane, so rows of up to `LPK * VPL * 16 / size` features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Lanes {
    lpk: usize,
    vpl: usize,
}

/// The lane layout for heads of `width = max(D, D_v)` features of `dtype`.
pub(super) fn decode_lanes(dtype: DType, width: usize) -> Option<Lanes> {
    let per_vec = 16 / dtype.size();
    let vectors = width.div_ceil(per_vec);
    match vectors {
        0 => None,
        1..=8 if per_vec == 8 => Some(Lanes { lpk: 8, vpl: 1 }),
        1..=16 => Some(Lanes { lpk: 16, vpl: 1 }),
        17..=32 => Some(Lanes { lpk: 32, vpl: 1 }),
        33..=64 => Some(Lanes { lpk: 32, vpl: 2 }),
        _ => None,
    }
}

/// The lane layouts a dtype can ask for.
fn lane_layouts(dtype: DType) -> Vec<Lanes> {
    [64, 128, 256]
        .iter()
        .filter_map(|&w| decode_lanes(dtype, w))
        .collect()
}

/// Query rows per decode block (`R`) for `rows` = GQA group times `T_q`: 1, 4 or 8 (larger
/// groups take several blocks per key range). Three sizes keep the compiled variants few;
/// a block with spare rows only does spare arithmetic, not extra memory traffic.
fn rows_per_block(rows: usize) -> usize {
    match rows {
        0 | 1 => 1,
        2..=4 => 4,
        _ => 8,
    }
}

const ROW_BLOCKS: [usize; 3] = [1, 4, 8];

fn decode_variant(dtype: DType, lanes: Lanes, rows: usize) -> String {
    format!(
        "attn_decode<{}, {}, {}, {rows}>",
        type_tag(dtype),
        lanes.lpk,
        lanes.vpl
    )
}

fn mma_variant(dtype: DType, d: usize, dv: usize, t: MmaTiles) -> String {
    format!(
        "attn_decode_mma<{}, {d}, {dv}, {}, {}, {}, {}>",
        type_tag(dtype),
        t.warps,
        t.stages,
        t.keys,
        t.load
    )
}

/// Bytes of dynamic shared memory of a tensor-core decode block: the Q tile (rows padded by 8
/// elements) and `warps * stages` tiles of `keys` K and V rows, swizzled and unpadded when
/// `d` and `dv` are multiples of 64, padded by 8 elements otherwise (`SW` in the kernel).
fn mma_shared_bytes(d: usize, dv: usize, t: MmaTiles, elem: usize) -> usize {
    let pad = kv_row_pad(d, dv);
    (MMA_ROWS * (d + 8) + t.warps * t.stages * t.keys * (d + pad + dv + pad)) * elem
}

fn combine_variant(dtype: DType) -> String {
    format!("attn_decode_combine<{}>", type_tag(dtype))
}

/// Every instantiation of `attn_decode.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in DTYPES {
        for lanes in lane_layouts(dtype) {
            for rows in ROW_BLOCKS {
                out.push(decode_variant(dtype, lanes, rows));
            }
        }
        out.push(combine_variant(dtype));
        if matches!(dtype, DType::F16 | DType::BF16) {
            for &((d, dv), t) in &MMA_HEAD_DIMS {
                out.push(mma_variant(dtype, d, dv, t));
            }
        }
    }
    out
}

/// The number of key ranges and their length for `t_kv` keys when `base_blocks` blocks
/// serve one range each and `resident` blocks fit on the GPU at once.
fn split_plan(t_kv: usize, base_blocks: u64, resident: u64) -> (usize, usize) {
    let target = TARGET_WAVES * resident.max(1);
    let wanted = if base_blocks >= target {
        1
    } else {
        target.div_ceil(base_blocks.max(1)) as usize
    };
    let splits = wanted
        .min(t_kv.div_ceil(MIN_SPLIT_KEYS))
        .clamp(1, MAX_SPLITS);
    let len = t_kv
        .div_ceil(splits)
        .div_ceil(SPLIT_ALIGN)
        .max(1)
        .saturating_mul(SPLIT_ALIGN);
    (t_kv.div_ceil(len).max(1), len)
}

/// The number of key ranges and their length for the tensor-core decode: `base_blocks` blocks
/// per range, `resident` blocks on the GPU at once. Picks the fewest splits whose grid fills
/// its last wave of blocks to at least 85% of the best fill any split count reaches (so the
/// blocks of the last wave do not leave most of the GPU idle), with ranges of at least
/// [`MMA_MIN_SPLIT_KEYS`] keys; `forced` (the `FERROFAST_DECODE_SPLITS` knob) overrides.
fn split_plan_mma(
    t_kv: usize,
    base_blocks: u64,
    resident: u64,
    forced: Option<usize>,
) -> (usize, usize) {
    let most = (t_kv / MMA_MIN_SPLIT_KEYS).clamp(1, MAX_SPLITS);
    let fill = |s: usize| {
        let waves = (base_blocks.max(1) * s as u64) as f64 / resident.max(1) as f64;
        waves / waves.ceil()
    };
    let wanted = match forced {
        Some(n) => n.clamp(1, MAX_SPLITS),
        None if base_blocks >= resident => 1,
        None => {
            let best = (1..=most).map(fill).fold(0.0, f64::max);
            (1..=most).find(|&s| fill(s) >= 0.85 * best).unwrap_or(1)
        }
    };
    let len = t_kv
        .div_ceil(wanted.max(1))
        .div_ceil(SPLIT_ALIGN)
        .max(1)
        .saturating_mul(SPLIT_ALIGN);
    (t_kv.div_ceil(len).max(1), len)
}

/// The tensor-core decode's tiles for `(d, dv)`, if it takes them.
pub(super) fn mma_tiles(d: usize, dv: usize) -> Option<MmaTiles> {
    MMA_HEAD_DIMS
        .iter()
        .find(|(dims, _)| *dims == (d, dv))
        .map(|&(_, t)| t)
}

/// The `FERROFAST_DECODE_*` tuning knobs (module docs), read once.
struct DecodeKnobs {
    splits: Option<usize>,
    stages: Option<usize>,
    warps: Option<usize>,
    keys: Option<usize>,
    load: Option<usize>,
}

fn decode_knobs() -> &'static DecodeKnobs {
    static KNOBS: std::sync::OnceLock<DecodeKnobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(|| {
        let num = |name: &str, lo: usize, hi: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|v| (lo..=hi).contains(v))
        };
        DecodeKnobs {
            splits: num("FERROFAST_DECODE_SPLITS", 1, MAX_SPLITS),
            stages: num("FERROFAST_DECODE_STAGES", 2, 8),
            warps: num("FERROFAST_DECODE_WARPS", 1, 8).filter(|w| w.is_power_of_two()),
            keys: num("FERROFAST_DECODE_TILE", 16, 64).filter(|k| [16, 32, 64].contains(k)),
            load: num("FERROFAST_DECODE_LOAD", 0, 3),
        }
    })
}

/// Which decode kernel [`super::select()`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Variant {
    /// `attn_decode`.
    Simt,
    /// `attn_decode_mma`.
    Mma,
}

/// A decode kernel with its launch shape.
#[derive(Clone, Copy, Debug)]
enum DecodeKernel {
    /// `attn_decode` with this lane layout.
    Simt(Lanes),
    /// `attn_decode_mma` with these tiles.
    Mma(MmaTiles),
}

/// The launch shape of `variant` for `(d, dv)` of `dtype`: the tables' choices, with the
/// tuning knobs applied (knobs asking for more shared memory than a block can have are
/// ignored).
fn kernel_for(variant: Variant, dtype: DType, d: usize, dv: usize) -> Result<DecodeKernel> {
    let missing = || {
        Error::Unsupported(format!(
            "{OP} no {variant:?} decode kernel for D {d}, D_v {dv} and {dtype}"
        ))
    };
    match variant {
        Variant::Simt => decode_lanes(dtype, d.max(dv))
            .map(DecodeKernel::Simt)
            .ok_or_else(missing),
        Variant::Mma => {
            let tiles = mma_tiles(d, dv).ok_or_else(missing)?;
            let knobs = decode_knobs();
            let tuned = MmaTiles {
                warps: knobs.warps.unwrap_or(tiles.warps),
                stages: knobs.stages.unwrap_or(tiles.stages),
                keys: knobs.keys.unwrap_or(tiles.keys),
                load: knobs.load.unwrap_or(tiles.load),
            };
            Ok(DecodeKernel::Mma(
                if mma_shared_bytes(d, dv, tuned, dtype.size()) <= MMA_MAX_SHARED {
                    tuned
                } else {
                    tiles
                },
            ))
        }
    }
}

/// Runs the decode kernel `variant` (chosen by [`super::select()`]) on `stream`.
///
/// # Errors
/// `Error::Unsupported` for grids past the CUDA limits; compile and driver errors.
pub(super) fn run(c: &SdpaArgs, stream: &Stream, variant: Variant) -> Result<Array> {
    let kernel = kernel_for(variant, c.dtype, c.k.shape()[3], c.out_shape[3])?;
    let dtype = c.dtype;
    let ordinal = stream.ordinal();
    let device = runtime::device(ordinal)?;
    let [b, nq, tq, dv] = c.out_shape;
    let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
    let group = nq / nkv;
    let rows = group * tq;
    let r = match kernel {
        DecodeKernel::Simt(_) => rows_per_block(rows),
        DecodeKernel::Mma(_) => MMA_ROWS,
    };
    let n_chunks = rows.div_ceil(r);

    let k = vector_operand(&c.k, stream)?;
    let v = vector_operand(&c.v, stream)?;
    let (qb, kb, vb) = (
        buffer(&c.q, "q", ordinal)?,
        buffer(&k, "k", ordinal)?,
        buffer(&v, "v", ordinal)?,
    );
    let mask = mask_arg(c, ordinal)?;
    let sinks = sinks_arg(c, ordinal)?;

    let (name, threads, smem) = match kernel {
        DecodeKernel::Simt(lanes) => (decode_variant(dtype, lanes, r), DECODE_THREADS, 0),
        DecodeKernel::Mma(t) => (
            mma_variant(dtype, d, dv, t),
            (32 * t.warps) as u32,
            mma_shared_bytes(d, dv, t, dtype.size()),
        ),
    };
    let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
    if smem > 0 {
        allow_shared_memory(&func, smem, "the decode kernel")?;
    }
    let base_blocks = (b * nkv * n_chunks) as u64;
    let resident = resident_blocks(&device, &name, &func, threads, smem)?;
    let (n_splits, split_len) = match kernel {
        DecodeKernel::Simt(_) => split_plan(tkv, base_blocks, resident),
        DecodeKernel::Mma(_) => split_plan_mma(tkv, base_blocks, resident, decode_knobs().splits),
    };
    let blocks = base_blocks * n_splits as u64;
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{OP} {blocks} decode blocks exceed the CUDA grid limit"
            ))
        })?;

    let params = AttnParams {
        n_row_chunks: to_i32(n_chunks, "a row block count")?,
        n_splits: n_splits as i32,
        split_len: to_i32(split_len, "a split length")?,
        ..AttnParams::new(c, [&c.q, &k, &v], &mask, sinks)?
    };

    let n_out = b * nq * tq * dv;
    let mut out = CudaBuffer::alloc(&device, stream, dtype, n_out)?;
    // f32 workspaces for the partial accumulators (slots x D_v) and (max, sum) per slot.
    let slots = b * nq * tq * n_splits;
    let mut workspace = if n_splits > 1 {
        Some((
            CudaBuffer::alloc(&device, stream, DType::F32, slots * dv)?,
            CudaBuffer::alloc(&device, stream, DType::F32, slots * 2)?,
        ))
    } else {
        None
    };
    let null: u64 = 0;
    let cu = stream.cuda();
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    {
        let mut builder = cu.launch_builder(&func);
        push_inputs(&mut builder, [qb, kb, vb], &mask, sinks, &null);
        builder.arg(out.slice_mut());
        match &mut workspace {
            Some((acc, ml)) => builder.arg(acc.slice_mut()).arg(ml.slice_mut()),
            None => builder.arg(&null).arg(&null),
        };
        builder.arg(&params);
        // SAFETY: the arguments match the parameters of attn_decode and attn_decode_mma
        // (the same list) in order and type; the mma kernel uses exactly `smem` bytes of
        // dynamic shared memory, allowed above. Block
        // (chunk, split, b, kv head) reads q rows (b, h, t) for the h and t of its rows, at
        // the strides of q's view; key and value rows j < T_kv of (b, kv head), D and D_v
        // elements each, at unit stride from 16-byte aligned starts (vector_operand made
        // sure); mask entries (b, h, t, j) and sinks[h] inside their views. It writes output
        // rows below B * N_q * T_q (D_v elements each) or, with splits, workspace slots below
        // B * N_q * T_q * n_splits, the sizes allocated above.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    if let Some((acc, ml)) = &workspace {
        let name = combine_variant(dtype);
        let combine = jit::function(&device, &REGISTERED.file, &name, &[])?;
        let rows_out = u32::try_from(b * nq * tq).map_err(|_| {
            Error::Unsupported(format!("{OP} too many output rows for the combine kernel"))
        })?;
        let cfg = LaunchConfig {
            grid_dim: (rows_out, 1, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = cu.launch_builder(&combine);
        builder.arg(acc.slice()).arg(ml.slice());
        match sinks {
            Some((s, _, _)) => builder.arg(s.slice()),
            None => builder.arg(&null),
        };
        builder.arg(out.slice_mut()).arg(&params);
        // SAFETY: the arguments match attn_decode_combine's parameters. Block `row` reads
        // the n_splits workspace slots of its output row (written by the launch above on the
        // same stream), sinks[h], and writes D_v elements of output row `row` < B * N_q * T_q.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    Array::from_cuda_buffer(out, &c.out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_layouts_cover_the_head() {
        for dtype in DTYPES {
            let per_vec = 16 / dtype.size();
            for w in (8..=256).step_by(8) {
                let l = decode_lanes(dtype, w).unwrap();
                assert!(l.lpk * l.vpl * per_vec >= w, "{dtype} {w}");
                assert!(lane_layouts(dtype).contains(&l), "{dtype} {w} {l:?}");
            }
            assert_eq!(decode_lanes(dtype, 0), None);
        }
        assert_eq!(decode_lanes(DType::F32, 257), None);
        assert_eq!(
            decode_lanes(DType::BF16, 128),
            Some(Lanes { lpk: 16, vpl: 1 })
        );
    }

    #[test]
    fn splits_fill_the_gpu_and_cover_the_keys() {
        // The decode shape: 64 (batch, kv head) pairs on 132 SMs.
        let (n, len) = split_plan(32768, 64, 132 * 4);
        assert!(n * 64 >= 2 * 132 * 4, "{n}");
        assert!(n * len >= 32768 && (n - 1) * len < 32768);
        assert_eq!(len % SPLIT_ALIGN, 0);
        for tkv in [0usize, 1, 255, 256, 257, 1000, 4096, 100_000, 1 << 22] {
            for base in [1u64, 7, 64, 5000] {
                let (n, len) = split_plan(tkv, base, 528);
                assert!((1..=MAX_SPLITS).contains(&n), "{tkv} {base}");
                assert!(n * len >= tkv, "{tkv} {base}");
                assert!(n == 1 || (n - 1) * len < tkv, "{tkv} {base}: empty split");
            }
        }
        assert_eq!(split_plan(100_000, 5000, 528).0, 1);
    }

    #[test]
    fn mma_splits_fill_the_last_wave_and_cover_the_keys() {
        // The decode shape: 64 (batch, kv head) pairs, two blocks per SM on 132 SMs:
        // 4 ranges of 8192 keys, 256 blocks in one wave of 264.
        assert_eq!(split_plan_mma(32768, 64, 264, None), (4, 8192));
        // Enough blocks already: one range.
        assert_eq!(split_plan_mma(32768, 264, 264, None).0, 1);
        // Short caches keep ranges of at least MMA_MIN_SPLIT_KEYS keys.
        assert_eq!(split_plan_mma(300, 1, 264, None).0, 1);
        assert_eq!(split_plan_mma(1025, 1, 264, None).0, 2);
        // The knob is obeyed (within 1..=MAX_SPLITS) and never leaves an empty range.
        assert_eq!(split_plan_mma(32768, 64, 264, Some(16)), (16, 2048));
        for tkv in [
            0usize,
            1,
            15,
            16,
            17,
            511,
            512,
            513,
            4999,
            32768,
            100_000,
            1 << 22,
        ] {
            for base in [1u64, 3, 64, 500, 5000] {
                for forced in [None, Some(1), Some(7), Some(256)] {
                    let (n, len) = split_plan_mma(tkv, base, 264, forced);
                    assert!((1..=MAX_SPLITS).contains(&n), "{tkv} {base} {forced:?}");
                    assert!(n * len >= tkv && len % SPLIT_ALIGN == 0, "{tkv} {base}");
                    assert!(n == 1 || (n - 1) * len < tkv, "{tkv} {base}: empty split");
                }
            }
        }
    }

    #[test]
    fn mma_tiles_fit_the_shared_memory() {
        for &((d, dv), t) in &MMA_HEAD_DIMS {
            let bytes = mma_shared_bytes(d, dv, t, 2);
            // 227 KB per block at most; two blocks per SM below 113 KB each, except the rows
            // planned as one block per SM (D = 256, and D = 128 with 8 warps).
            assert!(bytes <= MMA_MAX_SHARED, "({d}, {dv}): {bytes}");
            let one_block = d >= 256 || (d == 128 && t.warps == 8);
            assert!(one_block || bytes <= 112 * 1024, "({d}, {dv}): {bytes}");
            // The end-of-block merge reuses the stages as 16 x D_v f32 per warp.
            let q_bytes = MMA_ROWS * (d + 8) * 2;
            assert!((bytes - q_bytes) / t.warps >= MMA_ROWS * dv * 4);
            assert_eq!(mma_tiles(d, dv), Some(t));
        }
        assert_eq!(mma_tiles(72, 72), None);
        assert_eq!(mma_tiles(128, 64), None);
    }

    #[test]
    fn every_plan_has_a_compiled_variant() {
        let all = variants();
        for dtype in DTYPES {
            for w in [8usize, 64, 72, 128, 136, 200, 256] {
                let lanes = decode_lanes(dtype, w).unwrap();
                for rows in 1..40 {
                    let v = decode_variant(dtype, lanes, rows_per_block(rows));
                    assert!(all.contains(&v), "{v}");
                }
            }
            assert!(all.contains(&combine_variant(dtype)));
            for &((d, dv), t) in &MMA_HEAD_DIMS {
                let v = mma_variant(dtype, d, dv, t);
                assert_eq!(all.contains(&v), dtype != DType::F32, "{v}");
            }
        }
    }
}
