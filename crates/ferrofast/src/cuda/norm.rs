//! Launchers for `kernels/norm.cu`: RMS norm and layer norm forward over the last axis.
//!
//! The front end (`fast::rms_norm` / `fast::layer_norm`) validates the call into a
//! `NormArgs`; [`run`] casts x, weight and bias to the output dtype on the stream and picks a
//! kernel variant (every kernel is one template for both norms, `K` = `ff_rms` or
//! `ff_layer`):
//! - rows of up to 256 * N_READS elements (2048 f16/bf16, 1024 f32): a group of 4-32 lanes
//!   of a warp per row, several rows per 256-thread block, the row held in registers in its
//!   storage type and reduced with shuffles alone (`norm_group`);
//! - longer rows of up to 4096 * N_READS elements (N_READS = 16 / element size: 16384 f32, 32768
//!   f16/bf16): one block per row with the row held in registers (`norm_rows`), 1, 2 or 4
//!   chunks of N_READS elements per thread;
//! - longer rows: `norm_looped`, 1024 threads looping over the row;
//! - 16-byte vector accesses when every row, the weight and the bias are 16-byte aligned
//!   with unit stride and D % N_READS == 0; scalar accesses otherwise (odd D, offsets).

use super::copy::{copy_cast, row_len_i32, row_stride, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{driver_error, launch, resident_blocks, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::norm::{NormArgs, NormKind, NormVjpArgs};
use crate::Array;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// `kernels/norm.cu`: RMS norm and layer norm forward.
/// Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("norm.cu", include_str!("kernels/norm.cu")),
    variants: all_variants,
};

/// Threads per block of the looped variants.
const LOOPED_BLOCK: u32 = 1024;

/// Most threads a one-row-per-block launch uses; rows needing more are looped.
const ROWS_MAX_THREADS: usize = 1024;

/// Which kernel instantiation serves a row length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// `g` lanes per row, `GROUP_BLOCK / g` rows per block, `chunks` register chunks per
    /// lane (`norm_group`).
    Group { g: usize, chunks: usize },
    /// One block of `threads` per row, `chunks` register chunks per thread.
    Rows { chunks: usize, threads: u32 },
    /// One block of LOOPED_BLOCK threads per row, looping.
    Looped,
}

/// Threads per block of the `norm_group` kernels (`FF_GROUP_BLOCK` in norm.cu).
const GROUP_BLOCK: usize = 256;

/// Register chunks per lane the `norm_group` kernels are instantiated with (lanes per row 32).
const GROUP_CHUNKS: [usize; 5] = [1, 2, 4, 8, 16];

/// Elements one thread loads with a 16-byte vector.
fn n_reads(dtype: DType) -> usize {
    16 / dtype.size()
}

/// The chunk count the environment variable `name` holds when it is one of `allowed`, else
/// `default` (unset, unparsable or not allowed): the norm kernels' tuning knobs.
fn chunk_knob(name: &str, allowed: &[usize], default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| allowed.contains(v))
        .unwrap_or(default)
}

/// Most register chunks per lane a `norm_group` plan may use: 8, or the value of the
/// environment variable `FERROFAST_NORM_GROUP_CHUNKS` (1, 2, 4, 8 or 16) read once, a tuning
/// knob; rows needing more go to the one-block-per-row kernels. On an H200, bf16 rows of 4096
/// ran at 66% of copy with 16 chunks a lane (low occupancy) and 93% one block per row.
fn group_max_chunks() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| chunk_knob("FERROFAST_NORM_GROUP_CHUNKS", &GROUP_CHUNKS, 8))
}

/// Fewest register chunks per thread a one-block-per-row plan uses: 1, or the value of the
/// environment variable `FERROFAST_NORM_ROWS_CHUNKS` (1, 2 or 4) read once, a tuning knob
/// (more chunks: fewer threads per row, more rows resident per SM).
fn rows_min_chunks() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| chunk_knob("FERROFAST_NORM_ROWS_CHUNKS", &[1, 2, 4], 1))
}

fn plan(d: usize, dtype: DType) -> Plan {
    let threads_needed = d.div_ceil(n_reads(dtype)).max(1);
    // Rows of up to 256 vectors (2048 bf16 / f16, 1024 f32): a group of lanes per row, with
    // at most 8 chunks (32 registers of data) per lane.
    if threads_needed <= 32 {
        return Plan::Group {
            g: threads_needed.next_power_of_two().max(4),
            chunks: 1,
        };
    }
    if let Some(&chunks) = GROUP_CHUNKS
        .iter()
        .take_while(|&&c| c <= group_max_chunks())
        .find(|&&c| c * 32 >= threads_needed)
    {
        return Plan::Group { g: 32, chunks };
    }
    let chunks = if threads_needed <= 256 {
        1
    } else if threads_needed <= 512 {
        2
    } else if threads_needed <= 4 * ROWS_MAX_THREADS {
        4
    } else {
        return Plan::Looped;
    };
    let chunks = chunks.max(rows_min_chunks());
    let threads = threads_needed.div_ceil(chunks).div_ceil(32) * 32;
    Plan::Rows {
        chunks,
        threads: threads as u32,
    }
}

fn variant(kind: NormKind, dtype: DType, plan: Plan, aligned: bool) -> String {
    // The kernels' K template argument.
    let k = match kind {
        NormKind::Rms => "ff_rms",
        NormKind::Layer => "ff_layer",
    };
    let t = type_tag(dtype);
    match plan {
        Plan::Group { g, chunks } => format!("norm_group<{k}, {t}, {g}, {chunks}, {aligned}>"),
        Plan::Rows { chunks, .. } => format!("norm_rows<{k}, {t}, {chunks}, {aligned}>"),
        Plan::Looped => format!("norm_looped<{k}, {t}, {aligned}>"),
    }
}

/// Every instantiation of `norm.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for kind in [NormKind::Rms, NormKind::Layer] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for aligned in [true, false] {
                for chunks in [1, 2, 4] {
                    out.push(variant(
                        kind,
                        dtype,
                        Plan::Rows { chunks, threads: 0 },
                        aligned,
                    ));
                }
                out.push(variant(kind, dtype, Plan::Looped, aligned));
                for g in [4, 8, 16] {
                    out.push(variant(kind, dtype, Plan::Group { g, chunks: 1 }, aligned));
                }
                for chunks in GROUP_CHUNKS {
                    out.push(variant(kind, dtype, Plan::Group { g: 32, chunks }, aligned));
                }
                for chunks in VJP_CHUNKS {
                    let plan = VjpPlan::Rows { chunks, threads: 0 };
                    out.push(vjp_variant(kind, dtype, plan, aligned));
                }
            }
            for chunks in VJP_WARP_CHUNKS {
                out.push(vjp_variant(kind, dtype, VjpPlan::Warp { chunks }, true));
            }
            out.push(vjp_variant(kind, dtype, VjpPlan::Looped, false));
        }
    }
    out.push(VJP_REDUCE.to_string());
    out
}

/// Runs a validated `rms_norm` / `layer_norm` call on `stream` (whose device holds the
/// inputs): x, the weight and the bias are cast to the output dtype there first (as MLX's
/// front end does), then one kernel writes a new row-major array of `x`'s shape:
/// `y = round(norm(x)) * w (+ b)`, with f32 statistics (two-pass variance) and the weight
/// multiply and bias add each rounded to the output dtype, as MLX.
///
/// # Errors
/// `Error::Unsupported` for output dtypes other than f32, f16 and bf16 (f64 stays on the
/// CPU) and rows past the kernels' 32-bit indices; compile and driver errors.
pub(crate) fn run(args: &NormArgs, stream: &Stream) -> Result<Array> {
    let (kind, dtype) = (args.kind, args.dtype);
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!(
            "[{}] the CUDA kernels take float32, float16 and bfloat16, not {dtype}; compute \
             {dtype} on the CPU",
            kind.op()
        )));
    }
    let cast = |a: &Array| -> Result<Array> {
        if a.dtype() == dtype {
            Ok(a.clone())
        } else {
            copy_cast(a, dtype, Some(stream))
        }
    };
    let x = cast(&args.x)?;
    let w = args.weight.as_ref().map(cast).transpose()?;
    let b = args.bias.as_ref().map(cast).transpose()?;
    norm(kind, &x, w.as_ref(), b.as_ref(), args.eps, dtype, stream)
}

/// The scalar parameters of the backward kernels (`ff_norm_params` in `kernels/norm.cu`,
/// same C layout), passed by value: offsets and strides in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct NormParams {
    x_offset: i64,
    x_row_stride: i64,
    w_offset: i64,
    w_stride: i64,
    b_offset: i64,
    b_stride: i64,
    n_rows: i64,
    d: i32,
    eps: f32,
}

// SAFETY: `NormParams` is `repr(C)` plain data whose layout matches `ff_norm_params`.
unsafe impl DeviceRepr for NormParams {}

/// A 1-D parameter (weight or bias) as the kernel sees it.
struct Param<'a> {
    buffer: &'a CudaBuffer,
    offset: i64,
    stride: i64,
}

fn param<'a>(kind: NormKind, name: &str, p: Option<&'a Array>) -> Result<Option<Param<'a>>> {
    let Some(p) = p else {
        return Ok(None);
    };
    Ok(Some(Param {
        buffer: gpu_buffer(kind, name, p)?,
        offset: p.offset() as i64,
        stride: p.strides()[0] as i64,
    }))
}

/// The device buffer of an input the front end placed on the stream's device.
fn gpu_buffer<'a>(kind: NormKind, name: &str, a: &'a Array) -> Result<&'a CudaBuffer> {
    a.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "[{}] the CUDA kernel got {name} on {}",
            kind.op(),
            a.device()
        ))
    })
}

fn norm(
    kind: NormKind,
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    eps: f32,
    out_dtype: DType,
    stream: &Stream,
) -> Result<Array> {
    let device = gpu_buffer(kind, "x", x)?.device();
    let d = x.shape()[x.ndim() - 1];
    let wp = param(kind, "weight", w)?;
    let bp = param(kind, "bias", b)?;
    let n = x.size();
    if n == 0 {
        let out = CudaBuffer::alloc(device, stream, out_dtype, 0)?;
        return Array::from_cuda_buffer(out, x.shape());
    }
    // Element indices are 32-bit in the kernels, with room for one more block of loads.
    let d_i32 = row_len_i32(d, || {
        format!(
            "[{}] rows of {d} elements exceed the CUDA kernels' limit of 2^31 - 2^16",
            kind.op()
        )
    })?;

    // Rows must be addressable by one stride with a unit last stride; copy otherwise.
    let contiguous_copy;
    let (x, rs) = match row_stride(x) {
        Some(rs) => (x, rs),
        None => {
            contiguous_copy = copy_cast(x, out_dtype, Some(stream))?;
            (&contiguous_copy, d as i64)
        }
    };
    let src = x
        .cuda_buffer()
        .ok_or_else(|| Error::Device("contiguous copy left the GPU".into()))?;
    let n_rows = (n / d) as i64;

    let size = out_dtype.size();
    let reads = n_reads(out_dtype);
    let param_aligned = |p: &Option<Param>| {
        p.as_ref()
            .is_none_or(|p| p.stride == 1 && p.buffer.is_aligned(p.offset as usize, 16))
    };
    let aligned = d.is_multiple_of(reads)
        && src.is_aligned(x.offset(), 16)
        && (rs * size as i64).rem_euclid(16) == 0
        && param_aligned(&wp)
        && param_aligned(&bp);
    let mut plan = plan(d, out_dtype);
    let mut func = jit::function(
        device,
        &REGISTERED.file,
        &variant(kind, out_dtype, plan, aligned),
        &[],
    )?;
    let max_threads = func
        .max_threads_per_block()
        .map_err(|e| driver_error("reading a kernel's thread limit", e))?
        .max(32) as u32;
    // The kernels are compiled for 1024-thread blocks; should a device still allow fewer,
    // rows that need more threads go to the looped kernel, and it uses what is allowed.
    if let Plan::Rows { threads, .. } = plan {
        if threads > max_threads {
            plan = Plan::Looped;
            func = jit::function(
                device,
                &REGISTERED.file,
                &variant(kind, out_dtype, plan, aligned),
                &[],
            )?;
        }
    }
    let (threads, blocks) = match plan {
        Plan::Group { g, .. } => {
            let rows_per_block = (GROUP_BLOCK / g) as i64;
            let blocks = (n_rows + rows_per_block - 1) / rows_per_block;
            let blocks = u32::try_from(blocks).map_err(|_| {
                Error::Unsupported(format!(
                    "[{}] {n_rows} rows exceed the CUDA grid's limit",
                    kind.op()
                ))
            })?;
            (GROUP_BLOCK as u32, blocks)
        }
        Plan::Rows { threads, .. } => (threads, n_rows.min(i32::MAX as i64) as u32),
        Plan::Looped => (
            LOOPED_BLOCK.min(max_threads / 32 * 32),
            n_rows.min(i32::MAX as i64) as u32,
        ),
    };

    let mut out = CudaBuffer::alloc(device, stream, out_dtype, n)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let null: u64 = 0;
    let zero: i64 = 0;
    let x_offset = x.offset() as i64;
    let cu = stream.cuda();
    let mut builder = cu.launch_builder(&func);
    builder.arg(src.slice()).arg(&x_offset).arg(&rs);
    for p in [&wp, &bp] {
        match p {
            Some(p) => builder.arg(p.buffer.slice()).arg(&p.offset).arg(&p.stride),
            None => builder.arg(&null).arg(&zero).arg(&zero),
        };
    }
    builder
        .arg(out.slice_mut())
        .arg(&n_rows)
        .arg(&d_i32)
        .arg(&eps);
    let what = format!("launching {}", variant(kind, out_dtype, plan, aligned));
    // SAFETY: the arguments match the kernel's parameters in order and type. Rows are read
    // at x_offset + r * rs + [0, d) for r < n_rows, which is inside x's view; weight and bias
    // at offset + i * stride for i < d, inside their views; the output holds n_rows * d
    // elements. Vector accesses are used only when the alignment checks above hold.
    launch(&what, || unsafe { builder.launch(cfg) }.map(|_| ()))?;
    Array::from_cuda_buffer(out, x.shape())
}

/// Register chunks per thread of the backward's one-block-per-row kernel; rows needing more
/// than [`VJP_MAX_THREADS`] threads with the largest go to the looped kernel.
const VJP_CHUNKS: [usize; 2] = [1, 2];

/// Threads per block of the backward kernels (`FF_NORM_VJP_THREADS`, their
/// `__launch_bounds__`).
const VJP_MAX_THREADS: usize = 512;

/// The column-sum kernel of the backward and its block shape (`FF_REDUCE_ROWS` in norm.cu).
const VJP_REDUCE: &str = "norm_vjp_reduce";
const VJP_REDUCE_ROWS: u32 = 32;

/// Register chunks per lane of the backward's warp-per-row kernel (`norm_vjp_warp`).
const VJP_WARP_CHUNKS: [usize; 3] = [1, 2, 4];

/// Warps (rows at a time) per block of `norm_vjp_warp` (`FF_NORM_VJP_WARPS` in norm.cu).
const VJP_WARPS: u32 = 4;

/// Which backward kernel serves rows of `d` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VjpPlan {
    /// A warp per row, `chunks` register chunks per lane (`norm_vjp_warp`; aligned rows of
    /// at most `32 * 4` vectors only).
    Warp { chunks: usize },
    /// A block of `threads` per row, `chunks` register chunks per thread (`norm_vjp_rows`).
    Rows { chunks: usize, threads: u32 },
    /// A block of [`VJP_MAX_THREADS`] per row, looping over it (`norm_vjp_looped`).
    Looped,
}

impl VjpPlan {
    /// Threads per block.
    fn threads(self) -> u32 {
        match self {
            VjpPlan::Warp { .. } => 32 * VJP_WARPS,
            VjpPlan::Rows { threads, .. } => threads,
            VjpPlan::Looped => VJP_MAX_THREADS as u32,
        }
    }

    /// Rows a block takes at a time.
    fn rows_per_block(self) -> usize {
        match self {
            VjpPlan::Warp { .. } => VJP_WARPS as usize,
            VjpPlan::Rows { .. } | VjpPlan::Looped => 1,
        }
    }
}

/// Fewest register chunks per thread a one-block-per-row backward plan uses: 1, or the value
/// of the environment variable `FERROFAST_NORM_VJP_CHUNKS` (1 or 2) read once, a tuning knob
/// (2: half the threads per row, two blocks resident per multiprocessor).
fn vjp_min_chunks() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| chunk_knob("FERROFAST_NORM_VJP_CHUNKS", &VJP_CHUNKS, 1))
}

/// The backward kernel for rows of `d` elements of `dtype`, `aligned` as the launcher's
/// checks say (16-byte vectors everywhere); one-block-per-row plans use at least
/// `min_chunks` register chunks per thread.
fn vjp_plan(d: usize, dtype: DType, aligned: bool, min_chunks: usize) -> VjpPlan {
    let needed = d.div_ceil(n_reads(dtype)).max(1);
    if aligned {
        if let Some(&chunks) = VJP_WARP_CHUNKS.iter().find(|&&c| needed <= 32 * c) {
            return VjpPlan::Warp { chunks };
        }
    }
    for chunks in VJP_CHUNKS.into_iter().filter(|&c| c >= min_chunks) {
        let threads = needed.div_ceil(chunks).div_ceil(32) * 32;
        if threads <= VJP_MAX_THREADS {
            return VjpPlan::Rows {
                chunks,
                threads: threads as u32,
            };
        }
    }
    VjpPlan::Looped
}

fn vjp_variant(kind: NormKind, dtype: DType, plan: VjpPlan, aligned: bool) -> String {
    let k = match kind {
        NormKind::Rms => "ff_rms",
        NormKind::Layer => "ff_layer",
    };
    let t = type_tag(dtype);
    match plan {
        VjpPlan::Warp { chunks } => format!("norm_vjp_warp<{k}, {t}, {chunks}>"),
        VjpPlan::Rows { chunks, .. } => format!("norm_vjp_rows<{k}, {t}, {chunks}, {aligned}>"),
        VjpPlan::Looped => format!("norm_vjp_looped<{k}, {t}>"),
    }
}

/// The scalar parameters of the backward kernels (`ff_norm_vjp_params` in
/// `kernels/norm.cu`, same C layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct NormVjpParams {
    f: NormParams,
    g_offset: i64,
    g_row_stride: i64,
}

// SAFETY: `NormVjpParams` is `repr(C)` plain data whose layout matches `ff_norm_vjp_params`.
unsafe impl DeviceRepr for NormVjpParams {}

/// Runs a validated `rms_norm_vjp` / `layer_norm_vjp` call on `stream`: `x`, the weight and
/// the cotangent are cast to the forward's output dtype there (as MLX's graph does), one
/// kernel writes `dx` and per-block f32 partial sums of `dweight` / `dbias`, and a second adds
/// the partials in block order (deterministic on a given device, no atomics). `dx` comes back
/// in `x`'s dtype, `dweight` / `dbias` in the weight's / bias's (one rounding from f32 each).
///
/// # Errors
/// `Error::Unsupported` for output dtypes other than f32, f16 and bf16 and rows past the
/// kernels' 32-bit indices; compile and driver errors.
pub(crate) fn vjp(
    args: &NormVjpArgs,
    stream: &Stream,
) -> Result<(Array, Option<Array>, Option<Array>)> {
    let fwd = &args.fwd;
    let (kind, dtype) = (fwd.kind, fwd.dtype);
    let op = format!("[{}_vjp]", kind.op());
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!(
            "{op} the CUDA kernels take float32, float16 and bfloat16, not {dtype}; compute \
             {dtype} on the CPU"
        )));
    }
    // Inputs in the compute dtype, with rows addressable by one stride (copies otherwise).
    let rows = |a: &Array| -> Result<(Array, i64)> {
        if a.dtype() == dtype {
            if let Some(rs) = row_stride(a) {
                return Ok((a.clone(), rs));
            }
        }
        let c = copy_cast(a, dtype, Some(stream))?;
        Ok((c, *a.shape().last().unwrap_or(&1) as i64))
    };
    let shape = fwd.x.shape().to_vec();
    let d = *shape.last().unwrap_or(&1);
    let n = fwd.x.size();
    let (x, xrs) = rows(&fwd.x)?;
    let (g, grs) = rows(&args.cotangent)?;
    // A strided weight is copied too (D values): the kernel plan then depends on x and g
    // alone, so strided and contiguous weights give the same bits.
    let w = match &fwd.weight {
        Some(w) if w.dtype() != dtype || !w.is_contiguous() => {
            Some(copy_cast(w, dtype, Some(stream))?)
        }
        other => other.clone(),
    };
    let want_dw = fwd.weight.is_some();
    let want_db = kind == NormKind::Layer && fwd.bias.is_some();
    let device = gpu_buffer(kind, "x", &x)?.device().clone();
    let mut dx = CudaBuffer::alloc(&device, stream, dtype, n)?;
    let mut dw_sum = CudaBuffer::alloc(&device, stream, DType::F32, if want_dw { d } else { 0 })?;
    let mut db_sum = CudaBuffer::alloc(&device, stream, DType::F32, if want_db { d } else { 0 })?;

    let d_i32 = row_len_i32(d, || {
        format!("{op} rows of {d} elements exceed the CUDA kernels' limit of 2^31 - 2^16")
    })?;
    if n > 0 && d > 0 {
        let n_rows = n / d;
        let (xb, gb) = (
            gpu_buffer(kind, "x", &x)?,
            gpu_buffer(kind, "cotangent", &g)?,
        );
        let wp = param(kind, "weight", w.as_ref())?;
        let size = dtype.size() as i64;
        let aligned = d.is_multiple_of(n_reads(dtype))
            && xb.is_aligned(x.offset(), 16)
            && gb.is_aligned(g.offset(), 16)
            && (xrs * size).rem_euclid(16) == 0
            && (grs * size).rem_euclid(16) == 0
            && wp
                .as_ref()
                .is_none_or(|p| p.stride == 1 && p.buffer.is_aligned(p.offset as usize, 16));
        let plan = vjp_plan(d, dtype, aligned, vjp_min_chunks());
        let threads = plan.threads();
        let name = vjp_variant(kind, dtype, plan, aligned);
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        let resident = resident_blocks(&device, &name, &func, threads, 0)?;
        let blocks = (n_rows.div_ceil(plan.rows_per_block()) as u64)
            .min(resident)
            .max(1);
        let parts = blocks as usize;
        let part_len = |want: bool| if want { parts * d } else { 0 };
        let mut dw_part = CudaBuffer::alloc(&device, stream, DType::F32, part_len(want_dw))?;
        let mut db_part = CudaBuffer::alloc(&device, stream, DType::F32, part_len(want_db))?;
        let params = NormVjpParams {
            f: NormParams {
                x_offset: x.offset() as i64,
                x_row_stride: xrs,
                w_offset: wp.as_ref().map_or(0, |p| p.offset),
                w_stride: wp.as_ref().map_or(0, |p| p.stride),
                b_offset: 0,
                b_stride: 0,
                n_rows: n_rows as i64,
                d: d_i32,
                eps: fwd.eps,
            },
            g_offset: g.offset() as i64,
            g_row_stride: grs,
        };
        let null: u64 = 0;
        let cu = stream.cuda();
        let mut builder = cu.launch_builder(&func);
        builder.arg(xb.slice());
        match &wp {
            Some(p) => builder.arg(p.buffer.slice()),
            None => builder.arg(&null),
        };
        builder.arg(gb.slice()).arg(dx.slice_mut());
        for (want, part) in [(want_dw, &mut dw_part), (want_db, &mut db_part)] {
            if want {
                builder.arg(part.slice_mut());
            } else {
                builder.arg(&null);
            }
        }
        builder.arg(&params);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&format!("launching {name}"), || {
            // SAFETY: the arguments match the kernel's parameters in order and type
            // (`NormVjpParams` is `ff_norm_vjp_params`). Rows r < n_rows of x and g are read at
            // offset + r * row stride + [0, d), inside their views (unit last stride); the weight
            // at offset + i * stride for i < d; dx holds n_rows * d elements and each partial
            // buffer blocks * d, of which block b writes [b * d, (b + 1) * d). Vector accesses
            // only when the alignment checks above hold.
            unsafe { builder.launch(cfg) }.map(|_| ())
        })?;
        let reduce = jit::function(&device, &REGISTERED.file, VJP_REDUCE, &[])?;
        let parts_i32 = i32::try_from(parts).map_err(|_| {
            Error::Unsupported(format!(
                "{op} {parts} partial sums exceed the reduction's limit"
            ))
        })?;
        for (want, part, sum) in [
            (want_dw, &dw_part, &mut dw_sum),
            (want_db, &db_part, &mut db_sum),
        ] {
            if !want {
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(32) as u32, 1, 1),
                block_dim: (32, VJP_REDUCE_ROWS, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = cu.launch_builder(&reduce);
            builder
                .arg(part.slice())
                .arg(&parts_i32)
                .arg(&d_i32)
                .arg(sum.slice_mut());
            launch("launching norm_vjp_reduce", || {
                // SAFETY: norm_vjp_reduce(part, n_parts, D, out): reads part[p * D + i] for
                // p < parts, i < d (the buffer holds parts * d values written above on this
                // stream) and writes out[i] for i < d.
                unsafe { builder.launch(cfg) }.map(|_| ())
            })?;
        }
    }
    let dx = Array::from_cuda_buffer(dx, &shape)?;
    let dx = if dx.dtype() == args.dx_dtype() {
        dx
    } else {
        copy_cast(&dx, args.dx_dtype(), Some(stream))?
    };
    let finish = |sum: CudaBuffer, like: &Option<Array>| -> Result<Option<Array>> {
        let Some(like) = like else { return Ok(None) };
        if n == 0 {
            // No rows: the sums are zero.
            return Array::zeros(&[d], like.dtype(), &fwd.device).map(Some);
        }
        let a = Array::from_cuda_buffer(sum, &[d])?;
        Ok(Some(if like.dtype() == DType::F32 {
            a
        } else {
            copy_cast(&a, like.dtype(), Some(stream))?
        }))
    };
    let dw = finish(dw_sum, &fwd.weight)?;
    let db = if want_db {
        finish(db_sum, &fwd.bias)?
    } else {
        None
    };
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_plans() {
        let warp = |chunks| VjpPlan::Warp { chunks };
        let rows = |chunks, threads| VjpPlan::Rows { chunks, threads };
        for (d, dt, aligned, want) in [
            (8, DType::BF16, true, warp(1)),
            (256, DType::BF16, true, warp(1)),
            (264, DType::BF16, true, warp(2)),
            (1024, DType::BF16, true, warp(4)),
            (1024, DType::BF16, false, rows(1, 128)),
            (512, DType::F32, true, warp(4)),
            (1024, DType::F32, true, rows(1, 256)),
            (1032, DType::BF16, true, rows(1, 160)),
            (4096, DType::BF16, true, rows(1, 512)),
            (8192, DType::BF16, true, rows(2, 512)),
            (8200, DType::BF16, true, VjpPlan::Looped),
        ] {
            assert_eq!(
                vjp_plan(d, dt, aligned, 1),
                want,
                "D {d} {dt} aligned {aligned}"
            );
        }
        assert_eq!(vjp_plan(4096, DType::BF16, true, 2), rows(2, 256));
        assert_eq!(vjp_plan(1024, DType::BF16, true, 2), warp(4));
        assert_eq!(warp(4).threads(), 128);
        assert_eq!(warp(4).rows_per_block(), 4);
        assert_eq!(rows(1, 160).rows_per_block(), 1);
        assert!(all_variants().contains(&"norm_vjp_warp<ff_layer, ff_bf16, 4>".to_string()));
    }

    #[test]
    fn plans_cover_rows_and_switch_to_looped() {
        let group = |g, chunks| Plan::Group { g, chunks };
        let rows = |chunks, threads| Plan::Rows { chunks, threads };
        for (d, dt, want) in [
            (1, DType::F32, group(4, 1)),
            (128, DType::BF16, group(16, 1)),
            (128, DType::F32, group(32, 1)),
            (1024, DType::BF16, group(32, 4)),
            (1024, DType::F32, group(32, 8)),
            (2048, DType::BF16, group(32, 8)),
            (2048, DType::F32, rows(2, 256)),
            (4096, DType::BF16, rows(2, 256)),
            (2049, DType::F32, rows(4, 160)),
            (4096, DType::F32, rows(4, 256)),
            (4099, DType::F32, rows(4, 288)),
            (8192, DType::BF16, rows(4, 256)),
            (16384, DType::F32, rows(4, 1024)),
            (16385, DType::F32, Plan::Looped),
            (32768, DType::F16, rows(4, 1024)),
            (32769, DType::F16, Plan::Looped),
        ] {
            assert_eq!(plan(d, dt), want, "d {d} {dt}");
        }
        for d in [1usize, 7, 31, 33, 100, 1000, 2049, 4099, 9999, 16384] {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                match plan(d, dt) {
                    Plan::Rows { chunks, threads } => {
                        assert!(chunks * threads as usize * n_reads(dt) >= d, "d {d} {dt}");
                        assert!(threads as usize <= ROWS_MAX_THREADS && threads % 32 == 0);
                    }
                    Plan::Group { g, chunks } => {
                        assert!(g * chunks * n_reads(dt) >= d, "d {d} {dt}");
                        assert!(GROUP_BLOCK.is_multiple_of(g) && g <= 32);
                    }
                    Plan::Looped => {}
                }
            }
        }
    }

    #[test]
    fn every_plan_has_a_compiled_variant() {
        let all = all_variants();
        for d in [
            1usize, 5, 17, 33, 100, 128, 600, 1024, 3000, 4096, 20000, 70000,
        ] {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for kind in [NormKind::Rms, NormKind::Layer] {
                    for aligned in [true, false] {
                        let v = variant(kind, dt, plan(d, dt), aligned);
                        assert!(all.contains(&v), "{v} missing");
                    }
                }
            }
        }
    }
}
