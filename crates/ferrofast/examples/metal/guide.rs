//! Kernels of MLX's custom Metal kernel guide built the way the guide builds them, shared by
//! `examples/metal_kernel.rs` and `tests/metal_kernel.rs` (each includes this file).

use ferrofast::fast::{MathMode, MetalKernel};

/// The guide's `grid_sample` backward (`grid_sample_vjp.metal`): inputs `x`, `grid` and
/// `cotangent`, outputs `x_grad` and `grid_grad`, row-contiguous inputs, atomic outputs.
pub fn grid_sample_grad() -> ferrofast::Result<MetalKernel> {
    MetalKernel::new(
        "grid_sample_grad",
        &["x", "grid", "cotangent"],
        &["x_grad", "grid_grad"],
        include_str!("grid_sample_vjp.metal"),
        "",
        true,
        true,
        MathMode::Safe,
    )
}
