//! `fast::precompiled_cuda_kernel`: MLX's `precompiled_cuda_kernel`, a kernel compiled
//! elsewhere (PTX or CUBIN, e.g. from Triton or CuTe DSL) launched with the custom-kernel
//! rules; and [`compile_to_cubin`], NVRTC for callers who want to make such an image.

use super::{check_counts, KernelCall};
use crate::error::{Error, Result};
use crate::Array;

/// The error prefix.
const OP: &str = "precompiled_cuda_kernel";

/// A scalar argument of [`precompiled_cuda_kernel`], passed by value after the outputs:
/// MLX's `scalars` (Python `bool`, `int`, `float` -> C++ `bool`, `int32_t`, `float`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarArg {
    /// A `bool` parameter.
    Bool(bool),
    /// An `int32_t` parameter.
    Int(i32),
    /// A `float` parameter.
    Float(f32),
}

impl From<bool> for ScalarArg {
    fn from(v: bool) -> Self {
        ScalarArg::Bool(v)
    }
}

impl From<i32> for ScalarArg {
    fn from(v: i32) -> Self {
        ScalarArg::Int(v)
    }
}

impl From<f32> for ScalarArg {
    fn from(v: f32) -> Self {
        ScalarArg::Float(v)
    }
}

/// Launches the kernel `name` of a precompiled image, MLX's
/// `mx.fast.precompiled_cuda_kernel(name=, compiled_source=, inputs=, output_shapes=,
/// output_dtypes=, scalars=, grid=, threadgroup=, shared_memory=, init_value=,
/// ensure_row_contiguous=, stream=)`.
///
/// - `compiled_source`: PTX text (a trailing NUL is optional), a CUBIN or a fatbin for the
///   device. The module is loaded once per device, cached by `name` and a hash of the bytes.
/// - `name`: the exact symbol (mangled for C++ kernels, unless declared `extern "C"`).
/// - The kernel's parameters: one pointer per input (to its first element), one per output,
///   then `scalars` by value. No shapes or strides are passed.
/// - `call` gives the inputs, outputs, grid (in threads), threadgroup, `init_value` and
///   where to run, with the same rules as [`CudaKernel`](super::CudaKernel); its `template`
///   must be empty and `verbose` has nothing to print.
/// - `ensure_row_contiguous` (MLX's default: `false`) copies inputs that are not
///   row-contiguous first.
///
/// # Safety
/// The kernel's parameter list must be exactly: a pointer per input, a pointer per output,
/// then the scalars with the types above, in order; anything else is undefined behaviour.
/// The kernel must read inputs only inside their elements and write outputs only inside
/// theirs (threads past the grid in a partial last block run too), must not write inputs,
/// and must use at most `shared_memory` bytes of dynamic shared memory. A kernel breaking
/// this can corrupt GPU memory or fault the device's context.
///
/// # Errors
/// ``[precompiled_cuda_kernel] Expected `output_dtypes` to have size ...`` when the output
/// lists differ in length; template arguments; `[precompiled_cuda_kernel] Only supports the
/// GPU.` for the CPU device; `Error::CudaUnavailable` without a GPU (or in a build without
/// the `cuda` feature: `[cuda_kernel] No CUDA back-end.`); driver errors when the image
/// cannot be loaded or has no such symbol; threads per block above the kernel's limit;
/// shared memory above the device's limit.
pub unsafe fn precompiled_cuda_kernel(
    name: &str,
    compiled_source: &[u8],
    call: &KernelCall,
    scalars: &[ScalarArg],
    shared_memory: usize,
    ensure_row_contiguous: bool,
) -> Result<Vec<Array>> {
    check_counts(OP, call, call.inputs.len(), call.output_shapes.len())?;
    if !call.template.is_empty() {
        return Err(Error::invalid(format!(
            "[{OP}] A precompiled kernel takes no template arguments."
        )));
    }
    if name.is_empty() {
        return Err(Error::invalid(format!("[{OP}] The kernel name is empty.")));
    }
    if compiled_source.is_empty() {
        return Err(Error::invalid(format!(
            "[{OP}] The compiled source is empty."
        )));
    }
    let dispatch = super::dispatch(OP, call.grid, call.threadgroup)?;
    launch(
        name,
        compiled_source,
        call,
        scalars,
        (dispatch, shared_memory),
        ensure_row_contiguous,
    )
}

#[cfg(feature = "cuda")]
fn launch(
    name: &str,
    image: &[u8],
    call: &KernelCall,
    scalars: &[ScalarArg],
    (dispatch, shared_memory): (super::Dispatch, usize),
    ensure_row_contiguous: bool,
) -> Result<Vec<Array>> {
    use super::launch::{launch, resolve_stream, KernelSource, Launch, LaunchArg};
    let stream = resolve_stream(OP, call)?;
    let inputs: Vec<Array> = call.inputs.iter().map(|i| i.to_array()).collect();
    let mut args: Vec<LaunchArg> = (0..inputs.len()).map(LaunchArg::Input).collect();
    args.extend((0..call.output_shapes.len()).map(LaunchArg::Output));
    args.extend(scalars.iter().map(|s| match *s {
        ScalarArg::Bool(v) => LaunchArg::Bool(v),
        ScalarArg::Int(v) => LaunchArg::I32(v),
        ScalarArg::Float(v) => LaunchArg::F32(v),
    }));
    let l = Launch {
        op: OP,
        kernel: KernelSource::Binary {
            symbol: name,
            image,
        },
        inputs,
        ensure_row_contiguous,
        output_shapes: &call.output_shapes,
        output_dtypes: &call.output_dtypes,
        init_value: call.init_value,
        args,
        dispatch,
        split_partial: false,
        shared_memory,
        stream,
    };
    // SAFETY: the parameter list is the caller's contract (see `precompiled_cuda_kernel`).
    unsafe { launch(l) }
}

#[cfg(not(feature = "cuda"))]
fn launch(
    _name: &str,
    _image: &[u8],
    _call: &KernelCall,
    _scalars: &[ScalarArg],
    _launch: (super::Dispatch, usize),
    _ensure_row_contiguous: bool,
) -> Result<Vec<Array>> {
    Err(Error::CudaUnavailable(
        "[cuda_kernel] No CUDA back-end.".to_string(),
    ))
}

/// A kernel compiled to CUBIN by [`compile_to_cubin`].
#[cfg(feature = "cuda")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledCubin {
    /// The CUBIN image, loadable by [`precompiled_cuda_kernel`] on a device of the
    /// architecture it was compiled for.
    pub image: Vec<u8>,
    /// The kernel's symbol in the image (the mangled name of `name_expression`).
    pub symbol: String,
}

/// Compiles CUDA C++ `source` to CUBIN for `arch` (`"sm_90"`, `"sm_90a"`, ...) with NVRTC,
/// returning the image and the symbol of the kernel `name_expression` names (a kernel name,
/// or a template instantiation such as `scale<float>`). Options: `-std=c++17`, accurate
/// division and square root, `-I` for the CUDA headers when they are found, then `options`.
/// Needs libnvrtc, not a GPU.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc; `Error::Compile` with NVRTC's log.
#[cfg(feature = "cuda")]
pub fn compile_to_cubin(
    source: &str,
    name_expression: &str,
    arch: &str,
    options: &[&str],
) -> Result<CompiledCubin> {
    let mut all: Vec<String> = super::launch::include_options().unwrap_or_default();
    all.extend(options.iter().map(|o| o.to_string()));
    let program = crate::cuda::jit::SourceProgram {
        name: "compile_to_cubin.cu",
        source,
        headers: &[],
        name_expr: name_expression,
        options: &all,
        failure: "[compile_to_cubin] Failed to compile the kernel",
    };
    let compiled = crate::cuda::jit::compile_source(&program, arch)?;
    Ok(CompiledCubin {
        image: compiled.image,
        symbol: compiled.symbol,
    })
}

/// NVRTC's name for the exact architecture of a CUDA device (`"sm_90"` for an H100), the
/// `arch` to give [`compile_to_cubin`] for an image that device loads.
///
/// # Errors
/// `Error::Device` for the CPU; as [`Device::cuda`](crate::Device::cuda) otherwise.
#[cfg(feature = "cuda")]
pub fn cuda_architecture(device: &crate::Device) -> Result<String> {
    Ok(crate::cuda::runtime::cuda_device(device)?.arch())
}
