//! The fused ops of `mlx.core.fast`: argument validation, output dtype and shape, then
//! dispatch to the device the inputs live on.

mod layer_norm;
mod rms_norm;
mod rope;
pub(crate) mod sdpa;

pub use layer_norm::*;
pub use rms_norm::*;
pub use rope::*;
pub use sdpa::*;

pub use crate::custom::*;
