//! The launcher every custom-kernel front end shares: compile a complete CUDA source through
//! NVRTC (or load a precompiled image), prepare the inputs on the kernel's stream, allocate
//! and initialise the outputs, check the device limits, launch.
//!
//! A front end builds a [`Launch`]: the kernel ([`KernelSource`]), the input arrays, the
//! outputs to allocate, the kernel's arguments in parameter order ([`LaunchArg`]), the
//! dispatch and the dynamic shared memory. Everything the library can check is checked
//! before the launch and returns an `Error`; what the kernel does with its pointers is the
//! caller's `unsafe` contract.

use super::{Dispatch, KernelCall, MAX_NDIM};
use crate::cuda::jit::{self, SourceProgram};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, driver_error, guarded, CudaDevice};
use crate::cuda::Stream;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::{Array, Device};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaView, LaunchConfig, PushKernelArg};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Dynamic shared memory a kernel may use without opting in (48 KiB).
const DEFAULT_SHARED_LIMIT: usize = 48 * 1024;

/// Where the kernel comes from.
pub(crate) enum KernelSource<'a> {
    /// A CUDA C++ program compiled by NVRTC for the device (cached in memory and on disk).
    /// Its options should include [`include_options`] when it includes CUDA headers.
    Source(SourceProgram<'a>),
    /// A precompiled image (PTX text, CUBIN or fatbin) and the exact symbol to launch.
    Binary {
        /// The kernel's symbol in the image (mangled if the kernel is C++).
        symbol: &'a str,
        /// The image bytes.
        image: &'a [u8],
    },
}

/// One kernel argument, in parameter order. (`U32` and `U32x3` serve front ends that pass
/// unsigned scalars and `uint3` values, such as the Metal translation.)
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(dead_code)]
pub(crate) enum LaunchArg {
    /// Device pointer to the first element of input `i` (after the contiguous copy, when
    /// asked for).
    Input(usize),
    /// Device pointer to output `i`.
    Output(usize),
    /// Input `i`'s shape by value: `int32_t[10]`, unused entries 0.
    Shape(usize),
    /// Input `i`'s strides in elements by value: `int64_t[10]`, unused entries 0.
    Strides(usize),
    /// Input `i`'s number of dimensions: `int32_t`.
    Ndim(usize),
    /// A `bool` scalar.
    Bool(bool),
    /// An `int32_t` scalar.
    I32(i32),
    /// A `uint32_t` scalar.
    U32(u32),
    /// A `float` scalar.
    F32(f32),
    /// Three `uint32_t` by value (a `uint3`).
    U32x3([u32; 3]),
    /// The index of this launch's first block per axis (a `uint3`): 0 unless
    /// [`Launch::split_partial`] splits the grid into several launches.
    BlockOrigin,
}

/// Everything one launch needs.
pub(crate) struct Launch<'a> {
    /// The front end's name for messages: `custom_kernel`, `metal_kernel`, ...
    pub(crate) op: &'a str,
    /// The kernel.
    pub(crate) kernel: KernelSource<'a>,
    /// The inputs (CPU arrays are uploaded to the stream's device).
    pub(crate) inputs: Vec<Array>,
    /// Copy inputs that are not row-contiguous before the launch.
    pub(crate) ensure_row_contiguous: bool,
    /// Shapes of the outputs to allocate (row-contiguous).
    pub(crate) output_shapes: &'a [Vec<usize>],
    /// Their dtypes.
    pub(crate) output_dtypes: &'a [DType],
    /// Value to fill the outputs with before the launch, cast to each dtype.
    pub(crate) init_value: Option<f64>,
    /// The kernel's arguments in parameter order.
    pub(crate) args: Vec<LaunchArg>,
    /// Blocks and threads per block.
    pub(crate) dispatch: Dispatch,
    /// Launch the last, partial blocks along each axis as blocks of their real size, in
    /// launches of their own (up to eight: full and partial runs per axis), instead of full
    /// blocks whose threads past the grid idle: no thread of a block is then outside the grid
    /// (Metal's non-uniform threadgroups, whose barriers every thread of the block meets).
    pub(crate) split_partial: bool,
    /// Dynamic shared memory in bytes.
    pub(crate) shared_memory: usize,
    /// Where to run.
    pub(crate) stream: Stream,
}

/// The stream a call runs on (see [`KernelCall`]): its stream, its device's default stream,
/// the stream of its first GPU input, or `cuda:0`'s default stream.
///
/// # Errors
/// `[{op}] Only supports the GPU.` for the CPU; `Error::CudaUnavailable` when no GPU can be
/// used.
pub(crate) fn resolve_stream(op: &str, call: &KernelCall) -> Result<Stream> {
    if let Some(s) = &call.stream {
        return Ok(s.clone());
    }
    match call.device {
        Some(Device::Cpu) => Err(Error::Device(format!("[{op}] Only supports the GPU."))),
        Some(d) => Stream::default_for(&d),
        None => {
            for input in &call.inputs {
                if let super::KernelInput::Array(a) = input {
                    if let Some(s) = a.stream() {
                        return Ok(s);
                    }
                }
            }
            Stream::default_for(&Device::Cuda(0)).map_err(|e| match e {
                Error::CudaUnavailable(m) => Error::CudaUnavailable(format!(
                    "[{op}] Only supports the GPU, and no CUDA device can be used: {m}"
                )),
                other => other,
            })
        }
    }
}

/// The architecture NVRTC compiles custom kernels for: the device's exact one, with the `a`
/// suffix (architecture-specific features such as `wgmma`) from compute capability 9.0 on,
/// as MLX does.
pub(crate) fn kernel_arch(device: &CudaDevice) -> String {
    let arch = device.arch();
    let major = arch
        .trim_start_matches("sm_")
        .parse::<u32>()
        .map(|n| n / 10)
        .unwrap_or(0);
    if major >= 9 {
        format!("{arch}a")
    } else {
        arch
    }
}

// ----- CUDA headers ---------------------------------------------------------------------------

/// Folders holding the CUDA headers user kernels include: the toolkit's include folder (with
/// `cuda_fp16.h`, `cuda_bf16.h`, `cooperative_groups.h`) and CCCL's (`cuda/std/...`, which
/// `cooperative_groups.h` includes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CudaIncludes {
    /// The folder with `cuda_fp16.h`.
    pub(crate) cuda: PathBuf,
    /// The folder with `cuda/std/type_traits`.
    pub(crate) cccl: PathBuf,
}

const REQUIRED_HEADERS: [&str; 3] = ["cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"];

fn candidate_include_folders() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("FERROFAST_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(dir));
    }
    for var in [
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "CUDA_TOOLKIT_ROOT_DIR",
    ] {
        if let Some(root) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let root = PathBuf::from(root);
            out.push(root.join("include"));
            out.push(root.join("targets/x86_64-linux/include"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/include"));
    out.push(PathBuf::from(
        "/usr/local/cuda/targets/x86_64-linux/include",
    ));
    out.push(PathBuf::from("/opt/cuda/include"));
    // The pip wheels: `nvidia-cuda-runtime` 13.x puts the headers in nvidia/cu13/include
    // (with `nvidia-cuda-cccl` adding nvidia/cu13/include/cccl); 12.x in
    // nvidia/cuda_runtime/include (CCCL in nvidia/cuda_cccl/include).
    for site in runtime::python_site_folders() {
        out.push(site.join("nvidia/cu13/include"));
        out.push(site.join("nvidia/cuda_runtime/include"));
    }
    out
}

fn has_cccl(dir: &Path) -> bool {
    dir.join("cuda/std/type_traits").is_file()
}

fn cccl_for(cuda: &Path) -> Option<PathBuf> {
    // CUDA 13 keeps CCCL in include/cccl; CUDA 12 directly in include.
    let nested = cuda.join("cccl");
    if has_cccl(&nested) {
        return Some(nested);
    }
    if has_cccl(cuda) {
        return Some(cuda.to_path_buf());
    }
    // The 12.x wheels install CCCL as a sibling package.
    let sibling = cuda.parent()?.parent()?.join("cuda_cccl/include");
    has_cccl(&sibling).then_some(sibling)
}

fn find_includes() -> std::result::Result<CudaIncludes, String> {
    let candidates = candidate_include_folders();
    for dir in &candidates {
        if REQUIRED_HEADERS.iter().all(|h| dir.join(h).is_file()) {
            if let Some(cccl) = cccl_for(dir) {
                return Ok(CudaIncludes {
                    cuda: dir.clone(),
                    cccl,
                });
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let searched: Vec<String> = candidates
        .iter()
        .filter(|d| seen.insert(d.to_path_buf()))
        .map(|d| d.display().to_string())
        .collect();
    Err(format!(
        "custom CUDA kernels need the CUDA headers ({} and CCCL's cuda/std/type_traits) but no \
         folder holding them was found; looked in {}. Install the CUDA toolkit, or `pip \
         install 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*'`, or set \
         FERROFAST_CUDA_INCLUDE (or CUDA_HOME) to the folder holding cuda_fp16.h.",
        REQUIRED_HEADERS.join(", "),
        searched.join(", ")
    ))
}

/// The CUDA header folders, found once per process.
///
/// # Errors
/// `Error::CudaUnavailable` listing every folder searched when none holds the headers.
pub(crate) fn cuda_includes() -> Result<CudaIncludes> {
    static FOUND: OnceLock<std::result::Result<CudaIncludes, String>> = OnceLock::new();
    FOUND
        .get_or_init(find_includes)
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// NVRTC options that make the CUDA headers includable (`-I` for the toolkit and CCCL
/// folders).
///
/// # Errors
/// As [`cuda_includes`].
pub(crate) fn include_options() -> Result<Vec<String>> {
    let inc = cuda_includes()?;
    let mut out = vec![format!("-I{}", inc.cuda.display())];
    if inc.cccl != inc.cuda {
        out.push(format!("-I{}", inc.cccl.display()));
    }
    Ok(out)
}

// ----- launching ------------------------------------------------------------------------------

/// An argument value owned for the duration of the launch (the driver reads arguments
/// through pointers).
enum ArgValue {
    Bool(bool),
    I32(i32),
    U32(u32),
    F32(f32),
    U32x3([u32; 3]),
    Shape([i32; MAX_NDIM]),
    Strides([i64; MAX_NDIM]),
}

fn device_attribute(device: &CudaDevice, attr: CUdevice_attribute, what: &str) -> Result<usize> {
    device
        .context()
        .attribute(attr)
        .map(|v| v.max(0) as usize)
        .map_err(|e| driver_error(&format!("reading the device's {what}"), e))
}

fn function_attribute(f: &CudaFunction, attr: CUfunction_attribute, what: &str) -> Result<usize> {
    f.get_attribute(attr)
        .map(|v| v.max(0) as usize)
        .map_err(|e| driver_error(&format!("reading the kernel's {what}"), e))
}

/// Moves an input to the launch's device: CPU arrays are uploaded, views copied when
/// row-contiguity is required.
fn prepare_input(
    op: &str,
    index: usize,
    a: &Array,
    stream: &Stream,
    ensure_row_contiguous: bool,
) -> Result<Array> {
    let a = match a.cuda_buffer() {
        Some(b) if b.device().ordinal() != stream.ordinal() => {
            return Err(Error::Device(format!(
                "[{op}] input {index} is on cuda:{} but the kernel runs on cuda:{}",
                b.device().ordinal(),
                stream.ordinal()
            )))
        }
        Some(_) => a.clone(),
        None => crate::cuda::memory::upload(&a.contiguous()?, stream)?,
    };
    if ensure_row_contiguous && !a.is_contiguous() {
        return crate::cuda::copy::copy_cast(&a, a.dtype(), Some(stream));
    }
    Ok(a)
}

fn shape_arg(op: &str, a: &Array) -> Result<[i32; MAX_NDIM]> {
    check_ndim(op, a)?;
    let mut out = [0i32; MAX_NDIM];
    for (o, &d) in out.iter_mut().zip(a.shape()) {
        *o = i32::try_from(d).map_err(|_| {
            Error::Unsupported(format!(
                "[{op}] a dimension of {d} does not fit the kernel's int32 shape"
            ))
        })?;
    }
    Ok(out)
}

fn strides_arg(op: &str, a: &Array) -> Result<[i64; MAX_NDIM]> {
    check_ndim(op, a)?;
    let mut out = [0i64; MAX_NDIM];
    for (o, &s) in out.iter_mut().zip(a.strides()) {
        *o = s as i64;
    }
    Ok(out)
}

fn check_ndim(op: &str, a: &Array) -> Result<()> {
    if a.ndim() > MAX_NDIM {
        return Err(Error::invalid(format!(
            "[{op}] ndim can not be larger than {MAX_NDIM}."
        )));
    }
    Ok(())
}

/// The bit pattern of `value` converted to `dtype`, as little-endian bytes.
fn fill_pattern(dtype: DType, value: f64) -> Vec<u8> {
    fn bytes<T: Element>(value: f64) -> Vec<u8> {
        let v = T::from_f64(value);
        let size = std::mem::size_of::<T>();
        let mut out = vec![0u8; size];
        // SAFETY: `v` is a plain-data element of `size` bytes (bool is one byte, 0 or 1);
        // its bytes are copied into a buffer of exactly that size.
        unsafe {
            std::ptr::copy_nonoverlapping((&v as *const T).cast::<u8>(), out.as_mut_ptr(), size)
        };
        out
    }
    crate::array::dispatch_dtype!(dtype, T => bytes::<T>(value))
}

/// Fills `buf` with `value` converted to its dtype, on `stream`.
fn fill(buf: &mut CudaBuffer, stream: &Stream, value: f64) -> Result<()> {
    let n = buf.len();
    if n == 0 {
        return Ok(());
    }
    let pattern = fill_pattern(buf.dtype(), value);
    let cu = stream.cuda();
    let memset_done = {
        let (ptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(buf.slice_mut(), cu);
        let raw = cu.cu_stream();
        let wide_uniform = pattern.len() == 8 && pattern[..4] == pattern[4..];
        guarded("filling an output", || {
            // SAFETY: `ptr` is the start of this live allocation of n elements made on this
            // stream; each memset writes exactly n * pattern.len() bytes.
            let r = unsafe {
                match pattern.len() {
                    1 => cudarc::driver::sys::cuMemsetD8Async(ptr, pattern[0], n, raw),
                    2 => cudarc::driver::sys::cuMemsetD16Async(
                        ptr,
                        u16::from_le_bytes([pattern[0], pattern[1]]),
                        n,
                        raw,
                    ),
                    4 => cudarc::driver::sys::cuMemsetD32Async(
                        ptr,
                        u32::from_le_bytes([pattern[0], pattern[1], pattern[2], pattern[3]]),
                        n,
                        raw,
                    ),
                    _ if wide_uniform => cudarc::driver::sys::cuMemsetD32Async(
                        ptr,
                        u32::from_le_bytes([pattern[0], pattern[1], pattern[2], pattern[3]]),
                        2 * n,
                        raw,
                    ),
                    _ => return Ok(false),
                }
            };
            r.result()
                .map(|_| true)
                .map_err(|e| driver_error("filling an output", e))
        })?
    };
    if memset_done {
        return Ok(());
    }
    // An 8-byte value whose halves differ: upload it.
    let host: Vec<u8> = pattern.iter().copied().cycle().take(n * 8).collect();
    guarded("filling an output", || {
        cu.memcpy_htod(&host, buf.slice_mut())
            .map_err(|e| driver_error("filling an output", e))
    })
}

/// Compiles (or loads) the kernel, prepares the inputs, allocates the outputs and launches.
///
/// # Safety
/// The kernel must match `args` parameter for parameter (count, order and types), and may
/// only touch memory inside the input views and output buffers it is given (outputs hold
/// exactly their shape's element count, row-contiguous; inputs are addressed from their
/// first element with the strides the caller passes or implies), within the dynamic shared
/// memory requested. The kernel must not write inputs. A kernel breaking this can corrupt
/// memory or fault the device context.
///
/// # Errors
/// Compile errors (NVRTC's log), `Error::CudaUnavailable` without headers or NVRTC, and
/// `Error::InvalidArgument` for: an argument index out of range, an output passed twice,
/// ndim > 10 where shapes or strides are passed, threads per block above the kernel's limit,
/// shared memory above the device's limit. Driver errors from the launch itself.
pub(crate) unsafe fn launch(l: Launch) -> Result<Vec<Array>> {
    let op = l.op;
    let device = runtime::device(l.stream.ordinal())?;
    let stream = &l.stream;
    if l.output_shapes.len() != l.output_dtypes.len() {
        return Err(Error::invalid(format!(
            "[{op}] {} output shapes but {} output dtypes",
            l.output_shapes.len(),
            l.output_dtypes.len()
        )));
    }
    let inputs = l
        .inputs
        .iter()
        .enumerate()
        .map(|(i, a)| prepare_input(op, i, a, stream, l.ensure_row_contiguous))
        .collect::<Result<Vec<_>>>()?;

    // Owned argument values, checked before anything is compiled or allocated.
    let mut values: Vec<Option<ArgValue>> = Vec::with_capacity(l.args.len());
    let mut output_used = vec![false; l.output_shapes.len()];
    for arg in &l.args {
        let input = |i: usize| {
            inputs.get(i).ok_or_else(|| {
                Error::invalid(format!(
                    "[{op}] kernel argument refers to input {i} of {}",
                    inputs.len()
                ))
            })
        };
        values.push(match *arg {
            LaunchArg::Input(i) => {
                input(i)?;
                None
            }
            LaunchArg::Output(i) => {
                match output_used.get_mut(i) {
                    Some(used) if !*used => *used = true,
                    Some(_) => {
                        return Err(Error::invalid(format!(
                            "[{op}] output {i} is passed to the kernel twice"
                        )))
                    }
                    None => {
                        return Err(Error::invalid(format!(
                            "[{op}] kernel argument refers to output {i} of {}",
                            l.output_shapes.len()
                        )))
                    }
                }
                None
            }
            LaunchArg::Shape(i) => Some(ArgValue::Shape(shape_arg(op, input(i)?)?)),
            LaunchArg::Strides(i) => Some(ArgValue::Strides(strides_arg(op, input(i)?)?)),
            LaunchArg::Ndim(i) => {
                let a = input(i)?;
                check_ndim(op, a)?;
                Some(ArgValue::I32(a.ndim() as i32))
            }
            LaunchArg::Bool(v) => Some(ArgValue::Bool(v)),
            LaunchArg::I32(v) => Some(ArgValue::I32(v)),
            LaunchArg::U32(v) => Some(ArgValue::U32(v)),
            LaunchArg::F32(v) => Some(ArgValue::F32(v)),
            LaunchArg::U32x3(v) => Some(ArgValue::U32x3(v)),
            LaunchArg::BlockOrigin => None,
        });
    }

    let func = match &l.kernel {
        KernelSource::Source(program) => {
            jit::source_function(&device, program, &kernel_arch(&device))?
        }
        KernelSource::Binary { symbol, image } => jit::binary_function(&device, op, symbol, image)?,
    };

    // Limits: threads per block (the kernel's own limit accounts for its registers) and
    // shared memory (static + dynamic within the device's opt-in maximum).
    let threads: usize = l.dispatch.block.iter().map(|&b| b as usize).product();
    let max_threads = function_attribute(
        &func,
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
        "thread limit",
    )?;
    if threads > max_threads {
        return Err(Error::invalid(format!(
            "Thread group size ({threads}) is greater than  the maximum allowed threads per \
             threadgroup ({max_threads})."
        )));
    }
    let static_shared = function_attribute(
        &func,
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        "static shared memory",
    )?;
    let optin = device_attribute(
        &device,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        "shared memory limit",
    )?
    .max(DEFAULT_SHARED_LIMIT);
    if static_shared + l.shared_memory > optin {
        return Err(Error::invalid(format!(
            "[{op}] The kernel asks for {} bytes of dynamic shared memory (plus {static_shared} \
             static) but the device allows at most {optin} bytes per block.",
            l.shared_memory
        )));
    }
    let shared_bytes = u32::try_from(l.shared_memory)
        .map_err(|_| Error::invalid(format!("[{op}] shared memory size out of range")))?;
    if static_shared + l.shared_memory > DEFAULT_SHARED_LIMIT {
        // Raise the kernel's dynamic limit to all the device allows: one setting serves
        // every later launch, whatever size it asks for.
        let limit = (optin - static_shared) as i32;
        guarded("raising the dynamic shared memory limit", || {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                limit,
            )
            .map_err(|e| driver_error(&format!("[{op}] raising the shared memory limit"), e))
        })?;
    }

    let mut outputs = Vec::with_capacity(l.output_shapes.len());
    for (shape, &dtype) in l.output_shapes.iter().zip(l.output_dtypes) {
        let n = crate::array::checked_size(shape)?;
        let mut buf = CudaBuffer::alloc(&device, stream, dtype, n)?;
        if let Some(v) = l.init_value {
            fill(&mut buf, stream, v)?;
        }
        outputs.push(buf);
    }

    if !l.dispatch.is_empty() {
        let views: Vec<CudaView<'_, u8>> = inputs
            .iter()
            .map(|a| {
                let buf = a
                    .cuda_buffer()
                    .ok_or_else(|| Error::Device(format!("[{op}] an input left the GPU")))?;
                let start = a.offset() * a.dtype().size();
                Ok(buf
                    .slice()
                    .try_slice(start..)
                    .unwrap_or_else(|| buf.slice().as_view()))
            })
            .collect::<Result<_>>()?;
        let cu = stream.cuda();
        let what = format!("[{op}] launching the kernel");
        for (origin, blocks, block) in l.dispatch.segments(l.split_partial) {
            let mut output_refs: Vec<Option<&mut CudaBuffer>> =
                outputs.iter_mut().map(Some).collect();
            let mut builder = cu.launch_builder(&func);
            for (arg, value) in l.args.iter().zip(&values) {
                match (arg, value) {
                    (LaunchArg::Input(i), _) => {
                        builder.arg(&views[*i]);
                    }
                    (LaunchArg::Output(i), _) => {
                        let buf = output_refs[*i].take().ok_or_else(|| {
                            Error::invalid(format!("[{op}] output {i} is passed twice"))
                        })?;
                        builder.arg(buf.slice_mut());
                    }
                    (LaunchArg::BlockOrigin, _) => {
                        builder.arg(&origin);
                    }
                    (_, Some(ArgValue::Bool(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::I32(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::U32(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::F32(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::U32x3(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::Shape(v))) => {
                        builder.arg(v);
                    }
                    (_, Some(ArgValue::Strides(v))) => {
                        builder.arg(v);
                    }
                    (_, None) => {
                        return Err(Error::invalid(format!("[{op}] unexpected kernel argument")))
                    }
                }
            }
            let cfg = LaunchConfig {
                grid_dim: (blocks[0], blocks[1], blocks[2]),
                block_dim: (block[0], block[1], block[2]),
                shared_mem_bytes: shared_bytes,
            };
            guarded(&what, || {
                // SAFETY: the caller's contract (see above): the kernel matches the arguments
                // and stays inside the buffers it is given.
                unsafe { builder.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| driver_error(&what, e))
            })?;
        }
    }
    outputs
        .into_iter()
        .zip(l.output_shapes)
        .map(|(buf, shape)| Array::from_cuda_buffer(buf, shape))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_patterns_follow_casts() {
        assert_eq!(fill_pattern(DType::F32, 1.5), 1.5f32.to_le_bytes().to_vec());
        assert_eq!(
            fill_pattern(DType::I32, -2.7),
            (-2i32).to_le_bytes().to_vec()
        );
        assert_eq!(fill_pattern(DType::Bool, 3.0), vec![1u8]);
        assert_eq!(
            fill_pattern(DType::F16, 1.0),
            half::f16::from_f64(1.0).to_bits().to_le_bytes().to_vec()
        );
        assert_eq!(fill_pattern(DType::F64, 0.1), 0.1f64.to_le_bytes().to_vec());
    }
}
