//! Plain float64 implementations of every op, following the spec's definitions: the oracle
//! the tests compare against. Slow on purpose; clarity over speed. Each function takes the
//! same arguments as its `fast` counterpart and returns an `F64` array of the output shape.

mod cross_entropy;
mod gated_delta;
mod merge;
mod norm;
mod rope;
mod sdpa;
mod vjp;

pub use cross_entropy::*;
pub use gated_delta::*;
pub use merge::*;
pub use norm::*;
pub use rope::*;
pub use sdpa::*;
pub use vjp::*;
