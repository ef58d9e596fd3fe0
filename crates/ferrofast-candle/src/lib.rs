//! ferrofast's fused kernels on [candle](https://github.com/huggingface/candle) tensors:
//! RMS / layer norm, rope, scaled dot-product attention (masks, GQA, sinks) and the merge of
//! its partial results over disjoint keys ([`merge_attention_states`]), cross-entropy and
//! the gated delta rule, forward and backward, on the CPU and (with the `cuda` feature) on
//! NVIDIA GPUs.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ferrofast_candle as ffc;
//!
//! let dev = Device::Cpu; // or Device::new_cuda(0)? with the `cuda` feature
//! let q = Tensor::randn(0f32, 1., (1, 16, 128, 64), &dev)?;
//! let kv = Tensor::randn(0f32, 1., (1, 128, 4, 64), &dev)?.transpose(1, 2)?; // read in place
//! let x = ffc::rms_norm(&q, None, 1e-5)?;
//! let x = ffc::rope(&x, 64, &ffc::RopeOptions { offset: 7usize.into(), ..Default::default() })?;
//! let o = ffc::scaled_dot_product_attention(&x, &kv, &kv, 0.125, ffc::Mask::Causal, None)?;
//! assert_eq!(o.dims(), &[1, 16, 128, 64]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! Two forms of every op:
//! - **plain functions** ([`rms_norm`], [`scaled_dot_product_attention`], their `_vjp`
//!   backward passes, ...): the result has no autograd history; for inference and for
//!   training loops that call the backward passes themselves;
//! - **candle `CustomOp`s** in [`custom`] ([`custom::RmsNorm`],
//!   [`custom::ScaledDotProductAttention`], ... and [`custom::rms_norm`] etc. that apply
//!   them), so `Tensor::backward` runs ferrofast's backward passes. The gated delta rule
//!   takes more inputs than a candle `CustomOp` can (three), so it is a plain function only.
//!
//! # Memory
//! Inputs are never copied: a ferrofast array is made over the tensor's own memory with its
//! layout (strides and offset: a transposed or sliced tensor is read in place). Results
//! are handed over: a host result's vector becomes the tensor's `CpuStorage`, a GPU
//! result's device allocation becomes its `CudaStorage` (freed by candle). On a GPU the
//! work runs on candle's stream of the tensors' device (the primary context, which candle
//! and ferrofast both use), with no synchronisation.
//!
//! Tensors must not be written in place (`slice_set`, `inplace_op`) by another thread
//! while an op reads them, as for candle's own ops. All the tensors of a call live on one
//! device.
//!
//! # Dtypes
//! `u8`, `u32`, `i32`, `i64`, `f16`, `bf16`, `f32`, `f64`; candle has no `bool`: boolean
//! attention masks are `u8` ([`Mask::Bool`], non-zero keeps the key).
//!
//! # Errors
//! ferrofast's errors (MLX's messages) arrive as `candle_core::Error::Wrapped` around a
//! [`ferrofast::Error`]; their `Display` is the message.

mod convert;
pub mod custom;
mod ops;

pub use ferrofast;
pub use ferrofast::fast::{CrossEntropyOptions, Reduction};
pub use ops::*;

/// candle's result type: the ops return candle errors so they compose with `?` in candle
/// code.
pub type Result<T> = candle_core::Result<T>;

/// A ferrofast error as a candle error (`Wrapped`; its `Display` is ferrofast's message).
pub(crate) fn ff_err(e: ferrofast::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Moves a ferrofast array into a candle tensor on `device` (a CPU array to a CUDA device is
/// uploaded; a GPU array to the CPU downloaded), without copying when the array is the
/// only handle on its buffer and already lives there: its host vector or device allocation
/// becomes the tensor's storage.
///
/// # Errors
/// A device candle was built without (CUDA without the `cuda` feature), or transfer errors.
pub fn array_to_tensor(
    a: ferrofast::Array,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    convert::to_tensor(a, device)
}

/// A ferrofast array over a candle tensor's memory, without copying (the array keeps a
/// clone of the tensor, so the memory outlives it). On a GPU the array is produced on
/// candle's stream, so ops on it run there.
///
/// # Safety
/// Nothing may write the tensor's storage in place (candle's `slice_set`, `inplace_op`, a
/// custom in-place op, on any tensor sharing the storage) while the array or a view of it
/// lives: ferrofast reads borrowed memory from other threads without locking it.
///
/// # Errors
/// Dtypes ferrofast lacks (`i16`, the float8/6/4 formats); Metal tensors.
pub unsafe fn tensor_to_array(t: &candle_core::Tensor) -> Result<ferrofast::Array> {
    // The tensor is treated as private: by the caller's contract nobody writes it.
    convert::Borrowed::new(t.device())?.private(t.clone())
}
