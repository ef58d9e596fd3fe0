//! Float64 oracle for `scaled_dot_product_attention`, its log-sum-exp and its backward pass,
//! following the definition of spec §5.1 (MLX's fallback) with plain loops.

use crate::dtype::DType;
use crate::error::Result;
use crate::ops::sdpa::{check_output_shape, Mask, SdpaArgs};
use crate::Array;

/// A validated call's inputs in f64, with the definition of its softmax.
struct Oracle {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    sinks: Option<Vec<f64>>,
    /// Bool mask values (`true` keeps a key), broadcast to `[B, N_q, T_q, T_kv]`.
    keep: Option<Vec<bool>>,
    /// Additive mask values, broadcast likewise.
    add: Option<Vec<f64>>,
    causal: bool,
    scale: f64,
    nq: usize,
    nkv: usize,
    tq: usize,
    tkv: usize,
    d: usize,
    dv: usize,
}

impl Oracle {
    fn new(c: &SdpaArgs) -> Result<Oracle> {
        let (keep, add) = match &c.mask {
            None => (None, None),
            Some(m) if m.dtype() == DType::Bool => (Some(m.to_vec::<bool>()?), None),
            Some(m) => (None, Some(m.to_f64_vec()?)),
        };
        Ok(Oracle {
            q: c.q.to_f64_vec()?,
            k: c.k.to_f64_vec()?,
            v: c.v.to_f64_vec()?,
            sinks: c.sinks.as_ref().map(Array::to_f64_vec).transpose()?,
            keep,
            add,
            causal: c.causal,
            scale: f64::from(c.scale),
            nq: c.out_shape[1],
            nkv: c.k.shape()[1],
            tq: c.out_shape[2],
            tkv: c.k.shape()[2],
            d: c.k.shape()[3],
            dv: c.out_shape[3],
        })
    }

    /// The kv head of query head `h`.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.nq / self.nkv.max(1)).max(1)
    }

    fn q_row(&self, b: usize, h: usize, i: usize) -> &[f64] {
        &self.q[((b * self.nq + h) * self.tq + i) * self.d..][..self.d]
    }

    /// Key `j` of the kv head that query head `h` reads.
    fn k_row(&self, b: usize, h: usize, j: usize) -> &[f64] {
        &self.k[((b * self.nkv + self.kv_head(h)) * self.tkv + j) * self.d..][..self.d]
    }

    /// Value `j` of the kv head that query head `h` reads.
    fn v_row(&self, b: usize, h: usize, j: usize) -> &[f64] {
        &self.v[((b * self.nkv + self.kv_head(h)) * self.tkv + j) * self.dv..][..self.dv]
    }

    /// The softmax of row `(b, h, i)`: `(key, probability)` of each visible key (a key is
    /// hidden where a bool mask is `false` or causality hides it: query `i` sees key `j` iff
    /// `j <= i + T_kv - T_q`), and the log-sum-exp over the visible scores and the sink.
    /// A key whose logit is `-inf` gets no probability (its value row is never read). A row
    /// with no logit above `-inf` has no probabilities and a log-sum-exp of `-inf`; a row
    /// with a NaN logit (or a sink of `+inf`, which makes the softmax `inf / inf`) has a
    /// log-sum-exp of NaN and is NaN throughout (`None`).
    fn probabilities(&self, b: usize, h: usize, i: usize) -> (Option<Vec<(usize, f64)>>, f64) {
        let mrow = ((b * self.nq + h) * self.tq + i) * self.tkv;
        let qrow = self.q_row(b, h, i);
        let mut logits = Vec::with_capacity(self.tkv);
        for j in 0..self.tkv {
            let visible = (!self.causal || j as i64 <= i as i64 + self.tkv as i64 - self.tq as i64)
                && self.keep.as_ref().is_none_or(|kp| kp[mrow + j]);
            if visible {
                let s = self.scale * dot(qrow, self.k_row(b, h, j))
                    + self.add.as_ref().map_or(0.0, |a| a[mrow + j]);
                logits.push((j, s));
            }
        }
        let sink = self.sinks.as_ref().map(|s| s[h]);
        if logits.iter().any(|&(_, s)| s.is_nan())
            || sink.is_some_and(|s| s.is_nan() || s == f64::INFINITY)
        {
            return (None, f64::NAN);
        }
        logits.retain(|&(_, s)| s != f64::NEG_INFINITY);
        let max = logits
            .iter()
            .map(|&(_, s)| s)
            .chain(sink)
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return (Some(Vec::new()), f64::NEG_INFINITY);
        }
        let denom = sink.map_or(0.0, |s| (s - max).exp())
            + logits.iter().map(|&(_, s)| (s - max).exp()).sum::<f64>();
        let probs = logits
            .into_iter()
            .map(|(j, s)| (j, (s - max).exp() / denom))
            .collect();
        (Some(probs), max + denom.ln())
    }
}

/// Scaled dot-product attention computed in float64, the test oracle for
/// [`fast::scaled_dot_product_attention`](crate::fast::scaled_dot_product_attention).
///
/// Same arguments, validation and error messages as the fast function. q, k, v, an additive
/// mask and the sinks are first cast to `result_type(q, k, v)` (as MLX does), then every step
/// runs in f64: scores `scale * q·k` (query head `h` uses kv head `h / (N_q / N_kv)`), a key
/// is excluded where a bool mask is `false` or causality hides it (lower-right aligned:
/// query `i` sees key `j` iff `j <= i + T_kv - T_q`), an additive mask is added, the sink
/// joins the softmax as an extra logit, and `P v` is summed. A row left with no logit above
/// `-inf` (no visible key and no sink) is 0, the fast kernel's documented choice; a key
/// whose logit is `-inf` gets no weight and its value row is never read; a row with a NaN
/// logit or a sink of `+inf` is NaN (log-sum-exp NaN). See "Special values" in
/// `docs/architecture.md`.
///
/// Returns an `F64` array of shape `[B, N_q, T_q, D_v]`.
///
/// # Errors
/// Exactly those of the fast function.
pub fn scaled_dot_product_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    scaled_dot_product_attention_with_lse(q, k, v, scale, mask, sinks).map(|(out, _)| out)
}

/// Attention in plain f64 with its log-sum-exp, following
/// [`fast::scaled_dot_product_attention_with_lse`](crate::fast::scaled_dot_product_attention_with_lse):
/// the output as [`scaled_dot_product_attention`](super::scaled_dot_product_attention) gives
/// it, and `lse = ln(sum_j exp(s_j) + exp(sink))` per row over the visible scores `s_j =
/// scale * q·k_j + mask` (`-inf` for a row with nothing visible). Returns `F64` arrays of
/// shapes `[B, N_q, T_q, D_v]` and `[B, N_q, T_q]`.
///
/// # Errors
/// As the fast function.
pub fn scaled_dot_product_attention_with_lse(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<(Array, Array)> {
    let c = SdpaArgs::new(q, k, v, scale, mask, sinks)?;
    let o = Oracle::new(&c)?;
    let [b_n, nq, tq, dv] = c.out_shape;
    let mut out = vec![0.0f64; b_n * nq * tq * dv];
    let mut lse = vec![f64::NEG_INFINITY; b_n * nq * tq];
    for b in 0..b_n {
        for h in 0..nq {
            for i in 0..tq {
                let row = (b * nq + h) * tq + i;
                let (probs, l) = o.probabilities(b, h, i);
                lse[row] = l;
                let orow = &mut out[row * dv..][..dv];
                let Some(probs) = probs else {
                    orow.fill(f64::NAN);
                    continue;
                };
                for &(j, p) in &probs {
                    for (x, y) in orow.iter_mut().zip(o.v_row(b, h, j)) {
                        *x += p * y;
                    }
                }
            }
        }
    }
    Ok((
        Array::from_vec(out, &c.out_shape)?,
        Array::from_vec(lse, &[b_n, nq, tq])?,
    ))
}

/// The backward pass of attention in plain f64, following
/// [`fast::scaled_dot_product_attention_vjp`](crate::fast::scaled_dot_product_attention_vjp),
/// from the inputs and the output's cotangent alone (the output and the probabilities are
/// recomputed exactly): `(dq, dk, dv, dsinks)` as `F64` arrays of the primals' shapes,
/// `dsinks` only with sinks. Grouped-query heads sum their `dk` and `dv` into their kv head.
///
/// # Errors
/// As the forward; `Error::InvalidArgument` when `d_out` is not of the output's shape.
#[allow(clippy::type_complexity)]
pub fn scaled_dot_product_attention_vjp(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
    d_out: &Array,
) -> Result<(Array, Array, Array, Option<Array>)> {
    let c = SdpaArgs::new(q, k, v, scale, mask, sinks)?;
    check_output_shape("d_out", d_out, &c.out_shape)?;
    let o = Oracle::new(&c)?;
    let g = d_out.astype(c.dtype)?.to_f64_vec()?;
    let [b_n, nq, tq, dv] = c.out_shape;
    let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
    let repeats = (nq / nkv.max(1)).max(1);
    let scale = f64::from(scale);
    let mut dq = vec![0.0f64; b_n * nq * tq * d];
    let mut dk = vec![0.0f64; b_n * nkv * tkv * d];
    let mut dvv = vec![0.0f64; b_n * nkv * tkv * dv];
    let mut ds = vec![0.0f64; nq];
    for b in 0..b_n {
        for h in 0..nq {
            let kvh = h / repeats;
            for i in 0..tq {
                let row = (b * nq + h) * tq + i;
                let (probs, lse) = o.probabilities(b, h, i);
                let Some(probs) = probs else {
                    // A NaN row: its probabilities are NaN, and so is every gradient they
                    // reach (its dq row, dk and dv of every key of its kv head, its sink's).
                    dq[row * d..][..d].fill(f64::NAN);
                    let keys = (b * nkv + kvh) * tkv;
                    dk[keys * d..][..tkv * d].fill(f64::NAN);
                    dvv[keys * dv..][..tkv * dv].fill(f64::NAN);
                    ds[h] = f64::NAN;
                    continue;
                };
                let grow = &g[row * dv..][..dv];
                let mut out = vec![0.0f64; dv];
                for &(j, p) in &probs {
                    for (x, y) in out.iter_mut().zip(o.v_row(b, h, j)) {
                        *x += p * y;
                    }
                }
                let delta: f64 = grow.iter().zip(&out).map(|(a, b)| a * b).sum();
                if let (Some(s), true) = (&o.sinks, lse > f64::NEG_INFINITY) {
                    ds[h] -= (s[h] - lse).exp() * delta;
                }
                let qrow = o.q_row(b, h, i);
                for &(j, p) in &probs {
                    let vrow = o.v_row(b, h, j);
                    let dp: f64 = grow.iter().zip(vrow).map(|(a, b)| a * b).sum();
                    let dsc = p * (dp - delta);
                    let kr = (b * nkv + kvh) * tkv + j;
                    for (x, y) in dvv[kr * dv..][..dv].iter_mut().zip(grow) {
                        *x += p * y;
                    }
                    for (x, y) in dk[kr * d..][..d].iter_mut().zip(qrow) {
                        *x += scale * dsc * y;
                    }
                    for (x, y) in dq[row * d..][..d].iter_mut().zip(o.k_row(b, h, j)) {
                        *x += scale * dsc * y;
                    }
                }
            }
        }
    }
    Ok((
        Array::from_vec(dq, c.q.shape())?,
        Array::from_vec(dk, c.k.shape())?,
        Array::from_vec(dvv, c.v.shape())?,
        o.sinks
            .as_ref()
            .map(|_| Array::from_vec(ds, &[nq]))
            .transpose()?,
    ))
}

/// `sum(a[i] * b[i])` in f64 with four partial sums (a plain loop the compiler can pipeline).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}
