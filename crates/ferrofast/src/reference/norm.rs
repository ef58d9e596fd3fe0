//! Float64 oracles for `rms_norm` and `layer_norm`.

use crate::array::Array;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::norm::{NormArgs, NormKind};
use half::{bf16, f16};

/// `x * rsqrt(mean(x^2, -1) + eps) * weight` in plain f64 over the values as given (no
/// intermediate rounding), for `x` of any dtype and layout. Returns an `F64` array of
/// `x`'s shape.
///
/// # Errors
/// The validation errors of [`fast::rms_norm`](crate::fast::rms_norm).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    norm_rows(NormArgs::rms(x, weight, eps)?, |row| rms_stats(row, eps))
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
        layer_stats(row, eps)
    })
}

/// `(0, rsqrt(mean(row^2) + eps))` in f64.
fn rms_stats(row: &[f64], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let ms = row.iter().map(|v| v * v).sum::<f64>() / n;
    (0.0, 1.0 / (ms + f64::from(eps)).sqrt())
}

/// `(mean, rsqrt(var + eps))` of `row` in f64, with the biased two-pass variance.
fn layer_stats(row: &[f64], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + f64::from(eps)).sqrt())
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

/// A float64 oracle that rounds where MLX's kernels round, with the tolerance a result in
/// the output dtype has against it: see [`rms_norm_rounded`] and [`layer_norm_rounded`].
#[derive(Clone, Debug)]
pub struct RoundedNorm {
    /// The output dtype of the call (MLX's promotion rule).
    pub dtype: DType,
    /// The reference (`F64`, `x`'s shape).
    pub values: Array,
    /// Per element (`F64`, `x`'s shape), the largest `|result - value|` a correct result in
    /// `dtype` may have, with statistics accurate to a few units in the last place of the
    /// row's spread.
    pub tolerance: Array,
    /// Per element (`F64`, `x`'s shape), what a mean computed plainly in the compute type
    /// may add to `tolerance` on an ill-conditioned row (layer norm; 0 for RMS norm, which
    /// subtracts no mean): see [`layer_norm_rounded`].
    pub conditioning: Array,
}

/// [`rms_norm`] as MLX's kernels round it: the inputs converted to the output dtype, the
/// statistics in f64, the normalised value rounded to the output dtype, then the product
/// with the weight rounded again (f16 and bf16 through f32, as the kernels convert).
///
/// The tolerance of an element is `atol + rtol * scale`, `scale` being the larger of
/// `|x_hat * w|` and the value. f32: `(1e-5, 1e-5)`; f16 and bf16: `(1e-4, 3 ulp)` and
/// `(1e-3, 3 ulp)` (ulp of 1: 2^-10, 2^-7): the oracle's f64 statistics and a kernel's f32
/// ones may round the normalised value to neighbouring values, and that difference carries
/// through the weight multiply and the bias add, each rounded again. f64: `(1e-12, 1e-12)`.
///
/// # Errors
/// The validation errors of [`fast::rms_norm`](crate::fast::rms_norm).
pub fn rms_norm_rounded(x: &Array, weight: Option<&Array>, eps: f32) -> Result<RoundedNorm> {
    rounded_rows(NormArgs::rms(x, weight, eps)?, |row| rms_stats(row, eps))
}

/// [`layer_norm`] as MLX's kernels round it: as [`rms_norm_rounded`], with the sum with the
/// bias rounded last; the scale of an element is `|x_hat * w| + |bias|` (or the value, if
/// larger).
///
/// [`RoundedNorm::conditioning`] bounds the error of a mean computed plainly in the compute
/// type (f32; f64 for f64): off by about a unit in the last place of the row's largest
/// element, which `x - mean` carries into the output scaled by `rsqrt(var + eps)` and the
/// weight, `4 * unit * max|row| * rsqrt(var + eps) * |w|`. That error is inherent in MLX's
/// definition (rows of a large mean and a small spread hit it); a kernel whose statistics
/// do better (sums shifted by an element of the row) is held to `tolerance` alone.
///
/// # Errors
/// The validation errors of [`fast::layer_norm`](crate::fast::layer_norm).
pub fn layer_norm_rounded(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
) -> Result<RoundedNorm> {
    rounded_rows(NormArgs::layer(x, weight, bias, eps)?, |row| {
        layer_stats(row, eps)
    })
}

/// `v` rounded to `dtype` as the kernels round: f16 and bf16 through f32.
fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => f16::from_f32(v as f32).to_f64(),
        DType::BF16 => bf16::from_f32(v as f32).to_f64(),
        _ => v,
    }
}

/// The `(atol, rtol)` of [`rms_norm_rounded`] for `dtype`.
fn rounding_tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (1e-4, 3.0 * 2f64.powi(-10)),
        DType::BF16 => (1e-3, 3.0 * 2f64.powi(-7)),
        _ => (1e-12, 1e-12),
    }
}

/// The rows of a validated call with the roundings of [`rms_norm_rounded`], with
/// `(mean, inv) = stats(row)`.
fn rounded_rows(args: NormArgs, stats: impl Fn(&[f64]) -> (f64, f64)) -> Result<RoundedNorm> {
    let dtype = args.dtype;
    let centred = args.kind == NormKind::Layer;
    let unit = if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f64::from(f32::EPSILON)
    };
    let round = |v: f64| round_to(dtype, v);
    let read =
        |a: &Array| -> Result<Vec<f64>> { Ok(a.to_f64_vec()?.into_iter().map(round).collect()) };
    let d = args.x.shape()[args.x.ndim() - 1];
    let w = args.weight.as_ref().map(read).transpose()?;
    let b = args.bias.as_ref().map(read).transpose()?;
    let xs = read(&args.x)?;
    let (atol, rtol) = rounding_tolerance(dtype);
    let mut values = Vec::with_capacity(xs.len());
    let mut tolerance = Vec::with_capacity(xs.len());
    let mut conditioning = Vec::with_capacity(xs.len());
    if d > 0 {
        for row in xs.chunks_exact(d) {
            let (mean, inv) = stats(row);
            let stats_error = if centred {
                4.0 * unit * row.iter().fold(0.0f64, |m, v| m.max(v.abs())) * inv
            } else {
                0.0
            };
            for (i, &v) in row.iter().enumerate() {
                let mut y = round((v - mean) * inv);
                let mut scale = y.abs();
                let mut error = stats_error;
                if let Some(w) = &w {
                    y = round(y * w[i]);
                    scale = y.abs();
                    error *= w[i].abs();
                }
                if let Some(b) = &b {
                    scale += b[i].abs();
                    y = round(y + b[i]);
                }
                values.push(y);
                tolerance.push(atol + rtol * scale.max(y.abs()));
                conditioning.push(error);
            }
        }
    }
    Ok(RoundedNorm {
        dtype,
        values: Array::from_vec(values, args.x.shape())?,
        tolerance: Array::from_vec(tolerance, args.x.shape())?,
        conditioning: Array::from_vec(conditioning, args.x.shape())?,
    })
}
