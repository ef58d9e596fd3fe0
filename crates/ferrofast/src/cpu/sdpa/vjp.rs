//! CPU backward pass of `scaled_dot_product_attention` (FlashAttention-2's recomputation):
//! the probabilities are rebuilt tile by tile from the saved log-sum-exp, never stored whole.
//!
//! With `P = exp(scale * Q K^T + mask - lse)`, `delta = rowsum(dO * O)` and
//! `dS = P * (dO V^T - delta)`: `dV = P^T dO`, `dK = scale * dS^T Q`, `dQ = scale * dS K`,
//! and a sink's gradient is `-sum P_sink * delta` over its head's rows.
//!
//! Two passes, each with tasks that own what they write, so the result does not depend on
//! the number of threads or their timing: tasks of (batch, kv head, block of keys) sum `dK`
//! and `dV` over every query row of the group's query heads (grouped-query heads are
//! reduced here, without copying K or V), then tasks of (batch, query head, block of
//! queries) sum `dQ` over the keys. Each recomputes its `P` tiles; that costs two products
//! more than a single pass with a shared `dQ` would, and needs no atomics or partial
//! buffers. Products go through `gemm` in the compute type (f32, or f64 for f64 inputs).

use super::{matmul, matmul_add_rows, matmul_rows_t, tile_rows, Acc, Elem, MaskView, Rows, View};
use crate::array::{host_pool, Array};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaVjpArgs;
use half::{bf16, f16};
use rayon::prelude::*;

/// Keys per task of the dK/dV pass and per tile of the dQ pass.
const BKV: usize = 64;
/// Queries per task of the dQ pass and per tile of the dK/dV pass.
const BQV: usize = 64;

/// Runs a validated attention backward call on the CPU. Returns `(dq, dk, dv, dsinks)` in
/// the primals' dtypes (see `fast::scaled_dot_product_attention_vjp`).
pub(crate) fn run(c: &SdpaVjpArgs) -> Result<(Array, Array, Array, Option<Array>)> {
    let grads = match c.fwd.dtype {
        DType::F16 => run_typed::<f16>(c)?,
        DType::BF16 => run_typed::<bf16>(c)?,
        DType::F32 => run_typed::<f32>(c)?,
        DType::F64 => run_typed::<f64>(c)?,
        other => {
            return Err(Error::invalid(format!(
                "[scaled_dot_product_attention_vjp] Received unsupported type {other}."
            )))
        }
    };
    c.to_primals(grads)
}

/// Everything a task reads, shared by all tasks.
struct Ctx<'a, T: Elem> {
    q: View<'a, T>,
    k: View<'a, T>,
    v: View<'a, T>,
    d_out: View<'a, T>,
    mask: Option<MaskView<'a, T>>,
    /// `lse` per row `(b * nq + h) * tq + i`, in the compute type.
    lse: Vec<T::C>,
    /// `rowsum(dO * O)` per row, in the compute type.
    delta: Vec<T::C>,
    causal: bool,
    scale: T::C,
    nq: usize,
    r: usize,
    tq: usize,
    tkv: usize,
    d: usize,
    dv: usize,
}

/// Scratch tiles of one task.
struct Tiles<A> {
    /// Query rows times `scale`, `[nr, d]`.
    q: Vec<A>,
    /// `dO` rows, `[nr, dv]`.
    d_out: Vec<A>,
    /// Probabilities, `[nr, nk]`.
    p: Vec<A>,
    /// `dO V^T`, then `dS`, `[nr, nk]`.
    ds: Vec<A>,
}

impl<A: Acc> Tiles<A> {
    fn new() -> Self {
        Tiles {
            q: Vec::new(),
            d_out: Vec::new(),
            p: Vec::new(),
            ds: Vec::new(),
        }
    }
}

/// Grows `v` to at least `n` values (every value read is written first).
///
/// # Errors
/// `Error::OutOfMemory` when the values cannot be allocated.
fn grow<A: Acc>(v: &mut Vec<A>, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len())
            .map_err(|_| host_pool::out_of_memory::<A>(n))?;
        v.resize(n, A::ZERO);
    }
    Ok(())
}

impl<T: Elem> Ctx<'_, T> {
    /// Query `t` sees key `j` iff `j <= t + off` (causal).
    fn off(&self) -> isize {
        self.tkv as isize - self.tq as isize
    }

    /// Loads `nr` query rows from `q0` of head `(b, h)` (times `scale`) and their `dO`
    /// rows into the tiles.
    fn load_queries(
        &self,
        b: usize,
        h: usize,
        q0: usize,
        nr: usize,
        t: &mut Tiles<T::C>,
    ) -> Result<()> {
        let (d, dv) = (self.d, self.dv);
        grow(&mut t.q, nr * d)?;
        grow(&mut t.d_out, nr * dv)?;
        for i in 0..nr {
            let row = &mut t.q[i * d..][..d];
            self.q.load_row(b, h, q0 + i, row);
            for x in row.iter_mut() {
                *x = *x * self.scale;
            }
            self.d_out
                .load_row(b, h, q0 + i, &mut t.d_out[i * dv..][..dv]);
        }
        Ok(())
    }

    /// For the loaded query tile (`nr` rows from `q0` of head `(b, h)`) against keys
    /// `k0..k0 + nk` of kv head `g`: the probabilities into `t.p` and `dS` into `t.ds`,
    /// both `[nr, nk]` row-major. `kr` and `vr` are the tile's key and value rows.
    #[allow(clippy::too_many_arguments)]
    fn p_and_ds(
        &self,
        b: usize,
        h: usize,
        q0: usize,
        nr: usize,
        k0: usize,
        nk: usize,
        kr: &Rows<'_, T::C>,
        vr: &Rows<'_, T::C>,
        t: &mut Tiles<T::C>,
    ) -> Result<()> {
        let (d, dv) = (self.d, self.dv);
        grow(&mut t.p, nr * nk)?;
        grow(&mut t.ds, nr * nk)?;
        let (p, ds) = (&mut t.p[..nr * nk], &mut t.ds[..nr * nk]);
        // S = (scale Q) K^T and dP = dO V^T.
        matmul_rows_t((nr, nk, d), p, (&t.q, 0), kr);
        matmul_rows_t((nr, nk, dv), ds, (&t.d_out, 0), vr);
        let off = self.off();
        for i in 0..nr {
            let tq = q0 + i;
            let row = (b * self.nq + h) * self.tq + tq;
            let srow = &mut p[i * nk..][..nk];
            if let Some(mask) = &self.mask {
                mask.apply(b, h, tq, k0, srow);
            }
            if self.causal {
                let first_hidden = (tq as isize + off + 1 - k0 as isize).max(0) as usize;
                if first_hidden < nk {
                    srow[first_hidden..].fill(T::C::NEG_INF);
                }
            }
            let lse = self.lse[row];
            let delta = self.delta[row];
            let dsrow = &mut ds[i * nk..][..nk];
            if lse == T::C::NEG_INF {
                // A row that saw nothing has no probabilities and no gradient.
                srow.fill(T::C::ZERO);
                dsrow.fill(T::C::ZERO);
                continue;
            }
            for (s, g) in srow.iter_mut().zip(dsrow.iter_mut()) {
                let pv = if *s == T::C::NEG_INF {
                    T::C::ZERO
                } else {
                    (*s - lse).exp()
                };
                *s = pv;
                *g = pv * (*g - delta);
            }
        }
        Ok(())
    }

    /// `dK` and `dV` of keys `k0..k0 + nk` of kv head `(b, g)`, written (rounded to `T`)
    /// into `dk_out` (`[nk, d]`) and `dv_out` (`[nk, dv]`).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the task's tiles cannot be allocated.
    fn dkdv(
        &self,
        b: usize,
        g: usize,
        k0: usize,
        dk_out: &mut [T],
        dv_out: &mut [T],
    ) -> Result<()> {
        let (d, dv) = (self.d, self.dv);
        let nk = BKV.min(self.tkv - k0);
        let mut t = Tiles::new();
        let mut dk = host_pool::filled(nk * d, T::C::ZERO)?;
        let mut dvv = host_pool::filled(nk * dv, T::C::ZERO)?;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let kr = tile_rows(self.k, b, g, k0, nk, d, &mut ks)?;
        let vr = tile_rows(self.v, b, g, k0, nk, dv, &mut vs)?;
        // Causal: only queries t with t + off >= k0 see any of these keys.
        let first_q = if self.causal {
            (k0 as isize - self.off()).clamp(0, self.tq as isize) as usize
        } else {
            0
        };
        for h in g * self.r..(g + 1) * self.r {
            let mut q0 = first_q;
            while q0 < self.tq {
                let nr = BQV.min(self.tq - q0);
                self.load_queries(b, h, q0, nr, &mut t)?;
                self.p_and_ds(b, h, q0, nr, k0, nk, &kr, &vr, &mut t)?;
                // dV += P^T dO; dK += dS^T (scale Q).
                matmul_add_t((nr, nk, dv), &mut dvv, &t.p, &t.d_out);
                matmul_add_t((nr, nk, d), &mut dk, &t.ds, &t.q);
                q0 += nr;
            }
        }
        for (o, &a) in dk_out.iter_mut().zip(&dk) {
            *o = T::narrow(a);
        }
        for (o, &a) in dv_out.iter_mut().zip(&dvv) {
            *o = T::narrow(a);
        }
        Ok(())
    }

    /// `dQ` of queries `q0..q0 + nr` of head `(b, h)`, written (rounded to `T`) into `out`
    /// (`[nr, d]`).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the task's tiles cannot be allocated.
    fn dq(&self, b: usize, h: usize, q0: usize, out: &mut [T]) -> Result<()> {
        let d = self.d;
        let nr = BQV.min(self.tq - q0);
        let g = h / self.r;
        let mut t = Tiles::new();
        let mut acc = host_pool::filled(nr * d, T::C::ZERO)?;
        self.load_queries(b, h, q0, nr, &mut t)?;
        // Causal: the last query of the tile sees keys up to q0 + nr - 1 + off.
        let k_end = if self.causal {
            (q0 as isize + nr as isize + self.off()).clamp(0, self.tkv as isize) as usize
        } else {
            self.tkv
        };
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let mut k0 = 0;
        while k0 < k_end {
            let nk = BKV.min(k_end - k0);
            let kr = tile_rows(self.k, b, g, k0, nk, d, &mut ks)?;
            let vr = tile_rows(self.v, b, g, k0, nk, self.dv, &mut vs)?;
            self.p_and_ds(b, h, q0, nr, k0, nk, &kr, &vr, &mut t)?;
            // dQ += dS K (times scale below).
            matmul_add_rows((nr, nk, d), &mut acc, &t.ds, &kr);
            k0 += nk;
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = T::narrow(a * self.scale);
        }
        Ok(())
    }
}

/// `dst[nk x n] += a^T b` through [`matmul`]: `a` is `[m, nk]` and `b` is `[m, n]`, both
/// row-major from their start; `dst` is row-major with row stride `n`.
#[inline(always)]
fn matmul_add_t<A: Acc>((m, nk, n): (usize, usize, usize), dst: &mut [A], a: &[A], b: &[A]) {
    matmul(nk, n, m, dst, n, true, (a, 0, 1, nk), (b, 0, n, 1));
}

fn run_typed<T: Elem>(c: &SdpaVjpArgs) -> Result<(Array, Array, Array, Option<Array>)> {
    let a = &c.fwd;
    let [bn, nq, tq, dv] = a.out_shape;
    let (nkv, tkv, d) = (a.k.shape()[1], a.k.shape()[2], a.k.shape()[3]);
    let r = nq.checked_div(nkv).unwrap_or(1);
    // Checked: with D and D_v of 0 the arrays hold no element whatever the other sizes.
    let rows = crate::array::checked_size(&[bn, nq, tq])?;
    // delta = rowsum(dO * O) and lse, per row, in the compute type.
    let o = View::<T>::new(&c.out)?;
    let d_out = View::<T>::new(&c.d_out)?;
    let mut delta = host_pool::filled(rows, T::C::ZERO)?;
    {
        let (mut orow, mut grow_) = (
            host_pool::filled(dv, T::C::ZERO)?,
            host_pool::filled(dv, T::C::ZERO)?,
        );
        for (row, dl) in delta.iter_mut().enumerate() {
            let (bh, i) = (row / tq.max(1), row % tq.max(1));
            let (b, h) = (bh / nq, bh % nq);
            o.load_row(b, h, i, &mut orow);
            d_out.load_row(b, h, i, &mut grow_);
            let mut s = T::C::ZERO;
            for (x, y) in orow.iter().zip(&grow_) {
                s = s + *x * *y;
            }
            *dl = s;
        }
    }
    let lse: Vec<T::C> = host_pool::map(&c.lse.to_f64_vec()?, T::C::from_f64)?;
    let mask = MaskView::new(a.mask.as_ref())?;
    let ctx = Ctx {
        q: View::new(&a.q)?,
        k: View::new(&a.k)?,
        v: View::new(&a.v)?,
        d_out,
        mask,
        lse,
        delta,
        causal: a.causal,
        scale: T::C::from_f32(a.scale),
        nq,
        r,
        tq,
        tkv,
        d,
        dv,
    };

    // Each task returns its block; blocks are copied into place in task order.
    // The gradients have their primals' shapes, whose sizes every `Array` keeps in range.
    let mut dq = host_pool::take_filled(a.q.size(), T::default())?;
    let mut dk = host_pool::take_filled(a.k.size(), T::default())?;
    let mut dvv = host_pool::take_filled(a.v.size(), T::default())?;
    if tkv > 0 && rows > 0 {
        let kv_tasks: Vec<(usize, usize, usize)> = (0..bn * nkv)
            .flat_map(|bg| {
                (0..tkv)
                    .step_by(BKV)
                    .map(move |k0| (bg / nkv, bg % nkv, k0))
            })
            .collect();
        let blocks: Vec<(Vec<T>, Vec<T>)> = kv_tasks
            .par_iter()
            .map(|&(b, g, k0)| {
                let nk = BKV.min(tkv - k0);
                let mut bk = host_pool::filled(nk * d, T::default())?;
                let mut bv = host_pool::filled(nk * dv, T::default())?;
                ctx.dkdv(b, g, k0, &mut bk, &mut bv)?;
                Ok((bk, bv))
            })
            .collect::<Result<_>>()?;
        for (&(b, g, k0), (bk, bv)) in kv_tasks.iter().zip(&blocks) {
            let row0 = (b * nkv + g) * tkv + k0;
            dk[row0 * d..][..bk.len()].copy_from_slice(bk);
            dvv[row0 * dv..][..bv.len()].copy_from_slice(bv);
        }
        if d > 0 {
            let q_tasks: Vec<(usize, usize, usize)> = (0..bn * nq)
                .flat_map(|bh| (0..tq).step_by(BQV).map(move |q0| (bh / nq, bh % nq, q0)))
                .collect();
            let blocks: Vec<Vec<T>> = q_tasks
                .par_iter()
                .map(|&(b, h, q0)| {
                    let mut bq = host_pool::filled(BQV.min(tq - q0) * d, T::default())?;
                    ctx.dq(b, h, q0, &mut bq)?;
                    Ok(bq)
                })
                .collect::<Result<_>>()?;
            for (&(b, h, q0), bq) in q_tasks.iter().zip(&blocks) {
                let row0 = (b * nq + h) * tq + q0;
                dq[row0 * d..][..bq.len()].copy_from_slice(bq);
            }
        }
    }
    // Sinks: dsink_h = -sum over the head's rows of P_sink * delta, summed in row order.
    let dsinks = match &a.sinks {
        None => None,
        Some(s) => {
            let sinks = s.to_f64_vec()?;
            let mut g = host_pool::filled(nq, 0.0f64)?;
            for (row, (&l, &dl)) in ctx.lse.iter().zip(&ctx.delta).enumerate() {
                let h = (row / tq.max(1)) % nq;
                let l = l.to_f64();
                if l != f64::NEG_INFINITY {
                    g[h] -= (sinks[h] - l).exp() * dl.to_f64();
                }
            }
            Some(Array::from_kernel_vec(g, &[nq])?.astype(c.fwd.dtype)?)
        }
    };
    Ok((
        Array::from_kernel_vec(dq, a.q.shape())?,
        Array::from_kernel_vec(dk, a.k.shape())?,
        Array::from_kernel_vec(dvv, a.v.shape())?,
        dsinks,
    ))
}
