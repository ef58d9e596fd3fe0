//! Float64 oracles for `rms_norm` and `layer_norm`.

use crate::array::{fmt_shape, Array};
use crate::error::{Error, Result};

/// `x * rsqrt(mean(x^2, -1) + eps) * weight` in plain f64 over the values as given (no
/// intermediate rounding), for `x` of any dtype and layout. Returns an `F64` array of
/// `x`'s shape.
///
/// # Errors
/// `Error::InvalidArgument` if `x` has no dimensions or `weight` is not a vector of `x`'s
/// last dimension.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    norm_rows(x, weight, None, |row| {
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
/// `Error::InvalidArgument` if `x` has no dimensions or `weight`/`bias` is not a vector of
/// `x`'s last dimension.
pub fn layer_norm(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
) -> Result<Array> {
    norm_rows(x, weight, bias, |row| {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, 1.0 / (var + f64::from(eps)).sqrt())
    })
}

/// Applies `(x - mean) * inv * w + b` per row, with `(mean, inv) = stats(row)`.
fn norm_rows(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    stats: impl Fn(&[f64]) -> (f64, f64),
) -> Result<Array> {
    let Some(&d) = x.shape().last() else {
        return Err(Error::invalid(
            "reference norm: x must have at least 1 dimension",
        ));
    };
    let param = |p: Option<&Array>| -> Result<Option<Vec<f64>>> {
        match p {
            Some(p) if p.shape() != [d] => Err(Error::invalid(format!(
                "reference norm: parameter of shape {} does not match last dimension {d}",
                fmt_shape(p.shape())
            ))),
            Some(p) => Ok(Some(p.to_f64_vec()?)),
            None => Ok(None),
        }
    };
    let w = param(weight)?;
    let b = param(bias)?;
    let xs = x.to_f64_vec()?;
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
    Array::from_vec(out, x.shape())
}
