//! Custom kernels from Python: `metal_kernel`, `cuda_kernel` (objects built once and called
//! with MLX's keywords) and `precompiled_cuda_kernel`, over ferrofast's `fast::MetalKernel`,
//! `fast::CudaKernel` and `fast::precompiled_cuda_kernel`. Arguments arrive positional and
//! normalised by `ferrofast/fast.py` (arrays as `Tensor`s, dtypes as MLX names); the checks
//! and messages are the Rust crate's (MLX's). Compiling and launching run with the GIL
//! released; `verbose` text goes to Python's `sys.stdout`.
//!
//! Launching user code is the caller's contract, as in MLX: the kernel must stay inside its
//! inputs' and outputs' elements. Everything the library can check (counts, dtypes, shapes,
//! block sizes, shared memory) is checked and raised as an exception.

use ferrofast::fast::{
    self, CudaKernel, KernelCall, KernelInput, MathMode, MetalKernel, ScalarArg, TemplateArg,
};
use ferrofast::{Array, DType, Device};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};

use crate::dlpack::Tensor;
use crate::errors::to_py;

/// MLX's dtype name (`"float32"`, `"bfloat16"`, ...) as a [`DType`] (the names of
/// [`DType::name`]).
fn dtype_named(op: &str, name: &str) -> PyResult<DType> {
    DType::ALL
        .into_iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            PyValueError::new_err(format!(
                "[{op}] ferrofast has no dtype `{name}` ({}).",
                known.join(", ")
            ))
        })
}

/// A Python `int` as the C++ `int` it becomes (`what` names it in the error).
fn int32_of(op: &str, item: &Bound<'_, PyAny>, what: &str) -> PyResult<i32> {
    let v: i64 = item.extract()?;
    i32::try_from(v).map_err(|_| {
        PyValueError::new_err(format!("[{op}] the {what} {v} does not fit a 32-bit int."))
    })
}

/// One input as received: an array, or a Python scalar MLX turns into a 0-d array.
enum Input {
    Array(Array),
    Bool(bool),
    Int(i32),
    Float(f32),
}

impl Input {
    fn extract(op: &str, item: &Bound<'_, PyAny>) -> PyResult<Input> {
        if let Ok(t) = item.cast::<Tensor>() {
            return Ok(Input::Array(t.get().array()?));
        }
        if item.is_instance_of::<PyBool>() {
            return Ok(Input::Bool(item.extract()?));
        }
        if item.is_instance_of::<PyInt>() {
            return Ok(Input::Int(int32_of(op, item, "integer input")?));
        }
        if item.is_instance_of::<PyFloat>() {
            let v: f64 = item.extract()?;
            return Ok(Input::Float(v as f32));
        }
        Err(PyTypeError::new_err(format!(
            "[{op}] inputs must be arrays or bool, int or float scalars, not {}.",
            item.get_type().name()?
        )))
    }

    fn as_kernel_input(&self) -> KernelInput<'_> {
        match self {
            Input::Array(a) => KernelInput::Array(a),
            Input::Bool(v) => KernelInput::Bool(*v),
            Input::Int(v) => KernelInput::Int(*v),
            Input::Float(v) => KernelInput::Float(*v),
        }
    }
}

/// A template value: `bool` (tested first, as MLX does), `int`, or a dtype name.
fn template_value(op: &str, value: &Bound<'_, PyAny>) -> PyResult<TemplateArg> {
    if value.is_instance_of::<PyBool>() {
        return Ok(TemplateArg::Bool(value.extract()?));
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(TemplateArg::Int(int32_of(op, value, "template value")?));
    }
    if value.is_instance_of::<PyString>() {
        let name: String = value.extract()?;
        return Ok(TemplateArg::DType(dtype_named(op, &name)?));
    }
    Err(PyValueError::new_err(format!(
        "[{op}] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`."
    )))
}

/// Where a call runs, as `fast.py` resolved MLX's `stream=`: `(device index, raw CUstream)`;
/// `device` -1 is the CPU (refused by the kernels with MLX's message); no stream means the
/// device's default stream; neither means "where the first GPU input lives, else cuda:0".
type Placement = (Option<i64>, Option<usize>);

fn place<'a>(mut call: KernelCall<'a>, placement: Placement) -> PyResult<KernelCall<'a>> {
    match placement {
        (None, None) => {}
        (Some(-1), _) => call = call.on_device(Device::Cpu),
        (dev, raw) => {
            let index = usize::try_from(dev.unwrap_or(0))
                .map_err(|_| PyValueError::new_err("invalid CUDA device index"))?;
            let device = Device::cuda(index).map_err(to_py)?;
            match raw {
                Some(raw) => {
                    // SAFETY: `fast.py` passes the `cuda_stream` of a live stream object of
                    // the caller's (kept alive by the caller for the call), of this device.
                    let s = unsafe { ferrofast::Stream::from_raw(&device, raw as *mut _) }
                        .map_err(to_py)?;
                    call = call.on_stream(&s);
                }
                None => call = call.on_device(device),
            }
        }
    }
    Ok(call)
}

/// Converts a call's inputs, builds the call from the rest of its arguments and runs `f` on
/// it with `verbose`.
fn with_call<R>(
    op: &str,
    args: CallArgs<'_>,
    f: impl FnOnce(&KernelCall<'_>, bool) -> PyResult<R>,
) -> PyResult<R> {
    let (
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template,
        init_value,
        verbose,
        device,
        stream,
    ) = args;
    let inputs = inputs_of(op, &inputs)?;
    let mut call = KernelCall::new(
        [grid.0, grid.1, grid.2],
        [threadgroup.0, threadgroup.1, threadgroup.2],
    );
    call.inputs = inputs.iter().map(Input::as_kernel_input).collect();
    call.output_shapes = output_shapes;
    call.output_dtypes = output_dtypes
        .iter()
        .map(|d| dtype_named(op, d))
        .collect::<PyResult<_>>()?;
    call.template = template
        .iter()
        .map(|(n, v)| Ok((n.clone(), template_value(op, v)?)))
        .collect::<PyResult<_>>()?;
    call.init_value = init_value;
    f(&place(call, (device, stream))?, verbose)
}

fn inputs_of(op: &str, inputs: &[Bound<'_, PyAny>]) -> PyResult<Vec<Input>> {
    inputs.iter().map(|i| Input::extract(op, i)).collect()
}

fn write_stdout(py: Python<'_>, text: &str) -> PyResult<()> {
    let out = py.import("sys")?.getattr("stdout")?;
    out.call_method1("write", (text,))?;
    out.call_method0("flush")?;
    Ok(())
}

fn wrap_all(v: Vec<Array>) -> Vec<Tensor> {
    v.into_iter().map(Tensor::new).collect()
}

/// A kernel built by `cuda_kernel(...)` (MLX's CUDA custom kernel) or `metal_kernel(...)`
/// (a Metal kernel body run on CUDA).
#[pyclass(module = "ferrofast._native", frozen)]
pub struct KernelObject {
    kernel: Kernel,
}

enum Kernel {
    Cuda(CudaKernel),
    Metal(MetalKernel),
}

/// What both source kernels are built from, as `fast.py` passes it (one tuple): `(name,
/// input_names, output_names, source, header)`.
type KernelText = (String, Vec<String>, Vec<String>, String, String);

/// Builds a kernel object with `new(name, input_names, output_names, source, header)`.
fn build_kernel<K>(
    (name, input_names, output_names, source, header): KernelText,
    new: impl FnOnce(&str, &[&str], &[&str], &str, &str) -> ferrofast::Result<K>,
    kernel: impl FnOnce(K) -> Kernel,
) -> PyResult<KernelObject> {
    let ins: Vec<&str> = input_names.iter().map(String::as_str).collect();
    let outs: Vec<&str> = output_names.iter().map(String::as_str).collect();
    new(&name, &ins, &outs, &source, &header)
        .map(|k| KernelObject { kernel: kernel(k) })
        .map_err(to_py)
}

/// `cuda_kernel((name, input_names, output_names, source, header), ensure_row_contiguous,
/// shared_memory)`.
#[pyfunction]
#[pyo3(signature = (text, ensure_row_contiguous, shared_memory))]
pub fn cuda_kernel(
    text: KernelText,
    ensure_row_contiguous: bool,
    shared_memory: usize,
) -> PyResult<KernelObject> {
    build_kernel(
        text,
        |name, ins, outs, source, header| {
            CudaKernel::new(
                name,
                ins,
                outs,
                source,
                header,
                ensure_row_contiguous,
                shared_memory,
            )
        },
        Kernel::Cuda,
    )
}

/// `metal_kernel((name, input_names, output_names, source, header), ensure_row_contiguous,
/// atomic_outputs, math_mode)`; `math_mode` is `"safe"`, `"relaxed"` or `"fast"`.
#[pyfunction]
#[pyo3(signature = (text, ensure_row_contiguous, atomic_outputs, math_mode))]
pub fn metal_kernel(
    text: KernelText,
    ensure_row_contiguous: bool,
    atomic_outputs: bool,
    math_mode: &str,
) -> PyResult<KernelObject> {
    let mode = MathMode::from_compile_options(&[("math_mode", math_mode)]).map_err(to_py)?;
    build_kernel(
        text,
        |name, ins, outs, source, header| {
            MetalKernel::new(
                name,
                ins,
                outs,
                source,
                header,
                ensure_row_contiguous,
                atomic_outputs,
                mode,
            )
        },
        Kernel::Metal,
    )
}

/// A kernel call's arguments as `fast.py` passes them, one tuple: `(inputs,
/// output_shapes, output_dtypes, grid, threadgroup, template, init_value, verbose, device,
/// stream)`.
type CallArgs<'py> = (
    Vec<Bound<'py, PyAny>>,
    Vec<Vec<usize>>,
    Vec<String>,
    (usize, usize, usize),
    (usize, usize, usize),
    Vec<(String, Bound<'py, PyAny>)>,
    Option<f64>,
    bool,
    Option<i64>,
    Option<usize>,
);

/// What the two source-kernel objects share: the text `verbose` prints, and the launch.
trait SourceKernel: Sync {
    /// The op name of its messages.
    const OP: &'static str;
    /// MLX's `verbose` text for `call`.
    fn verbose_text(&self, call: &KernelCall) -> ferrofast::Result<String>;
    /// Compiles (cached) and launches.
    ///
    /// # Safety
    /// MLX's custom-kernel contract: the kernel reads and writes only inside its arrays'
    /// elements.
    unsafe fn launch(&self, call: &KernelCall) -> ferrofast::Result<Vec<Array>>;
}

impl SourceKernel for CudaKernel {
    const OP: &'static str = "custom_kernel";
    fn verbose_text(&self, call: &KernelCall) -> ferrofast::Result<String> {
        Ok(self.generate(call)?.verbose_text())
    }
    unsafe fn launch(&self, call: &KernelCall) -> ferrofast::Result<Vec<Array>> {
        // SAFETY: this function's own contract, passed on.
        unsafe { self.call(call) }
    }
}

impl SourceKernel for MetalKernel {
    const OP: &'static str = "metal_kernel";
    fn verbose_text(&self, call: &KernelCall) -> ferrofast::Result<String> {
        Ok(self.generate(call)?.verbose_text(self.name()))
    }
    unsafe fn launch(&self, call: &KernelCall) -> ferrofast::Result<Vec<Array>> {
        // SAFETY: this function's own contract, passed on.
        unsafe { self.call(call) }
    }
}

/// Builds the call, prints the source when asked, launches without the GIL.
fn call_source_kernel<K: SourceKernel>(
    py: Python<'_>,
    kernel: &K,
    args: CallArgs<'_>,
) -> PyResult<Vec<Tensor>> {
    with_call(K::OP, args, |call, verbose| {
        if verbose {
            let text = kernel.verbose_text(call).map_err(to_py)?;
            write_stdout(py, &text)?;
        }
        // SAFETY: MLX's contract for custom kernels, which `ferrofast.fast.cuda_kernel` and
        // `metal_kernel` state: the kernel reads and writes only inside its arrays' elements.
        py.detach(|| unsafe { kernel.launch(call) })
            .map(wrap_all)
            .map_err(to_py)
    })
}

#[pymethods]
impl KernelObject {
    /// `call((inputs, output_shapes, output_dtypes, grid, threadgroup, template,
    /// init_value, verbose, device, stream)) -> list[Tensor]`.
    fn call(&self, py: Python<'_>, args: CallArgs<'_>) -> PyResult<Vec<Tensor>> {
        match &self.kernel {
            Kernel::Cuda(k) => call_source_kernel(py, k, args),
            Kernel::Metal(k) => call_source_kernel(py, k, args),
        }
    }

    /// The kernel's name as given.
    #[getter]
    fn name(&self) -> &str {
        match &self.kernel {
            Kernel::Cuda(k) => k.name(),
            Kernel::Metal(k) => k.name(),
        }
    }
}

/// `precompiled_cuda_kernel(name, compiled_source, inputs, output_shapes, output_dtypes,
/// scalars, grid, threadgroup, shared_memory, init_value, ensure_row_contiguous, device,
/// stream) -> list[Tensor]`.
#[pyfunction]
#[pyo3(signature = (name, compiled_source, inputs, output_shapes, output_dtypes, scalars, grid, threadgroup, shared_memory, init_value, ensure_row_contiguous, device, stream))]
#[allow(clippy::too_many_arguments)]
pub fn precompiled_cuda_kernel(
    py: Python<'_>,
    name: &str,
    compiled_source: Vec<u8>,
    inputs: Vec<Bound<'_, PyAny>>,
    output_shapes: Vec<Vec<usize>>,
    output_dtypes: Vec<String>,
    scalars: Vec<Bound<'_, PyAny>>,
    grid: (usize, usize, usize),
    threadgroup: (usize, usize, usize),
    shared_memory: usize,
    init_value: Option<f64>,
    ensure_row_contiguous: bool,
    device: Option<i64>,
    stream: Option<usize>,
) -> PyResult<Vec<Tensor>> {
    const OP: &str = "precompiled_cuda_kernel";
    let scalars = scalars
        .iter()
        .map(|s| match Input::extract(OP, s)? {
            Input::Bool(v) => Ok(ScalarArg::Bool(v)),
            Input::Int(v) => Ok(ScalarArg::Int(v)),
            Input::Float(v) => Ok(ScalarArg::Float(v)),
            Input::Array(_) => Err(PyValueError::new_err(format!(
                "[{OP}] Invalid scalar argument type. Received array but must be one of \
                 bool, int or float"
            ))),
        })
        .collect::<PyResult<Vec<_>>>()?;
    let args = (
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        Vec::new(),
        init_value,
        false,
        device,
        stream,
    );
    with_call(OP, args, |call, _verbose| {
        // SAFETY: MLX's contract for precompiled kernels, stated by
        // `ferrofast.fast.precompiled_cuda_kernel`: the image's `name` takes a pointer per
        // input, a pointer per output, then the scalars, and stays inside its arrays' elements.
        py.detach(|| unsafe {
            fast::precompiled_cuda_kernel(
                name,
                &compiled_source,
                call,
                &scalars,
                shared_memory,
                ensure_row_contiguous,
            )
        })
        .map(wrap_all)
        .map_err(to_py)
    })
}

/// A host copy of `t` (the same `Tensor` when it already lives on the CPU).
#[pyfunction]
pub fn to_cpu(py: Python<'_>, t: &Bound<'_, Tensor>) -> PyResult<Tensor> {
    let a = t.get().array()?;
    if a.device().is_cpu() {
        return Ok(Tensor::new(a));
    }
    py.detach(|| a.to_device(&Device::Cpu))
        .map(Tensor::new)
        .map_err(to_py)
}

/// `compile_to_cubin(source, name_expression, arch, options) -> (bytes, symbol)`: NVRTC
/// to CUBIN for `arch` (`None`: the architecture of `cuda:0`), for
/// `precompiled_cuda_kernel`. Needs libnvrtc, not a GPU (with `arch` given).
#[pyfunction]
#[pyo3(signature = (source, name_expression, arch, options))]
pub fn compile_to_cubin(
    py: Python<'_>,
    source: &str,
    name_expression: &str,
    arch: Option<String>,
    options: Vec<String>,
) -> PyResult<(Py<pyo3::types::PyBytes>, String)> {
    let compiled = py
        .detach(|| {
            let arch = match arch {
                Some(a) => a,
                None => fast::cuda_architecture(&Device::cuda(0)?)?,
            };
            let opts: Vec<&str> = options.iter().map(String::as_str).collect();
            fast::compile_to_cubin(source, name_expression, &arch, &opts)
        })
        .map_err(to_py)?;
    Ok((
        pyo3::types::PyBytes::new(py, &compiled.image).unbind(),
        compiled.symbol,
    ))
}

/// The number of usable CUDA devices (0 without a driver or a GPU, or in a CPU-only build).
#[pyfunction]
pub fn cuda_device_count() -> usize {
    Device::cuda_device_count()
}
