//! CPU kernels, one file per op (each `run(&Args)`), and `simd.rs`, the helpers they
//! share (among them `Widen`, every storage dtype's conversions to and from the type its
//! arithmetic runs in). Work is split across the shared rayon pool.

pub(crate) mod cross_entropy;
pub(crate) mod gated_delta;
pub(crate) mod merge;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod sdpa;
pub(crate) mod simd;
