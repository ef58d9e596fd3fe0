//! ferrofast: MLX's `mlx.core.fast` module — fused normalization, rotary embedding and
//! attention kernels — in Rust, for CPUs (and NVIDIA GPUs with the `cuda` feature).
//!
//! Every op lives in [`fast`] with MLX's argument order, semantics, output dtypes and error
//! messages; [`reference`] holds plain float64 implementations used as the test oracle.
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

pub mod array;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod custom;
mod device;
pub mod dtype;
mod error;
pub mod fast;
pub mod reference;

pub use array::Array;
#[cfg(feature = "cuda")]
pub use cuda::Stream;
pub use device::Device;
pub use dtype::{promote_types, result_type, DType, Element, Float};
pub use error::{Error, Result};
pub use half::{bf16, f16};

/// The README's usage example, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
