//! ferrofast: MLX's `mlx.core.fast` module — fused normalization, rotary embedding,
//! attention and cross-entropy kernels — in Rust, for CPUs (and NVIDIA GPUs with the `cuda`
//! feature).
//!
//! Every op lives in [`fast`] with MLX's argument order, semantics, output dtypes and error
//! messages; [`reference`](mod@reference) holds plain float64 implementations used as the test oracle.
//!
//! ```
//! use ferrofast::{fast, Array, DType, Device};
//!
//! let x = Array::randn(&[2, 8, 64], DType::F32, 0, &Device::Cpu)?;
//! let w = Array::ones(&[64], DType::F32, &Device::Cpu)?;
//! let y = fast::rms_norm(&x, Some(&w), 1e-5)?;
//! assert_eq!(y.shape(), &[2, 8, 64]);
//! # Ok::<(), ferrofast::Error>(())
//! ```

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod array;
mod cpu;
// The CUDA back end, or with the feature off its stub (same interface, every entry
// `Error::CudaUnavailable`): the one place the `cuda` feature is decided for the ops.
#[cfg_attr(not(feature = "cuda"), path = "cuda/stub.rs")]
mod cuda;
mod custom;
mod device;
pub mod dtype;
mod error;
pub mod fast;
mod kv_cache;
#[cfg(feature = "ndarray")]
mod ndarray_interop;
mod ops;
pub mod parallel;
pub mod reference;
pub mod testing;

pub use array::{Array, CudaAllocation};
pub use cuda::Stream;
pub use device::Device;
pub use dtype::{promote_types, result_type, DType, Element, Float};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use kv_cache::KvCache;

/// The README's usage example, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
