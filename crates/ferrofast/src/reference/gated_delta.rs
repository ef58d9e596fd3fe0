//! Float64 oracles for `gated_delta_update` and its backward: the plain recurrence of
//! `ops/gated_delta.rs`, one step at a time, every state kept.

use crate::array::Array;
use crate::error::Result;
use crate::ops::gated_delta::{GatedDeltaArgs, GatedDeltaGrads, GatedDeltaVjpArgs};

/// [`fast::gated_delta_update`](crate::fast::gated_delta_update) in plain f64 (the state kept
/// in f64 too): returns `(out, state)` as `F64` arrays of shapes `[B, T, Hv, Dv]` and
/// `[B, Hv, Dv, Dk]`.
///
/// # Errors
/// The validation errors of [`fast::gated_delta_update`](crate::fast::gated_delta_update).
pub fn gated_delta_update(
    q: &Array,
    k: &Array,
    v: &Array,
    gamma: &Array,
    beta: &Array,
    initial_state: Option<&Array>,
    mask: Option<&Array>,
) -> Result<(Array, Array)> {
    let args = GatedDeltaArgs::new(q, k, v, gamma, beta, initial_state, mask)?;
    if args.t == 0 || args.hv == 0 || args.dv * args.dk == 0 {
        // No step, no value head or an empty state: `out` is zeros or empty, the state is
        // the initial one; no loop over (batch, head) pairs that do nothing.
        let state = match &args.state0 {
            Some(s) => s.astype(crate::DType::F64)?.contiguous()?,
            None => Array::zeros(&args.state_shape(), crate::DType::F64, &crate::Device::Cpu)?,
        };
        let out = Array::zeros(&args.out_shape(), crate::DType::F64, &crate::Device::Cpu)?;
        return Ok((out, state));
    }
    let x = Inputs::load(&args)?;
    let (bs, ts, hv, dv, dk) = (args.b, args.t, args.hv, args.dv, args.dk);
    let mut out = vec![0.0; bs * ts * hv * dv];
    let mut state = Vec::with_capacity(bs * hv * dv * dk);
    for b in 0..bs {
        for h in 0..hv {
            let states = x.run(&args, b, h);
            for t in 0..ts {
                let o = &mut out[((b * ts + t) * hv + h) * dv..][..dv];
                if x.taken(&args, b, t) {
                    let s = &states[t + 1];
                    let q = x.q(&args, b, t, h);
                    for (i, oi) in o.iter_mut().enumerate() {
                        *oi = dot(&s[i * dk..][..dk], q);
                    }
                }
            }
            state.extend_from_slice(&states[ts]);
        }
    }
    Ok((
        Array::from_vec(out, &args.out_shape())?,
        Array::from_vec(state, &args.state_shape())?,
    ))
}

/// [`fast::gated_delta_update_vjp`](crate::fast::gated_delta_update_vjp) in plain f64: the
/// gradients of `sum(out * d_out) + sum(state * d_state)` with respect to every primal, as
/// `F64` arrays (`dstate0` only when `initial_state` is given).
///
/// # Errors
/// The validation errors of
/// [`fast::gated_delta_update_vjp`](crate::fast::gated_delta_update_vjp).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update_vjp(
    q: &Array,
    k: &Array,
    v: &Array,
    gamma: &Array,
    beta: &Array,
    initial_state: Option<&Array>,
    mask: Option<&Array>,
    d_out: &Array,
    d_state: Option<&Array>,
) -> Result<GatedDeltaGrads> {
    let fwd = GatedDeltaArgs::new(q, k, v, gamma, beta, initial_state, mask)?;
    let args = GatedDeltaVjpArgs::new(fwd, d_out, d_state)?;
    let a = &args.fwd;
    if a.t == 0 || a.hv == 0 || a.dv * a.dk == 0 {
        // Nothing depends on anything: zero gradients, the state's passes through.
        let zeros =
            |like: &Array| Array::zeros(like.shape(), crate::DType::F64, &crate::Device::Cpu);
        let ds0 = match (&a.state0, &args.d_state) {
            (Some(_), Some(d)) => Some(d.astype(crate::DType::F64)?.contiguous()?),
            (Some(s), None) => Some(zeros(s)?),
            (None, _) => None,
        };
        return Ok(GatedDeltaGrads {
            dq: zeros(&a.q)?,
            dk: zeros(&a.k)?,
            dv: zeros(&a.v)?,
            dgamma: zeros(&a.gamma)?,
            dbeta: zeros(&a.beta)?,
            dstate0: ds0,
        });
    }
    let x = Inputs::load(a)?;
    let d_out = args.d_out.to_f64_vec()?;
    let d_state = match &args.d_state {
        Some(s) => Some(s.to_f64_vec()?),
        None => None,
    };
    let (bs, ts, hk, hv, dv, dk) = (a.b, a.t, a.hk, a.hv, a.dv, a.dk);
    let gk = if a.per_key_gamma { dk } else { 1 };
    let mut dq = vec![0.0; bs * ts * hk * dk];
    let mut dkk = vec![0.0; bs * ts * hk * dk];
    let mut dvv = vec![0.0; bs * ts * hv * dv];
    let mut dg = vec![0.0; bs * ts * hv * gk];
    let mut db = vec![0.0; bs * ts * hv];
    let mut ds0 = Vec::with_capacity(bs * hv * dv * dk);
    for b in 0..bs {
        for h in 0..hv {
            let kh = h / a.group();
            let states = x.run(a, b, h);
            let base = (b * hv + h) * dv * dk;
            let mut ds = match &d_state {
                Some(s) => s[base..base + dv * dk].to_vec(),
                None => vec![0.0; dv * dk],
            };
            for t in (0..ts).rev() {
                if !x.taken(a, b, t) {
                    continue;
                }
                let (sp, sn) = (&states[t], &states[t + 1]);
                let (q, kt, vt) = (x.q(a, b, t, h), x.k(a, b, t, h), x.v(a, b, t, h));
                let g = x.gamma(a, b, t, h);
                let beta = x.beta[(b * ts + t) * hv + h];
                let d_o = &d_out[((b * ts + t) * hv + h) * dv..][..dv];
                let qk = ((b * ts + t) * hk + kh) * dk;
                let vi = ((b * ts + t) * hv + h) * dv;
                let gi = ((b * ts + t) * hv + h) * gk;
                for i in 0..dv {
                    let row = i * dk;
                    let gj = |j: usize| if g.len() == 1 { g[0] } else { g[j] };
                    // o = S_new q.
                    for j in 0..dk {
                        dq[qk + j] += d_o[i] * sn[row + j];
                        ds[row + j] += d_o[i] * q[j];
                    }
                    // S_new = A + delta k^T, A = S_prev * g, delta = (v - A k) beta.
                    let kv: f64 = (0..dk).map(|j| sp[row + j] * gj(j) * kt[j]).sum();
                    let delta = (vt[i] - kv) * beta;
                    let d_delta: f64 = (0..dk).map(|j| ds[row + j] * kt[j]).sum();
                    let dvi = d_delta * beta;
                    dvv[vi + i] += dvi;
                    db[(b * ts + t) * hv + h] += d_delta * (vt[i] - kv);
                    let dkv = -dvi;
                    for j in 0..dk {
                        let aij = sp[row + j] * gj(j);
                        dkk[qk + j] += ds[row + j] * delta + dkv * aij;
                        let da = ds[row + j] + dkv * kt[j];
                        dg[gi + if gk == 1 { 0 } else { j }] += da * sp[row + j];
                        ds[row + j] = da * gj(j);
                    }
                }
            }
            ds0.extend_from_slice(&ds);
        }
    }
    let grad = |data: Vec<f64>, like: &Array| Array::from_vec(data, like.shape());
    Ok(GatedDeltaGrads {
        dq: grad(dq, &a.q)?,
        dk: grad(dkk, &a.k)?,
        dv: grad(dvv, &a.v)?,
        dgamma: grad(dg, &a.gamma)?,
        dbeta: grad(db, &a.beta)?,
        dstate0: match &a.state0 {
            Some(s) => Some(grad(ds0, s)?),
            None => None,
        },
    })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Every input in f64, row-major.
struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    state0: Option<Vec<f64>>,
    mask: Option<Vec<f64>>,
}

impl Inputs {
    fn load(a: &GatedDeltaArgs) -> Result<Inputs> {
        Ok(Inputs {
            q: a.q.to_f64_vec()?,
            k: a.k.to_f64_vec()?,
            v: a.v.to_f64_vec()?,
            gamma: a.gamma.to_f64_vec()?,
            beta: a.beta.to_f64_vec()?,
            state0: match &a.state0 {
                Some(s) => Some(s.to_f64_vec()?),
                None => None,
            },
            mask: match &a.mask {
                Some(m) => Some(m.to_f64_vec()?),
                None => None,
            },
        })
    }

    fn taken(&self, a: &GatedDeltaArgs, b: usize, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[b * a.t + t] != 0.0)
    }

    fn q(&self, a: &GatedDeltaArgs, b: usize, t: usize, h: usize) -> &[f64] {
        &self.q[((b * a.t + t) * a.hk + h / a.group()) * a.dk..][..a.dk]
    }

    fn k(&self, a: &GatedDeltaArgs, b: usize, t: usize, h: usize) -> &[f64] {
        &self.k[((b * a.t + t) * a.hk + h / a.group()) * a.dk..][..a.dk]
    }

    fn v(&self, a: &GatedDeltaArgs, b: usize, t: usize, h: usize) -> &[f64] {
        &self.v[((b * a.t + t) * a.hv + h) * a.dv..][..a.dv]
    }

    /// One decay, or `Dk` of them.
    fn gamma(&self, a: &GatedDeltaArgs, b: usize, t: usize, h: usize) -> &[f64] {
        let n = if a.per_key_gamma { a.dk } else { 1 };
        &self.gamma[((b * a.t + t) * a.hv + h) * n..][..n]
    }

    /// The states of head `(b, h)` before step 0 and after every step (`T + 1` of them,
    /// `[Dv, Dk]` each).
    fn run(&self, a: &GatedDeltaArgs, b: usize, h: usize) -> Vec<Vec<f64>> {
        let (dv, dk) = (a.dv, a.dk);
        let mut s = match &self.state0 {
            Some(s0) => s0[(b * a.hv + h) * dv * dk..][..dv * dk].to_vec(),
            None => vec![0.0; dv * dk],
        };
        let mut states = Vec::with_capacity(a.t + 1);
        states.push(s.clone());
        for t in 0..a.t {
            if self.taken(a, b, t) {
                let (kt, vt) = (self.k(a, b, t, h), self.v(a, b, t, h));
                let g = self.gamma(a, b, t, h);
                let beta = self.beta[(b * a.t + t) * a.hv + h];
                for i in 0..dv {
                    let row = &mut s[i * dk..][..dk];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x *= if g.len() == 1 { g[0] } else { g[j] };
                    }
                    let delta = (vt[i] - dot(row, kt)) * beta;
                    for (x, kj) in row.iter_mut().zip(kt) {
                        *x += delta * kj;
                    }
                }
            }
            states.push(s.clone());
        }
        states
    }
}
