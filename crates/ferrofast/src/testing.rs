//! Hooks for tests, benchmarks and CI, not for production use: the compile check of every
//! built-in CUDA kernel, a switch that poisons new GPU buffers, and which attention kernel a
//! call gets. In a build without the `cuda` feature the CUDA hooks return
//! `Error::CudaUnavailable` (and the poison switch does nothing).

use crate::error::Result;
use crate::ops::sdpa::{Mask, SdpaArgs};
use crate::{Array, Device};

/// The outcome of compiling one built-in kernel file with all its variants
/// ([`check_builtin_kernels`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCheck {
    /// The `.cu` file.
    pub file: &'static str,
    /// The architecture it was compiled for: the one asked for, or the file's own
    /// architecture-specific target (`sm_90a`).
    pub arch: String,
    /// Number of template instantiations compiled.
    pub variants: usize,
    /// Size of the resulting CUBIN.
    pub cubin_bytes: usize,
    /// Wall-clock time NVRTC took.
    pub compile_seconds: f64,
}

/// Compiles every built-in CUDA kernel, every variant the launchers can ask for, to CUBIN
/// for `arch` (`"sm_80"`, `"sm_90"`, ...). Needs libnvrtc but no GPU: CI runs it to prove the
/// kernels compile. Bypasses the caches. Files built for one architecture-specific target
/// (the Hopper attention kernel, `sm_90a`) are compiled for it when `arch` is `sm_90` or
/// `sm_90a` and left out otherwise; their [`KernelCheck::arch`] names that target.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc (or the `cuda` feature); `Error::Compile` with
/// NVRTC's log for the first file that fails.
pub fn check_builtin_kernels(arch: &str) -> Result<Vec<KernelCheck>> {
    crate::cuda::hooks::check_builtin_kernels(arch)
}

/// The version of the NVRTC library in use, `(major, minor)`.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc (or the `cuda` feature).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    crate::cuda::hooks::nvrtc_version()
}

/// While enabled, every GPU buffer ferrofast allocates for an op's output is filled with
/// 0xFF bytes (NaN for the float types) before the kernel runs, so elements a kernel fails to
/// write show up as NaN instead of stale memory. Off by default; the environment variable
/// `FERROFAST_POISON_GPU_BUFFERS` (any value but `0`) turns it on at start. Costs one memset
/// per output.
pub fn poison_gpu_buffers(enabled: bool) {
    crate::cuda::hooks::poison_gpu_buffers(enabled);
}

/// The kernel `fast::scaled_dot_product_attention` runs for these arguments where they
/// live: `"cpu"` on the CPU; on a CUDA device one of `"decode_mma"`, `"decode_simt"`,
/// `"prefill_sm90"`, `"prefill_mma"`, `"general"` (the rows of the selection table in
/// `docs/architecture.md`). Reads the selection knobs (`FERROFAST_PREFILL_KERNEL`,
/// `FERROFAST_DECODE_KERNEL`) as they are set now.
///
/// # Errors
/// The op's validation errors; `Error::CudaUnavailable` / `Error::Device` when the inputs'
/// device cannot be reached.
pub fn attention_kernel(
    q: &Array,
    k: &Array,
    v: &Array,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<&'static str> {
    let args = SdpaArgs::new(q, k, v, 1.0, mask, sinks)?;
    match args.device {
        Device::Cpu => Ok("cpu"),
        Device::Cuda(i) => crate::cuda::hooks::attention_kernel(&args, i),
    }
}
