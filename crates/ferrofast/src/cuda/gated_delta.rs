//! `gated_delta_update` on a CUDA device: no kernel yet; every call is refused with
//! `Error::Unsupported` naming the way out (the CPU kernels).

use super::runtime::Stream;
use crate::error::{Error, Result};
use crate::ops::gated_delta::{GatedDeltaArgs, GatedDeltaGrads, GatedDeltaVjpArgs};
use crate::Array;

fn unsupported(op: &str) -> Error {
    Error::Unsupported(format!(
        "[{op}] has no CUDA kernel yet; move the inputs to the CPU with \
         to_device(&Device::Cpu)."
    ))
}

/// Refuses the call: there is no CUDA kernel for the recurrence yet.
pub(crate) fn run(_: &GatedDeltaArgs, _: &Stream) -> Result<(Array, Array)> {
    Err(unsupported("gated_delta_update"))
}

/// Refuses the call: there is no CUDA kernel for the recurrence's backward yet.
pub(crate) fn vjp(_: &GatedDeltaVjpArgs, _: &Stream) -> Result<GatedDeltaGrads> {
    Err(unsupported("gated_delta_update_vjp"))
}
