//! `ferrofast._native`: the Rust half of the `ferrofast` Python package.
//!
//! Three layers (the Python half, `ferrofast/fast.py`, adds MLX's keyword signatures and
//! turns NumPy / PyTorch arrays into [`dlpack::Tensor`]s and back):
//!
//! - [`dlpack`]: DLPack import and export, zero-copy both ways for host and CUDA memory;
//! - [`ops`]: one function per ferrofast op and backward pass, run with the GIL released;
//! - [`kernels`]: the custom kernels (`cuda_kernel`, `metal_kernel` objects,
//!   `precompiled_cuda_kernel`) and `to_cpu`;
//! - [`errors`]: ferrofast's `Error` as `ValueError` / `MemoryError` /
//!   `NotImplementedError` / `RuntimeError` with the message unchanged.

pub mod dlpack;
pub mod errors;
pub mod kernels;
pub mod ops;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<dlpack::Tensor>()?;
    m.add_function(wrap_pyfunction!(dlpack::from_dlpack, m)?)?;
    m.add_class::<kernels::KernelObject>()?;
    m.add_function(wrap_pyfunction!(kernels::cuda_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::metal_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::precompiled_cuda_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::to_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::compile_to_cubin, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rms_norm_vjp, m)?)?;
    m.add_function(wrap_pyfunction!(ops::layer_norm, m)?)?;
    m.add_function(wrap_pyfunction!(ops::layer_norm_vjp, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rope, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rope_vjp, m)?)?;
    m.add_function(wrap_pyfunction!(ops::scaled_dot_product_attention, m)?)?;
    m.add_function(wrap_pyfunction!(
        ops::scaled_dot_product_attention_with_lse,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(ops::scaled_dot_product_attention_vjp, m)?)?;
    m.add_function(wrap_pyfunction!(ops::merge_attention_states, m)?)?;
    m.add_function(wrap_pyfunction!(ops::cross_entropy_with, m)?)?;
    m.add_function(wrap_pyfunction!(ops::cross_entropy_vjp, m)?)?;
    m.add_function(wrap_pyfunction!(ops::cross_entropy_fused, m)?)?;
    m.add_function(wrap_pyfunction!(ops::cross_entropy_fused_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(ops::gated_delta_update, m)?)?;
    m.add_function(wrap_pyfunction!(ops::gated_delta_update_vjp, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
