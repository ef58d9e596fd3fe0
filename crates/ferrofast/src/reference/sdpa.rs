//! Float64 oracle for `scaled_dot_product_attention`, following the definition of spec §5.1
//! (MLX's fallback) with plain loops.

use crate::dtype::DType;
use crate::error::Result;
use crate::ops::sdpa::{Mask, SdpaArgs};
use crate::Array;

/// Scaled dot-product attention computed in float64, the test oracle for
/// [`fast::scaled_dot_product_attention`](crate::fast::scaled_dot_product_attention).
///
/// Same arguments, validation and error messages as the fast function. q, k, v, an additive
/// mask and the sinks are first cast to `result_type(q, k, v)` (as MLX does), then every step
/// runs in f64: scores `scale * q·k` (query head `h` uses kv head `h / (N_q / N_kv)`), a key
/// is excluded where a bool mask is `false` or causality hides it (lower-right aligned:
/// query `i` sees key `j` iff `j <= i + T_kv - T_q`), an additive mask is added, the sink
/// joins the softmax as an extra logit, and `P v` is summed. A row left with no logit above
/// `-inf` (no visible key and no sink) is 0, the fast kernel's documented choice.
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
    let c = SdpaArgs::new(q, k, v, scale, mask, sinks)?;
    let [b_n, nq, tq, dv] = c.out_shape;
    let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
    let qv = c.q.to_f64_vec()?;
    let kv = c.k.to_f64_vec()?;
    let vv = c.v.to_f64_vec()?;
    let sinks = c.sinks.as_ref().map(Array::to_f64_vec).transpose()?;
    // `Some(true)` keeps, `Some(false)` drops a key; additive values are kept apart.
    let (keep, add): (Option<Vec<bool>>, Option<Vec<f64>>) = match &c.mask {
        None => (None, None),
        Some(m) if m.dtype() == DType::Bool => (Some(m.to_vec::<bool>()?), None),
        Some(m) => (None, Some(m.to_f64_vec()?)),
    };
    let repeats = nq / nkv.max(1);
    let scale = f64::from(scale);
    let mut out = vec![0.0f64; b_n * nq * tq * dv];
    let mut logits = Vec::with_capacity(tkv);
    for b in 0..b_n {
        for h in 0..nq {
            let g = h / repeats.max(1);
            let kbase = (b * nkv + g) * tkv;
            for i in 0..tq {
                let qrow = &qv[((b * nq + h) * tq + i) * d..][..d];
                let mrow = ((b * nq + h) * tq + i) * tkv;
                logits.clear();
                for j in 0..tkv {
                    let visible = (!c.causal || j as i64 <= i as i64 + tkv as i64 - tq as i64)
                        && keep.as_ref().is_none_or(|kp| kp[mrow + j]);
                    if !visible {
                        continue;
                    }
                    let krow = &kv[(kbase + j) * d..][..d];
                    let s = scale * dot(qrow, krow) + add.as_ref().map_or(0.0, |a| a[mrow + j]);
                    logits.push((j, s));
                }
                let sink = sinks.as_ref().map(|s| s[h]);
                let max = logits
                    .iter()
                    .map(|&(_, s)| s)
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut denom = sink.map_or(0.0, |s| (s - max).exp());
                let orow = &mut out[((b * nq + h) * tq + i) * dv..][..dv];
                for &(j, s) in &logits {
                    let p = (s - max).exp();
                    denom += p;
                    let vrow = &vv[(kbase + j) * dv..][..dv];
                    for (o, x) in orow.iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
                for o in orow.iter_mut() {
                    *o /= denom;
                }
            }
        }
    }
    Array::from_vec(out, &[b_n, nq, tq, dv])
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
