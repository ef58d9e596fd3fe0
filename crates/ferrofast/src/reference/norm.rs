//! Float64 oracles for `rms_norm` and `layer_norm`.

use crate::array::Array;
use crate::error::Result;
use crate::ops::norm::NormArgs;

/// `x * rsqrt(mean(x^2, -1) + eps) * weight` in plain f64 over the values as given (no
/// intermediate rounding), for `x` of any dtype and layout. Returns an `F64` array of
/// `x`'s shape.
///
/// # Errors
/// The validation errors of [`fast::rms_norm`](crate::fast::rms_norm).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    norm_rows(NormArgs::rms(x, weight, eps)?, |row| {
        let n = row.len() as f64;
        let ms = row.iter().map(|v| v * v).sum::<f64>() / n;
        (0.0, 1.0 / (ms + f64::from(eps)).sqrt())
    })
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis, with the biased
/// two-pass variance, in plain f64 over the values as given, for `x` of any dtype and layout.
/// Returns an `F64` array of `x`'s shape.
///
/// # Errors
/// The validation errors of [`fast::layer_norm`](crate::fast::layer_norm).
pub fn layer_norm(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
) -> Result<Array> {
    norm_rows(NormArgs::layer(x, weight, bias, eps)?, |row| {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, 1.0 / (var + f64::from(eps)).sqrt())
    })
}

/// Applies `(x - mean) * inv * w + b` per row of a validated call, with
/// `(mean, inv) = stats(row)`.
fn norm_rows(args: NormArgs, stats: impl Fn(&[f64]) -> (f64, f64)) -> Result<Array> {
    let d = args.x.shape()[args.x.ndim() - 1];
    let w = args.weight.as_ref().map(Array::to_f64_vec).transpose()?;
    let b = args.bias.as_ref().map(Array::to_f64_vec).transpose()?;
    let xs = args.x.to_f64_vec()?;
    let mut out = Vec::with_capacity(xs.len());
    if d > 0 {
        for row in xs.chunks_exact(d) {
            let (mean, inv) = stats(row);
            for (i, &v) in row.iter().enumerate() {
                let mut y = (v - mean) * inv;
                if let Some(w) = &w {
                    y *= w[i];
                }
                if let Some(b) = &b {
                    y += b[i];
                }
                out.push(y);
            }
        }
    }
    Array::from_vec(out, args.x.shape())
}
