//! One validated argument type per op: the contract between the front end ([`crate::fast`])
//! and every back end (`cpu`, `cuda`), the float64 oracle ([`crate::reference`]) and the
//! backward passes (the role of MLX's `fast_primitives.h`).
//!
//! Each type is built by one constructor that checks the call in MLX's order with MLX's
//! messages, works out the output dtype and shape, and checks that every input lives on one
//! device. Back ends take the validated type and never validate again; nothing here imports
//! the front end.

pub(crate) mod cross_entropy;
pub(crate) mod gated_delta;
pub(crate) mod merge;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod sdpa;

use crate::error::{Error, Result};
use crate::{Array, Device};

/// Checks that every named input lives on the device of the first one and returns that
/// device. `op` prefixes the message (`[rms_norm]`).
pub(crate) fn same_device(op: &str, inputs: &[(&str, &Array)]) -> Result<Device> {
    let Some(&(first, a)) = inputs.first() else {
        return Ok(Device::Cpu);
    };
    let device = a.device();
    if let Some((name, b)) = inputs.iter().find(|(_, b)| b.device() != device) {
        return Err(Error::Device(format!(
            "{op} {first} is on {device} but {name} is on {}; move every input to one device.",
            b.device()
        )));
    }
    Ok(device)
}
