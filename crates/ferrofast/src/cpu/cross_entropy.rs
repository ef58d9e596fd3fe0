//! CPU kernels for `cross_entropy`, its backward and the fused training pass.
//!
//! One row of `V` logits at a time, rows spread over rayon. A row is read from memory once
//! for the loss: blocks of [`BLOCK`] elements are scanned for their maximum and NaNs, the
//! running sum of exponentials is rescaled when the maximum grows, and the block (still in
//! L1) is exponentiated and summed. The backward pass reads the row a second time to write
//! the gradient, from L2 for every vocabulary a step uses (a 128k-class f32 row is 512 KB).
//! Arithmetic is f32 (f64 for f64 logits) with a polynomial `exp` written so that the loops
//! vectorise; the row loops are compiled twice, for baseline x86-64 and for AVX2, and picked
//! at run time. Contiguous f32 / f16 / bf16 rows are read in place; strided rows are gathered
//! into a per-task scratch row first.
//!
//! Per-row formulas: see `ops/cross_entropy.rs`. Reductions add the per-row losses in f64 in
//! row order, so every reduced result is deterministic.

use super::simd::{bf16_bits_rne, bf16_widen, f16_to_f32, f32_to_f16, has_avx2_fma};
use crate::array::{host_pool, Array};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::cross_entropy::{
    CrossEntropyArgs, CrossEntropyVjpArgs, Reduction, RowParams, Target,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per block of the one-pass max / sum-of-exponentials scan (16 KiB of f32: the
/// block is still in L1 when it is exponentiated).
const BLOCK: usize = 4096;
/// Independent accumulators per reduction (two AVX2 registers of f32).
const LANES: usize = 16;
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
    match args.logits.dtype() {
        DType::F32 => fused_in_place_typed::<f32>(args),
        DType::F16 => fused_in_place_typed::<f16>(args),
        DType::BF16 => fused_in_place_typed::<bf16>(args),
        _ => fused(&args),
    }
}

fn fused_in_place_typed<T: Logit>(mut args: CrossEntropyArgs) -> Result<(Array, Array)> {
    let shape = args.logits.shape().to_vec();
    let logits = std::mem::replace(&mut args.logits, Array::scalar(0.0f32));
    let mut buf = match logits.into_host_vec::<T>() {
        Ok(buf) => buf,
        Err(logits) => {
            args.logits = logits;
            return fused(&args);
        }
    };
    let targets = targets_i64(&args.targets)?;
    let p = args.row_params();
    let g = match args.opts.reduction {
        Reduction::Mean => (1.0 / valid_rows(&p, &targets) as f64) as f32,
        Reduction::None | Reduction::Sum => 1.0,
    };
    let (rows, v) = (args.rows, args.vocab);
    let mut losses = host_pool::filled(rows, 0.0f32)?;
    let avx2 = has_avx2_fma();
    if v > 0 {
        let job = |(r, (loss, row)): (usize, (&mut f32, &mut [T]))| {
            *loss = row_in_place(&p, row, targets[r], g, avx2);
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
        for (r, loss) in losses.iter_mut().enumerate() {
            *loss = row_in_place::<T>(&p, &mut [], targets[r], g, avx2);
        }
    }
    let loss = reduce(&args, &targets, &losses)?;
    Ok((loss, Array::from_vec(buf, &shape)?))
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

/// A logit element type computed in f32.
trait Logit: Element {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Logit for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}

impl Logit for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_widen(self.to_bits())
    }
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        bf16::from_bits(bf16_bits_rne(v))
    }
}

impl Logit for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        f16::from_bits(f32_to_f16(v))
    }
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
fn rows_typed<T: Logit>(
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
    let avx2 = has_avx2_fma();
    {
        let mut grad_rows: Vec<&mut [MaybeUninit<T>]> = match grads.as_mut() {
            Some(g) => g.spare_capacity_mut()[..n]
                .chunks_mut(v.max(1))
                .take(rows)
                .collect(),
            None => Vec::new(),
        };
        let job = |r: usize,
                   loss: &mut f32,
                   grad: Option<&mut [MaybeUninit<T>]>,
                   scratch: &mut Vec<T>| {
            let start = starts[r];
            let row: &[T] = if col_stride == 1 || v <= 1 {
                // SAFETY-free indexing: the view's elements lie inside the buffer.
                let s = start as usize;
                &buf[s..s + v]
            } else {
                scratch.clear();
                scratch.extend((0..v).map(|j| buf[(start + j as isize * col_stride) as usize]));
                scratch
            };
            let g = scale.map_or(1.0, |s| s[r]) as f32;
            *loss = row_f32(&p, row, targets[r], g, grad, avx2);
        };
        let parallel = n >= PARALLEL_MIN_ELEMENTS && rows > 1;
        if grad_rows.is_empty() {
            if parallel {
                losses
                    .par_iter_mut()
                    .enumerate()
                    .with_min_len((PARALLEL_MIN_ELEMENTS / v.max(1)).max(1))
                    .for_each_init(Vec::new, |scratch, (r, l)| job(r, l, None, scratch));
            } else {
                let mut scratch = Vec::new();
                for (r, l) in losses.iter_mut().enumerate() {
                    job(r, l, None, &mut scratch);
                }
            }
        } else if parallel {
            losses
                .par_iter_mut()
                .zip(grad_rows.par_iter_mut())
                .enumerate()
                .with_min_len((PARALLEL_MIN_ELEMENTS / v.max(1)).max(1))
                .for_each_init(Vec::new, |scratch, (r, (l, gr))| {
                    job(r, l, Some(gr), scratch)
                });
        } else {
            let mut scratch = Vec::new();
            for (r, (l, gr)) in losses.iter_mut().zip(grad_rows.iter_mut()).enumerate() {
                job(r, l, Some(gr), &mut scratch);
            }
        }
    }
    let grads = match grads {
        Some(mut g) => {
            // SAFETY: `row_f32` wrote every element of each of the `rows` rows of `v`
            // elements, `rows * v = n` elements in all, within the capacity reserved.
            unsafe { g.set_len(n) };
            Some(Array::from_kernel_vec(g, args.logits.shape())?)
        }
        None => None,
    };
    Ok((losses, grads))
}

/// One row: returns the loss and, with `grad`, writes `g * dloss/dx` into it.
#[inline]
fn row_f32<T: Logit>(
    p: &RowParams,
    x: &[T],
    raw_target: i64,
    g: f32,
    grad: Option<&mut [MaybeUninit<T>]>,
    avx2: bool,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
        return unsafe { row_f32_avx2(p, x, raw_target, g, grad) };
    }
    let _ = avx2;
    row_f32_generic(p, x, raw_target, g, grad)
}

/// [`row_f32_generic`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_f32_avx2<T: Logit>(
    p: &RowParams,
    x: &[T],
    raw_target: i64,
    g: f32,
    grad: Option<&mut [MaybeUninit<T>]>,
) -> f32 {
    row_f32_generic(p, x, raw_target, g, grad)
}

#[inline(always)]
fn row_f32_generic<T: Logit>(
    p: &RowParams,
    x: &[T],
    raw_target: i64,
    g: f32,
    grad: Option<&mut [MaybeUninit<T>]>,
) -> f32 {
    let (loss, rule) = row_loss(p, x, raw_target, g);
    if let Some(out) = grad {
        match rule {
            GradRule::Fill(v) => fill(out, T::narrow(v)),
            GradRule::Softmax { a, c, lse, t, dt } => {
                for (o, &xj) in out.iter_mut().zip(x) {
                    o.write(T::narrow(a * exp_f32(xj.widen() - lse) - c));
                }
                out[t].write(T::narrow(dt));
            }
        }
    }
    loss
}

/// One row of the in-place training pass: returns the loss and overwrites the row with
/// `g * dloss/dx` (each logit read before it is overwritten).
#[inline]
fn row_in_place<T: Logit>(p: &RowParams, x: &mut [T], raw_target: i64, g: f32, avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
        return unsafe { row_in_place_avx2(p, x, raw_target, g) };
    }
    let _ = avx2;
    row_in_place_generic(p, x, raw_target, g)
}

/// [`row_in_place_generic`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_in_place_avx2<T: Logit>(p: &RowParams, x: &mut [T], raw_target: i64, g: f32) -> f32 {
    row_in_place_generic(p, x, raw_target, g)
}

#[inline(always)]
fn row_in_place_generic<T: Logit>(p: &RowParams, x: &mut [T], raw_target: i64, g: f32) -> f32 {
    let (loss, rule) = row_loss(p, x, raw_target, g);
    match rule {
        GradRule::Fill(v) => x.fill(T::narrow(v)),
        GradRule::Softmax { a, c, lse, t, dt } => {
            for xj in x.iter_mut() {
                *xj = T::narrow(a * exp_f32(xj.widen() - lse) - c);
            }
            x[t] = T::narrow(dt);
        }
    }
    loss
}

/// How a row's gradient is written.
enum GradRule {
    /// Every element `v` (ignored rows: 0; out-of-range targets and NaN rows: NaN).
    Fill(f32),
    /// `a exp(x_j - lse) - c` everywhere, `dt` at the target `t`.
    Softmax {
        a: f32,
        c: f32,
        lse: f32,
        t: usize,
        dt: f32,
    },
}

/// A row's loss and the rule for its gradient with cotangent `g`.
#[inline(always)]
fn row_loss<T: Logit>(p: &RowParams, x: &[T], raw_target: i64, g: f32) -> (f32, GradRule) {
    let t = match p.target(raw_target) {
        Target::Class(t) => t,
        Target::Ignored => return (0.0, GradRule::Fill(0.0)),
        Target::OutOfRange => return (f32::NAN, GradRule::Fill(f32::NAN)),
    };
    let stats = scan(x, p.eps != 0.0);
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
    (loss, GradRule::Softmax { a, c, lse, t, dt })
}

fn fill<T: Copy>(out: &mut [MaybeUninit<T>], v: T) {
    for o in out {
        o.write(v);
    }
}

/// A row's maximum (NaNs ignored), sum of `exp(x - max)`, sum of `x` (f64; only when asked
/// for) and whether it holds a NaN.
struct Scan {
    max: f32,
    sum: f32,
    sum_x: f64,
    nan: bool,
}

/// One read of the row from memory: per block of [`BLOCK`] logits, the block's maximum,
/// then (the block still in L1) the rescaled running sum of exponentials. A NaN logit makes
/// the sum NaN whenever the maximum is finite; a row with an infinite maximum (no sum) is
/// searched for NaNs separately.
#[inline(always)]
fn scan<T: Logit>(x: &[T], want_sum_x: bool) -> Scan {
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f32;
    let mut sum_x = 0.0f64;
    for block in x.chunks(BLOCK) {
        let mut bm = [f32::NEG_INFINITY; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for k in 0..LANES {
                let v = c[k].widen();
                bm[k] = if v > bm[k] { v } else { bm[k] };
            }
        }
        for &e in chunks.remainder() {
            let v = e.widen();
            bm[0] = if v > bm[0] { v } else { bm[0] };
        }
        let block_max = bm.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if want_sum_x {
            let mut bx = [0.0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for k in 0..LANES {
                    bx[k] += c[k].widen();
                }
            }
            for &e in chunks.remainder() {
                bx[0] += e.widen();
            }
            sum_x += bx.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        if block_max > m {
            s = if m == f32::NEG_INFINITY {
                0.0
            } else {
                s * exp_f32(m - block_max)
            };
            m = block_max;
        }
        if m.is_infinite() {
            continue;
        }
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for k in 0..LANES {
                acc[k] += exp_nonpositive(c[k].widen() - m);
            }
        }
        for &e in chunks.remainder() {
            acc[0] += exp_nonpositive(e.widen() - m);
        }
        s += acc.iter().sum::<f32>();
    }
    let nan = if m.is_infinite() {
        x.iter().any(|v| v.widen().is_nan())
    } else {
        s.is_nan()
    };
    Scan {
        max: m,
        sum: s,
        sum_x,
        nan,
    }
}

/// The parts of `exp` shared by [`exp_f32`] and [`exp_nonpositive`]: `2^n * 2^f` with
/// `n = round(x log2 e)` and a degree-6 polynomial for `2^f`, `|f| <= 1/2`, for `x log2 e` in
/// `[-126, 127]` (clamped); NaN stays NaN. Written without branches or float-to-int
/// conversions so that loops over it vectorise.
#[inline(always)]
fn exp_core(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to the nearest integer (in the FPU's mode) and leaves it in
    // the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * LOG2E;
    let t = if t < -126.0 { -126.0 } else { t };
    let t = if t > 127.0 { 127.0 } else { t };
    let r = t + ROUND;
    let f = t - (r - ROUND);
    let mut p = 1.535_336_2e-4f32;
    p = p * f + 1.339_887_4e-3;
    p = p * f + 9.618_438e-3;
    p = p * f + 5.550_332_5e-2;
    p = p * f + 2.402_264_8e-1;
    p = p * f + 6.931_472e-1;
    p = p * f + 1.0;
    let n_biased = r.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    p * f32::from_bits(n_biased << 23)
}

/// `exp(x)` for `x <= 0` or NaN (the terms of a sum of exponentials below its maximum):
/// relative error about 2e-7 near 0 (growing with `|x|` to about 1e-5 near -87); below about
/// -87.3 the result is `2^-126` instead of a smaller number or 0, which no sum with its
/// maximum's term 1 can notice.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    exp_core(x)
}

/// `exp(x)` in f32 without branches, so loops over it vectorise (see [`exp_core`]):
/// underflows to exactly 0 below -87.3, overflows to infinity above 88.7, NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_matches_std_and_handles_the_edges() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            // The argument x log2(e) is rounded: relative error up to about |x| * 6e-8.
            let bound = 3e-7 + f64::from(x.abs()) * 1e-7;
            assert!(
                f64::from(((a - b) / b).abs()) < bound,
                "exp({x}) = {a}, std {b}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
