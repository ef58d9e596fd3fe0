//! The row passes in safe, portable code: the reference for [`super::avx2`] and the path on
//! CPUs without AVX2. The loops keep [`LANES`] independent accumulators so that the compiler
//! can vectorise them.

use super::{blocks, exp_nonpositive, raise_max, Logit, Scan, Scratch};
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
    if let Some(sc) = store.as_deref_mut() {
        sc.prepare(x.len());
    }
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f32;
    let mut sum_x = 0.0f64;
    let mut nan = false;
    for r in blocks(x.len()) {
        let block = &x[r.clone()];
        let (bm, bn, bsx) = block_max(block, want_sum_x);
        nan |= bn;
        sum_x += bsx;
        raise_max(&mut m, &mut s, bm);
        let e = store.as_deref_mut().map(|sc| {
            sc.block_max.push(m);
            &mut sc.e[r]
        });
        if m.is_finite() {
            s += block_exp(block, m, e);
        } else if let Some(e) = e {
            // All of the block is -inf (or NaN), or the row's maximum is +inf (the gradient
            // is then taken from the logits): the stored terms are 0.
            e.fill(0.0);
        }
    }
    Scan {
        max: m,
        sum: s,
        sum_x,
        nan,
    }
}

/// `o_j = k e_j - c` over a block (`e` as long as `o`): one block of the second pass of a
/// gradient (see [`super::write`]).
pub(super) fn block_write<T: Logit>(e: &[f32], k: f32, c: f32, o: &mut [MaybeUninit<T>]) {
    for (o, &e) in o.iter_mut().zip(e) {
        o.write(T::narrow(e * k - c));
    }
}
