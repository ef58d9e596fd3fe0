//! The CUDA back end (feature `cuda`): driver and NVRTC loading, contexts and streams
//! (`runtime`), run-time compilation of the `.cu` kernels to CUBIN with in-memory and on-disk
//! caches (`jit`), device buffers behind [`Array`](crate::Array) (`memory`), and one launcher
//! per op.
//!
//! Nothing here links against CUDA: cudarc loads `libcuda` and `libnvrtc` at run time, after
//! `runtime` has checked they exist (cudarc panics on a missing library), so the crate
//! builds and its CPU paths work on machines without CUDA.
//!
//! Public here: [`Stream`], the norm kernels with an explicit stream ([`rms_norm_on`],
//! [`layer_norm_on`]) for callers that have already cast their inputs, the rope kernel
//! ([`rope()`], [`rope_on`]) for callers that have already validated their arguments, the
//! kernel compile check CI runs ([`check_builtin_kernels`]) and a debugging switch
//! ([`poison_gpu_buffers`]). Most users only need [`Device::cuda`](crate::Device::cuda) and
//! the ops in [`fast`](crate::fast), which dispatch here for GPU arrays.

pub(crate) mod attn_prefill;
pub(crate) mod copy;
pub(crate) mod jit;
pub(crate) mod memory;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod runtime;

pub use jit::{check_builtin_kernels, nvrtc_version, KernelCheck};
pub use memory::poison_gpu_buffers;
pub use norm::{layer_norm, layer_norm_on, rms_norm, rms_norm_on};
pub use rope::{rope, rope_on, RopeFreqs, RopeOffsets};
pub use runtime::Stream;
