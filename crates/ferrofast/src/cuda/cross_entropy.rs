//! Launchers for `kernels/cross_entropy.cu`: the cross-entropy loss, its backward and the
//! fused training pass.
//!
//! One block per row. The loss alone runs `ce_looped<T, ALIGNED, false>`: up to 256
//! threads stride over the row with four 16-byte loads in flight each, so every logit is
//! read once and several rows share a multiprocessor. The gradient passes (backward and
//! fused) run `ce_regs` when the row fits in registers (1024 threads of up to 4 vectors:
//! 32768 f16 / bf16 or 16384 f32 logits), reading each logit once, and
//! `ce_looped<T, ALIGNED, true>` with 1024 threads otherwise, which reads the row a second
//! time to write the gradient (from L2 while the row is still there: a 128k-class bf16 row
//! is 256 KB, and with one such block per multiprocessor the rows in flight fit in L2). The targets are made contiguous int64 first (a copy of
//! `rows * 8` bytes when they are not). `Sum` and `Mean` add the per-row losses in a second,
//! one-block kernel (`ce_reduce`) in a fixed order; the mean's `1 / n_valid` comes from
//! `ce_count_valid` over the targets, launched before the row kernel so the gradient can be
//! scaled in the same pass. Nothing reads the logits more than the kernels above say.

use super::copy::{copy_cast, row_len_i32, row_stride, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{launch, Stream};
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
/// Threads per block of the loss-only pass at most.
const FORWARD_THREADS: usize = 256;
/// Threads per block of `ce_regs` at most (`FF_CE_REGS_THREADS`).
const REGS_THREADS: usize = 1024;
/// Vectors in flight per thread of `ce_looped` (`FF_CE_U`).
const LOOPED_UNROLL: usize = 4;
/// Register chunks per thread `ce_regs` is instantiated with.
const REGS_CHUNKS: [usize; 3] = [1, 2, 4];
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
    /// `ce_regs` with `chunks` vectors per thread and `threads` per block.
    Regs { chunks: usize, threads: u32 },
}

/// The loss alone: about four rounds of [`LOOPED_UNROLL`] vectors per thread, at most
/// [`FORWARD_THREADS`] threads, so several rows share a multiprocessor and one row's
/// reduction overlaps another's loads.
fn forward_plan(v: usize, dtype: DType) -> Plan {
    let vectors = v.div_ceil(n_reads(dtype)).max(1);
    let threads = vectors.div_ceil(4 * LOOPED_UNROLL).div_ceil(32) * 32;
    Plan::Looped {
        threads: threads.clamp(32, FORWARD_THREADS) as u32,
    }
}

/// The plan of a gradient pass over rows of `v` logits.
fn grad_plan(v: usize, dtype: DType) -> Plan {
    let vectors = v.div_ceil(n_reads(dtype)).max(1);
    for chunks in REGS_CHUNKS {
        let threads = vectors.div_ceil(chunks).div_ceil(32) * 32;
        if threads <= REGS_THREADS {
            return Plan::Regs {
                chunks,
                threads: threads as u32,
            };
        }
    }
    // Longer rows: the whole block strides over the row, so few rows are in flight and
    // their second read finds them in L2 (132 rows of 128k bf16 logits are 33 MB).
    Plan::Looped {
        threads: LOOPED_THREADS as u32,
    }
}

fn variant(dtype: DType, plan: Plan, aligned: bool, grad: bool) -> String {
    let t = type_tag(dtype);
    match plan {
        Plan::Looped { .. } => format!("ce_looped<{t}, {aligned}, {grad}>"),
        Plan::Regs { chunks, .. } => format!("ce_regs<{t}, {aligned}, {chunks}>"),
    }
}

/// Every instantiation of `cross_entropy.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for aligned in [true, false] {
            for grad in [false, true] {
                out.push(variant(dtype, Plan::Looped { threads: 0 }, aligned, grad));
            }
            for chunks in REGS_CHUNKS {
                out.push(variant(
                    dtype,
                    Plan::Regs { chunks, threads: 0 },
                    aligned,
                    true,
                ));
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
    let blocks = u32::try_from(rows)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "[cross_entropy] {rows} rows exceed the CUDA grid's limit of 2^31 - 1"
            ))
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
        launch("launching ce_count_valid", || {
            // SAFETY: ce_count_valid(targets, n_rows, has_ignore, ignore, out) reads
            // targets[0..n_rows) (contiguous int64, `rows` elements) and writes out[0..2).
            unsafe { b.launch(cfg) }.map(|_| ())
        })?;
    }

    let mut losses = CudaBuffer::alloc(&device, stream, DType::F32, rows)?;
    let in_place = matches!(grad, Grad::ImpliedInPlace);
    let fresh = want_grad && !in_place;
    let mut dx = CudaBuffer::alloc(&device, stream, dtype, if fresh { n } else { 0 })?;
    if rows > 0 {
        let aligned = v % n_reads(dtype) == 0
            && xb.is_aligned(x.offset(), 16)
            && (rs * dtype.size() as i64).rem_euclid(16) == 0;
        let plan = if want_grad {
            grad_plan(v, dtype)
        } else {
            forward_plan(v, dtype)
        };
        let name = variant(dtype, plan, aligned, want_grad);
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        let threads = match plan {
            Plan::Looped { threads } | Plan::Regs { threads, .. } => threads,
        };
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
            shared_mem_bytes: 0,
        };
        launch(&format!("launching {name}"), || {
            // SAFETY: the arguments match the kernel's parameters in order and type (`CeParams`
            // is `ff_ce_params`). Row r < rows of the logits is read at x_offset + r * rs +
            // [0, v), inside the view (unit last stride); targets[0..rows) are contiguous int64;
            // losses hold `rows` floats and dx (when written) rows * v elements; the cotangent
            // holds `rows` floats (g_stride 1) or one (g_stride 0); the count buffer two floats.
            // Vector accesses only when the alignment checks above hold.
            unsafe { b.launch(cfg) }.map(|_| ())
        })?;
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
        launch("launching ce_reduce", || {
            // SAFETY: ce_reduce(losses, n, count, out) reads losses[0..rows) written above on
            // this stream (nothing when rows is 0), count[1] when given, and writes out[0].
            unsafe { b.launch(cfg) }.map(|_| ())
        })?;
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
            1usize, 7, 31, 128, 1000, 4096, 16384, 32768, 32769, 50257, 128256,
        ] {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                for grad in [false, true] {
                    let plan = if grad {
                        grad_plan(v, dt)
                    } else {
                        forward_plan(v, dt)
                    };
                    match plan {
                        Plan::Regs { chunks, threads } => {
                            assert!(chunks * threads as usize * n_reads(dt) >= v, "{v} {dt}");
                            assert!(threads as usize <= REGS_THREADS && threads % 32 == 0);
                        }
                        Plan::Looped { threads } => {
                            assert!((32..=LOOPED_THREADS as u32).contains(&threads));
                            assert!(threads % 32 == 0);
                        }
                    }
                    for aligned in [true, false] {
                        let name = variant(dt, plan, aligned, grad);
                        assert!(all.contains(&name), "{name} missing");
                    }
                }
            }
        }
        assert_eq!(
            grad_plan(32768, DType::BF16),
            Plan::Regs {
                chunks: 4,
                threads: 1024
            }
        );
        assert_eq!(
            grad_plan(128256, DType::BF16),
            Plan::Looped { threads: 1024 }
        );
    }
}
