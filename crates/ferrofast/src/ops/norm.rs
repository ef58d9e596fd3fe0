//! [`NormArgs`]: a validated `rms_norm` or `layer_norm` call.

use crate::dtype::{promote_types, DType};
use crate::error::{Error, Result};
use crate::{Array, Device};

/// Which normalisation a call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NormKind {
    /// `x * rsqrt(mean(x^2) + eps)`.
    Rms,
    /// `(x - mean) * rsqrt(mean((x - mean)^2) + eps)`, two-pass.
    Layer,
}

impl NormKind {
    /// MLX's name of the op, as its messages print it.
    pub(crate) fn op(self) -> &'static str {
        match self {
            NormKind::Rms => "rms_norm",
            NormKind::Layer => "layer_norm",
        }
    }
}

/// A validated normalisation over the last axis of `x`.
///
/// `x`, `weight` and `bias` are the caller's arrays, uncast (a back end converts them to
/// `dtype` as it reads them, or casts first); the weight and the bias are 1-D with
/// `x.shape[-1]` elements. The output has `x`'s shape and dtype `dtype`.
#[derive(Clone, Debug)]
pub(crate) struct NormArgs {
    /// Rms or layer.
    pub(crate) kind: NormKind,
    /// The input, at least 1-D, any dtype and strides.
    pub(crate) x: Array,
    /// Optional scale.
    pub(crate) weight: Option<Array>,
    /// Optional shift (layer norm only).
    pub(crate) bias: Option<Array>,
    /// Added to the variance (not validated: MLX accepts any value).
    pub(crate) eps: f32,
    /// The output dtype (floating): MLX's `result_type` rule of the op.
    pub(crate) dtype: DType,
    /// Where every input lives.
    pub(crate) device: Device,
}

impl NormArgs {
    /// Validates an `rms_norm` call in MLX's order with MLX's messages.
    ///
    /// # Errors
    /// `Error::InvalidArgument`: `x` has no dimensions; `weight` is not 1-D or not of `x`'s
    /// last dimension; the output dtype is not floating. `Error::Device`: `weight` is on
    /// another device than `x`.
    pub(crate) fn rms(x: &Array, weight: Option<&Array>, eps: f32) -> Result<NormArgs> {
        NormArgs::new(NormKind::Rms, x, weight, None, eps)
    }

    /// Validates a `layer_norm` call in MLX's order with MLX's messages.
    ///
    /// # Errors
    /// As [`NormArgs::rms`], with the same checks for `bias`; the output dtype is not
    /// floating (e.g. integer `x` with only a bias).
    pub(crate) fn layer(
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
    ) -> Result<NormArgs> {
        NormArgs::new(NormKind::Layer, x, weight, bias, eps)
    }

    fn new(
        kind: NormKind,
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
    ) -> Result<NormArgs> {
        let op = kind.op();
        if x.ndim() == 0 {
            return Err(Error::invalid(format!(
                "[{op}] Input must have at least 1 dimension but got input with 0 dimensions."
            )));
        }
        let d = x.shape()[x.ndim() - 1];
        // MLX's rms_norm names its weight `(*weight)` in these messages.
        let weight_name = match kind {
            NormKind::Rms => "(*weight)",
            NormKind::Layer => "weight",
        };
        for (name, param) in [(weight_name, weight), ("bias", bias)] {
            let Some(p) = param else { continue };
            if p.ndim() != 1 {
                return Err(Error::invalid(format!(
                    "[{op}] {name} must have 1 dimension but has {} dimensions.",
                    p.ndim()
                )));
            }
            if p.size() != d {
                return Err(Error::invalid(format!(
                    "[{op}] {name} must have the same size as the last dimension of x but \
                     has {} elements.",
                    p.size()
                )));
            }
        }
        // MLX's `result_type(x, weight[, bias])`, a left fold of `promote_types`; without a
        // weight the output keeps x's dtype (a wider bias is cast down).
        let dtype = match (weight, bias) {
            (Some(w), Some(b)) => promote_types(promote_types(x.dtype(), w.dtype()), b.dtype()),
            (Some(w), None) => promote_types(x.dtype(), w.dtype()),
            (None, _) => x.dtype(),
        };
        if !dtype.is_floating() {
            return Err(Error::invalid(format!(
                "[{op}] Received unsupported type {dtype}."
            )));
        }
        let mut inputs = vec![("x", x)];
        inputs.extend(weight.map(|w| ("weight", w)));
        inputs.extend(bias.map(|b| ("bias", b)));
        let device = super::same_device(&format!("[{op}]"), &inputs)?;
        Ok(NormArgs {
            kind,
            x: x.clone(),
            weight: weight.cloned(),
            bias: bias.cloned(),
            eps,
            dtype,
            device,
        })
    }
}

/// A validated `rms_norm_vjp` / `layer_norm_vjp` call: the forward's arguments and the
/// cotangent of its output.
///
/// The gradients are computed from the inputs cast to the forward's output dtype
/// (`fwd.dtype`), as MLX's graph does, and returned in each input's own dtype: `dx` in `x`'s
/// dtype (the output dtype when `x` is not floating), `dweight` in the weight's, `dbias` in
/// the bias's.
#[derive(Clone, Debug)]
pub(crate) struct NormVjpArgs {
    /// The forward call.
    pub(crate) fwd: NormArgs,
    /// The cotangent of the forward's output: `x`'s shape, any floating dtype and strides,
    /// on `fwd.device`.
    pub(crate) cotangent: Array,
}

impl NormVjpArgs {
    /// Validates the cotangent of a validated forward call.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when the cotangent's shape is not `x`'s (MLX's `vjp` text) or
    /// its dtype is not floating; `Error::Device` when it is on another device than `x`.
    pub(crate) fn new(fwd: NormArgs, cotangent: &Array) -> Result<NormVjpArgs> {
        let op = format!("[{}_vjp]", fwd.kind.op());
        let cotangent = check_cotangent(&op, fwd.x.shape(), ("x", &fwd.x), cotangent)?;
        Ok(NormVjpArgs { fwd, cotangent })
    }

    /// The dtype `dx` is returned in.
    pub(crate) fn dx_dtype(&self) -> DType {
        if self.fwd.x.dtype().is_floating() {
            self.fwd.x.dtype()
        } else {
            self.fwd.dtype
        }
    }
}

/// Checks a cotangent against its output's shape (MLX's `vjp` message when they differ), then
/// that it is floating, then that it lives on the device of the named forward input `first`;
/// returns the cotangent.
pub(crate) fn check_cotangent(
    op: &str,
    shape: &[usize],
    first: (&str, &Array),
    cotangent: &Array,
) -> Result<Array> {
    if cotangent.shape() != shape {
        return Err(Error::invalid(format!(
            "{op} Output shape {} does not match cotangent shape {}.",
            crate::array::fmt_shape(shape),
            crate::array::fmt_shape(cotangent.shape())
        )));
    }
    if !cotangent.dtype().is_floating() {
        return Err(Error::invalid(format!(
            "{op} The cotangent must be floating but has type {}.",
            cotangent.dtype()
        )));
    }
    super::same_device(op, &[first, ("cotangent", cotangent)])?;
    Ok(cotangent.clone())
}
