//! The row passes in safe, portable code: the reference for [`super::avx2`] and the path on
//! CPUs without AVX2. The loops keep [`LANES`] independent accumulators so that the compiler
//! can vectorise them.

use super::{blocks, exp_nonpositive, Logit, Scan, Scratch};
use std::mem::MaybeUninit;

/// Independent accumulators per reduction (two AVX2 registers of f32).
const LANES: usize = 16;

/// A block's maximum (NaNs ignored), whether it holds a NaN, and (with `want_sum_x`) its
/// sum.
fn block_max<T: Logit>(x: &[T], want_sum_x: bool) -> (f32, bool, f64) {
    let mut bm = [f32::NEG_INFINITY; LANES];
    let mut bn = [false; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            let v = c[k].widen();
            bm[k] = if v > bm[k] { v } else { bm[k] };
            bn[k] |= v.is_nan();
        }
    }
    for &e in chunks.remainder() {
        let v = e.widen();
        bm[0] = if v > bm[0] { v } else { bm[0] };
        bn[0] |= v.is_nan();
    }
    let max = bm.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let nan = bn.iter().any(|&n| n);
    let mut sum_x = 0.0;
    if want_sum_x {
        let mut bx = [0.0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for k in 0..LANES {
                bx[k] += c[k].widen();
            }
        }
        for &e in chunks.remainder() {
            bx[0] += e.widen();
        }
        sum_x = bx.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    (max, nan, sum_x)
}

/// `sum_j exp(x_j - m)` over a block (`m` at least every element), each term also stored to
/// `e` when given (same length as `x`).
fn block_exp<T: Logit>(x: &[T], m: f32, e: Option<&mut [f32]>) -> f32 {
    let mut acc = [0.0f32; LANES];
    match e {
        None => {
            let mut chunks = x.chunks_exact(LANES);
            for c in &mut chunks {
                for k in 0..LANES {
                    acc[k] += exp_nonpositive(c[k].widen() - m);
                }
            }
            for &v in chunks.remainder() {
                acc[0] += exp_nonpositive(v.widen() - m);
            }
        }
        Some(e) => {
            let mut xc = x.chunks_exact(LANES);
            let mut ec = e.chunks_exact_mut(LANES);
            for (c, o) in (&mut xc).zip(&mut ec) {
                for k in 0..LANES {
                    let y = exp_nonpositive(c[k].widen() - m);
                    o[k] = y;
                    acc[k] += y;
                }
            }
            for (&v, o) in xc.remainder().iter().zip(ec.into_remainder()) {
                let y = exp_nonpositive(v.widen() - m);
                *o = y;
                acc[0] += y;
            }
        }
    }
    acc.iter().sum()
}

/// The first pass over a row (see [`super::scan`]).
pub(super) fn scan<T: Logit>(x: &[T], want_sum_x: bool, mut store: Option<&mut Scratch>) -> Scan {
    let mut acc = Scan::start(x.len(), store.as_deref_mut());
    for r in blocks(x.len()) {
        let block = &x[r.clone()];
        acc.add_block(block_max(block, want_sum_x));
        acc.add_terms(
            store.as_deref_mut(),
            r,
            |m| block_exp(block, m, None),
            |m, e| block_exp(block, m, Some(e)),
        );
    }
    acc
}

/// `o_j = k e_j - c` over a block (`e` as long as `o`): one block of the second pass of a
/// gradient (see [`super::write`]).
pub(super) fn block_write<T: Logit>(e: &[f32], k: f32, c: f32, o: &mut [MaybeUninit<T>]) {
    for (o, &e) in o.iter_mut().zip(e) {
        o.write(T::narrow(e * k - c));
    }
}
