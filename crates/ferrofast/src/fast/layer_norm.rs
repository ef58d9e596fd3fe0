//! `layer_norm`: mean/variance normalisation over the last axis (MLX `mx.fast.layer_norm`).

use crate::array::Array;
use crate::cpu;
use crate::dtype::promote_types;
use crate::error::{Error, Result};
use crate::Device;

/// Layer normalisation over the last axis, MLX's `mx.fast.layer_norm`:
/// `y = (x - mean) * rsqrt(var + eps)` with the biased variance `mean((x - mean)^2)` (two
/// passes), then `* weight` and `+ bias` where given.
///
/// - Output dtype: with a weight, `result_type(x, weight[, bias])`; without one, `x.dtype()`
///   even when the bias is wider (the bias is then cast down: f16 `x`, f32 bias -> f16).
///   Shape: `x.shape()`.
/// - Numerics follow MLX's definition: `x` is taken in the output dtype, mean, variance and
///   the normalisation are computed in f32, the result is rounded to the output dtype, then
///   multiplied by the weight and shifted by the bias (both cast to the output dtype) in the
///   output dtype, rounding after each op. For f64 output everything is computed in f64,
///   which is more accurate than MLX (MLX goes through f32 there too).
/// - `eps` is not validated. Empty leading axes, 1-D `x` and any strides are accepted without
///   copying `x`.
///
/// # Errors
/// `Error::InvalidArgument` with MLX's message, checked in MLX's order: `x` has no
/// dimensions; `weight` is not 1-D; `weight.size()` differs from `x`'s last dimension; the
/// same two checks for `bias`; the output dtype is not floating (e.g. integer `x` with only a
/// bias). `Error::Device` if `weight` or `bias` is on another device than `x`;
/// `Error::Unsupported` for inputs on a CUDA device (not wired yet).
pub fn layer_norm(
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
) -> Result<Array> {
    if x.ndim() == 0 {
        return Err(Error::InvalidArgument(
            "[layer_norm] Input must have at least 1 dimension but got input with 0 dimensions."
                .into(),
        ));
    }
    let d = x.shape()[x.ndim() - 1];
    for (name, param) in [("weight", weight), ("bias", bias)] {
        let Some(p) = param else { continue };
        if p.ndim() != 1 {
            return Err(Error::InvalidArgument(format!(
                "[layer_norm] {name} must have 1 dimension but has {} dimensions.",
                p.ndim()
            )));
        }
        if p.size() != d {
            return Err(Error::InvalidArgument(format!(
                "[layer_norm] {name} must have the same size as the last dimension of x but \
                 has {} elements.",
                p.size()
            )));
        }
    }
    // MLX's `result_type(x, weight[, bias])`, a left fold of `promote_types`.
    let out = match (weight, bias) {
        (Some(w), Some(b)) => promote_types(promote_types(x.dtype(), w.dtype()), b.dtype()),
        (Some(w), None) => promote_types(x.dtype(), w.dtype()),
        (None, _) => x.dtype(),
    };
    if !out.is_floating() {
        return Err(Error::InvalidArgument(format!(
            "[layer_norm] Received unsupported type {out}."
        )));
    }
    let device = x.device();
    for (name, param) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = param {
            if p.device() != device {
                return Err(Error::Device(format!(
                    "[layer_norm] {name} is on {} but x is on {device}; move both to one device.",
                    p.device()
                )));
            }
        }
    }
    match device {
        Device::Cpu => cpu::norm::layer_norm(x, weight, bias, eps, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            // The kernels read inputs already in the output dtype (MLX's front end casts too).
            let x = x.astype(out)?;
            let w = weight.map(|w| w.astype(out)).transpose()?;
            let b = bias.map(|b| b.astype(out)).transpose()?;
            crate::cuda::layer_norm(&x, w.as_ref(), b.as_ref(), eps, out)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => Err(Error::CudaUnavailable(format!(
            "[layer_norm] inputs are on cuda:{i} but this build has no CUDA back end"
        ))),
    }
}
