//! CPU kernels for `gated_delta_update` and its backward.
//!
//! One task per `(batch, value head)`, spread over rayon; a task keeps its `[Dv, Dk]` float32
//! state in one buffer (64 KiB at Dk = Dv = 128: in L2) and walks the steps in order. A step
//! touches each state row once in the forward: the row is decayed and dotted with `k` in one
//! loop, then updated and dotted with `q` in a second, while it is in L1. Inputs are read as
//! float32 copies in row-major order (any dtype and strides), so the loops are unit-stride.
//! The row loops are compiled twice, for baseline x86-64 and for AVX2 + FMA, and picked at
//! run time.
//!
//! The backward recomputes states instead of storing one per step: the forward is run once
//! more, keeping the state at the start of every chunk of [`ckpt_chunk`] steps; the steps
//! are then walked backwards a chunk at a time, the chunk's states recomputed from its
//! checkpoint. Memory per task is `(T / C + C + 1)` states for chunks of `C ≈ sqrt(T)`.
//! The query and key gradients of the value heads that share a key head are summed in head
//! order after every task has finished, so results do not depend on scheduling.

use super::simd::has_avx2_fma;
use crate::array::{checked_size, host_pool};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::gated_delta::{Form, GatedDeltaArgs, GatedDeltaGrads, GatedDeltaVjpArgs};
use crate::Array;
use rayon::prelude::*;
use std::borrow::Cow;

/// Defines `$name(args.., fma)`, which runs `$generic::<true>` compiled for AVX2 + FMA (through
/// `$avx2`, an `unsafe fn` also defined here) when `fma` is true, and `$generic::<false>`
/// otherwise; callers pass `fma = has_avx2_fma()`. A `#[target_feature]` function cannot be
/// generic over its features, hence a macro rather than a function.
macro_rules! fma_dispatch {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident / $avx2:ident => $generic:ident(
            $($arg:ident: $ty:ty),* $(,)?
        ) $(-> $ret:ty)?
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty,)* fma: bool) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma`, checked by the caller).
                return unsafe { $avx2($($arg),*) };
            }
            let _ = fma;
            $generic::<false>($($arg),*)
        }

        #[doc = concat!("[`", stringify!($generic), "`] compiled for AVX2 + FMA.")]
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[allow(clippy::too_many_arguments)]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $generic::<true>($($arg),*)
        }
    };
}

mod chunked;
mod rows;

/// State rows a task steps together through every step: 16 rows of Dk = 128 are 8 KiB,
/// which stay in L1 while the step's key, query and decay are reused for each.
const ROWS: usize = 16;

/// Every input as float32 (mask as bool), row-major: borrowed when the array is a
/// contiguous float32 one, else a copy.
struct Inputs<'a> {
    q: Cow<'a, [f32]>,
    k: Cow<'a, [f32]>,
    v: Cow<'a, [f32]>,
    gamma: Cow<'a, [f32]>,
    beta: Cow<'a, [f32]>,
    state0: Option<Cow<'a, [f32]>>,
    mask: Option<Vec<bool>>,
}

/// `a` in row-major order as f32, borrowed when it already is.
fn f32s(a: &Array) -> Result<Cow<'_, [f32]>> {
    if a.dtype() == DType::F32 {
        if let Some(s) = a.contiguous_slice::<f32>()? {
            return Ok(Cow::Borrowed(s));
        }
    }
    Ok(Cow::Owned(a.astype(DType::F32)?.to_vec::<f32>()?))
}

impl<'a> Inputs<'a> {
    fn load(a: &'a GatedDeltaArgs) -> Result<Inputs<'a>> {
        Ok(Inputs {
            q: f32s(&a.q)?,
            k: f32s(&a.k)?,
            v: f32s(&a.v)?,
            gamma: f32s(&a.gamma)?,
            beta: f32s(&a.beta)?,
            state0: a.state0.as_ref().map(f32s).transpose()?,
            mask: a
                .mask
                .as_ref()
                .map(|m| m.astype(DType::Bool)?.to_vec::<bool>())
                .transpose()?,
        })
    }
}

/// One task's view of the inputs: head `(b, h)`.
struct Head<'a> {
    a: &'a GatedDeltaArgs,
    x: &'a Inputs<'a>,
    b: usize,
    h: usize,
}

impl Head<'_> {
    fn taken(&self, t: usize) -> bool {
        self.x
            .mask
            .as_ref()
            .is_none_or(|m| m[self.b * self.a.t + t])
    }
    fn qk_at(&self, t: usize) -> usize {
        let a = self.a;
        ((self.b * a.t + t) * a.hk + self.h / a.group()) * a.dk
    }
    fn q(&self, t: usize) -> &[f32] {
        &self.x.q[self.qk_at(t)..][..self.a.dk]
    }
    fn k(&self, t: usize) -> &[f32] {
        &self.x.k[self.qk_at(t)..][..self.a.dk]
    }
    /// Index of `(b, t, h)` in `[B, T, Hv]`.
    fn bth(&self, t: usize) -> usize {
        (self.b * self.a.t + t) * self.a.hv + self.h
    }
    fn v(&self, t: usize) -> &[f32] {
        &self.x.v[self.bth(t) * self.a.dv..][..self.a.dv]
    }
    fn beta(&self, t: usize) -> f32 {
        self.x.beta[self.bth(t)]
    }
    /// The decay of step `t` per key dimension, in `buf` (`Dk` values).
    fn gamma<'b>(&'b self, t: usize, buf: &'b mut [f32]) -> &'b [f32] {
        let dk = self.a.dk;
        if self.a.per_key_gamma {
            &self.x.gamma[self.bth(t) * dk..][..dk]
        } else {
            buf.fill(self.x.gamma[self.bth(t)]);
            buf
        }
    }
    /// State rows `r0..r0 + s.len() / Dk` of the head's initial state into `s`.
    fn init(&self, r0: usize, s: &mut [f32]) {
        match &self.x.state0 {
            Some(s0) => {
                let start = (self.b * self.a.hv + self.h) * self.a.dv * self.a.dk;
                s.copy_from_slice(&s0[start + r0 * self.a.dk..][..s.len()]);
            }
            None => s.fill(0.0),
        }
    }
}

/// Runs a validated `gated_delta_update` call on the CPU: `(out, state)`.
///
/// Each task writes its head's final state in place in the `[B, Hv, Dv, Dk]` result and its
/// outputs into a `[B, Hv, T, Dv]` buffer, which is transposed to `[B, T, Hv, Dv]` once at
/// the end.
pub(crate) fn run(a: &GatedDeltaArgs) -> Result<(Array, Array)> {
    let n = checked_size(&[a.dv, a.dk])?;
    // Every element of both is written below (each task initialises its state and writes
    // every step's output), so neither is cleared first.
    let mut state = host_pool::take_or_zeroed::<f32>(checked_size(&a.state_shape())?)?;
    let per_head = a.t * a.dv;
    let mut outs = host_pool::take_or_zeroed::<f32>(checked_size(&a.out_shape())?)?;
    if n > 0 && per_head > 0 {
        let x = Inputs::load(a)?;
        let fma = has_avx2_fma();
        let chunks = uses_chunks(a);
        state
            .par_chunks_mut(n)
            .zip(outs.par_chunks_mut(per_head))
            .enumerate()
            .try_for_each(|(task, (s, out))| -> Result<()> {
                let head = Head {
                    a,
                    x: &x,
                    b: task / a.hv,
                    h: task % a.hv,
                };
                head.init(0, s);
                if chunks {
                    return chunked::head_forward(&head, s, out, fma);
                }
                let mut gbuf = host_pool::filled(a.dk, 0.0f32)?;
                for (blk, rows) in s.chunks_mut(ROWS * a.dk).enumerate() {
                    let r0 = blk * ROWS;
                    forward(&head, 0..a.t, rows, r0, Some(out), &mut gbuf, None, fma);
                }
                Ok(())
            })?;
    } else if n > 0 {
        // No step (T = 0): the state is the initial one; `outs` is empty.
        match &a.state0 {
            Some(s0) => state.copy_from_slice(&f32s(s0)?),
            None => state.fill(0.0),
        }
    }
    let out = Array::from_kernel_vec(outs, &[a.b, a.hv, a.t, a.dv])?
        .transpose(&[0, 2, 1, 3])?
        .astype(a.out_dtype)?
        .contiguous()?;
    Ok((out, Array::from_kernel_vec(state, &a.state_shape())?))
}

/// Whether the forward runs in chunks ([`chunked`]) rather than step by step.
fn uses_chunks(a: &GatedDeltaArgs) -> bool {
    a.chunkable()
        && match Form::from_env() {
            Form::Sequential => false,
            Form::Chunked => true,
            Form::Auto => false,
        }
}

/// Steps `steps` of state rows `r0..r0 + s.len() / Dk` of one head, held in `s` (updated in
/// place). With `out` (`[T, Dv]`), writes those rows' output of each step (0 for a
/// masked-out step); with `keep`, copies the rows after each step into consecutive slots of
/// `s.len()` floats.
#[allow(clippy::too_many_arguments)]
fn forward(
    head: &Head<'_>,
    steps: std::ops::Range<usize>,
    s: &mut [f32],
    r0: usize,
    mut out: Option<&mut [f32]>,
    gbuf: &mut [f32],
    mut keep: Option<&mut [f32]>,
    fma: bool,
) {
    let (dv, n) = (head.a.dv, s.len());
    let nr = n / head.a.dk.max(1);
    for (j, t) in steps.enumerate() {
        if head.taken(t) {
            let o = out.as_deref_mut().map(|o| &mut o[t * dv + r0..][..nr]);
            step(head, t, s, r0, o, gbuf, fma);
        } else if let Some(o) = out.as_deref_mut() {
            o[t * dv + r0..][..nr].fill(0.0);
        }
        if let Some(k) = keep.as_deref_mut() {
            k[j * n..][..n].copy_from_slice(s);
        }
    }
}

fma_dispatch! {
    /// One taken step of the recurrence on state rows `r0..` held in `s`; writes their `S q`
    /// into `out` when given.
    #[inline]
    fn step / step_avx2 => step_generic(
        head: &Head<'_>,
        t: usize,
        s: &mut [f32],
        r0: usize,
        out: Option<&mut [f32]>,
        gbuf: &mut [f32],
    )
}

#[inline(always)]
fn step_generic<const F: bool>(
    head: &Head<'_>,
    t: usize,
    s: &mut [f32],
    r0: usize,
    mut out: Option<&mut [f32]>,
    gbuf: &mut [f32],
) {
    let dk = head.a.dk;
    let (kt, qt, vt, beta) = (head.k(t), head.q(t), head.v(t), head.beta(t));
    let g = head.gamma(t, gbuf);
    // Four rows at a time where there are four (independent reductions overlap), then the
    // rest one by one.
    let quads = s.len() / (4 * dk.max(1));
    let (four, rest) = s.split_at_mut(quads * 4 * dk);
    for (qi, rows4) in four.chunks_exact_mut(4 * dk.max(1)).enumerate() {
        let i = qi * 4;
        let kv = rows::scale_dot4::<F>(rows4, dk, g, kt);
        let delta: [f32; 4] = std::array::from_fn(|r| (vt[r0 + i + r] - kv[r]) * beta);
        match out.as_deref_mut() {
            Some(o) => {
                let y = rows::axpy_dot4::<F>(rows4, dk, delta, kt, qt);
                o[i..i + 4].copy_from_slice(&y);
            }
            None => {
                for (row, d) in rows4.chunks_exact_mut(dk).zip(delta) {
                    rows::axpy::<F>(row, d, kt);
                }
            }
        }
    }
    for (i, row) in rest.chunks_exact_mut(dk.max(1)).enumerate() {
        let i = quads * 4 + i;
        let kv = rows::scale_dot::<F>(row, g, kt);
        let delta = (vt[r0 + i] - kv) * beta;
        match out.as_deref_mut() {
            Some(o) => o[i] = rows::axpy_dot::<F>(row, delta, kt, qt),
            None => rows::axpy::<F>(row, delta, kt),
        }
    }
}

/// Steps per checkpoint of the backward for `t` steps: about `sqrt(t)`, at least 8.
fn ckpt_chunk(t: usize) -> usize {
    ((t as f64).sqrt().ceil() as usize).clamp(8, 256)
}

/// One task's gradients: head `(b, h)`.
struct HeadGrads {
    /// `[T, Dk]`, this value head's share of the key head's gradients.
    dq: Vec<f32>,
    dk: Vec<f32>,
    /// `[T, Dv]`.
    dv: Vec<f32>,
    /// `[T, Dk]` per key dimension or `[T]`.
    dg: Vec<f32>,
    /// `[T]`.
    db: Vec<f32>,
    /// `[Dv, Dk]`.
    ds0: Vec<f32>,
}

/// Runs a validated `gated_delta_update_vjp` call on the CPU.
pub(crate) fn vjp(args: &GatedDeltaVjpArgs) -> Result<GatedDeltaGrads> {
    let a = &args.fwd;
    checked_size(&a.state_shape())?;
    if args.is_trivial() {
        return args.trivial_grads(|d| d.astype(DType::F32)?.contiguous());
    }
    let x = Inputs::load(a)?;
    let d_out = f32s(&args.d_out)?;
    let d_state = args.d_state.as_ref().map(f32s).transpose()?;
    let (bs, ts, hk, hv, dv, dk) = (a.b, a.t, a.hk, a.hv, a.dv, a.dk);
    let gk = if a.per_key_gamma { dk } else { 1 };
    let fma = has_avx2_fma();
    let tasks: Vec<HeadGrads> = (0..bs * hv)
        .into_par_iter()
        .map(|task| {
            let head = Head {
                a,
                x: &x,
                b: task / hv,
                h: task % hv,
            };
            let ds = d_state.as_ref().map(|s| &s[task * dv * dk..][..dv * dk]);
            head_vjp(&head, &d_out, ds, fma)
        })
        .collect::<Result<_>>()?;
    let mut dq = host_pool::filled(bs * ts * hk * dk, 0.0f32)?;
    let mut dkk = host_pool::filled(bs * ts * hk * dk, 0.0f32)?;
    let mut dvv = host_pool::filled(bs * ts * hv * dv, 0.0f32)?;
    let mut dg = host_pool::filled(bs * ts * hv * gk, 0.0f32)?;
    let mut db = host_pool::filled(bs * ts * hv, 0.0f32)?;
    let mut ds0 = host_pool::with_capacity::<f32>(bs * hv * dv * dk)?;
    // Value heads in order: the group sums are the same on every run.
    for (task, g) in tasks.iter().enumerate() {
        let (b, h) = (task / hv, task % hv);
        let kh = h / a.group();
        for t in 0..ts {
            let qk = ((b * ts + t) * hk + kh) * dk;
            for j in 0..dk {
                dq[qk + j] += g.dq[t * dk + j];
                dkk[qk + j] += g.dk[t * dk + j];
            }
            let bth = (b * ts + t) * hv + h;
            dvv[bth * dv..][..dv].copy_from_slice(&g.dv[t * dv..][..dv]);
            dg[bth * gk..][..gk].copy_from_slice(&g.dg[t * gk..][..gk]);
            db[bth] = g.db[t];
        }
        ds0.extend_from_slice(&g.ds0);
    }
    let grad = |data: Vec<f32>, like: &Array| {
        Array::from_kernel_vec(data, like.shape())?.astype(like.dtype())
    };
    Ok(GatedDeltaGrads {
        dq: grad(dq, &a.q)?,
        dk: grad(dkk, &a.k)?,
        dv: grad(dvv, &a.v)?,
        dgamma: grad(dg, &a.gamma)?,
        dbeta: grad(db, &a.beta)?,
        dstate0: match &a.state0 {
            Some(s) => Some(Array::from_kernel_vec(ds0, s.shape())?),
            None => None,
        },
    })
}

/// The backward of one head, a block of [`ROWS`] state rows at a time (rows evolve
/// independently; only the key-side gradients sum over them): checkpoints of the block, then
/// the steps in reverse a chunk at a time.
fn head_vjp(
    head: &Head<'_>,
    d_out: &[f32],
    d_state: Option<&[f32]>,
    fma: bool,
) -> Result<HeadGrads> {
    let a = head.a;
    let (ts, dv, dk) = (a.t, a.dv, a.dk);
    let gk = if a.per_key_gamma { dk } else { 1 };
    let c = ckpt_chunk(ts);
    let chunks = ts.div_ceil(c);
    let nb = checked_size(&[ROWS.min(dv), dk])?;
    let mut gbuf = host_pool::filled(dk, 0.0f32)?;
    let mut g = HeadGrads {
        dq: host_pool::filled(ts * dk, 0.0f32)?,
        dk: host_pool::filled(ts * dk, 0.0f32)?,
        dv: host_pool::filled(ts * dv, 0.0f32)?,
        dg: host_pool::filled(ts * gk, 0.0f32)?,
        db: host_pool::filled(ts, 0.0f32)?,
        ds0: match d_state {
            Some(d) => {
                let mut v = host_pool::with_capacity(dv * dk)?;
                v.extend_from_slice(d);
                v
            }
            None => host_pool::filled(dv * dk, 0.0f32)?,
        },
    };
    if nb == 0 {
        return Ok(g);
    }
    if uses_chunks(a) {
        chunked::head_vjp(head, d_out, &mut g, fma)?;
        return Ok(g);
    }
    // The block's rows at the start of every chunk, and `states[j]`: the rows before step
    // `c0 + j` of the chunk being walked (`states[len]` after it).
    let mut ckpt = host_pool::filled(checked_size(&[chunks, nb])?, 0.0f32)?;
    let mut states = host_pool::filled(checked_size(&[c + 1, nb])?, 0.0f32)?;
    let mut s = host_pool::filled(nb, 0.0f32)?;
    let mut dg_row = host_pool::filled(dk, 0.0f32)?;
    for (blk, ds) in g.ds0.chunks_mut(nb).enumerate() {
        let r0 = blk * ROWS;
        let n = ds.len();
        let nr = n / dk;
        head.init(r0, &mut s[..n]);
        for ch in 0..chunks {
            ckpt[ch * n..][..n].copy_from_slice(&s[..n]);
            if ch + 1 < chunks {
                let steps = ch * c..(ch + 1) * c;
                forward(head, steps, &mut s[..n], r0, None, &mut gbuf, None, fma);
            }
        }
        for ch in (0..chunks).rev() {
            let (c0, c1) = (ch * c, ((ch + 1) * c).min(ts));
            states[..n].copy_from_slice(&ckpt[ch * n..][..n]);
            s[..n].copy_from_slice(&ckpt[ch * n..][..n]);
            let keep = Some(&mut states[n..]);
            forward(head, c0..c1, &mut s[..n], r0, None, &mut gbuf, keep, fma);
            for t in (c0..c1).rev() {
                if !head.taken(t) {
                    continue;
                }
                let j = t - c0;
                let (sp, sn) = states[j * n..(j + 2) * n].split_at(n);
                let d_o = &d_out[head.bth(t) * dv + r0..][..nr];
                let st = StepGrads {
                    dq: &mut g.dq[t * dk..][..dk],
                    dk: &mut g.dk[t * dk..][..dk],
                    dv: &mut g.dv[t * dv + r0..][..nr],
                    dg: &mut dg_row,
                };
                g.db[t] += step_vjp(head, t, sp, sn, r0, d_o, ds, st, &mut gbuf, fma);
                if a.per_key_gamma {
                    for (d, x) in g.dg[t * dk..][..dk].iter_mut().zip(&*dg_row) {
                        *d += x;
                    }
                } else {
                    g.dg[t] += dg_row.iter().sum::<f32>();
                }
            }
        }
    }
    Ok(g)
}

/// The gradients one step writes.
struct StepGrads<'a> {
    /// `[Dk]`, added to.
    dq: &'a mut [f32],
    /// `[Dk]`, added to.
    dk: &'a mut [f32],
    /// `[rows]`, written.
    dv: &'a mut [f32],
    /// `[Dk]`, written: the decay's gradient per key dimension.
    dg: &'a mut [f32],
}

fma_dispatch! {
    /// The backward of taken step `t` over state rows `r0..`: `sp` / `sn` are the rows before
    /// and after it, `ds` their gradient after it (turned into the gradient before it), `d_o`
    /// their outputs' cotangent. Returns their share of `dbeta`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn step_vjp / step_vjp_avx2 => step_vjp_generic(
        head: &Head<'_>,
        t: usize,
        sp: &[f32],
        sn: &[f32],
        r0: usize,
        d_o: &[f32],
        ds: &mut [f32],
        g: StepGrads<'_>,
        gbuf: &mut [f32],
    ) -> f32
}

/// Per state row `i` (`S_new = A + delta k^T`, `A = S_prev * g`, `o = S_new q`):
/// `dS += do_i q`, `dq += do_i S_new`, `d_delta = dS · k`, `dk += delta dS - dv_i A`,
/// `dv_i = d_delta beta`, `dbeta += d_delta (v_i - A · k)`, `dA = dS - dv_i k`,
/// `dg += dA * S_prev`, `dS_prev = dA * g`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn step_vjp_generic<const F: bool>(
    head: &Head<'_>,
    t: usize,
    sp: &[f32],
    sn: &[f32],
    r0: usize,
    d_o: &[f32],
    ds: &mut [f32],
    g: StepGrads<'_>,
    gbuf: &mut [f32],
) -> f32 {
    let dk = head.a.dk;
    let (kt, qt, vt, beta) = (head.k(t), head.q(t), head.v(t), head.beta(t));
    let gam = head.gamma(t, gbuf);
    g.dg.fill(0.0);
    let mut dbeta = 0.0f32;
    let rows = sp
        .chunks_exact(dk.max(1))
        .zip(sn.chunks_exact(dk.max(1)))
        .zip(ds.chunks_exact_mut(dk.max(1)));
    for (i, ((sp, sn), ds)) in rows.enumerate() {
        let x = rows::RowIn {
            sp,
            sn,
            g: gam,
            k: kt,
            q: qt,
        };
        let (kv, dd) = rows::vjp_pass1::<F>(&x, d_o[i], ds, g.dq);
        let resid = vt[r0 + i] - kv;
        let dvi = dd * beta;
        g.dv[i] = dvi;
        dbeta += dd * resid;
        rows::vjp_pass2::<F>(&x, resid * beta, dvi, ds, g.dk, g.dg);
    }
    dbeta
}
