//! Backward passes of `rms_norm` and `layer_norm` on the CPU.
//!
//! Per row (`D` elements, `n = rsqrt(var + eps)`, `g` the cotangent, `w` the weight or ones):
//!
//! - rms: `dx = n * g * w - x * mean(g * w * x) * n^3`, `dw += g * x * n`;
//! - layer: `xc = x - mean(x)`, `dx = (g * w - mean(g * w)) * n - xc * mean(g * w * xc) * n^3`,
//!   `dw += g * xc * n`, `db += g`.
//!
//! The inputs are taken in the forward's output dtype (as MLX's graph casts them), every sum
//! and product is computed in f32 (f64 for f64); layer norm's variance is the two-pass one
//! (portable loop) or shifted moments with a two-pass fallback (AVX2 kernel). Rows are split
//! into at most [`MAX_TASKS`] tasks of consecutive rows, chosen from the shape alone; each
//! task sums its rows' `dw` / `db` contributions in order and the tasks' partial sums are
//! added in task order, so the results do not depend on the thread count or scheduling
//! (deterministic).

use super::{Acc, LANES};
use crate::array::{host_pool, Array};
use crate::cpu::simd::Widen;
#[cfg(target_arch = "x86_64")]
use crate::cpu::simd::{has_avx2, prefetch};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::norm::{NormKind, NormVjpArgs};
use half::{bf16, f16};
use rayon::prelude::*;

/// Most tasks a call is split into: bounds the partial `dw` / `db` rows kept (`MAX_TASKS * D`
/// values each) while leaving enough tasks for every core.
const MAX_TASKS: usize = 64;

/// Bytes of dx from which it is written by non-temporal stores: an output this large does not
/// stay in the caches for the next op, and streaming it skips the read of every line before
/// its write (a quarter of the memory traffic).
const STREAM_OUT_BYTES: usize = 16 << 20;

/// Fewest elements a task gets, so that small calls stay on few threads.
const MIN_TASK_ELEMENTS: usize = 1 << 15;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// An element type the backward reads and writes: a [`Widen`] dtype whose compute type (f32,
/// or f64 for f64) is an ordered [`Acc`], with its hand-vectorised row kernel where it has
/// one.
trait VjpFloat: Widen<C: Acc + PartialOrd> {
    /// [`Job::rows`] through the AVX2 kernel of [`avx2`], or `None` where this type has no
    /// such kernel or the CPU cannot run it (the portable loop runs then).
    fn simd_rows(
        _job: &Job<'_, Self::C>,
        _x: &[Self],
        _g: &[Self],
        _out: &mut [Self],
    ) -> Option<Result<Partials<Self::C>>> {
        None
    }
}

impl VjpFloat for f64 {}

/// The types of the AVX2 kernel (bf16, f16, f32).
macro_rules! simd_vjp_float {
    ($($t:ty),*) => {$(
        impl VjpFloat for $t {
            #[cfg(target_arch = "x86_64")]
            fn simd_rows(
                job: &Job<'_, f32>,
                x: &[$t],
                g: &[$t],
                out: &mut [$t],
            ) -> Option<Result<Partials<f32>>> {
                avx2::rows(job, x, g, out)
            }
        }
    )*};
}

simd_vjp_float!(f32, bf16, f16);

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

/// The logical elements of a row-major array from [`dense`], borrowed (not its whole buffer:
/// an empty view of a broadcast buffer still has one element).
fn rows_of<T: VjpFloat>(a: &Array) -> Result<&[T]> {
    a.contiguous_slice::<T>()?
        .ok_or_else(|| Error::invalid("norm backward: a row-major copy was expected".to_string()))
}

fn run_typed<T: VjpFloat>(args: &NormVjpArgs) -> Result<(Array, Option<Array>, Option<Array>)> {
    let fwd = &args.fwd;
    let shape = fwd.x.shape();
    let d = shape.last().copied().unwrap_or(1);
    // Row-major views of the logical elements in T (the arrays themselves when they already
    // are: no copy), read in place.
    let (xa, ga) = (dense::<T>(&fwd.x)?, dense::<T>(&args.cotangent)?);
    let (x, g) = (rows_of::<T>(&xa)?, rows_of::<T>(&ga)?);
    // The weight widened, or ones (one row for the whole call).
    let w: Vec<T::C> = match &fwd.weight {
        Some(w) => host_pool::map(rows_of::<T>(&dense::<T>(w)?)?, |v| v.widen())?,
        None => host_pool::filled(d, T::C::ONE)?,
    };
    let layer = fwd.kind == NormKind::Layer;
    let want_dw = fwd.weight.is_some();
    let want_db = layer && fwd.bias.is_some();

    let n = x.len();
    // Every element is written below (n > 0 means d > 0 and whole rows).
    let mut dx = host_pool::take_or_zeroed::<T>(n)?;
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
            w: &w,
            want_dw,
            want_db,
            stream_out: std::mem::size_of_val(x) >= STREAM_OUT_BYTES,
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

/// `sum(f(x[i], g[i], w[i]))` over a row with [`LANES`] independent accumulators, added up
/// as `lane_sum` does. (One sum a pass: two accumulator arrays in one loop make LLVM pair
/// them into scalar-sized vectors.)
#[inline(always)]
fn sum3<C: Acc>(x: &[C], g: &[C], w: &[C], f: impl Fn(C, C, C) -> C) -> C {
    let mut s = [C::ZERO; LANES];
    let mut cx = x.chunks_exact(LANES);
    let mut cg = g.chunks_exact(LANES);
    let mut cw = w.chunks_exact(LANES);
    for ((x, g), w) in (&mut cx).zip(&mut cg).zip(&mut cw) {
        for i in 0..LANES {
            s[i] = s[i] + f(x[i], g[i], w[i]);
        }
    }
    let mut rest = C::ZERO;
    for ((&x, &g), &w) in cx
        .remainder()
        .iter()
        .zip(cg.remainder())
        .zip(cw.remainder())
    {
        rest = rest + f(x, g, w);
    }
    s.iter().fold(rest, |u, &v| u + v)
}

/// One task's `dw` and `db` sums (each empty when not wanted).
type Partials<C> = (Vec<C>, Vec<C>);

/// What every task of a call shares.
struct Job<'a, C> {
    layer: bool,
    d: usize,
    eps: C,
    inv_d: C,
    /// The weight in the compute type, or ones.
    w: &'a [C],
    want_dw: bool,
    want_db: bool,
    /// Whether dx is written past the caches (non-temporal stores, where the kernel can):
    /// the call's dx is at least [`STREAM_OUT_BYTES`].
    stream_out: bool,
}

impl<C: Acc + PartialOrd> Job<'_, C> {
    /// Writes `dx` for the rows of `x` / `g` (row-major, `d` per row) into `out` and returns
    /// this task's `dw` and `db` sums (empty when not wanted). bf16, f16 and f32 rows take
    /// the AVX2 kernel of [`avx2`] where the CPU runs it (widened in registers, one pass of
    /// statistics and one of outputs; shifted moments for layer norm). Otherwise (f64, or a
    /// CPU without AVX2 / FMA / F16C) each row is widened once (f32 and f64 rows are read in
    /// place) and then taken in two passes (RMS norm: both sums, then the outputs) or three
    /// (layer norm: the means, the centred sums, the outputs); that portable loop is
    /// compiled for AVX2 where the CPU has it (the same operations in the same order: no FMA
    /// contraction, so both builds give the same bits).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the task's rows of scratch cannot be allocated.
    fn rows<T: VjpFloat<C = C>>(&self, x: &[T], g: &[T], out: &mut [T]) -> Result<Partials<C>> {
        if let Some(done) = T::simd_rows(self, x, g, out) {
            return done;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.rows_avx2(x, g, out) };
        }
        self.rows_impl(x, g, out)
    }

    /// [`Job::rows`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_avx2<T: VjpFloat<C = C>>(
        &self,
        x: &[T],
        g: &[T],
        out: &mut [T],
    ) -> Result<Partials<C>> {
        self.rows_impl(x, g, out)
    }

    /// The body of [`Job::rows`].
    #[inline(always)]
    fn rows_impl<T: VjpFloat<C = C>>(
        &self,
        x: &[T],
        g: &[T],
        out: &mut [T],
    ) -> Result<Partials<C>> {
        let d = self.d;
        let mut dw = host_pool::filled(if self.want_dw { d } else { 0 }, C::ZERO)?;
        let mut db = host_pool::filled(if self.want_db { d } else { 0 }, C::ZERO)?;
        let widened = T::as_compute(x).is_none();
        let scratch = if widened { d } else { 0 };
        let mut xs = host_pool::filled(scratch, C::ZERO)?;
        let mut gs = host_pool::filled(scratch, C::ZERO)?;
        let w = self.w;
        let row_bytes = d * std::mem::size_of::<T>();
        for (r, ((xr, gr), o)) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
            .enumerate()
        {
            // The next row's inputs are fetched while this one is computed (its passes run
            // from L1 / L2); without it the memory idles between rows' first reads.
            #[cfg(target_arch = "x86_64")]
            {
                prefetch(x.as_ptr().wrapping_add((r + 1) * d).cast(), row_bytes);
                prefetch(g.as_ptr().wrapping_add((r + 1) * d).cast(), row_bytes);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (r, row_bytes);
            let (xr, gr): (&[C], &[C]) = match (T::as_compute(xr), T::as_compute(gr)) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    T::widen_slice(xr, &mut xs);
                    T::widen_slice(gr, &mut gs);
                    (&xs, &gs)
                }
            };
            // Row statistics as the forward computes them (layer norm: the mean, then the
            // variance about it), with the sums of g * w and g * w * (x - mean).
            let (mean, mean_gw) = if self.layer {
                let sx = sum3(xr, gr, w, |x, _, _| x);
                let sgw = sum3(xr, gr, w, |_, g, w| g * w);
                (sx * self.inv_d, sgw * self.inv_d)
            } else {
                (C::ZERO, C::ZERO)
            };
            let var = sum3(xr, gr, w, |x, _, _| (x - mean) * (x - mean));
            let sum_gwx = sum3(xr, gr, w, |x, g, w| g * w * (x - mean));
            let var = var * self.inv_d;
            let n = C::ONE / (var + self.eps).sqrt();
            let c = sum_gwx * self.inv_d * n * n * n;
            // dx, and this row's share of dw and db, in one pass.
            let (o, xr, gr, w) = (&mut o[..d], &xr[..d], &gr[..d], &w[..d]);
            let dx_at = |i: usize| T::narrow((gr[i] * w[i] - mean_gw) * n - (xr[i] - mean) * c);
            match (self.want_dw, self.want_db) {
                (true, true) => {
                    let (dw, db) = (&mut dw[..d], &mut db[..d]);
                    for i in 0..d {
                        o[i] = dx_at(i);
                        dw[i] = dw[i] + gr[i] * (xr[i] - mean) * n;
                        db[i] = db[i] + gr[i];
                    }
                }
                (true, false) => {
                    let dw = &mut dw[..d];
                    for i in 0..d {
                        o[i] = dx_at(i);
                        dw[i] = dw[i] + gr[i] * (xr[i] - mean) * n;
                    }
                }
                (false, true) => {
                    let db = &mut db[..d];
                    for i in 0..d {
                        o[i] = dx_at(i);
                        db[i] = db[i] + gr[i];
                    }
                }
                (false, false) => {
                    for (i, o) in o.iter_mut().enumerate() {
                        *o = dx_at(i);
                    }
                }
            }
        }
        Ok((dw, db))
    }
}
