//! `layer_norm`: mean/variance normalisation over the last axis (MLX `mx.fast.layer_norm`).

use crate::array::Array;
use crate::error::Result;
use crate::ops::norm::{NormArgs, NormVjpArgs};
use crate::Stream;

with_on_form! {
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
    /// bias). `Error::Device` if `weight` or `bias` is on another device than `x`. On a CUDA
    /// device: `Error::Unsupported` for float64 (compute it on the CPU); compile and driver
    /// errors.
    pub fn layer_norm(
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
    ) -> Result<Array>;

    /// [`layer_norm`] on an explicit CUDA stream (MLX's `stream=` argument): the work is
    /// queued on `stream` instead of the stream that produced `x`.
    ///
    /// # Errors
    /// As [`layer_norm`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn layer_norm_on(stream: &Stream, ..);

    |stream| super::rms_norm::run(NormArgs::layer(x, weight, bias, eps)?, stream)
}

with_on_form! {
    /// The backward pass of [`layer_norm`]: given the cotangent `cotangent` of its output,
    /// returns `(dx, dweight, dbias)`, `dweight` / `dbias` only when a weight / bias was given
    /// (MLX's `LayerNorm::vjp`).
    ///
    /// With `xc = x - mean(x, -1)`, `n = rsqrt(mean(xc^2, -1) + eps)` (the forward's two-pass
    /// statistics) and `gw = g * w`: `dx = (gw - mean(gw, -1)) * n - xc * mean(gw * xc, -1) * n^3`,
    /// `dweight = sum over every leading axis of g * xc * n`, `dbias = sum over every leading axis
    /// of g`.
    ///
    /// - `x`, `weight` and `cotangent` are taken in the forward's output dtype; sums and
    ///   products are computed in f32 (f64 for f64 output); `dx` is rounded once to `x`'s dtype
    ///   (the output dtype for a non-floating `x`), `dweight` / `dbias` once to the weight's /
    ///   bias's dtype.
    /// - Deterministic: bit-identical gradients on every run and any thread count.
    /// - `cotangent` may have any floating dtype and strides; every input may be strided.
    ///
    /// # Errors
    /// The forward's validation errors (see [`layer_norm`]), then `Error::InvalidArgument` when
    /// `cotangent`'s shape is not `x`'s or its dtype is not floating; `Error::Device` when it
    /// lives on another device. On a CUDA device: `Error::Unsupported` for float64; compile and
    /// driver errors.
    pub fn layer_norm_vjp(
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
        cotangent: &Array,
    ) -> Result<(Array, Option<Array>, Option<Array>)>;

    /// [`layer_norm_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`layer_norm_vjp`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn layer_norm_vjp_on(stream: &Stream, ..);

    |stream| {
        let args = NormVjpArgs::new(NormArgs::layer(x, weight, bias, eps)?, cotangent)?;
        super::rms_norm::run_vjp(&args, stream)
    }
}
