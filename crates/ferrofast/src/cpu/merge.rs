//! CPU kernel of `merge_attention_states`, and the float32 accumulation the context-parallel
//! backward sums its partial gradients with.
//!
//! Rows (`B * H * T` of them, `D_v` elements each) are cut into blocks that run on the rayon
//! pool (small inputs stay on the calling thread). Per row the two factors
//! `c_a = w_a / (w_a + w_b)`, `c_b = w_b / (w_a + w_b)` and the merged log-sum-exp are
//! computed for 64 rows at a time, in f32 by a vectorised pass with polynomial `exp` and
//! `ln(1 + w)` (rows with a non-finite log-sum-exp then through `ops::merge::row_factors_f32`,
//! which carries the special-value rules), in f64 by `row_factors_f64`; the row is then `c_a out_a + c_b out_b`, with a part
//! whose factor is exactly 0 not read at all, so each row takes one of four branch-free
//! loops that the compiler vectorises (compiled a second time for AVX2 and FMA, picked at
//! run time). The parts are read in place through their strides; rows whose feature axis
//! has unit stride are read as slices.

use super::simd::{has_avx2_fma, View, Widen};
use crate::array::{host_pool, Array};
use crate::ops::merge::{row_factors_f32, row_factors_f64, MergeArgs, MIN_LOG_WEIGHT};
use crate::{DType, Element, Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, Mul};

/// Elements a parallel task aims to cover.
const TASK_ELEMS: usize = 1 << 15;
/// Inputs with fewer elements than this stay on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// The arithmetic of a merge: f32 (the log-sum-exps are f32) or f64.
trait Compute:
    Element + Copy + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self>
{
    const ZERO: Self;
    /// `(c_a, c_b, lse)` of each row of a group, from its log-sum-exps `la`, `lb`.
    fn factors(la: &[Self], lb: &[Self], ca: &mut [Self], cb: &mut [Self], lse: &mut [Self]);
}

impl Compute for f32 {
    const ZERO: f32 = 0.0;
    /// One branch-free pass that vectorises (one exponential and one `ln(1 + w)` a row,
    /// polynomials), then the rows with a non-finite log-sum-exp again through
    /// `row_factors_f32`, which gives the special values their rules.
    fn factors(la: &[f32], lb: &[f32], ca: &mut [f32], cb: &mut [f32], lse: &mut [f32]) {
        for ((((&x, &y), a), b), l) in la
            .iter()
            .zip(lb)
            .zip(ca.iter_mut())
            .zip(cb.iter_mut())
            .zip(lse.iter_mut())
        {
            let a_is_max = x >= y;
            let m = if a_is_max { x } else { y };
            // The smaller part's weight e^(min - max); the larger part's is 1.
            let w = exp_nonpositive(-(x - y).abs());
            let big = 1.0 / (1.0 + w);
            let small = w * big;
            *a = if a_is_max { big } else { small };
            *b = if a_is_max { small } else { big };
            *l = m + ln_1p_unit(w);
        }
        for (i, (&x, &y)) in la.iter().zip(lb).enumerate() {
            if !(x.is_finite() && y.is_finite()) {
                (ca[i], cb[i], lse[i]) = row_factors_f32(x, y);
            }
        }
    }
}

impl Compute for f64 {
    const ZERO: f64 = 0.0;
    fn factors(la: &[f64], lb: &[f64], ca: &mut [f64], cb: &mut [f64], lse: &mut [f64]) {
        for (i, (&x, &y)) in la.iter().zip(lb).enumerate() {
            (ca[i], cb[i], lse[i]) = row_factors_f64(x, y);
        }
    }
}

/// `e^x` for `x <= 0` to about one ulp, 0 below [`MIN_LOG_WEIGHT`] (where `e^x` leaves f32's
/// normal range; such a weight contributes nothing, as an underflowed attention weight). Written
/// without branches or calls so that loops over it vectorise; the caller handles NaN and
/// `-inf` inputs.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(MIN_LOG_WEIGHT);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-126, 0]: 2^n is a normal float.
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < MIN_LOG_WEIGHT {
        0.0
    } else {
        p * scale
    }
}

/// `ln(1 + w)` for `w` in `[0, 1]`, to a few ulp and exact in relative terms for small `w`:
/// `2 atanh(s)` with `s = w / (2 + w)` in `[0, 1/3]`, its series to `s^13`.
#[inline(always)]
fn ln_1p_unit(w: f32) -> f32 {
    let s = w / (2.0 + w);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0))))));
    2.0 * s * series
}

/// Rows whose factors one pass computes together.
const FACTOR_ROWS: usize = 64;

/// Runs a validated `merge_attention_states` call on the CPU: `(out, lse)`, both new
/// row-major arrays.
pub(crate) fn run(args: &MergeArgs) -> Result<(Array, Array)> {
    match args.dtype {
        DType::F32 => merge_typed::<f32, f32>(args),
        DType::F16 => merge_typed::<f16, f32>(args),
        DType::BF16 => merge_typed::<bf16, f32>(args),
        DType::F64 => merge_typed::<f64, f64>(args),
        other => Err(Error::invalid(format!(
            "[merge_attention_states] Received unsupported type {other}."
        ))),
    }
}

fn merge_typed<T: Widen<C = C>, C: Compute>(args: &MergeArgs) -> Result<(Array, Array)> {
    let [bn, hn, tn, dv] = args.shape;
    let rows = bn * hn * tn;
    let mut out = host_pool::take_or_zeroed::<T>(rows * dv)?;
    let mut lse = host_pool::take_or_zeroed::<C>(rows)?;
    let oa = View::<T>::new(&args.out_a)?;
    let ob = View::<T>::new(&args.out_b)?;
    let la = View::<C>::new(&args.lse_a)?;
    let lb = View::<C>::new(&args.lse_b)?;
    let avx2 = has_avx2_fma();
    let coords = |r: usize| (r / (hn * tn), (r / tn) % hn, r % tn);
    let block = |first: usize, out: &mut [T], lse: &mut [C]| {
        let (mut lav, mut lbv) = ([C::ZERO; FACTOR_ROWS], [C::ZERO; FACTOR_ROWS]);
        let (mut cav, mut cbv) = ([C::ZERO; FACTOR_ROWS], [C::ZERO; FACTOR_ROWS]);
        // Each row's offsets in the two parts.
        let (mut rav, mut rbv) = ([0isize; FACTOR_ROWS], [0isize; FACTOR_ROWS]);
        for i in 0..lse.len() {
            let g = i % FACTOR_ROWS;
            if g == 0 {
                let n = FACTOR_ROWS.min(lse.len() - i);
                for k in 0..n {
                    let (b, h, t) = coords(first + i + k);
                    lav[k] = la.at(la.pos(b, h, t), 0);
                    lbv[k] = lb.at(lb.pos(b, h, t), 0);
                    rav[k] = oa.pos(b, h, t);
                    rbv[k] = ob.pos(b, h, t);
                }
                C::factors(
                    &lav[..n],
                    &lbv[..n],
                    &mut cav[..n],
                    &mut cbv[..n],
                    &mut lse[i..i + n],
                );
            }
            let (ca, cb, ra, rb) = (cav[g], cbv[g], rav[g], rbv[g]);
            let o = &mut out[i * dv..][..dv];
            match (oa.unit_row(ra, dv), ob.unit_row(rb, dv)) {
                (Some(a), Some(bs)) => row_slices(o, ca, a, cb, bs, avx2),
                _ => {
                    for (j, x) in o.iter_mut().enumerate() {
                        let pa = if ca == C::ZERO {
                            C::ZERO
                        } else {
                            ca * oa.at(ra, j).widen()
                        };
                        let pb = if cb == C::ZERO {
                            C::ZERO
                        } else {
                            cb * ob.at(rb, j).widen()
                        };
                        *x = T::narrow(pa + pb);
                    }
                }
            }
        }
    };
    let rows_per_task = (TASK_ELEMS / dv.max(1)).max(1);
    if rows * dv.max(1) < PARALLEL_MIN_ELEMS {
        block(0, &mut out, &mut lse);
    } else {
        out.par_chunks_mut(rows_per_task * dv.max(1))
            .zip(lse.par_chunks_mut(rows_per_task))
            .enumerate()
            .for_each(|(task, (o, l))| block(task * rows_per_task, o, l));
    }
    let mut lse_shape = args.shape.to_vec();
    lse_shape.pop();
    Ok((
        Array::from_kernel_vec(out, &args.shape)?,
        Array::from_kernel_vec(lse, &lse_shape)?,
    ))
}

/// One row from unit-stride parts: `o = c_a a + c_b b`, a part with factor 0 not read.
#[inline]
fn row_slices<T: Widen<C = C>, C: Compute>(
    o: &mut [T],
    ca: C,
    a: &[T],
    cb: C,
    b: &[T],
    avx2: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma`, checked by the caller).
        return unsafe { row_slices_avx2(o, ca, a, cb, b) };
    }
    let _ = avx2;
    row_slices_generic(o, ca, a, cb, b)
}

/// [`row_slices_generic`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_slices_avx2<T: Widen<C = C>, C: Compute>(
    o: &mut [T],
    ca: C,
    a: &[T],
    cb: C,
    b: &[T],
) {
    row_slices_generic(o, ca, a, cb, b)
}

#[inline(always)]
fn row_slices_generic<T: Widen<C = C>, C: Compute>(o: &mut [T], ca: C, a: &[T], cb: C, b: &[T]) {
    match (ca == C::ZERO, cb == C::ZERO) {
        (true, true) => o.fill(T::narrow(C::ZERO)),
        (false, true) => {
            for (x, &p) in o.iter_mut().zip(a) {
                *x = T::narrow(ca * p.widen());
            }
        }
        (true, false) => {
            for (x, &p) in o.iter_mut().zip(b) {
                *x = T::narrow(cb * p.widen());
            }
        }
        (false, false) => {
            for ((x, &p), &q) in o.iter_mut().zip(a).zip(b) {
                *x = T::narrow(ca * p.widen() + cb * q.widen());
            }
        }
    }
}

/// `acc + x` as a new row-major array of `x`'s shape, float32 (float64 for a float64 `x`;
/// `x` alone, converted, when `acc` is `None`): `x` of any floating dtype and strides, `acc`
/// of the result's dtype and `x`'s shape. One addition per element, in the result's dtype.
pub(crate) fn accumulate(acc: Option<&Array>, x: &Array) -> Result<Array> {
    if x.dtype() == DType::F64 {
        accumulate_typed::<f64>(acc, x)
    } else {
        accumulate_typed::<f32>(acc, x)
    }
}

fn accumulate_typed<T: Compute>(acc: Option<&Array>, x: &Array) -> Result<Array> {
    let mut sum = x.astype(T::DTYPE)?.to_vec::<T>()?;
    if let Some(acc) = acc {
        let a = acc.astype(T::DTYPE)?.to_vec::<T>()?;
        let add = |(s, &v): (&mut T, &T)| *s = v + *s;
        if sum.len() >= PARALLEL_MIN_ELEMS {
            sum.par_iter_mut().zip(a.par_iter()).for_each(add);
        } else {
            sum.iter_mut().zip(a.iter()).for_each(add);
        }
    }
    Array::from_kernel_vec(sum, x.shape())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomials_match_std() {
        let mut worst = (0.0f64, 0.0f64);
        for i in 0..=200_000 {
            let x = -90.0 * f64::from(i) / 200_000.0;
            let e = f64::from(exp_nonpositive(x as f32));
            let want = (x as f32 as f64).exp();
            if x as f32 >= -87.3 {
                worst.0 = worst.0.max((e - want).abs() / want);
            } else {
                assert_eq!(e, 0.0, "{x}");
            }
            let w = f64::from(i) / 200_000.0;
            let l = f64::from(ln_1p_unit(w as f32));
            let want = (w as f32 as f64).ln_1p();
            if w > 0.0 {
                worst.1 = worst.1.max((l - want).abs() / want);
            }
        }
        assert!(worst.0 < 3e-7 && worst.1 < 3e-7, "{worst:?}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(ln_1p_unit(0.0), 0.0);
    }

    #[test]
    fn grouped_factors_agree_with_the_row_rules() {
        let vals = [
            0.0f32,
            1.5,
            -3.25,
            40.0,
            -100.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
        ];
        let (mut la, mut lb) = (Vec::new(), Vec::new());
        for &x in &vals {
            for &y in &vals {
                la.push(x);
                lb.push(y);
            }
        }
        let n = la.len();
        let (mut ca, mut cb, mut l) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        <f32 as Compute>::factors(&la, &lb, &mut ca, &mut cb, &mut l);
        for i in 0..n {
            let (a, b, m) = row_factors_f32(la[i], lb[i]);
            for (got, want) in [(ca[i], a), (cb[i], b), (l[i], m)] {
                assert!(
                    got == want
                        || (got.is_nan() && want.is_nan())
                        || (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{} {}: {got} vs {want}",
                    la[i],
                    lb[i]
                );
            }
            // A factor is exactly 0 exactly when the rules skip that part.
            assert_eq!(ca[i] == 0.0, a == 0.0, "{} {}", la[i], lb[i]);
            assert_eq!(cb[i] == 0.0, b == 0.0, "{} {}", la[i], lb[i]);
        }
    }
}
