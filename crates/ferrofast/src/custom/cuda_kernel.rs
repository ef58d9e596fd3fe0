//! `fast::CudaKernel`: MLX's `cuda_kernel`, a kernel body given as CUDA source, wrapped in a
//! generated signature, compiled by NVRTC at the first call and launched on a GPU.

use super::{
    check_counts, check_identifier, check_names, cuda_type, mentions, type_string, KernelCall,
    TemplateArg,
};
use crate::error::{Error, Result};
use crate::Array;

/// The error prefix MLX's CUDA custom kernels use.
const OP: &str = "custom_kernel";

/// Include name of the helper header every generated source includes (MLX's path, so
/// headers written for MLX that include it work unchanged).
pub(crate) const UTILS_NAME: &str = "mlx/backend/cuda/device/utils.cuh";

#[cfg(feature = "cuda")]
/// The helper header: Shape/Strides, elem_to_loc, Limits, AlignedVector, complex64_t, f16 and
/// bf16 types.
pub(crate) const UTILS: &str = include_str!("kernels/utils.cuh");

/// A custom CUDA kernel, MLX's `mx.fast.cuda_kernel`: `source` is the body of a kernel whose
/// signature is generated from the input and output names, so the body reads inputs and
/// writes outputs by name.
///
/// Build it once and call it many times: each distinct generated source (it depends on the
/// template arguments and on which inputs are 0-d) is compiled once per process and device,
/// and kept on disk (`FERROFAST_CACHE_DIR`) across processes.
///
/// # The generated source
///
/// ```text
/// #include "mlx/backend/cuda/device/utils.cuh"
/// #include <cooperative_groups.h>
///
/// {header}
///
/// namespace mlx::core::cu {
///
/// namespace cg = cooperative_groups;
///
/// __global__ void custom_kernel_{name}{template suffix}(
///     const {type}* {input},                        // every input, 0-d ones too: read x[0]
///     const __grid_constant__ Shape {input}_shape,  // only if the source mentions it
///     const __grid_constant__ Strides {input}_strides,
///     const __grid_constant__ int {input}_ndim,
///     {type}* {output}) {
///   constexpr int f = 3;  constexpr bool e = true;  using T = __half;  // template args
///   {source}
/// }
///
/// } // namespace mlx::core::cu
/// ```
///
/// - Types: `bool`, `uint8_t`, `uint32_t`, `int32_t`, `int64_t`, `__half` (f16),
///   `__nv_bfloat16` (bf16), `float`, `double`.
/// - `{input}_shape`, `_strides` and `_ndim` are passed (by value) for inputs of at least one
///   dimension whose name followed by the suffix occurs anywhere in `source`. `Shape` and
///   `Strides` hold 10 entries (`int32_t` and `int64_t`, strides in elements) with `.data()`,
///   `operator[]` and `size()`.
/// - The template suffix is `_{value}` for each int (`_n{value}` when negative), `_t`/`_f`
///   for bools and `_{type}` for dtypes (`_float16_t`, `_float`, ...), in order.
/// - Available: the helper header (`elem_to_loc`, `elem_to_loc_nd`, `Shape`, `Strides`,
///   `MAX_NDIM`, `WARP_SIZE`, `Limits<T>`, `AlignedVector`, `load_vector`, `store_vector`,
///   `complex64_t`), `cuda_fp16.h`, `cuda_bf16.h`, cooperative groups as `cg`, and any other
///   CUDA or CCCL header by name. Functions in `header` need no `__device__`: NVRTC runs with
///   `--device-as-default-execution-space`.
/// - Compiling needs the CUDA headers: the toolkit (`CUDA_HOME`, `CUDA_PATH`,
///   `/usr/local/cuda`) or the `nvidia-cuda-runtime` and `nvidia-cuda-cccl` wheels; set
///   `FERROFAST_CUDA_INCLUDE` to point elsewhere.
/// - A compile error is `Error::Compile` with NVRTC's log; lines in `header` are reported as
///   `header(N)` and lines in `source` as `source(N)`, counting from the first line of the
///   string (NVRTC sees `#line` directives the printed source leaves out).
///
/// # Launch
///
/// `grid` is in threads: block `(x, y, z) = min(threadgroup, grid)` per axis, and
/// `ceil(grid / block)` blocks. Threads past the grid in a partial last block run too (as in
/// MLX's CUDA back end), so the body must bounds-check. `shared_memory` bytes of dynamic
/// shared memory (`extern __shared__`) are given to every block; above 48 KiB the kernel's
/// limit is raised, up to the device's opt-in maximum.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    name: String,
    input_names: Vec<String>,
    output_names: Vec<String>,
    source: String,
    header: String,
    ensure_row_contiguous: bool,
    shared_memory: usize,
    /// Per input: whether the source mentions `_shape`, `_strides`, `_ndim`.
    mentions: Vec<[bool; 3]>,
}

/// A generated kernel: its name and full source, as [`CudaKernel`] prints and compiles it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedKernel {
    /// `custom_kernel_{name}` plus the template suffix.
    pub kernel_name: String,
    /// The source in MLX's shape (what `verbose` prints).
    pub source: String,
    /// The source NVRTC compiles: `source` with `#line` directives, so compile errors name
    /// lines of the user's `header` and `source`.
    pub compiled_source: String,
}

impl GeneratedKernel {
    /// The text `verbose` prints: a title line, then the source fenced by lines of three
    /// backticks.
    pub fn verbose_text(&self) -> String {
        format!(
            "Generated source code for `{}`:\n```\n{}\n```",
            self.kernel_name, self.source
        )
    }
}

/// Pieces of a generated source, so it can be printed plainly and compiled with `#line`
/// directives pointing into the user's strings.
enum Piece {
    Generated(String),
    User(&'static str, String),
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

impl CudaKernel {
    /// A kernel named `name` reading `input_names` and writing `output_names` (MLX's
    /// `cuda_kernel(name, input_names, output_names, source, header, ensure_row_contiguous,
    /// shared_memory)`; MLX's defaults are `header = ""`, `ensure_row_contiguous = true`,
    /// `shared_memory = 0`). Touches no device.
    ///
    /// `ensure_row_contiguous`: inputs that are not row-contiguous are copied first, so the
    /// body may index them flat; without it inputs are passed as they lie (a view's pointer
    /// is its first element) and the body must use `{input}_shape` / `_strides`.
    ///
    /// # Errors
    /// `[custom_kernel] Must specify at least one output.`; names that are not C++
    /// identifiers or that repeat.
    pub fn new(
        name: &str,
        input_names: &[&str],
        output_names: &[&str],
        source: &str,
        header: &str,
        ensure_row_contiguous: bool,
        shared_memory: usize,
    ) -> Result<CudaKernel> {
        check_names(OP, name, input_names, output_names)?;
        let mentions = mentions(source, input_names);
        Ok(CudaKernel {
            name: name.to_string(),
            input_names: input_names.iter().map(|s| s.to_string()).collect(),
            output_names: output_names.iter().map(|s| s.to_string()).collect(),
            source: source.to_string(),
            header: header.to_string(),
            ensure_row_contiguous,
            shared_memory,
            mentions,
        })
    }

    /// The name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether inputs are made row-contiguous before the launch.
    pub fn ensure_row_contiguous(&self) -> bool {
        self.ensure_row_contiguous
    }

    /// Dynamic shared memory per block, in bytes.
    pub fn shared_memory(&self) -> usize {
        self.shared_memory
    }

    /// The kernel name and source a call would compile (no device needed): checks the
    /// argument counts and the template names.
    ///
    /// # Errors
    /// MLX's size messages (``[custom_kernel] Expected `inputs` to have size ...``), template
    /// names that are not identifiers or clash with an input or output.
    pub fn generate(&self, call: &KernelCall) -> Result<GeneratedKernel> {
        check_counts(OP, call, self.input_names.len(), self.output_names.len())?;
        let arrays: Vec<Array> = call.inputs.iter().map(|i| i.to_array()).collect();
        self.generate_for(&arrays, call)
    }

    fn generate_for(&self, inputs: &[Array], call: &KernelCall) -> Result<GeneratedKernel> {
        let mut kernel_name = format!("custom_kernel_{}", self.name);
        let mut constants = String::new();
        for (name, value) in &call.template {
            check_identifier(OP, "template argument name", name)?;
            if self.input_names.contains(name) || self.output_names.contains(name) {
                return Err(Error::invalid(format!(
                    "[{OP}] The template argument `{name}` has the name of an input or output."
                )));
            }
            match value {
                TemplateArg::Bool(b) => {
                    kernel_name.push_str(if *b { "_t" } else { "_f" });
                    constants.push_str(&format!("  constexpr bool {name} = {b};\n"));
                }
                TemplateArg::Int(v) => {
                    if *v < 0 {
                        kernel_name.push_str(&format!("_n{}", v.unsigned_abs()));
                    } else {
                        kernel_name.push_str(&format!("_{v}"));
                    }
                    constants.push_str(&format!("  constexpr int {name} = {v};\n"));
                }
                TemplateArg::DType(d) => {
                    kernel_name.push('_');
                    kernel_name.push_str(type_string(*d));
                    constants.push_str(&format!("  using {name} = {};\n", cuda_type(*d)));
                }
            }
        }

        let mut params: Vec<String> = Vec::new();
        for (i, (name, a)) in self.input_names.iter().zip(inputs).enumerate() {
            params.push(format!("const {}* {name}", cuda_type(a.dtype())));
            if a.ndim() > 0 {
                let [shape, strides, ndim] = self.mentions[i];
                if shape {
                    params.push(format!("const __grid_constant__ Shape {name}_shape"));
                }
                if strides {
                    params.push(format!("const __grid_constant__ Strides {name}_strides"));
                }
                if ndim {
                    params.push(format!("const __grid_constant__ int {name}_ndim"));
                }
            }
        }
        for (name, &dtype) in self.output_names.iter().zip(&call.output_dtypes) {
            params.push(format!("{}* {name}", cuda_type(dtype)));
        }

        let pieces = vec![
            Piece::Generated(format!(
                "#include \"{UTILS_NAME}\"\n#include <cooperative_groups.h>\n\n"
            )),
            Piece::User("header", ensure_newline(self.header.clone())),
            Piece::Generated(format!(
                "\nnamespace mlx::core::cu {{\n\nnamespace cg = cooperative_groups;\n\n\
                 __global__ void {kernel_name}(\n    {}) {{\n{constants}",
                params.join(",\n    ")
            )),
            Piece::User("source", ensure_newline(self.source.clone())),
            Piece::Generated("}\n\n} // namespace mlx::core::cu\n".to_string()),
        ];
        let mut source = String::new();
        let mut compiled_source = String::new();
        let mut line = 1usize;
        for piece in &pieces {
            match piece {
                Piece::Generated(text) => {
                    compiled_source.push_str(&format!("#line {line} \"{kernel_name}.cu\"\n"));
                    compiled_source.push_str(text);
                    source.push_str(text);
                    line += text.matches('\n').count();
                }
                Piece::User(file, text) => {
                    compiled_source.push_str(&format!("#line 1 \"{file}\"\n"));
                    compiled_source.push_str(text);
                    source.push_str(text);
                    line += text.matches('\n').count();
                }
            }
        }
        Ok(GeneratedKernel {
            kernel_name,
            source: source.trim_end().to_string(),
            compiled_source,
        })
    }

    /// Compiles the kernel a call would run, for architecture `arch` (`"sm_90"`,
    /// `"sm_90a"`, ...), without a GPU and without launching: a compile check. Needs libnvrtc
    /// and the CUDA headers.
    ///
    /// # Errors
    /// As [`CudaKernel::generate`]; `Error::CudaUnavailable` without libnvrtc or headers;
    /// `Error::Compile` with NVRTC's log.
    #[cfg(feature = "cuda")]
    pub fn compile_check(&self, call: &KernelCall, arch: &str) -> Result<()> {
        let generated = self.generate(call)?;
        let options = program_options()?;
        let names = ProgramNames::new(&generated);
        crate::cuda::jit::compile_source(&names.program(&generated, &options), arch).map(|_| ())
    }

    /// Runs the kernel (MLX's `kernel(inputs=..., output_shapes=..., ...)`), returning the
    /// outputs: new row-contiguous arrays on the GPU, produced on the call's stream (see
    /// [`KernelCall`] for where it runs). With `call.verbose` the generated source is printed
    /// to stdout first.
    ///
    /// # Safety
    /// The library checks what it can (below); the rest is the caller's contract:
    /// - the body reads each input only inside its elements (for row-contiguous inputs,
    ///   indices `0..size`; otherwise the offsets `{input}_shape`/`_strides` give) and writes
    ///   outputs only at indices `0..size` of each output;
    /// - threads beyond the grid (the last block along an axis may be partial) must not
    ///   access memory out of bounds: bounds-check with the grid or the sizes;
    /// - the body does not write inputs, uses at most `shared_memory` bytes of dynamic shared
    ///   memory, and does not deadlock (e.g. `__syncthreads()` reached by only part of a
    ///   block).
    ///
    /// A kernel breaking it can read or corrupt unrelated GPU memory or fault the device's
    /// context, failing later work on it.
    ///
    /// # Errors
    /// Checked before the launch: MLX's size messages; `[custom_kernel] Only supports the
    /// GPU.` for the CPU device; `Error::CudaUnavailable` without a GPU, libnvrtc or the CUDA
    /// headers; `Error::Compile` with NVRTC's log; `[custom_kernel] ndim can not be larger
    /// than 10.` for an input with more dimensions whose shape or strides the body uses;
    /// threads per block above the kernel's limit; shared memory above the device's limit;
    /// a zero threadgroup dimension. Driver errors from the launch.
    pub unsafe fn call(&self, call: &KernelCall) -> Result<Vec<Array>> {
        let generated = self.generate(call)?;
        if call.verbose {
            println!("{}", generated.verbose_text());
        }
        let dispatch = super::dispatch(OP, call.grid, call.threadgroup)?;
        self.launch(&generated, call, dispatch)
    }

    #[cfg(feature = "cuda")]
    fn launch(
        &self,
        generated: &GeneratedKernel,
        call: &KernelCall,
        dispatch: super::Dispatch,
    ) -> Result<Vec<Array>> {
        use super::launch::{launch, resolve_stream, KernelSource, Launch, LaunchArg};
        let stream = resolve_stream(OP, call)?;
        let inputs: Vec<Array> = call.inputs.iter().map(|i| i.to_array()).collect();
        let mut args = Vec::new();
        for (i, a) in inputs.iter().enumerate() {
            args.push(LaunchArg::Input(i));
            if a.ndim() > 0 {
                let [shape, strides, ndim] = self.mentions[i];
                if shape {
                    args.push(LaunchArg::Shape(i));
                }
                if strides {
                    args.push(LaunchArg::Strides(i));
                }
                if ndim {
                    args.push(LaunchArg::Ndim(i));
                }
            }
        }
        args.extend((0..self.output_names.len()).map(LaunchArg::Output));
        let options = program_options()?;
        let names = ProgramNames::new(generated);
        let l = Launch {
            op: OP,
            kernel: KernelSource::Source(names.program(generated, &options)),
            inputs,
            ensure_row_contiguous: self.ensure_row_contiguous,
            output_shapes: &call.output_shapes,
            output_dtypes: &call.output_dtypes,
            init_value: call.init_value,
            args,
            dispatch,
            split_partial: false,
            shared_memory: self.shared_memory,
            stream,
        };
        // SAFETY: the arguments follow the generated signature parameter for parameter;
        // what the body does with them is the caller's contract (see `call`).
        unsafe { launch(l) }
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(
        &self,
        _generated: &GeneratedKernel,
        _call: &KernelCall,
        _dispatch: super::Dispatch,
    ) -> Result<Vec<Array>> {
        Err(Error::CudaUnavailable(
            "[cuda_kernel] No CUDA back-end.".to_string(),
        ))
    }
}

#[cfg(feature = "cuda")]
fn program_options() -> Result<Vec<String>> {
    let mut options = super::launch::include_options()?;
    options.push("--device-as-default-execution-space".to_string());
    Ok(options)
}

#[cfg(feature = "cuda")]
static HEADERS: [(&str, &str); 1] = [(UTILS_NAME, UTILS)];

/// The names NVRTC and the error messages use for a generated kernel.
#[cfg(feature = "cuda")]
struct ProgramNames {
    program: String,
    name_expr: String,
    failure: String,
}

#[cfg(feature = "cuda")]
impl ProgramNames {
    fn new(generated: &GeneratedKernel) -> Self {
        let k = &generated.kernel_name;
        ProgramNames {
            program: format!("{k}.cu"),
            name_expr: format!("mlx::core::cu::{k}"),
            failure: format!("[{OP}] Failed to compile kernel `{k}`"),
        }
    }

    fn program<'a>(
        &'a self,
        generated: &'a GeneratedKernel,
        options: &'a [String],
    ) -> crate::cuda::jit::SourceProgram<'a> {
        crate::cuda::jit::SourceProgram {
            name: &self.program,
            source: &generated.compiled_source,
            headers: &HEADERS,
            name_expr: &self.name_expr,
            options,
            failure: &self.failure,
        }
    }
}
