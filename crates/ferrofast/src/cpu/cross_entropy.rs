//! CPU kernels for `cross_entropy`, its backward and the fused training pass.
//!
//! One row of `V` logits at a time, rows spread over rayon. A row is read from memory once.
//! The first pass ([`scan`]) walks it in blocks of [`BLOCK`] elements: each block's maximum
//! (and NaN test, and sum for label smoothing) is taken first, then, the block in L1, the
//! running sum of `exp(x - max)` over it, rescaled when the maximum grows; the next block is
//! prefetched meanwhile (the AVX-512 forward takes a block in one pass against the running
//! maximum instead, see [`avx512`]). The loss needs nothing more. A gradient pass also keeps
//! each exponential in a per-thread f32 row ([`Scratch`], in L2 for any vocabulary a step
//! uses) with the running maximum of its block, and the second pass ([`write`]) scales them
//! into the output: one exponential per logit. A new output buffer is written with streaming
//! stores (no read of its cache lines first); the in-place pass rewrites the logits' own
//! lines, which the first pass brought into cache.
//!
//! Arithmetic is f32 (f64 for f64 logits). `exp` is a range-reduced `2^x`: the nearest
//! integer `n` of `x log2 e`, a degree-6 polynomial for `2^f` on `[-1/2, 1/2]` and `2^n`
//! built in the exponent bits. Three implementations of the passes, the first the CPU runs
//! chosen at run time ([`Isa::detect`]): [`avx512`] (AVX-512 F + BW + VL intrinsics, 32
//! logits a step), [`avx2`] (AVX2 + FMA + F16C intrinsics, 16 logits a step; both widen bf16
//! by shifts in registers and give the same bits for each exponential) and [`portable`]
//! (safe loops) elsewhere; rows whose maximum is infinite take a slower path with the
//! exponentials recomputed from the logits. Contiguous f32 / f16 / bf16 rows are read in
//! place; strided rows are gathered into a per-task row first.
//!
//! Per-row formulas: see `ops/cross_entropy.rs`. Reductions add the per-row losses in f64 in
//! row order, so every reduced result is deterministic.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
#[cfg(test)]
mod tests;

#[cfg(target_arch = "x86_64")]
use super::simd::{has_avx2_fma_f16c, Widen};
use crate::array::{host_pool, Array};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::cross_entropy::{
    CrossEntropyArgs, CrossEntropyVjpArgs, Reduction, RowParams, Target,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Elements per block of the first pass (16 KiB of f32: the block is still in L1 when it
/// is exponentiated, beside its exponentials and the next block being prefetched).
pub(super) const BLOCK: usize = 4096;
/// Below this many logits the op runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Runs a validated `cross_entropy` call on the CPU: the loss, reduced as asked.
pub(crate) fn run(args: &CrossEntropyArgs) -> Result<Array> {
    let targets = targets_i64(&args.targets)?;
    let losses = match args.logits.dtype() {
        DType::F64 => rows_f64(args, &targets, None)?.0,
        _ => rows_f32(args, &targets, None)?.0,
    };
    reduce(args, &targets, &losses)
}

/// Runs a validated `cross_entropy_vjp` call on the CPU: `dlogits` in the logits' dtype.
pub(crate) fn vjp(args: &CrossEntropyVjpArgs) -> Result<Array> {
    let fwd = &args.fwd;
    let targets = targets_i64(&fwd.targets)?;
    let g = args.cotangent.astype(DType::F64)?.to_vec::<f64>()?;
    let scale = match fwd.opts.reduction {
        Reduction::None => g,
        Reduction::Sum => vec![g.first().copied().unwrap_or(0.0); fwd.rows],
        Reduction::Mean => {
            let n = valid_rows(&fwd.row_params(), &targets) as f64;
            vec![g.first().copied().unwrap_or(0.0) / n; fwd.rows]
        }
    };
    let grads = match fwd.logits.dtype() {
        DType::F64 => rows_f64(fwd, &targets, Some(&scale))?.1,
        _ => rows_f32(fwd, &targets, Some(&scale))?.1,
    };
    grads.ok_or_else(|| Error::Cuda("cross_entropy_vjp: no gradient was written".into()))
}

/// Runs the fused training pass on the CPU: the reduced loss and `dlogits` of the reduced
/// loss (cotangent 1, or `1 / n_valid` per row for the mean), from one read of each row.
pub(crate) fn fused(args: &CrossEntropyArgs) -> Result<(Array, Array)> {
    let targets = targets_i64(&args.targets)?;
    let g = match args.opts.reduction {
        Reduction::Mean => 1.0 / valid_rows(&args.row_params(), &targets) as f64,
        Reduction::None | Reduction::Sum => 1.0,
    };
    let scale = vec![g; args.rows];
    let (losses, grads) = match args.logits.dtype() {
        DType::F64 => rows_f64(args, &targets, Some(&scale))?,
        _ => rows_f32(args, &targets, Some(&scale))?,
    };
    let grads =
        grads.ok_or_else(|| Error::Cuda("cross_entropy_fused: no gradient was written".into()))?;
    Ok((reduce(args, &targets, &losses)?, grads))
}

/// The fused pass writing `dlogits` over the logits (f32 / f16 / bf16 logits that are the only
/// handle on their whole row-major buffer: [`Array::owns_whole_buffer`]); any other call
/// runs [`fused`] into a new buffer.
pub(crate) fn fused_in_place(args: CrossEntropyArgs) -> Result<(Array, Array)> {
    // SAFETY: `lent` is false: only ferrofast's own buffers are written.
    unsafe { in_place(args, false) }
}

/// [`fused_in_place`], and for row-major f32 / f16 / bf16 logits that are the only handle on
/// their buffer but do not cover all of it (a view of ferrofast's own buffer, or borrowed
/// memory from [`Array::from_external`]), the same pass over their elements: `dlogits` is the
/// logits array itself.
///
/// # Safety
/// When the logits view borrowed memory, its producer lends it for writing for this call
/// (writable, nobody else reads or writes these elements until the call returns).
pub(crate) unsafe fn fused_in_place_lent(args: CrossEntropyArgs) -> Result<(Array, Array)> {
    // SAFETY: the caller's contract.
    unsafe { in_place(args, true) }
}

/// # Safety
/// With `lent`, [`fused_in_place_lent`]'s contract.
unsafe fn in_place(args: CrossEntropyArgs, lent: bool) -> Result<(Array, Array)> {
    // SAFETY: passed on.
    unsafe {
        match args.logits.dtype() {
            DType::F32 => in_place_typed::<f32>(args, lent),
            DType::F16 => in_place_typed::<f16>(args, lent),
            DType::BF16 => in_place_typed::<bf16>(args, lent),
            _ => fused(&args),
        }
    }
}

/// # Safety
/// With `lent`, [`fused_in_place_lent`]'s contract.
unsafe fn in_place_typed<T: RowElem>(
    mut args: CrossEntropyArgs,
    lent: bool,
) -> Result<(Array, Array)> {
    let mut logits = std::mem::replace(&mut args.logits, Array::scalar(0.0f32));
    let rows = if lent {
        // SAFETY: the caller's contract lends borrowed memory for writing for this call
        // (ferrofast's own buffer is written through the only handle on it); the slice lives
        // until the rows are written, inside it.
        unsafe { logits.lent_host_slice_mut::<T>() }
    } else if logits.owns_whole_buffer() {
        logits.host_slice_mut::<T>()
    } else {
        None
    };
    if let Some(rows) = rows {
        let loss = grad_rows_in_place(&args, rows)?;
        return Ok((loss, logits));
    }
    args.logits = logits;
    fused(&args)
}

/// The fused pass over the row-major logits `buf` (`args`' rows, vocabulary and options),
/// each row's gradient written over its logits: returns the loss array.
fn grad_rows_in_place<T: RowElem>(args: &CrossEntropyArgs, buf: &mut [T]) -> Result<Array> {
    let targets = targets_i64(&args.targets)?;
    let p = args.row_params();
    let g = match args.opts.reduction {
        Reduction::Mean => (1.0 / valid_rows(&p, &targets) as f64) as f32,
        Reduction::None | Reduction::Sum => 1.0,
    };
    let (rows, v) = (args.rows, args.vocab);
    let mut losses = host_pool::filled(rows, 0.0f32)?;
    let isa = Isa::detect();
    if v > 0 {
        let job = |(r, (loss, row)): (usize, (&mut f32, &mut [T]))| {
            *loss = with_scratch(|sc| row_grad_in_place(&p, row, targets[r], g, isa, sc));
        };
        if rows * v >= PARALLEL_MIN_ELEMENTS && rows > 1 {
            losses
                .par_iter_mut()
                .zip(buf.par_chunks_mut(v))
                .enumerate()
                .with_min_len((PARALLEL_MIN_ELEMENTS / v).max(1))
                .for_each(job);
        } else {
            losses
                .iter_mut()
                .zip(buf.chunks_mut(v))
                .enumerate()
                .for_each(job);
        }
    } else {
        let mut sc = Scratch::default();
        for (r, loss) in losses.iter_mut().enumerate() {
            *loss = row_grad_in_place::<T>(&p, &mut [], targets[r], g, isa, &mut sc);
        }
    }
    reduce(args, &targets, &losses)
}

/// Rows whose target is not the ignored index.
fn valid_rows(p: &RowParams, targets: &[i64]) -> usize {
    targets
        .iter()
        .filter(|&&t| p.target(t) != Target::Ignored)
        .count()
}

/// The targets as `i64`, in row-major order.
fn targets_i64(t: &Array) -> Result<Vec<i64>> {
    Ok(match t.dtype() {
        DType::U8 => t.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => t.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec::<i64>()?,
        other => {
            return Err(Error::invalid(format!(
                "[cross_entropy] targets must be integer class indices but got {other}."
            )))
        }
    })
}

/// The loss array: per row, or the f64 sum / mean of the rows rounded once to f32.
fn reduce(args: &CrossEntropyArgs, targets: &[i64], losses: &[f32]) -> Result<Array> {
    let sum = || losses.iter().map(|&l| f64::from(l)).sum::<f64>();
    match args.opts.reduction {
        Reduction::None => Array::from_kernel_vec(losses.to_vec(), args.targets.shape()),
        Reduction::Sum => Array::from_kernel_vec(vec![sum() as f32], &[]),
        Reduction::Mean => {
            let n = valid_rows(&args.row_params(), targets) as f64;
            Array::from_kernel_vec(vec![(sum() / n) as f32], &[])
        }
    }
}

/// Buffer offset of each row's first logit, and the stride along the row.
fn row_layout(x: &Array) -> (Vec<isize>, isize) {
    let nd = x.ndim();
    let rows: usize = x.shape()[..nd - 1].iter().product();
    let mut starts = Vec::with_capacity(rows);
    let lead_shape = &x.shape()[..nd - 1];
    let lead_strides = &x.strides()[..nd - 1];
    for r in 0..rows {
        let mut rem = r;
        let mut off = x.offset() as isize;
        for (&n, &s) in lead_shape.iter().zip(lead_strides).rev() {
            off += (rem % n) as isize * s;
            rem /= n;
        }
        starts.push(off);
    }
    (starts, x.strides()[nd - 1])
}

// ----- f32 / f16 / bf16 logits, f32 arithmetic ------------------------------------------

/// A logit element type computed in f32: a [`Widen`] dtype whose compute type is f32 (f32,
/// f16, bf16). Implemented for every such type; adds nothing to [`Widen`].
pub(super) trait Logit: Widen<C = f32> {}

impl<T: Widen<C = f32>> Logit for T {}

/// The row kernels' element types: [`Logit`]s with an AVX2 and an AVX-512 form on x86-64.
#[cfg(target_arch = "x86_64")]
pub(super) trait RowElem: avx2::Lanes + avx512::Lanes {}
#[cfg(target_arch = "x86_64")]
impl<T: avx2::Lanes + avx512::Lanes> RowElem for T {}
/// The row kernels' element types.
#[cfg(not(target_arch = "x86_64"))]
pub(super) trait RowElem: Logit {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Logit> RowElem for T {}

/// Which implementation of the row passes runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// Safe loops for any CPU (vectorised by the compiler where it can).
    Portable,
    /// The AVX2 + FMA + F16C kernels of [`avx2`]; only where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX-512 F + BW + VL kernels of [`avx512`]; only where the CPU has them (and
    /// AVX2, FMA and F16C).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best implementation this CPU runs.
    pub(super) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if avx512::detected() {
            return Isa::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            return Isa::Avx2;
        }
        Isa::Portable
    }

    /// Every implementation this CPU runs, the portable one first.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            v.push(Isa::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if avx512::detected() {
            v.push(Isa::Avx512);
        }
        v
    }
}

/// A row's maximum (NaNs ignored), sum of `exp(x - max)` (meaningful when the maximum is
/// finite), sum of `x` (f64; only when asked for) and whether it holds a NaN.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scan {
    pub(super) max: f32,
    pub(super) sum: f32,
    pub(super) sum_x: f64,
    pub(super) nan: bool,
}

impl Scan {
    /// The state before a row's first block (maximum -inf, sums 0, no NaN); prepares
    /// `store`, when given, for a row of `v` elements.
    #[inline(always)]
    pub(super) fn start(v: usize, store: Option<&mut Scratch>) -> Scan {
        if let Some(sc) = store {
            sc.prepare(v);
        }
        Scan {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            sum_x: 0.0,
            nan: false,
        }
    }

    /// Takes in a block's maximum (NaNs ignored), NaN flag and sum of `x`: where the block's
    /// maximum is larger, it becomes the running maximum and the running sum of
    /// `exp(x - max)` is rescaled to it (a sum against -inf is 0).
    #[inline(always)]
    pub(super) fn add_block(&mut self, (bm, bn, bsx): (f32, bool, f64)) {
        self.nan |= bn;
        self.sum_x += bsx;
        if bm > self.max {
            self.sum = if self.max == f32::NEG_INFINITY {
                0.0
            } else {
                self.sum * exp_f32(self.max - bm)
            };
            self.max = bm;
        }
    }

    /// Adds the terms `exp(x - max)` of block `r` against the running maximum: without
    /// `store`, `sum(max)`; with it, the maximum is kept as the block's and `stored(max, e)`
    /// writes the terms into `e` (the block's part of the scratch row) and returns their sum.
    /// Nothing is added where the maximum is not finite.
    #[inline(always)]
    pub(super) fn add_terms(
        &mut self,
        store: Option<&mut Scratch>,
        r: Range<usize>,
        sum: impl FnOnce(f32) -> f32,
        stored: impl FnOnce(f32, &mut [f32]) -> f32,
    ) {
        let m = self.max;
        match store {
            None if m.is_finite() => self.sum += sum(m),
            None => {}
            Some(sc) => {
                sc.block_max.push(m);
                let e = &mut sc.e[r];
                if m.is_finite() {
                    self.sum += stored(m, e);
                } else {
                    // All of the block is -inf (or NaN), or the row's maximum is +inf (the
                    // gradient is then taken from the logits): the stored terms are 0.
                    e.fill(0.0);
                }
            }
        }
    }
}

/// Per-thread working memory of the gradient passes: the row's exponentials and the running
/// maximum they were taken against, per block.
#[derive(Default)]
pub(super) struct Scratch {
    /// `exp(x_j - block_max[b])` for `j` in block `b` (in the kernel's own order within a
    /// block: the AVX2 and AVX-512 bf16 kernels store even and odd elements apart, in
    /// groups of 16 and of 32).
    pub(super) e: Vec<f32>,
    /// The running maximum each block's exponentials are relative to (`-inf`: the block's
    /// exponentials are 0).
    pub(super) block_max: Vec<f32>,
}

impl Scratch {
    /// Makes room for a row of `v` exponentials and forgets the previous row's blocks.
    pub(super) fn prepare(&mut self, v: usize) {
        if self.e.len() < v {
            self.e.resize(v, 0.0);
        }
        self.block_max.clear();
    }
}

thread_local! {
    /// Each rayon worker's [`Scratch`], kept between calls (a fresh 128 KiB row per task
    /// would come from `mmap` and page-fault every time).
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (taken out for the call, so a nested call would get
/// a fresh one).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut sc = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let r = f(&mut sc);
    // Fails only while the thread is being torn down; the scratch is then dropped.
    let _ = SCRATCH.try_with(|cell| cell.set(sc));
    r
}

/// The blocks a row of `v` is scanned in: [`BLOCK`] elements at a time from its start (the
/// same for every output buffer, so that the in-place pass gives the fused pass's bits).
pub(super) fn blocks(v: usize) -> impl Iterator<Item = Range<usize>> {
    (0..v).step_by(BLOCK).map(move |s| s..(s + BLOCK).min(v))
}

/// Panics unless `sc` holds what a first pass over a row of `v` stored: an exponential per
/// element and a maximum per block (the second pass must write every element of the
/// output, whose length is then set).
pub(super) fn check_stored(sc: &Scratch, v: usize) {
    assert!(
        sc.e.len() >= v && sc.block_max.len() == v.div_ceil(BLOCK),
        "cross_entropy: second pass over a row the first pass did not store"
    );
}

fn rows_f32(
    args: &CrossEntropyArgs,
    targets: &[i64],
    scale: Option<&[f64]>,
) -> Result<(Vec<f32>, Option<Array>)> {
    match args.logits.dtype() {
        DType::F32 => rows_typed::<f32>(args, targets, scale),
        DType::F16 => rows_typed::<f16>(args, targets, scale),
        DType::BF16 => rows_typed::<bf16>(args, targets, scale),
        other => Err(Error::invalid(format!(
            "[cross_entropy] Received unsupported logits type {other}."
        ))),
    }
}

/// The per-row losses and, with `scale` (the cotangent of each row's loss), the gradient.
fn rows_typed<T: RowElem>(
    args: &CrossEntropyArgs,
    targets: &[i64],
    scale: Option<&[f64]>,
) -> Result<(Vec<f32>, Option<Array>)> {
    let (rows, v) = (args.rows, args.vocab);
    let n = rows
        .checked_mul(v)
        .ok_or_else(|| Error::Shape("cross_entropy: logits size overflows usize".into()))?;
    let p = args.row_params();
    let buf = args.logits.cpu_buffer::<T>()?;
    let (starts, col_stride) = row_layout(&args.logits);
    let mut losses = vec![0.0f32; rows];
    let mut grads: Option<Vec<T>> = scale.map(|_| host_pool::take_uninit::<T>(n)).transpose()?;
    let isa = Isa::detect();
    {
        let mut grad_rows: Vec<&mut [MaybeUninit<T>]> = match grads.as_mut() {
            Some(g) => g.spare_capacity_mut()[..n]
                .chunks_mut(v.max(1))
                .take(rows)
                .collect(),
            None => Vec::new(),
        };
        let job =
            |r: usize, loss: &mut f32, grad: Option<&mut [MaybeUninit<T>]>, gather: &mut Vec<T>| {
                let start = starts[r];
                let row: &[T] = if col_stride == 1 || v <= 1 {
                    // The view's elements lie inside the buffer (indexing checks it).
                    let s = start as usize;
                    &buf[s..s + v]
                } else {
                    gather.clear();
                    gather.extend((0..v).map(|j| buf[(start + j as isize * col_stride) as usize]));
                    gather
                };
                *loss = match grad {
                    None => row_forward(&p, row, targets[r], isa),
                    Some(out) => {
                        let g = scale.map_or(1.0, |s| s[r]) as f32;
                        with_scratch(|sc| row_grad(&p, row, targets[r], g, out, isa, sc))
                    }
                };
            };
        let parallel = n >= PARALLEL_MIN_ELEMENTS && rows > 1;
        let min_len = (PARALLEL_MIN_ELEMENTS / v.max(1)).max(1);
        if grad_rows.is_empty() {
            if parallel {
                losses
                    .par_iter_mut()
                    .enumerate()
                    .with_min_len(min_len)
                    .for_each_init(Vec::new, |gather, (r, l)| job(r, l, None, gather));
            } else {
                let mut gather = Vec::new();
                for (r, l) in losses.iter_mut().enumerate() {
                    job(r, l, None, &mut gather);
                }
            }
        } else if parallel {
            losses
                .par_iter_mut()
                .zip(grad_rows.par_iter_mut())
                .enumerate()
                .with_min_len(min_len)
                .for_each_init(Vec::new, |gather, (r, (l, gr))| job(r, l, Some(gr), gather));
        } else {
            let mut gather = Vec::new();
            for (r, (l, gr)) in losses.iter_mut().zip(grad_rows.iter_mut()).enumerate() {
                job(r, l, Some(gr), &mut gather);
            }
        }
    }
    let grads = match grads {
        Some(mut g) => {
            // SAFETY: `row_grad` wrote every element of each of the `rows` rows of `v`
            // elements, `rows * v = n` elements in all, within the capacity reserved.
            unsafe { g.set_len(n) };
            Some(Array::from_kernel_vec(g, args.logits.shape()))
        }
        None => None,
    }
    .transpose()?;
    Ok((losses, grads))
}

/// The first pass over a row, by `isa`: [`Scan`] of `x`, and with `store` the row's
/// exponentials and block maxima (see [`blocks`]).
#[inline]
pub(super) fn scan<T: RowElem>(
    x: &[T],
    want_sum_x: bool,
    store: Option<&mut Scratch>,
    isa: Isa,
) -> Scan {
    match isa {
        Isa::Portable => portable::scan(x, want_sum_x, store),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only made where the CPU has AVX2, FMA and F16C
        // (`Isa::detect`, `Isa::available`).
        Isa::Avx2 => unsafe { avx2::scan(x, want_sum_x, store) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only made where the CPU has AVX-512 F, BW and VL, AVX2,
        // FMA and F16C (`avx512::detected`, in `Isa::detect` and `Isa::available`).
        Isa::Avx512 => unsafe { avx512::scan(x, want_sum_x, store) },
    }
}

/// The second pass of a gradient, by `isa`: `out_j = k exp(block_max_b - m) e_j - c` over
/// the blocks `scan` stored (by the same `isa`: the kernels order a block's exponentials
/// differently); `stream` asks for non-temporal stores (a new buffer), which the AVX2 and
/// AVX-512 kernels use for every block that starts on a 16-byte boundary.
#[inline]
pub(super) fn write<T: RowElem>(
    sc: &Scratch,
    m: f32,
    k: f32,
    c: f32,
    out: &mut [MaybeUninit<T>],
    stream: bool,
    isa: Isa,
) {
    check_stored(sc, out.len());
    let stream = stream && isa != Isa::Portable;
    let mut streamed = false;
    for (r, &bm) in blocks(out.len()).zip(&sc.block_max) {
        let kb = if bm == f32::NEG_INFINITY {
            0.0
        } else {
            k * exp_f32(bm - m)
        };
        let (e, o) = (&sc.e[r.clone()], &mut out[r]);
        let nt = stream && (o.as_ptr() as usize).is_multiple_of(16);
        streamed |= nt;
        match isa {
            Isa::Portable => portable::block_write(e, kb, c, o),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `scan`: the CPU runs `isa`'s kernels.
            _ if nt => unsafe { simd_block_write::<T, true>(isa, e, kb, c, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `scan`: the CPU runs `isa`'s kernels.
            _ => unsafe { simd_block_write::<T, false>(isa, e, kb, c, o) },
        }
    }
    #[cfg(target_arch = "x86_64")]
    if streamed {
        // Orders the non-temporal stores before whatever this thread does next (the task's
        // completion, which other threads synchronise with).
        // SAFETY: `sfence` is SSE, which every x86-64 CPU has.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = streamed;
}

/// One block of [`write`] by [`avx512::block_write`] or [`avx2::block_write`], as `isa`
/// says (not [`Isa::Portable`]); `STREAM` as theirs.
///
/// # Safety
/// The CPU runs `isa`'s kernels (true of every `Isa` that [`Isa::detect`] or
/// [`Isa::available`] gives).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn simd_block_write<T: RowElem, const STREAM: bool>(
    isa: Isa,
    e: &[f32],
    k: f32,
    c: f32,
    o: &mut [MaybeUninit<T>],
) {
    if isa == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F, BW and VL, AVX2, FMA and F16C (the caller's
        // obligation for `Isa::Avx512`).
        unsafe { avx512::block_write::<T, STREAM>(e, k, c, o) }
    } else {
        // SAFETY: the CPU has AVX2, FMA and F16C (the caller's obligation for `Isa::Avx2`).
        unsafe { avx2::block_write::<T, STREAM>(e, k, c, o) }
    }
}

/// One row's loss.
fn row_forward<T: RowElem>(p: &RowParams, x: &[T], raw_target: i64, isa: Isa) -> f32 {
    let t = match p.target(raw_target) {
        Target::Class(t) => t,
        Target::Ignored => return 0.0,
        Target::OutOfRange => return f32::NAN,
    };
    let stats = scan(x, p.eps != 0.0, None, isa);
    row_loss(p, x, t, 1.0, &stats).0
}

/// How a row's gradient is written.
enum GradRule {
    /// Every element `v` (ignored rows: 0; out-of-range targets and NaN rows: NaN).
    Fill(f32),
    /// `k exp(block_max_b - m) e_j - c` from the stored exponentials, `dt` at the target `t`.
    Stored {
        k: f32,
        m: f32,
        c: f32,
        t: usize,
        dt: f32,
    },
    /// `a exp(x_j - lse) - c` from the logits (rows whose maximum is infinite), `dt` at `t`.
    Direct {
        a: f32,
        c: f32,
        lse: f32,
        t: usize,
        dt: f32,
    },
}

/// A row's loss, from its [`Scan`], and the rule for its gradient with cotangent `g`.
#[inline]
fn row_loss<T: Logit>(p: &RowParams, x: &[T], t: usize, g: f32, stats: &Scan) -> (f32, GradRule) {
    if stats.nan {
        return (f32::NAN, GradRule::Fill(f32::NAN));
    }
    let m = stats.max;
    let xt = x[t].widen();
    let log_s = if m.is_infinite() { 0.0 } else { stats.sum.ln() };
    let lse = if m.is_infinite() { m } else { m + log_s };
    let mut loss = p.one_minus_eps * (m - xt) + log_s;
    if p.eps != 0.0 {
        loss += p.eps * (m - (stats.sum_x / x.len() as f64) as f32);
    }
    if p.z != 0.0 {
        loss += p.z * lse * lse;
    }
    let a = g * (1.0 + 2.0 * p.z * lse);
    let c = g * p.eps_over_v;
    let dt = a * exp_f32(xt - lse) - c - g * p.one_minus_eps;
    let rule = if m.is_infinite() {
        GradRule::Direct { a, c, lse, t, dt }
    } else {
        GradRule::Stored {
            k: a / stats.sum,
            m,
            c,
            t,
            dt,
        }
    };
    (loss, rule)
}

/// A gradient row's loss and rule: the first pass over the row (which keeps each
/// exponential in `sc`) for a class target.
fn grad_plan<T: RowElem>(
    p: &RowParams,
    x: &[T],
    raw_target: i64,
    g: f32,
    isa: Isa,
    sc: &mut Scratch,
) -> (f32, GradRule) {
    match p.target(raw_target) {
        Target::Class(t) => {
            let stats = scan(x, p.eps != 0.0, Some(sc), isa);
            row_loss(p, x, t, g, &stats)
        }
        Target::Ignored => (0.0, GradRule::Fill(0.0)),
        Target::OutOfRange => (f32::NAN, GradRule::Fill(f32::NAN)),
    }
}

/// One row of a gradient pass: returns the loss and writes `g * dloss/dx` to `out` (a new
/// buffer, written with streaming stores where the kernel has them, so that its cache lines
/// are not read from memory first). The row is read from memory once: the first pass keeps
/// each exponential in `sc` (the row stays in L2), the second scales them into `out`.
pub(super) fn row_grad<T: RowElem>(
    p: &RowParams,
    x: &[T],
    raw_target: i64,
    g: f32,
    out: &mut [MaybeUninit<T>],
    isa: Isa,
    sc: &mut Scratch,
) -> f32 {
    let (loss, rule) = grad_plan(p, x, raw_target, g, isa, sc);
    match rule {
        GradRule::Fill(v) => {
            let v = T::narrow(v);
            for o in out.iter_mut() {
                o.write(v);
            }
        }
        GradRule::Stored { k, m, c, t, dt } => {
            write(sc, m, k, c, out, true, isa);
            out[t].write(T::narrow(dt));
        }
        GradRule::Direct { a, c, lse, t, dt } => {
            for (o, &xj) in out.iter_mut().zip(x) {
                o.write(T::narrow(a * exp_f32(xj.widen() - lse) - c));
            }
            out[t].write(T::narrow(dt));
        }
    }
    loss
}

/// [`row_grad`] writing the gradient over the row itself (each logit is read before it is
/// overwritten; plain stores, the lines are in cache).
pub(super) fn row_grad_in_place<T: RowElem>(
    p: &RowParams,
    x: &mut [T],
    raw_target: i64,
    g: f32,
    isa: Isa,
    sc: &mut Scratch,
) -> f32 {
    let (loss, rule) = grad_plan(p, x, raw_target, g, isa, sc);
    match rule {
        GradRule::Fill(v) => x.fill(T::narrow(v)),
        GradRule::Stored { k, m, c, t, dt } => {
            write(sc, m, k, c, as_uninit(x), false, isa);
            x[t] = T::narrow(dt);
        }
        GradRule::Direct { a, c, lse, t, dt } => {
            for xj in x.iter_mut() {
                *xj = T::narrow(a * exp_f32(xj.widen() - lse) - c);
            }
            x[t] = T::narrow(dt);
        }
    }
    loss
}

/// `o` as a slice of possibly uninitialised elements, to be overwritten with initialised
/// ones.
fn as_uninit<T>(o: &mut [T]) -> &mut [MaybeUninit<T>] {
    let len = o.len();
    // SAFETY: `MaybeUninit<T>` has `T`'s size and alignment, so the pointer and length
    // describe the same memory, borrowed mutably for the same lifetime. The only writer of
    // the result (`write`) stores initialised values, so the elements stay initialised for
    // the caller's `&mut [T]` once the borrow ends.
    unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<MaybeUninit<T>>(), len) }
}

/// The parts of `exp` shared by [`exp_f32`] and [`exp_nonpositive`]: `2^n * 2^f` with
/// `n = round(x log2 e)` and a degree-6 polynomial for `2^f`, `|f| <= 1/2`, for `x log2 e` in
/// `[-127, 127]` (clamped; `n = -127` gives 0); NaN stays NaN. Written without branches or
/// float-to-int conversions so that loops over it vectorise.
#[inline(always)]
fn exp_core(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to the nearest integer (in the FPU's mode) and leaves it in
    // the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * LOG2E;
    let t = if t < -127.0 { -127.0 } else { t };
    let t = if t > 127.0 { 127.0 } else { t };
    let r = t + ROUND;
    let f = t - (r - ROUND);
    let mut p = EXP2_POLY[0];
    for &c in &EXP2_POLY[1..] {
        p = p * f + c;
    }
    let n_biased = r.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    p * f32::from_bits(n_biased << 23)
}

/// `2^f` for `|f| <= 1/2`, highest degree first: the minimax polynomial of degree 6 for
/// relative error (2.5e-9 in exact arithmetic; 8e-8, under an ulp, evaluated in f32 with
/// fused multiply-adds).
pub(super) const EXP2_POLY: [f32; 7] = [
    1.546_144_5e-4,
    1.340_042_8e-3,
    9.618_057e-3,
    5.550_327e-2,
    2.402_265e-1,
    6.931_472e-1,
    1.0,
];

/// `exp(x)` for `x <= 0` or NaN (the terms of a sum of exponentials below its maximum):
/// relative error about 2e-7 near 0 (growing with `|x|` to about 1e-5 near -87); 0 below
/// about -87.7, a wrong but tiny number (at most `2^-126`) between -87.7 and -87.3, which
/// no sum with its maximum's term 1 can notice.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    exp_core(x)
}

/// `exp(x)` in f32 without branches, so loops over it vectorise (see [`exp_core`]):
/// underflows to exactly 0 below -87.3, overflows to infinity above 88.7, NaN stays NaN.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    let r = exp_core(x);
    let r = if x < -87.3 { 0.0 } else { r };
    if x > 88.7 {
        f32::INFINITY
    } else {
        r
    }
}

// ----- f64 logits, f64 arithmetic ---------------------------------------------------------

fn rows_f64(
    args: &CrossEntropyArgs,
    targets: &[i64],
    scale: Option<&[f64]>,
) -> Result<(Vec<f32>, Option<Array>)> {
    let (rows, v) = (args.rows, args.vocab);
    let p = args.row_params();
    let buf = args.logits.cpu_buffer::<f64>()?;
    let (starts, col_stride) = row_layout(&args.logits);
    let (eps, z) = (f64::from(p.eps), f64::from(p.z));
    let mut losses = Vec::with_capacity(rows);
    let mut grads = scale.map(|_| Vec::with_capacity(rows * v));
    for r in 0..rows {
        let x: Vec<f64> = (0..v)
            .map(|j| buf[(starts[r] + j as isize * col_stride) as usize])
            .collect();
        let t = match p.target(targets[r]) {
            Target::Class(t) if !x.iter().any(|a| a.is_nan()) => Some(t),
            Target::Ignored => {
                losses.push(0.0);
                if let Some(gr) = grads.as_mut() {
                    gr.extend(std::iter::repeat_n(0.0, v));
                }
                continue;
            }
            _ => None,
        };
        let Some(t) = t else {
            losses.push(f32::NAN);
            if let Some(gr) = grads.as_mut() {
                gr.extend(std::iter::repeat_n(f64::NAN, v));
            }
            continue;
        };
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_s = if m.is_infinite() {
            0.0
        } else {
            x.iter().map(|a| (a - m).exp()).sum::<f64>().ln()
        };
        let lse = if m.is_infinite() { m } else { m + log_s };
        let mut loss = (1.0 - eps) * (m - x[t]) + log_s;
        if eps != 0.0 {
            loss += eps * (m - x.iter().sum::<f64>() / v as f64);
        }
        loss += z * lse * lse;
        losses.push(loss as f32);
        if let (Some(gr), Some(s)) = (grads.as_mut(), scale) {
            let g = s[r];
            let a = g * (1.0 + 2.0 * z * lse);
            let base = gr.len();
            gr.extend(
                x.iter()
                    .map(|&xj| a * (xj - lse).exp() - g * eps / v as f64),
            );
            gr[base + t] -= g * (1.0 - eps);
        }
    }
    let grads = grads
        .map(|g| Array::from_kernel_vec(g, args.logits.shape()))
        .transpose()?;
    Ok((losses, grads))
}
