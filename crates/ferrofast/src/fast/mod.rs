//! The fused ops of `mlx.core.fast`: each call is validated into its argument type
//! (`crate::ops`), then run where its inputs live: on the CPU, or on a CUDA stream (the
//! stream that produced the first input, or the one given to the op's `_on` form, MLX's
//! `stream=` argument).

/// Defines an op and its `_on` form from one parameter list and one body. The op is
/// `pub fn $name(params) -> ret` running `body` with `$stream` bound to `None` (run where the
/// inputs live); the `_on` form is `pub fn $name_on(stream: &Stream, params) -> ret` running
/// the same `body` with `$stream` bound to `Some(stream)`. Each keeps its own doc comment and
/// attributes.
macro_rules! with_on_form {
    (
        $(#[$attr:meta])*
        pub fn $name:ident($($param:ident: $ty:ty),* $(,)?) -> $ret:ty;

        $(#[$attr_on:meta])*
        pub fn $name_on:ident(stream: &Stream, ..);

        |$stream:ident| $body:expr
    ) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($param: $ty),*) -> $ret {
            let $stream: Option<&Stream> = None;
            $body
        }

        $(#[$attr_on])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name_on(stream: &Stream, $($param: $ty),*) -> $ret {
            let $stream = Some(stream);
            $body
        }
    };
}

mod cross_entropy;
mod gated_delta;
mod layer_norm;
mod merge;
mod rms_norm;
mod rope;
mod sdpa;

pub use cross_entropy::*;
pub use gated_delta::*;
pub use layer_norm::*;
pub use merge::*;
pub use rms_norm::*;
pub use rope::*;
pub use sdpa::*;

pub use crate::custom::*;

use crate::error::{Error, Result};
use crate::{Array, Device, Stream};

/// Where a validated call runs.
enum Place {
    Cpu,
    Cuda(Stream),
}

/// Picks where a call on inputs living on `device` runs: the CPU; `stream` when one is
/// given (it must be on `device`); else the stream that produced `first`.
fn place(op: &str, device: Device, first: &Array, stream: Option<&Stream>) -> Result<Place> {
    match (device, stream) {
        (Device::Cpu, None) => Ok(Place::Cpu),
        (Device::Cpu, Some(s)) => Err(Error::Device(format!(
            "{op} a stream of {} was given but the inputs are on the CPU; move them with \
             to_device or call the op without a stream.",
            s.device()
        ))),
        (Device::Cuda(_), Some(s)) if s.device() == device => Ok(Place::Cuda(s.clone())),
        (Device::Cuda(_), Some(s)) => Err(Error::Device(format!(
            "{op} the stream is on {} but the inputs are on {device}; move them with \
             to_device or to_stream.",
            s.device()
        ))),
        (Device::Cuda(_), None) => first
            .stream()
            .map(Place::Cuda)
            .ok_or_else(|| Error::Device(format!("{op} the inputs on {device} have no stream"))),
    }
}
