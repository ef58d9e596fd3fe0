//! Backward passes of `rms_norm` and `layer_norm` on the CPU.
//!
//! Per row (`D` elements, `n = rsqrt(var + eps)`, `g` the cotangent, `w` the weight or ones):
//!
//! - rms: `dx = n * g * w - x * mean(g * w * x) * n^3`, `dw += g * x * n`;
//! - layer: `xc = x - mean(x)`, `dx = (g * w - mean(g * w)) * n - xc * mean(g * w * xc) * n^3`,
//!   `dw += g * xc * n`, `db += g`.
//!
//! The inputs are taken in the forward's output dtype (as MLX's graph casts them), every sum
//! and product is computed in f32 (f64 for f64), and the row statistics are the forward's
//! (two-pass variance for layer norm). Rows are split into at most [`MAX_TASKS`] tasks of
//! consecutive rows, chosen from the shape alone; each task sums its rows' `dw` / `db`
//! contributions in order and the tasks' partial sums are added in task order, so the
//! results do not depend on the thread count or scheduling (deterministic).

use super::{lane_sum, Acc, LANES};
use crate::array::{host_pool, Array};
use crate::cpu::simd::Widen;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::norm::{NormKind, NormVjpArgs};
use half::{bf16, f16};
use rayon::prelude::*;

/// Most tasks a call is split into: bounds the partial `dw` / `db` rows kept (`MAX_TASKS * D`
/// values each) while leaving enough tasks for every core.
const MAX_TASKS: usize = 64;

/// Fewest elements a task gets, so that small calls stay on few threads.
const MIN_TASK_ELEMENTS: usize = 1 << 15;

/// An element type the backward reads and writes: a [`Widen`] dtype whose compute type (f32,
/// or f64 for f64) is an ordered [`Acc`]. Implemented for every such type; adds nothing to
/// [`Widen`].
trait VjpFloat: Widen<C: Acc + PartialOrd> {}

impl<T: Widen<C: Acc + PartialOrd>> VjpFloat for T {}

/// The gradients of a validated call: `dx` (in `x`'s dtype, see [`NormVjpArgs`]), and
/// `dweight` / `dbias` in their inputs' dtypes when those were given.
pub(crate) fn run(args: &NormVjpArgs) -> Result<(Array, Option<Array>, Option<Array>)> {
    match args.fwd.dtype {
        DType::F16 => run_typed::<f16>(args),
        DType::BF16 => run_typed::<bf16>(args),
        DType::F32 => run_typed::<f32>(args),
        DType::F64 => run_typed::<f64>(args),
        other => Err(Error::invalid(format!(
            "normalization kernels compute in a floating dtype, not {other}"
        ))),
    }
}

/// `a` cast to `T`'s dtype, row-major, on the CPU.
fn dense<T: VjpFloat>(a: &Array) -> Result<Array> {
    a.astype(T::DTYPE)?.contiguous()
}

fn run_typed<T: VjpFloat>(args: &NormVjpArgs) -> Result<(Array, Option<Array>, Option<Array>)> {
    let fwd = &args.fwd;
    let shape = fwd.x.shape();
    let d = shape.last().copied().unwrap_or(1);
    let x = dense::<T>(&fwd.x)?;
    let g = dense::<T>(&args.cotangent)?;
    let w = fwd.weight.as_ref().map(dense::<T>).transpose()?;
    // The logical elements, not the whole buffer: an empty view of a broadcast buffer still
    // has one.
    let logical = |a: &Array| -> Result<Vec<T>> { a.to_vec::<T>() };
    let (x, g) = (logical(&x)?, logical(&g)?);
    let (x, g) = (x.as_slice(), g.as_slice());
    let w: Option<Vec<T::C>> = match &w {
        Some(w) => Some(host_pool::map(&w.to_vec::<T>()?, |v| v.widen())?),
        None => None,
    };
    let layer = fwd.kind == NormKind::Layer;
    let want_dw = fwd.weight.is_some();
    let want_db = layer && fwd.bias.is_some();

    let n = x.len();
    let mut dx = host_pool::take_filled::<T>(n, T::narrow(T::C::ZERO))?;
    let mut dw_sum = host_pool::filled(if want_dw { d } else { 0 }, T::C::ZERO)?;
    let mut db_sum = host_pool::filled(if want_db { d } else { 0 }, T::C::ZERO)?;
    if n > 0 && d > 0 {
        let rows = n / d;
        let per_task = rows
            .div_ceil(MAX_TASKS)
            .max(MIN_TASK_ELEMENTS.div_ceil(d))
            .min(rows);
        let job = Job {
            layer,
            d,
            eps: T::C::from_f64(f64::from(fwd.eps)),
            inv_d: T::C::from_f64(1.0 / d as f64),
            w: w.as_deref(),
            want_dw,
            want_db,
        };
        let partials: Vec<Partials<T::C>> = dx
            .par_chunks_mut(per_task * d)
            .enumerate()
            .map(|(t, out)| {
                let first = t * per_task * d;
                let len = out.len();
                job.rows(&x[first..first + len], &g[first..first + len], out)
            })
            .collect::<Result<_>>()?;
        for (pw, pb) in &partials {
            for (s, &p) in dw_sum.iter_mut().zip(pw) {
                *s = *s + p;
            }
            for (s, &p) in db_sum.iter_mut().zip(pb) {
                *s = *s + p;
            }
        }
    }
    let dx = Array::from_cpu_data(T::wrap(dx), shape)?;
    let dx = if dx.dtype() == args.dx_dtype() {
        dx
    } else {
        dx.astype(args.dx_dtype())?
    };
    let reduced = |sum: Vec<T::C>, like: &Option<Array>| -> Result<Option<Array>> {
        let Some(like) = like else { return Ok(None) };
        let vals: Vec<T> = host_pool::map(&sum, T::narrow)?;
        let a = Array::from_kernel_vec(vals, &[d])?;
        Ok(Some(if a.dtype() == like.dtype() {
            a
        } else {
            a.astype(like.dtype())?
        }))
    };
    // The sums are rounded to the compute dtype's element type first (exact for f32 and f64;
    // for f16 / bf16 the output dtype is the weight's own, so this is the one rounding).
    let dw = reduced(dw_sum, &fwd.weight)?;
    let db = if want_db {
        reduced(db_sum, &fwd.bias)?
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// `sum(a[i] * b[i])` with [`LANES`] independent accumulators.
#[inline(always)]
fn lane_dot<C: Acc>(a: &[C], b: &[C]) -> C {
    let mut acc = [C::ZERO; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s = *s + p * q;
        }
    }
    let rest = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(C::ZERO, |s, (&p, &q)| s + p * q);
    acc.iter().fold(rest, |s, &v| s + v)
}

/// One task's `dw` and `db` sums (each empty when not wanted).
type Partials<C> = (Vec<C>, Vec<C>);

/// What every task of a call shares.
struct Job<'a, C> {
    layer: bool,
    d: usize,
    eps: C,
    inv_d: C,
    w: Option<&'a [C]>,
    want_dw: bool,
    want_db: bool,
}

impl<C: Acc + PartialOrd> Job<'_, C> {
    /// Writes `dx` for the rows of `x` / `g` (row-major, `d` per row) into `out` and returns
    /// this task's `dw` and `db` sums (empty when not wanted).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the task's rows of scratch cannot be allocated.
    fn rows<T: VjpFloat<C = C>>(&self, x: &[T], g: &[T], out: &mut [T]) -> Result<Partials<C>> {
        let d = self.d;
        let mut dw = host_pool::filled(if self.want_dw { d } else { 0 }, C::ZERO)?;
        let mut db = host_pool::filled(if self.want_db { d } else { 0 }, C::ZERO)?;
        let mut xs = host_pool::filled(d, C::ZERO)?;
        let mut gw = host_pool::filled(d, C::ZERO)?;
        for ((xr, gr), o) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
        {
            for (s, &v) in xs.iter_mut().zip(xr) {
                *s = v.widen();
            }
            // Row statistics as the forward computes them.
            let mean = if self.layer {
                lane_sum(&xs, |v| v) * self.inv_d
            } else {
                C::ZERO
            };
            if self.layer {
                for v in xs.iter_mut() {
                    *v = *v - mean;
                }
            }
            let var = lane_sum(&xs, |v| v * v) * self.inv_d;
            let n = C::ONE / (var + self.eps).sqrt();
            // gw = g * w; the row sums of the formula.
            match self.w {
                Some(w) => {
                    for ((s, &v), &wi) in gw.iter_mut().zip(gr).zip(w) {
                        *s = v.widen() * wi;
                    }
                }
                None => {
                    for (s, &v) in gw.iter_mut().zip(gr) {
                        *s = v.widen();
                    }
                }
            }
            let sum_gwx = lane_dot(&gw, &xs);
            let mean_gw = if self.layer {
                lane_sum(&gw, |v| v) * self.inv_d
            } else {
                C::ZERO
            };
            let c = sum_gwx * self.inv_d * n * n * n;
            for ((o, &a), &b) in o.iter_mut().zip(&gw).zip(&xs) {
                *o = T::narrow((a - mean_gw) * n - b * c);
            }
            if self.want_dw {
                for ((s, &v), &b) in dw.iter_mut().zip(gr).zip(&xs) {
                    *s = *s + v.widen() * b * n;
                }
            }
            if self.want_db {
                for (s, &v) in db.iter_mut().zip(gr) {
                    *s = *s + v.widen();
                }
            }
        }
        Ok((dw, db))
    }
}
