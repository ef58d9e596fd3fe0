//! `rms_norm`: root-mean-square normalisation over the last axis (MLX `mx.fast.rms_norm`).

use super::{place, Place};
use crate::array::Array;
use crate::error::Result;
use crate::ops::norm::{NormArgs, NormVjpArgs};
use crate::Stream;

with_on_form! {
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
    /// device than `x`. On a CUDA device: `Error::Unsupported` for float64 (compute it on the
    /// CPU); compile and driver errors.
    pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array>;

    /// [`rms_norm`] on an explicit CUDA stream (MLX's `stream=` argument): the work is queued
    /// on `stream` instead of the stream that produced `x`.
    ///
    /// # Errors
    /// As [`rms_norm`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn rms_norm_on(stream: &Stream, ..);

    |stream| run(NormArgs::rms(x, weight, eps)?, stream)
}

with_on_form! {
    /// The backward pass of [`rms_norm`]: given the cotangent `cotangent` of its output, returns
    /// `(dx, dweight)`, `dweight` only when a weight was given (MLX's `RMSNorm::vjp`).
    ///
    /// With `n = rsqrt(mean(x^2, -1) + eps)`: `dx = g * w * n - x * mean(g * w * x, -1) * n^3`
    /// and `dweight = sum over every leading axis of g * x * n`.
    ///
    /// - `x`, `weight` and `cotangent` are taken in the forward's output dtype (as MLX's graph
    ///   casts them); sums and products are computed in f32 (f64 for f64 output), as MLX's GPU
    ///   kernels do; `dx` is rounded once to `x`'s dtype (the output dtype for a non-floating
    ///   `x`), `dweight` once to the weight's dtype.
    /// - Deterministic: the same inputs give bit-identical gradients on every run and any thread
    ///   count (`dweight` is summed in a fixed order, without atomics).
    /// - `cotangent` may have any floating dtype and strides; every input may be strided.
    ///
    /// # Errors
    /// The forward's validation errors (see [`rms_norm`]), then `Error::InvalidArgument` when
    /// `cotangent`'s shape is not `x`'s (`[rms_norm_vjp] Output shape (..) does not match
    /// cotangent shape (..).`) or its dtype is not floating; `Error::Device` when it lives on
    /// another device. On a CUDA device: `Error::Unsupported` for float64; compile and driver
    /// errors.
    pub fn rms_norm_vjp(
        x: &Array,
        weight: Option<&Array>,
        eps: f32,
        cotangent: &Array,
    ) -> Result<(Array, Option<Array>)>;

    /// [`rms_norm_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`rms_norm_vjp`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn rms_norm_vjp_on(stream: &Stream, ..);

    |stream| {
        let args = NormVjpArgs::new(NormArgs::rms(x, weight, eps)?, cotangent)?;
        run_vjp(&args, stream).map(|(dx, dw, _)| (dx, dw))
    }
}

/// Runs a validated `rms_norm_vjp` or `layer_norm_vjp` call where its inputs live.
pub(super) fn run_vjp(
    args: &NormVjpArgs,
    stream: Option<&Stream>,
) -> Result<(Array, Option<Array>, Option<Array>)> {
    let op = format!("{}_vjp", args.fwd.kind.op());
    match place(&op, args.fwd.device, &args.fwd.x, stream)? {
        Place::Cpu => crate::cpu::norm::vjp::run(args),
        Place::Cuda(stream) => crate::cuda::norm::vjp(args, &stream),
    }
}

/// Runs a validated `rms_norm` or `layer_norm` call where its inputs live.
pub(super) fn run(args: NormArgs, stream: Option<&Stream>) -> Result<Array> {
    match place(args.kind.op(), args.device, &args.x, stream)? {
        Place::Cpu => crate::cpu::norm::run(&args),
        Place::Cuda(stream) => crate::cuda::norm::run(&args, &stream),
    }
}
