//! `fast::MetalKernel`: MLX's `metal_kernel`, running MLX Metal kernel sources unchanged on
//! NVIDIA GPUs.
//!
//! A call generates the Metal source MLX would compile (the header, a `[[kernel]]` signature
//! built from the inputs, outputs, template arguments and the thread attributes the body
//! mentions, the body, and the explicit instantiation), translates that whole source to CUDA
//! C++ (`translate`), adds an entry kernel that computes Metal's thread attributes and calls
//! the translated kernel, and hands the result to the shared custom-kernel launcher (NVRTC ->
//! CUBIN, cached in memory and on disk). The Metal library the kernels use lives in
//! `prelude.cuh`.

mod lexer;
mod translate;

use super::{
    check_counts, check_identifier, check_names, mentions, type_string, KernelCall, TemplateArg,
};
use crate::error::{Error, Result};
use crate::{Array, DType};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// The error prefix MLX's Metal custom kernels use.
const OP: &str = "metal_kernel";

/// Include name of the Metal compatibility header.
const PRELUDE_NAME: &str = "ferrofast_metal.cuh";

/// The Metal compatibility header: Metal's types, math, SIMD-group functions, atomics and
/// MLX's Metal utilities, in CUDA C++.
#[cfg(feature = "cuda")]
const PRELUDE: &str = include_str!("prelude.cuh");

/// Inputs with fewer elements than this are passed in Metal's `constant` address space.
const MAX_CONSTANT_ARRAY_SIZE: usize = 8;

/// Metal's thread-position attributes and their types, in the order MLX appends them to the
/// signature (when their name occurs in the source).
const ATTRIBUTES: [(&str, &str); 20] = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
];

/// MLX's `compile_options={"math_mode": ...}` for Metal kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MathMode {
    /// IEEE behaviour for special values (`exp(-inf) == 0`), accurate division and square
    /// root (NVRTC's defaults, `--prec-div=true --prec-sqrt=true`). MLX's default.
    #[default]
    Safe,
    /// Faster division and square root (`--prec-div=false --prec-sqrt=false`), special
    /// values still IEEE.
    Relaxed,
    /// `--use_fast_math` (approximate transcendental functions, denormals flushed), and the
    /// macro `__FAST_MATH__` defined to 1, as the Metal compiler does in fast mode.
    Fast,
}

impl MathMode {
    /// MLX's name of the mode: `"safe"`, `"relaxed"` or `"fast"`.
    pub fn name(self) -> &'static str {
        match self {
            MathMode::Safe => "safe",
            MathMode::Relaxed => "relaxed",
            MathMode::Fast => "fast",
        }
    }

    /// The mode named by MLX's `compile_options` entries (`[("math_mode", "fast")]`; empty
    /// means the default).
    ///
    /// # Errors
    /// MLX's messages: ``[metal_kernel] Unknown compile option `{key}`.`` for a key other
    /// than `math_mode`, `[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or
    /// 'fast'.` for any other value.
    pub fn from_compile_options(options: &[(&str, &str)]) -> Result<MathMode> {
        let mut mode = MathMode::Safe;
        for &(key, value) in options {
            if key != "math_mode" {
                return Err(Error::invalid(format!(
                    "[{OP}] Unknown compile option `{key}`."
                )));
            }
            mode = value.parse()?;
        }
        Ok(mode)
    }

    #[cfg(feature = "cuda")]
    fn nvrtc_options(self) -> Vec<String> {
        let opts: &[&str] = match self {
            MathMode::Safe => &[],
            MathMode::Relaxed => &["--prec-div=false", "--prec-sqrt=false", "--fmad=true"],
            MathMode::Fast => &[
                "--use_fast_math",
                "--prec-div=false",
                "--prec-sqrt=false",
                "-D__FAST_MATH__=1",
            ],
        };
        opts.iter().map(|s| s.to_string()).collect()
    }
}

impl std::str::FromStr for MathMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<MathMode> {
        match s {
            "safe" => Ok(MathMode::Safe),
            "relaxed" => Ok(MathMode::Relaxed),
            "fast" => Ok(MathMode::Fast),
            _ => Err(Error::invalid(format!(
                "[{OP}] Expected math_mode to be 'safe', 'relaxed', or 'fast'."
            ))),
        }
    }
}

impl fmt::Display for MathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of an input's `_shape`, `_strides` and `_ndim` the source mentions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ShapeInfo {
    shape: bool,
    strides: bool,
    ndim: bool,
}

/// A custom Metal kernel, MLX's `mx.fast.metal_kernel`, run on NVIDIA GPUs: `source` is the
/// body of a Metal compute kernel whose signature is generated from the input and output
/// names. The generated Metal source is translated to CUDA C++ and compiled by NVRTC at the
/// first call with each distinct signature (kept in memory and on disk, keyed by a hash of
/// the source, so two kernels with one name and different sources never collide).
///
/// # The generated Metal source
///
/// Exactly MLX's (print it with `verbose`):
///
/// ```text
/// {header}template <bool e, int f, typename T>       // only with template arguments
/// [[kernel]] void custom_kernel_{name}_{template hash}_{input types}_{output types}(
///   const device float* a [[buffer(0)]],           // `constant` if fewer than 8 elements
///   const constant int* a_shape [[buffer(1)]],     // if the source mentions a_shape
///   const constant int64_t* a_strides [[buffer(2)]],
///   const constant int& a_ndim [[buffer(3)]],
///   const constant float& d [[buffer(4)]],         // 0-d inputs by reference
///   device float* out [[buffer(5)]],               // `device atomic<float>*` with atomic_outputs
///   uint3 thread_position_in_grid [[thread_position_in_grid]]) {   // attributes it mentions
/// {source}
/// }
///
/// template [[host_name("...")]] [[kernel]] decltype(...<1, 3, float16_t>) ...<1, 3, float16_t>;
/// ```
///
/// The name gets `_` plus the template values (`<1, 3, float16_t>` with `<`, `>` and `, `
/// turned into `_`), then per input `_` + its type (`float`, `float16_t`, `bfloat16_t`,
/// `int32_t`, `uint32_t`, `uint8_t`, `int64_t`, `bool`, `double`) + `s` for 0-d inputs or
/// `c` for fewer than 8 elements, then per output `_` + its type. An attribute is added when
/// its name occurs anywhere in `source` (plain substring search, as in MLX), from:
/// `dispatch_quadgroups_per_threadgroup`, `dispatch_simdgroups_per_threadgroup`,
/// `dispatch_threads_per_threadgroup`, `grid_origin`, `grid_size`,
/// `quadgroup_index_in_threadgroup`, `quadgroups_per_threadgroup`,
/// `simdgroup_index_in_threadgroup`, `simdgroups_per_threadgroup`, `thread_execution_width`,
/// `thread_index_in_quadgroup`, `thread_index_in_simdgroup`, `thread_index_in_threadgroup`,
/// `thread_position_in_grid`, `thread_position_in_threadgroup`,
/// `threadgroup_position_in_grid`, `threadgroups_per_grid`, `threads_per_grid`,
/// `threads_per_simdgroup`, `threads_per_threadgroup`.
///
/// # What the kernel can use
///
/// Metal's scalar types (`half`, `bfloat`/`bfloat16_t`, `float16_t`, `uint`, `ushort`,
/// `intN_t`, ...), vector types (`float2..4`, `half2..4`, `int2..4`, `uint2..4`, `bool2..4`,
/// ... and `vec<T, N>`) with element-wise operators, constructors, `.xyzw`/`.rgba` and
/// swizzles; the `metal::` math functions (with `precise::` and `fast::`); `as_type`;
/// `threadgroup` arrays and `threadgroup_barrier`/`simdgroup_barrier`; the SIMD-group
/// functions (`simd_sum/product/min/max/and/or/xor`, `simd_prefix_{in,ex}clusive_{sum,
/// product}`, `simd_shuffle{,_up,_down,_xor,_rotate_*,_and_fill_*}`, `simd_broadcast{,_first}`,
/// `simd_any/all/ballot`, the `quad_*` counterparts); atomics on `atomic<T>` outputs and
/// threadgroup variables (`atomic_{load,store,exchange,compare_exchange_weak}_explicit`,
/// `atomic_fetch_{add,sub,min,max,and,or,xor}_explicit`, for 32- and 64-bit types and, through
/// compare-and-swap, 16-bit ones); `metal::numeric_limits`; and MLX's utilities (`Limits<T>`,
/// `elem_to_loc`, `ceildiv`). SIMD groups are 32 threads.
///
/// Not translatable (an `Error::Unsupported` naming the construct and its line): textures
/// and samplers, `simdgroup_matrix`, matrix and packed vector types, imageblocks, graphics
/// stages and their attributes, function constants. Translation limits: an unsuffixed
/// floating literal is a `float` (Metal has no `double`); `c ? h : 0.0f` with a `half` `h`
/// needs a cast (C++ finds two conversions where Metal finds one); a half converts to
/// integers only explicitly.
///
/// # Dispatch
///
/// As Metal's `dispatchThreads`: `grid` and `threadgroup` are in threads, the threadgroup is
/// clamped to the grid per axis, exactly `prod(grid)` threads run the body, and the last
/// threadgroups along an axis are smaller when the grid is not a multiple of the threadgroup
/// (`threads_per_threadgroup` says so). Those partial threadgroups run as CUDA blocks of
/// their real size, in launches of their own, so every thread of a block runs the body and
/// meets its barriers.
#[derive(Debug)]
pub struct MetalKernel {
    name: String,
    input_names: Vec<String>,
    output_names: Vec<String>,
    source: String,
    header: String,
    ensure_row_contiguous: bool,
    atomic_outputs: bool,
    math_mode: MathMode,
    shape_infos: Vec<ShapeInfo>,
    attributes: Vec<(&'static str, &'static str)>,
    /// Whether the kernel uses barriers (the entry then keeps idle threads at the barrier).
    uses_barriers: bool,
    /// Generated sources by kernel name (the name fixes the source for this kernel).
    generated: Mutex<HashMap<String, Arc<GeneratedMetalKernel>>>,
}

impl Clone for MetalKernel {
    fn clone(&self) -> Self {
        MetalKernel {
            name: self.name.clone(),
            input_names: self.input_names.clone(),
            output_names: self.output_names.clone(),
            source: self.source.clone(),
            header: self.header.clone(),
            ensure_row_contiguous: self.ensure_row_contiguous,
            atomic_outputs: self.atomic_outputs,
            math_mode: self.math_mode,
            shape_infos: self.shape_infos.clone(),
            attributes: self.attributes.clone(),
            uses_barriers: self.uses_barriers,
            generated: Mutex::new(HashMap::new()),
        }
    }
}

/// The sources of one [`MetalKernel`] call: the Metal source MLX would compile and the CUDA
/// program it becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedMetalKernel {
    /// The kernel's name in the Metal source (`custom_kernel_...`).
    pub kernel_name: String,
    /// The generated Metal source, as MLX prints it with `verbose`.
    pub metal_source: String,
    /// The CUDA C++ program (it includes the in-memory header `ferrofast_metal.cuh`).
    pub cuda_source: String,
    /// The CUDA entry kernel's name (`extern "C"`, so unmangled).
    pub entry_name: String,
}

impl GeneratedMetalKernel {
    /// What `verbose` prints, MLX's format with the user-given `name`: a line
    /// ``Generated source code for `name`:``, a line of three backticks, the Metal source, a
    /// line of three backticks.
    pub fn verbose_text(&self, name: &str) -> String {
        format!(
            "Generated source code for `{name}`:\n```\n{}\n```\n",
            self.metal_source
        )
    }
}

impl MetalKernel {
    /// MLX's `metal_kernel(name, input_names, output_names, source, header,
    /// ensure_row_contiguous, atomic_outputs, compile_options)`; `math_mode` comes from
    /// [`MathMode::from_compile_options`] or `"fast".parse()`. Touches no device.
    ///
    /// # Errors
    /// `[metal_kernel] Must specify at least one output.` without outputs; an
    /// `Error::InvalidArgument` when `name` or an input or output name is not a C++
    /// identifier, or a name repeats.
    // MLX's factory takes these eight arguments in this order.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        input_names: &[&str],
        output_names: &[&str],
        source: &str,
        header: &str,
        ensure_row_contiguous: bool,
        atomic_outputs: bool,
        math_mode: MathMode,
    ) -> Result<MetalKernel> {
        check_names(OP, name, input_names, output_names)?;
        let shape_infos = mentions(source, input_names)
            .into_iter()
            .map(|[shape, strides, ndim]| ShapeInfo {
                shape,
                strides,
                ndim,
            })
            .collect();
        let attributes = ATTRIBUTES
            .iter()
            .copied()
            .filter(|(a, _)| source.contains(a))
            .collect();
        Ok(MetalKernel {
            name: name.to_string(),
            input_names: input_names.iter().map(|s| s.to_string()).collect(),
            output_names: output_names.iter().map(|s| s.to_string()).collect(),
            source: source.to_string(),
            header: header.to_string(),
            ensure_row_contiguous,
            atomic_outputs,
            math_mode,
            shape_infos,
            attributes,
            uses_barriers: source.contains("threadgroup_barrier")
                || header.contains("threadgroup_barrier"),
            generated: Mutex::new(HashMap::new()),
        })
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The math mode given at creation.
    pub fn math_mode(&self) -> MathMode {
        self.math_mode
    }

    /// The Metal source MLX would generate for `call` and the CUDA program it translates
    /// to. Needs no GPU.
    ///
    /// # Errors
    /// MLX's size errors (``[metal_kernel] Expected `inputs` to have size 2 but got size
    /// 1.`` and the same for `output_shapes`/`output_dtypes`, each ending with a newline);
    /// an invalid template argument name; `Error::Unsupported` naming the construct and its
    /// line (in the header or the source) when the Metal source cannot be translated.
    pub fn generate(&self, call: &KernelCall) -> Result<Arc<GeneratedMetalKernel>> {
        check_counts(OP, call, self.input_names.len(), self.output_names.len())?;
        for (name, _) in &call.template {
            check_identifier(OP, "template argument name", name)?;
        }
        let inputs: Vec<Array> = call.inputs.iter().map(|i| i.to_array()).collect();
        let kernel_name = self.kernel_name(&inputs, &call.output_dtypes, &call.template);
        let lock_error = || Error::Cuda("the MetalKernel cache was poisoned by a panic".into());
        if let Some(g) = self
            .generated
            .lock()
            .map_err(|_| lock_error())?
            .get(&kernel_name)
        {
            return Ok(Arc::clone(g));
        }
        let (metal_source, body_line) =
            self.metal_source(&kernel_name, &inputs, &call.output_dtypes, &call.template);
        let translated = translate::translate(&metal_source).map_err(|u| {
            let header_lines = self.header.matches('\n').count();
            let place = if u.line <= header_lines {
                format!("line {} of the header", u.line)
            } else if u.line >= body_line {
                format!("line {} of the source", u.line - body_line + 1)
            } else {
                format!("line {} of the generated signature", u.line)
            };
            Error::Unsupported(format!(
                "[{OP}] `{}` ({place}) cannot be translated to CUDA: {}.",
                u.construct, u.reason
            ))
        })?;
        let entry_name = format!("{kernel_name}_entry");
        let cuda_source = self.cuda_source(
            &kernel_name,
            &entry_name,
            &translated,
            &inputs,
            &call.output_dtypes,
            &call.template,
        );
        let generated = Arc::new(GeneratedMetalKernel {
            kernel_name: kernel_name.clone(),
            metal_source,
            cuda_source,
            entry_name,
        });
        let mut map = self.generated.lock().map_err(|_| lock_error())?;
        Ok(Arc::clone(map.entry(kernel_name).or_insert(generated)))
    }

    fn kernel_name(
        &self,
        inputs: &[Array],
        out: &[DType],
        template: &[(String, TemplateArg)],
    ) -> String {
        let mut name = format!("custom_kernel_{}", self.name);
        if !template.is_empty() {
            // MLX: the instantiation list `<1, 3, float16_t>` with `<`, `>` and `, ` turned
            // into `_`, the trailing `_` dropped.
            let hash = template_list(template)
                .replace(['<', '>'], "_")
                .replace(", ", "_");
            name.push('_');
            name.push_str(hash.strip_suffix('_').unwrap_or(&hash));
        }
        for a in inputs {
            name.push('_');
            name.push_str(type_string(a.dtype()));
            if a.ndim() == 0 {
                name.push('s');
            } else if a.size() < MAX_CONSTANT_ARRAY_SIZE {
                name.push('c');
            }
        }
        for &d in out {
            name.push('_');
            name.push_str(type_string(d));
        }
        name
    }

    /// MLX's generated Metal source, and the line the body starts on.
    fn metal_source(
        &self,
        kernel_name: &str,
        inputs: &[Array],
        out_dtypes: &[DType],
        template: &[(String, TemplateArg)],
    ) -> (String, usize) {
        let mut s = String::with_capacity(self.header.len() + self.source.len() + 1024);
        s.push_str(&self.header);
        if !template.is_empty() {
            let params: Vec<String> = template
                .iter()
                .map(|(n, a)| {
                    let kind = match a {
                        TemplateArg::Int(_) => "int",
                        TemplateArg::Bool(_) => "bool",
                        TemplateArg::DType(_) => "typename",
                    };
                    format!("{kind} {n}")
                })
                .collect();
            s.push_str(&format!("template <{}>\n", params.join(", ")));
        }
        s.push_str(&format!("[[kernel]] void {kernel_name}(\n"));
        let mut params: Vec<String> = Vec::new();
        let mut index = 0;
        for ((name, a), info) in self.input_names.iter().zip(inputs).zip(&self.shape_infos) {
            let space = if a.size() < MAX_CONSTANT_ARRAY_SIZE {
                "constant"
            } else {
                "device"
            };
            let reference = if a.ndim() == 0 { "&" } else { "*" };
            params.push(format!(
                "  const {space} {}{reference} {name} [[buffer({index})]]",
                type_string(a.dtype())
            ));
            index += 1;
            if a.ndim() > 0 {
                if info.shape {
                    params.push(format!(
                        "  const constant int* {name}_shape [[buffer({index})]]"
                    ));
                    index += 1;
                }
                if info.strides {
                    params.push(format!(
                        "  const constant int64_t* {name}_strides [[buffer({index})]]"
                    ));
                    index += 1;
                }
                if info.ndim {
                    params.push(format!(
                        "  const constant int& {name}_ndim [[buffer({index})]]"
                    ));
                    index += 1;
                }
            }
        }
        for (name, &d) in self.output_names.iter().zip(out_dtypes) {
            let ty = if self.atomic_outputs {
                format!("atomic<{}>", type_string(d))
            } else {
                type_string(d).to_string()
            };
            params.push(format!("  device {ty}* {name} [[buffer({index})]]"));
            index += 1;
        }
        for (attr, ty) in &self.attributes {
            params.push(format!("  {ty} {attr} [[{attr}]]"));
        }
        // MLX separates parameters with ",\n" and closes with ") {\n" (its own rule for the
        // last output misplaces the brace when shape parameters and several outputs meet
        // without attributes; that source does not compile on Metal either).
        s.push_str(&params.join(",\n"));
        s.push_str(") {\n");
        let body_line = s.matches('\n').count() + 1;
        s.push_str(&self.source);
        s.push_str("\n}\n");
        if !template.is_empty() {
            let inst = format!("{kernel_name}{}", template_list(template));
            s.push_str(&format!(
                "\ntemplate [[host_name(\"{kernel_name}\")]] [[kernel]] decltype({inst}) {inst};\n"
            ));
        }
        (s, body_line)
    }

    /// The CUDA program: the prelude, the translated Metal source (with `#line` so NVRTC's
    /// messages point into the Metal source), and the entry kernel.
    fn cuda_source(
        &self,
        kernel_name: &str,
        entry_name: &str,
        translated: &str,
        inputs: &[Array],
        out_dtypes: &[DType],
        template: &[(String, TemplateArg)],
    ) -> String {
        let mut s = String::with_capacity(translated.len() + 2048);
        s.push_str(&format!("#include \"{PRELUDE_NAME}\"\n"));
        s.push_str(&format!("#line 1 \"{}.metal\"\n", self.name));
        s.push_str(translated);
        s.push_str("\n#line 1 \"ferrofast_metal_entry\"\n");
        let mut params: Vec<String> = Vec::new();
        let mut args: Vec<String> = Vec::new();
        for ((name, a), info) in self.input_names.iter().zip(inputs).zip(&self.shape_infos) {
            let ty = type_string(a.dtype());
            params.push(format!("const {ty}* {name}"));
            if a.ndim() == 0 {
                args.push(format!("*{name}"));
                continue;
            }
            args.push(name.clone());
            if info.shape {
                params.push(format!(
                    "const __grid_constant__ ff_dims<{}> {name}_shape",
                    super::MAX_NDIM
                ));
                args.push(format!("{name}_shape.v"));
            }
            if info.strides {
                params.push(format!(
                    "const __grid_constant__ ff_strides<{}> {name}_strides",
                    super::MAX_NDIM
                ));
                args.push(format!("{name}_strides.v"));
            }
            if info.ndim {
                params.push(format!("int {name}_ndim"));
                args.push(format!("{name}_ndim"));
            }
        }
        for (name, &d) in self.output_names.iter().zip(out_dtypes) {
            let ty = type_string(d);
            params.push(format!("{ty}* {name}"));
            args.push(if self.atomic_outputs {
                format!("(metal::atomic<{ty}>*){name}")
            } else {
                name.clone()
            });
        }
        params.push("const __grid_constant__ ff_grid3 ff_grid".to_string());
        params.push("const __grid_constant__ ff_grid3 ff_tg".to_string());
        params.push("const __grid_constant__ ff_grid3 ff_origin".to_string());
        for (attr, _) in &self.attributes {
            args.push(format!("ff_t.{attr}"));
        }
        let callee = if template.is_empty() {
            kernel_name.to_string()
        } else {
            format!("{kernel_name}{}", template_list(template))
        };
        s.push_str(&format!(
            "extern \"C\" __global__ void {entry_name}(\n    {}) {{\n",
            params.join(",\n    ")
        ));
        s.push_str("    ff_thread_info ff_t = ff_thread_info::make(ff_grid, ff_tg, ff_origin);\n");
        s.push_str(&format!(
            "    if (ff_t.in_grid) {{\n        {callee}({});\n    }}\n",
            args.join(", ")
        ));
        if self.uses_barriers {
            // Threads whose body returned early keep meeting the barriers of the others
            // until the whole block is here.
            s.push_str("    while (ff_barrier_or(false)) {\n    }\n");
        }
        s.push_str("}\n");
        s
    }

    #[cfg(feature = "cuda")]
    fn nvrtc_options(&self) -> Vec<String> {
        let mut opts = vec!["--device-as-default-execution-space".to_string()];
        opts.extend(self.math_mode.nvrtc_options());
        opts
    }

    /// Generates, translates and compiles the kernel for `call` to CUBIN for `arch` (e.g.
    /// `"sm_90"`) without a GPU and without the caches: a compile check.
    ///
    /// # Errors
    /// As [`generate`](Self::generate); `Error::CudaUnavailable` without libnvrtc;
    /// `Error::Compile` with NVRTC's log (lines point into the Metal source).
    #[cfg(feature = "cuda")]
    pub fn compile_check(&self, call: &KernelCall, arch: &str) -> Result<()> {
        let g = self.generate(call)?;
        self.with_program(&g, |program| {
            crate::cuda::jit::compile_source(&program, arch).map(|_| ())
        })
    }

    /// Calls `f` with the NVRTC program of the translated kernel `g`.
    #[cfg(feature = "cuda")]
    fn with_program<R>(
        &self,
        g: &GeneratedMetalKernel,
        f: impl FnOnce(crate::cuda::jit::SourceProgram<'_>) -> R,
    ) -> R {
        let program_name = format!("{}.cu", g.kernel_name);
        let options = self.nvrtc_options();
        let failure = format!("[{OP}] Failed to compile kernel `{}`", self.name);
        let headers = [(PRELUDE_NAME, PRELUDE)];
        f(crate::cuda::jit::SourceProgram {
            name: &program_name,
            source: &g.cuda_source,
            headers: &headers,
            name_expr: &g.entry_name,
            options: &options,
            failure: &failure,
        })
    }

    /// Runs the kernel: MLX's `kernel(inputs=..., output_shapes=..., output_dtypes=...,
    /// grid=..., threadgroup=..., template=..., init_value=..., verbose=..., stream=...)`.
    /// Returns the outputs: new row-contiguous arrays on the kernel's GPU, uninitialised
    /// unless `init_value` is given. Inputs on the CPU are uploaded first; inputs that are
    /// not row-contiguous are copied first when `ensure_row_contiguous` is set, otherwise
    /// passed as they are (read them through `{name}_shape` / `{name}_strides`, at most 10
    /// dimensions).
    ///
    /// # Safety
    /// The kernel body is arbitrary code. The caller guarantees that it reads only the
    /// elements of its inputs (from the first element of each view, through the view's
    /// strides when the input is not row-contiguous), writes only its outputs (each holds
    /// exactly its shape's element count), never writes an input, stays within the
    /// threadgroup memory it declares, and that the barrier and SIMD-group functions it uses
    /// are reached as Metal requires. A kernel breaking this can corrupt memory, hang, or
    /// fault the GPU context.
    ///
    /// # Errors
    /// Everything [`generate`](Self::generate) reports; `[metal_kernel] Only supports the
    /// GPU.` for the CPU; `Error::CudaUnavailable` without a GPU or without the `cuda`
    /// feature; a threadgroup dimension of 0 or above CUDA's limits (1024, 1024, 64) or a
    /// grid needing too many threadgroups; `Thread group size ({n}) is greater than  the
    /// maximum allowed threads per threadgroup ({m}).` (MLX's text); `[metal_kernel] ndim can
    /// not be larger than 10.` where shapes or strides are passed; `Error::Compile` with
    /// NVRTC's log (lines in the Metal source); driver errors.
    pub unsafe fn call(&self, call: &KernelCall) -> Result<Vec<Array>> {
        let g = self.generate(call)?;
        if call.verbose {
            print!("{}", g.verbose_text(&self.name));
        }
        self.launch(call, &g)
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(&self, _call: &KernelCall, _g: &GeneratedMetalKernel) -> Result<Vec<Array>> {
        Err(Error::CudaUnavailable(format!(
            "[{OP}] ferrofast was built without the `cuda` feature; Metal kernels run on \
             NVIDIA GPUs through CUDA"
        )))
    }

    #[cfg(feature = "cuda")]
    fn launch(&self, call: &KernelCall, g: &GeneratedMetalKernel) -> Result<Vec<Array>> {
        use super::launch::{self as l, KernelSource, Launch, LaunchArg};
        let stream = l::resolve_stream(OP, call)?;
        let dispatch = super::dispatch(OP, call.grid, call.threadgroup)?;
        let inputs: Vec<Array> = call.inputs.iter().map(|i| i.to_array()).collect();
        let mut args = Vec::new();
        for (i, (a, info)) in inputs.iter().zip(&self.shape_infos).enumerate() {
            args.push(LaunchArg::Input(i));
            if a.ndim() > 0 {
                if info.shape {
                    args.push(LaunchArg::Shape(i));
                }
                if info.strides {
                    args.push(LaunchArg::Strides(i));
                }
                if info.ndim {
                    args.push(LaunchArg::Ndim(i));
                }
            }
        }
        args.extend((0..self.output_names.len()).map(LaunchArg::Output));
        let grid = call.grid.map(|g| u32::try_from(g).unwrap_or(u32::MAX));
        args.push(LaunchArg::U32x3(grid));
        args.push(LaunchArg::U32x3(dispatch.block));
        args.push(LaunchArg::BlockOrigin);
        self.with_program(g, |program| {
            let launch = Launch {
                op: OP,
                kernel: KernelSource::Source(program),
                inputs,
                ensure_row_contiguous: self.ensure_row_contiguous,
                output_shapes: &call.output_shapes,
                output_dtypes: &call.output_dtypes,
                init_value: call.init_value,
                args,
                dispatch,
                split_partial: true,
                shared_memory: 0,
                stream,
            };
            // SAFETY: the entry kernel's parameters are generated from the same inputs, shape
            // infos and outputs as `args`; the caller of `call` guarantees the body's memory
            // accesses.
            unsafe { l::launch(launch) }
        })
    }
}

/// `<1, 3, float16_t>`: MLX's instantiation list (bools as 1/0, dtypes as Metal types).
fn template_list(template: &[(String, TemplateArg)]) -> String {
    let items: Vec<String> = template
        .iter()
        .map(|(_, a)| match a {
            TemplateArg::Int(v) => v.to_string(),
            TemplateArg::Bool(b) => u8::from(*b).to_string(),
            TemplateArg::DType(d) => type_string(*d).to_string(),
        })
        .collect();
    format!("<{}>", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custom::KernelCall;

    fn args_kernel() -> MetalKernel {
        let source = "uint elem = thread_position_in_grid.x;\nout1[elem] = a[1] + d;";
        MetalKernel::new(
            "arg_test",
            &["a", "b", "c", "d"],
            &["out1", "out2"],
            source,
            "",
            true,
            false,
            MathMode::Safe,
        )
        .unwrap()
    }

    #[test]
    fn names_follow_mlx() {
        let a = Array::zeros(&[3, 6], DType::F32, &crate::Device::Cpu).unwrap();
        let b = Array::from_vec(vec![3i32, 4, 5], &[3]).unwrap();
        let c = Array::zeros(&[2, 2], DType::BF16, &crate::Device::Cpu).unwrap();
        let call = KernelCall::new([6, 1, 1], [2, 1, 1])
            .input(&a)
            .input(&b)
            .input(&c)
            .input(7.3f32)
            .template_arg("e", true)
            .template_arg("f", 3)
            .template_arg("T", DType::F16)
            .output(&[3, 2], DType::F32)
            .output(&[3, 2], DType::I32);
        let g = args_kernel().generate(&call).unwrap();
        assert_eq!(
            g.kernel_name,
            "custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t"
        );
        let expected_head = "template <bool e, int f, typename T>\n[[kernel]] void custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t(\n  const device float* a [[buffer(0)]],\n  const constant int32_t* b [[buffer(1)]],\n  const constant bfloat16_t* c [[buffer(2)]],\n  const constant float& d [[buffer(3)]],\n  device float* out1 [[buffer(4)]],\n  device int32_t* out2 [[buffer(5)]],\n  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\nuint elem";
        assert!(
            g.metal_source.starts_with(expected_head),
            "{}",
            g.metal_source
        );
        assert!(g.metal_source.ends_with(
            "\n}\n\ntemplate [[host_name(\"custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t\")]] [[kernel]] decltype(custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t<1, 3, float16_t>) custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t<1, 3, float16_t>;\n"
        ));
        let verbose = g.verbose_text("arg_test");
        assert!(verbose.starts_with("Generated source code for `arg_test`:\n```\ntemplate <"));
        assert!(verbose.ends_with(";\n\n```\n"));
    }

    #[test]
    fn shape_parameters_and_atomics() {
        let k = MetalKernel::new(
            "s",
            &["inp"],
            &["out"],
            "out[0] = inp[elem_to_loc(0, inp_shape, inp_strides, inp_ndim)]; threads_per_simdgroup;",
            "",
            false,
            true,
            MathMode::Fast,
        )
        .unwrap();
        let a = Array::zeros(&[4, 4], DType::F32, &crate::Device::Cpu).unwrap();
        let call = KernelCall::new([1, 1, 1], [1, 1, 1])
            .input(&a)
            .output(&[1], DType::F32);
        let g = k.generate(&call).unwrap();
        assert_eq!(g.kernel_name, "custom_kernel_s_float_float");
        assert!(g.metal_source.contains(
            "  const device float* inp [[buffer(0)]],\n  const constant int* inp_shape [[buffer(1)]],\n  const constant int64_t* inp_strides [[buffer(2)]],\n  const constant int& inp_ndim [[buffer(3)]],\n  device atomic<float>* out [[buffer(4)]],\n  uint threads_per_simdgroup [[threads_per_simdgroup]]) {\n"
        ), "{}", g.metal_source);
        assert!(g.cuda_source.contains("(metal::atomic<float>*)out"));
        assert!(g
            .cuda_source
            .contains("inp_shape.v, inp_strides.v, inp_ndim"));
    }

    #[test]
    fn creation_errors_use_mlx_messages() {
        let e =
            MetalKernel::new("k", &["a"], &[], "", "", true, false, MathMode::Safe).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[metal_kernel] Must specify at least one output."
        );
        let e = "precise".parse::<MathMode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'."
        );
        let e = MathMode::from_compile_options(&[("unknown", "value")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[metal_kernel] Unknown compile option `unknown`."
        );
        assert_eq!(
            MathMode::from_compile_options(&[("math_mode", "relaxed")]).unwrap(),
            MathMode::Relaxed
        );
        assert_eq!(MathMode::from_compile_options(&[]).unwrap(), MathMode::Safe);
        assert!(
            MetalKernel::new("k", &["a b"], &["o"], "", "", true, false, MathMode::Safe).is_err()
        );
        assert!(
            MetalKernel::new("k", &["a"], &["a"], "", "", true, false, MathMode::Safe).is_err()
        );
    }

    #[test]
    fn untranslatable_source_names_construct_and_line() {
        let k = MetalKernel::new(
            "tex",
            &["inp"],
            &["out"],
            "uint e = thread_position_in_grid.x;\ntexture2d<float> t;\nout[e] = inp[e];",
            "// helper\n",
            true,
            false,
            MathMode::Safe,
        )
        .unwrap();
        let a = Array::zeros(&[8], DType::F32, &crate::Device::Cpu).unwrap();
        let call = KernelCall::new([8, 1, 1], [8, 1, 1])
            .input(&a)
            .output(&[8], DType::F32);
        let e = k.generate(&call).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)));
        assert!(
            e.to_string().contains("`texture2d` (line 2 of the source)"),
            "{e}"
        );
    }
}
