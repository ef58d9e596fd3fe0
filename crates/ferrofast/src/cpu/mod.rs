//! CPU kernels, one file per op. Work is split across the shared rayon pool.

pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod sdpa;
