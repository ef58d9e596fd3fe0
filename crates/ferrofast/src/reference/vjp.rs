//! Float64 oracles of the backward passes.

use crate::ops::norm::{NormArgs, NormKind, NormVjpArgs};
use crate::{Array, Result};

/// The backward pass of `rms_norm` in plain f64 over the values as given (no intermediate
/// rounding): `(dx, dweight)` for the cotangent `cotangent` of the output, following
/// [`fast::rms_norm_vjp`](crate::fast::rms_norm_vjp). Returns `F64` arrays of `x`'s and the
/// weight's shapes; `dweight` only with a weight.
///
/// # Errors
/// As [`fast::rms_norm_vjp`](crate::fast::rms_norm_vjp).
pub fn rms_norm_vjp(
    x: &Array,
    weight: Option<&Array>,
    eps: f32,
    cotangent: &Array,
) -> Result<(Array, Option<Array>)> {
    let args = NormVjpArgs::new(NormArgs::rms(x, weight, eps)?, cotangent)?;
    norm_vjp(&args).map(|(dx, dw, _)| (dx, dw))
}

/// The backward pass of `layer_norm` in plain f64 over the values as given: `(dx, dweight,
/// dbias)`, following [`fast::layer_norm_vjp`](crate::fast::layer_norm_vjp). Returns `F64`
/// arrays; `dweight` / `dbias` only with a weight / bias.
///
/// # Errors
/// As [`fast::layer_norm_vjp`](crate::fast::layer_norm_vjp).
pub fn layer_norm_vjp(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
    cotangent: &Array,
) -> Result<(Array, Option<Array>, Option<Array>)> {
    let args = NormVjpArgs::new(NormArgs::layer(x, weight, bias, eps)?, cotangent)?;
    norm_vjp(&args)
}

fn norm_vjp(args: &NormVjpArgs) -> Result<(Array, Option<Array>, Option<Array>)> {
    let fwd = &args.fwd;
    let shape = fwd.x.shape();
    let d = shape.last().copied().unwrap_or(1);
    let xs = fwd.x.to_f64_vec()?;
    let gs = args.cotangent.to_f64_vec()?;
    let w = fwd.weight.as_ref().map(Array::to_f64_vec).transpose()?;
    let layer = fwd.kind == NormKind::Layer;
    let mut dx = Vec::with_capacity(xs.len());
    let mut dw = vec![0.0; d];
    let mut db = vec![0.0; d];
    if d > 0 {
        for (xr, gr) in xs.chunks_exact(d).zip(gs.chunks_exact(d)) {
            let nd = d as f64;
            let mean = if layer {
                xr.iter().sum::<f64>() / nd
            } else {
                0.0
            };
            let xc: Vec<f64> = xr.iter().map(|v| v - mean).collect();
            let var = xc.iter().map(|v| v * v).sum::<f64>() / nd;
            let n = 1.0 / (var + f64::from(fwd.eps)).sqrt();
            let gw: Vec<f64> = match &w {
                Some(w) => gr.iter().zip(w).map(|(g, w)| g * w).collect(),
                None => gr.to_vec(),
            };
            let mean_gw = if layer {
                gw.iter().sum::<f64>() / nd
            } else {
                0.0
            };
            let mean_gwx = gw.iter().zip(&xc).map(|(a, b)| a * b).sum::<f64>() / nd;
            for i in 0..d {
                dx.push((gw[i] - mean_gw) * n - xc[i] * mean_gwx * n * n * n);
                dw[i] += gr[i] * xc[i] * n;
                db[i] += gr[i];
            }
        }
    }
    let dx = Array::from_vec(dx, shape)?;
    let dw = match fwd.weight {
        Some(_) => Some(Array::from_vec(dw, &[d])?),
        None => None,
    };
    let db = match (layer, &fwd.bias) {
        (true, Some(_)) => Some(Array::from_vec(db, &[d])?),
        _ => None,
    };
    Ok((dx, dw, db))
}

/// The backward pass of `rope` in plain f64: the inverse rotation of `cotangent` with the
/// forward's angles (the float64 [`rope`](super::rope) with `-scale`), following
/// [`fast::rope_vjp`](crate::fast::rope_vjp). Returns an `F64` array of the cotangent's
/// shape.
///
/// # Errors
/// As [`fast::rope_vjp`](crate::fast::rope_vjp).
pub fn rope_vjp(
    cotangent: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: crate::fast::RopeOffset<'_>,
    freqs: Option<&Array>,
) -> Result<Array> {
    super::rope(cotangent, dims, traditional, base, -scale, offset, freqs)
}
