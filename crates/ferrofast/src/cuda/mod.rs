//! The CUDA back end (feature `cuda`): driver and NVRTC loading, contexts and streams
//! (`runtime`), run-time compilation of the `.cu` kernels to CUBIN with in-memory and on-disk
//! caches (`jit`), device buffers behind [`Array`] (`memory`), and one launcher
//! per op.
//!
//! Nothing here links against CUDA: cudarc loads `libcuda` and `libnvrtc` at run time, after
//! `runtime` has checked they exist (cudarc panics on a missing library), so the crate
//! builds and its CPU paths work on machines without CUDA.
//!
//! Public here: [`Stream`], the norm kernels with an explicit stream ([`rms_norm_on`],
//! [`layer_norm_on`]) for callers that have already cast their inputs, the rope kernel
//! ([`rope()`], [`rope_on`]) for callers that have already validated their arguments,
//! attention ([`scaled_dot_product_attention()`], [`scaled_dot_product_attention_on`]), the
//! kernel compile check CI runs ([`check_builtin_kernels`]), a debugging switch
//! ([`poison_gpu_buffers`]) and a report of which prefill kernel Hopper devices take
//! ([`hopper_prefill_selected`]). Most users only need [`Device::cuda`](crate::Device::cuda) and
//! the ops in [`fast`](crate::fast), which dispatch here for GPU arrays.

pub(crate) mod attn_prefill;
pub(crate) mod attn_prefill_sm90;
pub(crate) mod copy;
pub(crate) mod jit;
pub(crate) mod memory;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod runtime;
pub(crate) mod sdpa;

pub use jit::{check_builtin_kernels, nvrtc_version, KernelCheck};
pub use memory::poison_gpu_buffers;
pub use norm::{layer_norm, layer_norm_on, rms_norm, rms_norm_on};
pub use rope::{rope, rope_on, RopeFreqs, RopeOffsets};
pub use runtime::Stream;

use crate::error::Result;
use crate::fast::Mask;
use crate::Array;

/// Whether attention prefill on CUDA device `ordinal` takes the Hopper kernel
/// (`kernels/attn_prefill_sm90.cu`) for the cases it covers: true when the device has
/// compute capability 9.0, unless the environment variable `FERROFAST_PREFILL_KERNEL` is
/// `mma`.
/// False when the device cannot be reached. Tests and benchmarks use it to report which
/// kernel ran.
pub fn hopper_prefill_selected(ordinal: usize) -> bool {
    attn_prefill_sm90::requested()
        && runtime::device(ordinal).is_ok_and(|d| attn_prefill_sm90::supported_arch(&d.arch()))
}

/// Scaled dot-product attention on the CUDA device of `q`, on the stream that produced `q`:
/// the kernels behind [`fast::scaled_dot_product_attention`](crate::fast::scaled_dot_product_attention)
/// (same arguments, validation, dtype promotion, results and edge cases), called directly.
///
/// Every input must be on that device (k, v, the mask and the sinks may come from other
/// streams of it; the kernel waits for them on the GPU). f32, f16 and bf16 run here.
///
/// # Errors
/// The front end's validation errors; `Error::Unsupported` for a float64 result;
/// `Error::Device` for an input on the CPU or on another device; compile and driver errors.
pub fn scaled_dot_product_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    sdpa::run_checked(q, k, v, scale, mask, sinks, None)
}

/// [`scaled_dot_product_attention()`] on a given stream (MLX's `stream=` argument).
///
/// # Errors
/// As [`scaled_dot_product_attention()`]; `Error::Device` if an input is on another device
/// than the stream.
pub fn scaled_dot_product_attention_on(
    stream: &Stream,
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    sdpa::run_checked(q, k, v, scale, mask, sinks, Some(stream))
}
