//! Launchers for `kernels/cross_entropy.cu`: the cross-entropy loss, its backward and the
//! fused training pass.
//!
//! The loss alone over rows whose starts are 16-byte aligned, of at least 128 KiB (64 KiB
//! when the call has at least eight rows a block), runs `ce_stream`: two persistent blocks
//! of 256 threads a multiprocessor stream their rows through rings of 16 KiB slots of shared
//! memory (six on Hopper, four on the A100), each thread keeping five (three) slots of its
//! own loads in flight across the rows' merges, with online statistics; while one block
//! merges a row the other computes. Every other pass runs `ce_rows` when a row fits in the
//! registers of one block or of a cluster of up to eight (sm_90 and later): each block of at
//! most 256 threads holds its slice of the row, 2, 8 or 16 vectors of 16 bytes per thread,
//! so every logit is read from memory once, for the gradient passes (backward and fused)
//! too, and several rows share a multiprocessor. Rows of up to 262144 f16 / bf16 or 131072
//! f32 logits fit (32768 / 16384 without clusters). Longer rows run `ce_looped`: one block
//! strides over the row (up to 256 threads for the loss, with four 16-byte loads in flight
//! each; 1024 for the gradient, which reads the row a second time, from L2 while it is
//! still there). The targets are made contiguous int64 first (a copy of `rows * 8` bytes
//! when they are not). `Sum` and `Mean` add the per-row losses in a second, one-block
//! kernel (`ce_reduce`) in a fixed order; the mean's `1 / n_valid` comes from
//! `ce_count_valid` over the targets, launched before the row kernel so the gradient can be
//! scaled in the same pass. Nothing reads the logits more than the kernels above say.
//!
//! Knobs, read once per process: `FERROFAST_CE_CLUSTER` (1, 2, 4 or 8; default 8) caps the
//! cluster size; `FERROFAST_CE_STREAM=0` turns `ce_stream` off, `=1` lets it take every
//! aligned row of at least one slot; `FERROFAST_CE_STREAM_THREADS=512` runs it as one block
//! of 512 threads a multiprocessor (32 KiB slots).

use super::copy::{copy_cast, row_len_i32, row_stride, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{allow_dynamic_shared_memory, launch_kernel, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::cross_entropy::{CrossEntropyArgs, CrossEntropyVjpArgs, Reduction};
use crate::Array;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// `kernels/cross_entropy.cu`. Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("cross_entropy.cu", include_str!("kernels/cross_entropy.cu")),
    variants: all_variants,
};

/// Threads per block of `ce_looped` at most (`FF_CE_LOOPED_THREADS`), the gradient pass's
/// block for rows too long for registers.
const LOOPED_THREADS: usize = 1024;
/// Threads per block of the loss-only `ce_looped` at most.
const FORWARD_THREADS: usize = 256;
/// Vectors in flight per thread of `ce_looped` (`FF_CE_U`).
const LOOPED_UNROLL: usize = 4;
/// Threads per block of `ce_rows` at most (`FF_CE_ROWS_THREADS`).
const ROWS_THREADS: usize = 256;
/// The cluster sizes of `ce_rows` (more than 1 only with clusters).
const ROWS_CLUSTERS: [usize; 4] = [1, 2, 4, 8];
/// The (cluster sizes, register chunks per thread) of `ce_rows` in the order tried: one
/// block with 2, 8 or 16 chunks first (a cluster's barriers cost more than the occupancy
/// that 16 chunks lose: H100, run 72), then clusters with 8 chunks, then with 16.
const ROWS_ROUNDS: [(&[usize], &[usize]); 3] =
    [(&[1], &[2, 8, 16]), (&[2, 4, 8], &[8]), (&[2, 4, 8], &[16])];
/// Caps the cluster size of `ce_rows` (1, 2, 4 or 8).
const CLUSTER_KNOB: &str = "FERROFAST_CE_CLUSTER";
/// `ce_stream` for the loss alone: `0` off (`ce_rows` or `ce_looped` then), `1` on every
/// aligned row of at least one ring slot; otherwise as [`stream_min_row`] says.
const STREAM_KNOB: &str = "FERROFAST_CE_STREAM";
/// Threads per block of `ce_stream`: 256 (two blocks a multiprocessor, so one merges a row
/// while the other computes) unless `FERROFAST_CE_STREAM_THREADS=512` (one block).
const STREAM_THREADS_KNOB: &str = "FERROFAST_CE_STREAM_THREADS";
/// The block sizes `ce_stream` is instantiated with; a multiprocessor holds 512 / threads.
const STREAM_THREAD_COUNTS: [u32; 2] = [512, 256];
/// Bytes a thread loads into one ring slot: 4 vectors of 16 bytes (`FF_CE_STREAM_U`).
const STREAM_THREAD_SLOT: usize = 4 * 16;
/// Rows of at least this many bytes take `ce_stream` by default (H100, run 74: 128256 bf16
/// logits a row 0.75x `ce_rows`'s time; f32 rows of 128 KiB level with it).
const STREAM_MIN_ROW: usize = 128 * 1024;
/// Rows of at least this many bytes take `ce_stream` when the call has at least
/// [`STREAM_MANY_ROWS`] rows a block (run 74: `[8192, 32768]` bf16 0.98x `ce_rows`'s time,
/// `[1024, 32768]` 1.06x: with a few rows a block the ring's fill and drain are not hidden).
const STREAM_MIN_ROW_MANY: usize = 64 * 1024;
/// See [`STREAM_MIN_ROW_MANY`].
const STREAM_MANY_ROWS: usize = 8;
/// Ring slots `ce_stream` is instantiated with, the most first: six on Hopper (192 KiB a
/// multiprocessor), four on the A100 (128 KiB).
const STREAM_STAGES: [usize; 2] = [6, 4];
/// Shared memory a block takes besides its ring (the block merge and the driver's
/// reservation), rounded up.
const STREAM_BLOCK_OVERHEAD: usize = 2048;
/// Threads of the one-block kernels `ce_count_valid` and `ce_reduce`.
const REDUCE_THREADS: u32 = 1024;
const COUNT: &str = "ce_count_valid";
const REDUCE: &str = "ce_reduce";

/// Elements one thread loads with a 16-byte vector.
fn n_reads(dtype: DType) -> usize {
    16 / dtype.size()
}

/// Which kernel serves a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// `ce_looped` with `threads` per block.
    Looped { threads: u32 },
    /// `ce_rows` with clusters of `cluster` blocks of `threads`, `chunks` vectors per thread,
    /// `slice` logits per block.
    Rows {
        chunks: usize,
        cluster: usize,
        threads: u32,
        slice: usize,
    },
    /// `ce_stream` with blocks of `threads` and a ring of `stages` slots (the loss alone).
    Stream { stages: usize, threads: u32 },
}

impl Plan {
    /// `(threads per block, blocks per cluster, logits per block of a row, dynamic shared
    /// memory)` of the launch.
    fn launch_shape(self) -> (u32, usize, usize, usize) {
        match self {
            Plan::Looped { threads } => (threads, 1, 0, 0),
            Plan::Rows {
                threads,
                cluster,
                slice,
                ..
            } => (threads, cluster, slice, 0),
            Plan::Stream { stages, threads } => (threads, 1, 0, stages * stream_slot(threads)),
        }
    }
}

/// What the device and the logits allow, for [`plan`].
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// The largest `ce_rows` cluster: 1 without clusters, else [`Knobs::cluster`].
    max_cluster: usize,
    /// The threads of a `ce_stream` block and the most ring slots the blocks of a
    /// multiprocessor hold (0: no `ce_stream`).
    stream_threads: u32,
    stream_stages: usize,
    /// The shortest row, in bytes, `ce_stream` takes.
    stream_min_row: usize,
    /// Rows 16-byte aligned, `V` a multiple of the vector width.
    aligned: bool,
}

/// `ce_stream`'s setting ([`STREAM_KNOB`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamKnob {
    Off,
    EveryRow,
    Default,
}

/// The knobs, read from the environment once per process (launches stay free of it).
#[derive(Clone, Copy, Debug)]
struct Knobs {
    /// The largest `ce_rows` cluster allowed ([`CLUSTER_KNOB`]; 8 by default).
    cluster: usize,
    stream: StreamKnob,
    /// [`STREAM_THREADS_KNOB`]: 256 or 512.
    stream_threads: u32,
}

fn knobs() -> Knobs {
    static KNOBS: std::sync::OnceLock<Knobs> = std::sync::OnceLock::new();
    *KNOBS.get_or_init(|| {
        let var = |name| std::env::var(name).unwrap_or_default().trim().to_string();
        Knobs {
            cluster: var(CLUSTER_KNOB)
                .parse::<usize>()
                .ok()
                .filter(|c| ROWS_CLUSTERS.contains(c))
                .unwrap_or(8),
            stream: match var(STREAM_KNOB).as_str() {
                "0" => StreamKnob::Off,
                "1" => StreamKnob::EveryRow,
                _ => StreamKnob::Default,
            },
            stream_threads: if var(STREAM_THREADS_KNOB) == "512" {
                512
            } else {
                256
            },
        }
    })
}

/// Bytes of one `ce_stream` ring slot for blocks of `threads`.
fn stream_slot(threads: u32) -> usize {
    threads as usize * STREAM_THREAD_SLOT
}

/// `ce_stream` blocks of `threads` a multiprocessor holds (all resident at once).
fn stream_blocks_per_sm(threads: u32) -> usize {
    (512 / threads) as usize
}

impl Caps {
    /// The capabilities of `device` for `rows` rows of logits, `aligned` or not.
    fn of(device: &super::runtime::CudaDevice, rows: usize, aligned: bool) -> Caps {
        let k = knobs();
        let per_sm = stream_blocks_per_sm(k.stream_threads);
        let slot = stream_slot(k.stream_threads);
        let optin = device.max_shared_optin();
        let stream_stages = STREAM_STAGES
            .into_iter()
            .find(|&s| {
                k.stream != StreamKnob::Off && per_sm * (s * slot + STREAM_BLOCK_OVERHEAD) <= optin
            })
            .unwrap_or(0);
        Caps {
            max_cluster: if device.has_clusters() { k.cluster } else { 1 },
            stream_threads: k.stream_threads,
            stream_stages,
            stream_min_row: if k.stream == StreamKnob::EveryRow {
                slot
            } else {
                stream_min_row(rows, device.sm_count() as usize * per_sm)
            },
            aligned,
        }
    }
}

/// The shortest row, in bytes, that `ce_stream` takes by default in a call of `rows` rows
/// with `blocks` resident blocks.
fn stream_min_row(rows: usize, blocks: usize) -> usize {
    if rows >= STREAM_MANY_ROWS * blocks {
        STREAM_MIN_ROW_MANY
    } else {
        STREAM_MIN_ROW
    }
}

/// The `ce_rows` plan for rows of `v` logits, or `None` when a row does not fit in the
/// registers of `max_cluster` blocks: the first of [`ROWS_ROUNDS`] that holds the row, with
/// the fewest threads (a multiple of 32) that hold a block's slice.
fn rows_plan(v: usize, dtype: DType, max_cluster: usize) -> Option<Plan> {
    let n = n_reads(dtype);
    let vectors = v.div_ceil(n).max(1);
    for (clusters, chunk_counts) in ROWS_ROUNDS {
        for &cluster in clusters.iter().filter(|&&c| c <= max_cluster) {
            let per = vectors.div_ceil(cluster);
            for &chunks in chunk_counts {
                let threads = per.div_ceil(chunks).div_ceil(32) * 32;
                if threads <= ROWS_THREADS {
                    return Some(Plan::Rows {
                        chunks,
                        cluster,
                        threads: threads as u32,
                        slice: per * n,
                    });
                }
            }
        }
    }
    None
}

/// The plan of a pass over rows of `v` logits: for the loss alone over aligned rows of at
/// least `caps.stream_min_row` bytes, `ce_stream` where the device has the shared memory;
/// else `ce_rows`
/// when the row fits; else `ce_looped` (for the loss alone about four rounds of
/// [`LOOPED_UNROLL`] vectors per thread, at most [`FORWARD_THREADS`] threads; for the
/// gradient [`LOOPED_THREADS`], so few rows are in flight and their second read finds them
/// in L2).
fn plan(v: usize, dtype: DType, grad: bool, caps: Caps) -> Plan {
    if !grad
        && caps.aligned
        && caps.stream_stages > 0
        && v * dtype.size() >= caps.stream_min_row.max(stream_slot(caps.stream_threads))
    {
        return Plan::Stream {
            stages: caps.stream_stages,
            threads: caps.stream_threads,
        };
    }
    if let Some(p) = rows_plan(v, dtype, caps.max_cluster) {
        return p;
    }
    if grad {
        return Plan::Looped {
            threads: LOOPED_THREADS as u32,
        };
    }
    let vectors = v.div_ceil(n_reads(dtype)).max(1);
    let threads = vectors.div_ceil(4 * LOOPED_UNROLL).div_ceil(32) * 32;
    Plan::Looped {
        threads: threads.clamp(32, FORWARD_THREADS) as u32,
    }
}

fn variant(dtype: DType, plan: Plan, aligned: bool, grad: bool) -> String {
    let t = type_tag(dtype);
    match plan {
        Plan::Looped { .. } => format!("ce_looped<{t}, {aligned}, {grad}>"),
        Plan::Rows {
            chunks, cluster, ..
        } => {
            format!("ce_rows<{t}, {aligned}, {grad}, {chunks}, {cluster}>")
        }
        Plan::Stream { stages, threads } => format!("ce_stream<{t}, {stages}, {threads}>"),
    }
}

/// Every instantiation of `cross_entropy.cu` a launch can ask for (2 chunks only ever come
/// with a cluster of 1: a row that needs two blocks of 2 fits one block of 8).
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for aligned in [true, false] {
            for grad in [false, true] {
                out.push(variant(dtype, Plan::Looped { threads: 0 }, aligned, grad));
                if aligned && !grad {
                    for stages in STREAM_STAGES {
                        for threads in STREAM_THREAD_COUNTS {
                            let p = Plan::Stream { stages, threads };
                            out.push(variant(dtype, p, aligned, grad));
                        }
                    }
                }
                for chunks in [2, 8, 16] {
                    for cluster in ROWS_CLUSTERS {
                        if chunks == 2 && cluster > 1 {
                            continue;
                        }
                        let p = Plan::Rows {
                            chunks,
                            cluster,
                            threads: 0,
                            slice: 0,
                        };
                        out.push(variant(dtype, p, aligned, grad));
                    }
                }
            }
        }
    }
    out.push(COUNT.to_string());
    out.push(REDUCE.to_string());
    out
}

/// `ff_ce_params` in `kernels/cross_entropy.cu`, same C layout, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CeParams {
    x_offset: i64,
    x_row_stride: i64,
    n_rows: i64,
    ignore_index: i64,
    g_stride: i64,
    has_ignore: i32,
    v: i32,
    one_minus_eps: f32,
    eps: f32,
    eps_over_v: f32,
    z: f32,
    slice: i32,
}

// SAFETY: `CeParams` is `repr(C)` plain data whose layout matches `ff_ce_params`.
unsafe impl DeviceRepr for CeParams {}

fn buffer<'a>(name: &str, a: &'a Array) -> Result<&'a CudaBuffer> {
    a.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "[cross_entropy] the CUDA kernel got {name} on {}",
            a.device()
        ))
    })
}

/// What one launch of the row kernel computes besides the per-row losses.
enum Grad<'a> {
    /// The loss only.
    None,
    /// `dlogits` with the cotangent `g` (f32, contiguous; one value per row, or one scalar
    /// for every row), and for the mean the `ce_count_valid` buffer as scale.
    Cotangent(&'a CudaBuffer, i64),
    /// `dlogits` of the reduced loss (cotangent 1, times `1 / n_valid` for the mean).
    Implied,
    /// As `Implied`, written over the logits (which own their whole row-major buffer, or
    /// view memory lent for writing).
    ImpliedInPlace,
}

/// The row kernel and the reductions: returns `(loss, dlogits)`.
fn launch_rows(
    args: &CrossEntropyArgs,
    stream: &Stream,
    grad: Grad<'_>,
) -> Result<(Array, Option<Array>)> {
    let dtype = args.logits.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!(
            "[cross_entropy] the CUDA kernels take float32, float16 and bfloat16 logits, not \
             {dtype}; compute {dtype} on the CPU"
        )));
    }
    let (rows, v) = (args.rows, args.vocab);
    let v_i32 = row_len_i32(v, || {
        format!("[cross_entropy] rows of {v} logits exceed the CUDA kernels' limit of 2^31 - 2^16")
    })?;
    let n = rows
        .checked_mul(v)
        .ok_or_else(|| Error::Shape("[cross_entropy] logits size overflows usize".into()))?;
    let want_grad = !matches!(grad, Grad::None);

    // Logits with rows addressable by one stride (a copy otherwise); int64 targets.
    let copied;
    let (x, rs) = match row_stride(&args.logits) {
        Some(rs) => (&args.logits, rs),
        None => {
            copied = copy_cast(&args.logits, dtype, Some(stream))?;
            (&copied, v as i64)
        }
    };
    let targets = if args.targets.dtype() == DType::I64
        && args.targets.is_contiguous()
        && args.targets.offset() == 0
    {
        args.targets.clone()
    } else {
        copy_cast(&args.targets, DType::I64, Some(stream))?
    };
    let xb = buffer("logits", x)?;
    let tb = buffer("targets", &targets)?;
    let device = xb.device().clone();
    let cu = stream.cuda();

    let mean = args.opts.reduction == Reduction::Mean;
    let p = args.row_params();
    let null: u64 = 0;
    // The mean's count, first: the gradient pass scales by it.
    let mut count = CudaBuffer::alloc(&device, stream, DType::F32, if mean { 2 } else { 0 })?;
    if mean {
        let func = jit::function(&device, &REGISTERED.file, COUNT, &[])?;
        let n_rows = rows as i64;
        let has_ignore = i32::from(p.ignore.is_some());
        let ignore = p.ignore.unwrap_or(0);
        let mut b = cu.launch_builder(&func);
        b.arg(tb.slice())
            .arg(&n_rows)
            .arg(&has_ignore)
            .arg(&ignore)
            .arg(count.slice_mut());
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ce_count_valid(targets, n_rows, has_ignore, ignore, out) reads
        // targets[0..n_rows) (contiguous int64, `rows` elements) and writes out[0..2).
        unsafe { launch_kernel("ce_count_valid", &mut b, cfg) }?;
    }

    let mut losses = CudaBuffer::alloc(&device, stream, DType::F32, rows)?;
    let in_place = matches!(grad, Grad::ImpliedInPlace);
    let fresh = want_grad && !in_place;
    let mut dx = CudaBuffer::alloc(&device, stream, dtype, if fresh { n } else { 0 })?;
    if rows > 0 {
        let aligned = v % n_reads(dtype) == 0
            && xb.is_aligned(x.offset(), 16)
            && (rs * dtype.size() as i64).rem_euclid(16) == 0;
        let plan = plan(v, dtype, want_grad, Caps::of(&device, rows, aligned));
        let (threads, cluster, slice, smem) = plan.launch_shape();
        // ce_stream's blocks are persistent, all resident at once.
        let grid_rows = match plan {
            Plan::Stream { threads, .. } => {
                rows.min(device.sm_count() as usize * stream_blocks_per_sm(threads))
            }
            _ => rows,
        };
        let blocks = grid_rows
            .checked_mul(cluster)
            .and_then(|b| u32::try_from(b).ok())
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "[cross_entropy] {rows} rows of {cluster} blocks exceed the CUDA grid's \
                     limit of 2^31 - 1 blocks"
                ))
            })?;
        let name = variant(dtype, plan, aligned, want_grad);
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        allow_dynamic_shared_memory(&func, smem, &name)?;
        let params = CeParams {
            x_offset: x.offset() as i64,
            x_row_stride: rs,
            n_rows: rows as i64,
            ignore_index: p.ignore.unwrap_or(0),
            g_stride: match grad {
                Grad::Cotangent(_, stride) => stride,
                _ => 0,
            },
            has_ignore: i32::from(p.ignore.is_some()),
            v: v_i32,
            one_minus_eps: p.one_minus_eps,
            eps: p.eps,
            eps_over_v: p.eps_over_v,
            z: p.z,
            // At most the row length rounded up to a vector: below 2^31.
            slice: slice as i32,
        };
        let mut b = cu.launch_builder(&func);
        b.arg(xb.slice()).arg(tb.slice()).arg(losses.slice_mut());
        if in_place {
            // The gradient goes over the logits: the kernel reads every logit before the
            // thread that read it writes its gradient (kernels/cross_entropy.cu).
            b.arg(xb.slice());
        } else if want_grad {
            b.arg(dx.slice_mut());
        } else {
            b.arg(&null);
        }
        match grad {
            Grad::Cotangent(g, _) => b.arg(g.slice()),
            _ => b.arg(&null),
        };
        if want_grad && mean {
            b.arg(count.slice());
        } else {
            b.arg(&null);
        }
        b.arg(&params);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            // At most six slots of 32 KiB.
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match the kernel's parameters in order and type (`CeParams`
        // is `ff_ce_params`). Row r < rows of the logits is read at x_offset + r * rs +
        // [0, v), inside the view (unit last stride); targets[0..rows) are contiguous int64;
        // losses hold `rows` floats and dx (when written) rows * v elements; the cotangent
        // holds `rows` floats (g_stride 1) or one (g_stride 0); the count buffer two floats.
        // Vector accesses only when the alignment checks above hold.
        unsafe { launch_kernel(&name, &mut b, cfg) }?;
    }

    let loss = if args.opts.reduction == Reduction::None {
        Array::from_cuda_buffer(losses, args.targets.shape())?
    } else {
        let func = jit::function(&device, &REGISTERED.file, REDUCE, &[])?;
        let mut out = CudaBuffer::alloc(&device, stream, DType::F32, 1)?;
        let n_rows = rows as i64;
        let mut b = cu.launch_builder(&func);
        b.arg(losses.slice()).arg(&n_rows);
        if mean {
            b.arg(count.slice());
        } else {
            b.arg(&null);
        }
        b.arg(out.slice_mut());
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ce_reduce(losses, n, count, out) reads losses[0..rows) written above on
        // this stream (nothing when rows is 0), count[1] when given, and writes out[0].
        unsafe { launch_kernel("ce_reduce", &mut b, cfg) }?;
        Array::from_cuda_buffer(out, &[])?
    };
    let dlogits = if in_place {
        Some(x.clone())
    } else if want_grad {
        Some(Array::from_cuda_buffer(dx, args.logits.shape())?)
    } else {
        None
    };
    Ok((loss, dlogits))
}

/// Runs a validated `cross_entropy` call on `stream`: the loss, reduced as asked.
///
/// # Errors
/// `Error::Unsupported` for f64 logits, rows longer than the kernels' 32-bit indices or more
/// rows than a grid holds; compile and driver errors.
pub(crate) fn run(args: &CrossEntropyArgs, stream: &Stream) -> Result<Array> {
    launch_rows(args, stream, Grad::None).map(|(loss, _)| loss)
}

/// Runs a validated `cross_entropy_vjp` call on `stream`: `dlogits` in the logits' dtype.
///
/// # Errors
/// As [`run`].
pub(crate) fn vjp(args: &CrossEntropyVjpArgs, stream: &Stream) -> Result<Array> {
    let g = copy_cast(&args.cotangent, DType::F32, Some(stream))?;
    let stride = match args.fwd.opts.reduction {
        Reduction::None => 1,
        Reduction::Sum | Reduction::Mean => 0,
    };
    let gb = buffer("cotangent", &g)?;
    let (_, dx) = launch_rows(&args.fwd, stream, Grad::Cotangent(gb, stride))?;
    dx.ok_or_else(|| Error::Cuda("[cross_entropy_vjp] no gradient was written".into()))
}

/// Runs the fused training pass on `stream`: the reduced loss and `dlogits` of it.
///
/// # Errors
/// As [`run`].
pub(crate) fn fused(args: &CrossEntropyArgs, stream: &Stream) -> Result<(Array, Array)> {
    match launch_rows(args, stream, Grad::Implied)? {
        (loss, Some(dx)) => Ok((loss, dx)),
        (_, None) => Err(Error::Cuda(
            "[cross_entropy] the fused pass wrote no gradient".into(),
        )),
    }
}

/// The fused pass writing `dlogits` over the logits when they are the only handle on their
/// whole row-major buffer ([`Array::owns_whole_buffer`]; `args` holds that handle); any other
/// call runs [`fused`] into a new buffer.
///
/// # Errors
/// As [`run`].
pub(crate) fn fused_in_place(args: CrossEntropyArgs, stream: &Stream) -> Result<(Array, Array)> {
    let own = args.logits.owns_whole_buffer();
    // SAFETY: only ferrofast's own buffers are written (`own`).
    unsafe { in_place(args, stream, own) }
}

/// [`fused_in_place`], and for row-major f32 / f16 / bf16 logits over borrowed device memory
/// ([`Array::from_cuda_external`]) that are the only handle on it, the same pass over that
/// memory: `dlogits` is the logits array itself.
///
/// # Safety
/// When the logits view borrowed memory, its producer lends it for writing for this call:
/// writable, and nobody else reads or writes these elements until the work this call queues
/// on `stream` has finished.
///
/// # Errors
/// As [`run`].
pub(crate) unsafe fn fused_in_place_lent(
    args: CrossEntropyArgs,
    stream: &Stream,
) -> Result<(Array, Array)> {
    let writable = args.logits.is_sole_handle() && args.logits.is_contiguous();
    // SAFETY: the caller's contract lends borrowed memory for writing; ferrofast's own
    // buffers are written only when `args` holds the only handle on them.
    unsafe { in_place(args, stream, writable) }
}

/// # Safety
/// With `writable`, the logits' elements may be overwritten: ferrofast's own buffer with no
/// other handle, or memory lent for writing ([`fused_in_place_lent`]'s contract).
unsafe fn in_place(
    args: CrossEntropyArgs,
    stream: &Stream,
    writable: bool,
) -> Result<(Array, Array)> {
    let native = matches!(args.logits.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !native || !writable {
        return fused(&args, stream);
    }
    match launch_rows(&args, stream, Grad::ImpliedInPlace)? {
        (loss, Some(dx)) => Ok((loss, dx)),
        (_, None) => Err(Error::Cuda(
            "[cross_entropy] the fused pass wrote no gradient".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_the_row_and_have_variants() {
        let all = all_variants();
        for v in [
            1usize, 7, 31, 128, 1000, 4096, 16384, 32768, 32769, 50257, 128256, 256000, 300000,
        ] {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for max_cluster in ROWS_CLUSTERS {
                    for (stream_stages, stream_threads, stream_min_row) in [
                        (0, 256, STREAM_MIN_ROW),
                        (4, 256, STREAM_MIN_ROW_MANY),
                        (6, 256, STREAM_MIN_ROW),
                        (6, 512, stream_slot(512)),
                    ] {
                        for aligned in [true, false] {
                            for grad in [false, true] {
                                let caps = Caps {
                                    max_cluster,
                                    stream_threads,
                                    stream_stages,
                                    stream_min_row,
                                    aligned,
                                };
                                let plan = plan(v, dt, grad, caps);
                                check_plan(v, dt, grad, caps, plan);
                                let name = variant(dt, plan, aligned, grad);
                                assert!(all.contains(&name), "{name} missing");
                            }
                        }
                    }
                }
            }
        }
        let caps = |max_cluster| Caps {
            max_cluster,
            stream_threads: 256,
            stream_stages: 6,
            stream_min_row: STREAM_MIN_ROW,
            aligned: true,
        };
        let rows = |v, dt, c, grad| match plan(v, dt, grad, caps(c)) {
            Plan::Rows {
                chunks, cluster, ..
            } => Some((chunks, cluster)),
            Plan::Looped { .. } | Plan::Stream { .. } => None,
        };
        assert_eq!(rows(32768, DType::BF16, 8, true), Some((16, 1)));
        assert_eq!(rows(32768, DType::BF16, 1, true), Some((16, 1)));
        assert_eq!(rows(32768, DType::F32, 8, true), Some((8, 4)));
        assert_eq!(rows(128256, DType::BF16, 8, true), Some((8, 8)));
        assert_eq!(rows(128256, DType::BF16, 1, true), None);
        assert_eq!(rows(256000, DType::BF16, 8, true), Some((16, 8)));
        assert_eq!(rows(1000, DType::BF16, 8, true), Some((2, 1)));
        assert_eq!(rows(1000, DType::BF16, 8, false), Some((2, 1)));
        assert_eq!(rows(16383, DType::BF16, 8, false), Some((8, 1)));
        assert_eq!(rows(40000, DType::BF16, 8, true), Some((8, 4)));
        // The loss: rows of 128 KiB streamed; of 64 KiB with many rows a block.
        assert_eq!(
            plan(65536, DType::BF16, false, caps(8)),
            Plan::Stream {
                stages: 6,
                threads: 256
            }
        );
        assert_eq!(rows(32768, DType::BF16, 8, false), Some((16, 1)));
        assert_eq!(stream_min_row(1024, 264), STREAM_MIN_ROW);
        assert_eq!(stream_min_row(8192, 264), STREAM_MIN_ROW_MANY);
        let many = Caps {
            stream_min_row: stream_min_row(8192, 264),
            ..caps(8)
        };
        assert!(matches!(
            plan(32768, DType::BF16, false, many),
            Plan::Stream { threads: 256, .. }
        ));
        assert!(matches!(
            plan(32767, DType::BF16, false, many),
            Plan::Rows { .. }
        ));
        let every_row = Caps {
            stream_threads: 256,
            stream_min_row: stream_slot(256),
            ..caps(8)
        };
        assert_eq!(
            plan(8192, DType::BF16, false, every_row),
            Plan::Stream {
                stages: 6,
                threads: 256
            }
        );
    }

    /// A plan covers the row within its kernel's limits.
    fn check_plan(v: usize, dt: DType, grad: bool, caps: Caps, plan: Plan) {
        match plan {
            Plan::Rows {
                chunks,
                cluster,
                threads,
                slice,
            } => {
                assert!(cluster <= caps.max_cluster, "{v} {dt}");
                assert!(slice % n_reads(dt) == 0 && slice * cluster >= v);
                assert!(chunks * threads as usize * n_reads(dt) >= slice);
                assert!(threads as usize <= ROWS_THREADS && threads % 32 == 0);
            }
            Plan::Looped { threads } => {
                assert!(rows_plan(v, dt, caps.max_cluster).is_none());
                assert!((32..=LOOPED_THREADS as u32).contains(&threads));
                assert!(threads % 32 == 0);
            }
            Plan::Stream { stages, threads } => {
                assert!(!grad && caps.aligned && stages == caps.stream_stages);
                assert_eq!(threads, caps.stream_threads);
                let slot = stream_slot(threads);
                assert!(v * dt.size() >= slot.max(caps.stream_min_row));
                // The ring passes 48 KiB, so the launch opts in to it (the opt-in helper does
                // not count the kernel's static shared memory).
                assert!(stages * slot > 48 * 1024);
                assert_eq!(plan.launch_shape().3, stages * slot);
            }
        }
    }
}
