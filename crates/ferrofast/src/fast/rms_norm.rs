//! `rms_norm`: root-mean-square normalisation over the last axis (MLX `mx.fast.rms_norm`).

use crate::array::Array;
use crate::cpu;
use crate::dtype::promote_types;
use crate::error::{Error, Result};
use crate::Device;

/// Root-mean-square normalisation over the last axis, MLX's `mx.fast.rms_norm`:
/// `y = x * rsqrt(mean(x^2, axis=-1) + eps)`, then `* weight` if given.
///
/// - Output dtype: `result_type(x, weight)` with a weight, else `x.dtype()` (for example
///   int32 `x` with an f16 weight gives f16; bf16 `x` with an f16 weight gives f32). Shape:
///   `x.shape()`.
/// - Numerics follow MLX's definition: `x` is taken in the output dtype, the mean of squares
///   and the normalisation are computed in f32, the result is rounded to the output dtype and
///   only then multiplied by the weight (cast to the output dtype) in the output dtype.
///   For f64 output everything is computed in f64, which is more accurate than MLX (MLX goes
///   through f32 there too).
/// - `eps` is not validated (MLX accepts negative values). Empty leading axes, 1-D `x` and any
///   strides (transposed, stepped, broadcast) are accepted without copying `x`.
///
/// # Errors
/// `Error::InvalidArgument` with MLX's message, checked in MLX's order:
/// `x` has no dimensions; `weight` is not 1-D; `weight.size()` differs from `x`'s last
/// dimension; the output dtype is not floating. `Error::Device` if `weight` is on another
/// device than `x`; `Error::Unsupported` for inputs on a CUDA device (not wired yet).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    if x.ndim() == 0 {
        return Err(Error::InvalidArgument(
            "[rms_norm] Input must have at least 1 dimension but got input with 0 dimensions."
                .into(),
        ));
    }
    let d = x.shape()[x.ndim() - 1];
    if let Some(w) = weight {
        if w.ndim() != 1 {
            return Err(Error::InvalidArgument(format!(
                "[rms_norm] (*weight) must have 1 dimension but has {} dimensions.",
                w.ndim()
            )));
        }
        if w.size() != d {
            return Err(Error::InvalidArgument(format!(
                "[rms_norm] (*weight) must have the same size as the last dimension of x but \
                 has {} elements.",
                w.size()
            )));
        }
    }
    let out = match weight {
        Some(w) => promote_types(x.dtype(), w.dtype()),
        None => x.dtype(),
    };
    if !out.is_floating() {
        return Err(Error::InvalidArgument(format!(
            "[rms_norm] Received unsupported type {out}."
        )));
    }
    let device = x.device();
    if let Some(w) = weight {
        if w.device() != device {
            return Err(Error::Device(format!(
                "[rms_norm] weight is on {} but x is on {device}; move both to one device.",
                w.device()
            )));
        }
    }
    match device {
        Device::Cpu => cpu::norm::rms_norm(x, weight, eps, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            // The kernels read inputs already in the output dtype (MLX's front end casts too).
            let x = x.astype(out)?;
            let w = weight.map(|w| w.astype(out)).transpose()?;
            crate::cuda::rms_norm(&x, w.as_ref(), eps, out)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => Err(Error::CudaUnavailable(format!(
            "[rms_norm] inputs are on cuda:{i} but this build has no CUDA back end"
        ))),
    }
}
