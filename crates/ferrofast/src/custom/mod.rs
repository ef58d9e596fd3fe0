//! Custom kernels written by the user: [`CudaKernel`] (MLX's `cuda_kernel`), the Metal
//! front end (MLX's `metal_kernel`, translated to CUDA) and [`precompiled_cuda_kernel`].
//!
//! This module holds what every front end shares: the call description ([`KernelCall`],
//! [`KernelInput`], [`TemplateArg`]), MLX's argument checks and type names, the dispatch rule
//! (grid given in threads), and — with the `cuda` feature — the launcher in `launch`, which
//! compiles a complete CUDA source (or loads a precompiled image), prepares the inputs,
//! allocates the outputs, checks the device limits and launches.

mod cuda_kernel;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
mod metal;
mod precompiled;

pub use cuda_kernel::{CudaKernel, GeneratedKernel};
pub use metal::{GeneratedMetalKernel, MathMode, MetalKernel};
#[cfg(feature = "cuda")]
pub use precompiled::{compile_to_cubin, cuda_architecture, CompiledCubin};
pub use precompiled::{precompiled_cuda_kernel, ScalarArg};

use crate::error::{Error, Result};
use crate::{Array, DType, Device};

/// Most dimensions an input may have when its shape or strides are passed to a kernel
/// (MLX's `MAX_NDIM`).
pub const MAX_NDIM: usize = 10;

/// One input of a custom kernel call: an array, or a scalar that becomes a 0-d array the way
/// MLX converts Python scalars (`bool` -> bool, `int` -> int32, `float` -> float32).
#[derive(Clone, Copy, Debug)]
pub enum KernelInput<'a> {
    /// An array on the CPU (uploaded for the call) or on the GPU the kernel runs on.
    Array(&'a Array),
    /// A 0-d bool array.
    Bool(bool),
    /// A 0-d int32 array.
    Int(i32),
    /// A 0-d float32 array.
    Float(f32),
}

impl<'a> From<&'a Array> for KernelInput<'a> {
    fn from(a: &'a Array) -> Self {
        KernelInput::Array(a)
    }
}

impl From<bool> for KernelInput<'_> {
    fn from(v: bool) -> Self {
        KernelInput::Bool(v)
    }
}

impl From<i32> for KernelInput<'_> {
    fn from(v: i32) -> Self {
        KernelInput::Int(v)
    }
}

impl From<f32> for KernelInput<'_> {
    fn from(v: f32) -> Self {
        KernelInput::Float(v)
    }
}

impl KernelInput<'_> {
    /// The input as an array (scalars become 0-d arrays on the CPU).
    pub fn to_array(&self) -> Array {
        match *self {
            KernelInput::Array(a) => a.clone(),
            KernelInput::Bool(v) => Array::scalar(v),
            KernelInput::Int(v) => Array::scalar(v),
            KernelInput::Float(v) => Array::scalar(v),
        }
    }
}

/// A template argument of a custom kernel: a compile-time constant or a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateArg {
    /// `constexpr bool`.
    Bool(bool),
    /// `constexpr int`.
    Int(i32),
    /// A type alias (`using T = float;`).
    DType(DType),
}

impl From<bool> for TemplateArg {
    fn from(v: bool) -> Self {
        TemplateArg::Bool(v)
    }
}

impl From<i32> for TemplateArg {
    fn from(v: i32) -> Self {
        TemplateArg::Int(v)
    }
}

impl From<DType> for TemplateArg {
    fn from(v: DType) -> Self {
        TemplateArg::DType(v)
    }
}

/// The arguments of one custom kernel call: MLX's `inputs`, `output_shapes`,
/// `output_dtypes`, `grid`, `threadgroup`, `template`, `init_value`, `verbose` and `stream`.
///
/// Build it with [`KernelCall::new`] and the chained setters, or fill the fields directly.
///
/// - `grid` and `threadgroup` are in **threads**, per axis (x, y, z). Each threadgroup axis
///   is clamped to the grid's; the kernel runs `ceil(grid / threadgroup)` blocks per axis.
/// - Outputs are new row-contiguous arrays, uninitialised unless `init_value` is given (then
///   filled with it, converted to each output's dtype as a C cast would).
/// - Where it runs: on `stream` if given; else on `device`'s default stream if given (the
///   CPU is refused: custom kernels only run on a GPU); else on the stream of the first input
///   that lives on a GPU; else on the default stream of `cuda:0`. Inputs on the CPU are
///   uploaded to that device for the call.
#[derive(Clone, Debug, Default)]
pub struct KernelCall<'a> {
    /// The inputs, in the order of the kernel's `input_names`.
    pub inputs: Vec<KernelInput<'a>>,
    /// One shape per output.
    pub output_shapes: Vec<Vec<usize>>,
    /// One dtype per output.
    pub output_dtypes: Vec<DType>,
    /// Threads per axis (x, y, z).
    pub grid: [usize; 3],
    /// Threads per block per axis (x, y, z).
    pub threadgroup: [usize; 3],
    /// Template arguments `(name, value)`, in order.
    pub template: Vec<(String, TemplateArg)>,
    /// Value every output element starts as, if any.
    pub init_value: Option<f64>,
    /// Print the generated source to stdout before compiling.
    pub verbose: bool,
    /// Device to run on (its default stream), unless `stream` is given.
    pub device: Option<Device>,
    /// Stream to run on.
    #[cfg(feature = "cuda")]
    pub stream: Option<crate::Stream>,
}

impl<'a> KernelCall<'a> {
    /// A call with `grid` and `threadgroup` (in threads) and no inputs or outputs yet.
    pub fn new(grid: [usize; 3], threadgroup: [usize; 3]) -> Self {
        KernelCall {
            grid,
            threadgroup,
            ..KernelCall::default()
        }
    }

    /// Appends an input (an `&Array`, `bool`, `i32` or `f32`).
    pub fn input(mut self, input: impl Into<KernelInput<'a>>) -> Self {
        self.inputs.push(input.into());
        self
    }

    /// Appends an output of `shape` and `dtype`.
    pub fn output(mut self, shape: &[usize], dtype: DType) -> Self {
        self.output_shapes.push(shape.to_vec());
        self.output_dtypes.push(dtype);
        self
    }

    /// Appends a template argument (`bool`, `i32` or [`DType`]).
    pub fn template_arg(mut self, name: &str, value: impl Into<TemplateArg>) -> Self {
        self.template.push((name.to_string(), value.into()));
        self
    }

    /// Fills every output with `value` before the kernel runs.
    pub fn init_value(mut self, value: f64) -> Self {
        self.init_value = Some(value);
        self
    }

    /// Prints the generated source to stdout when `on`.
    pub fn verbose(mut self, on: bool) -> Self {
        self.verbose = on;
        self
    }

    /// Runs on `device`'s default stream.
    pub fn on_device(mut self, device: Device) -> Self {
        self.device = Some(device);
        self
    }

    /// Runs on `stream`.
    #[cfg(feature = "cuda")]
    pub fn on_stream(mut self, stream: &crate::Stream) -> Self {
        self.stream = Some(stream.clone());
        self
    }
}

/// MLX's size check of `inputs`, `output_shapes` and `output_dtypes` against the kernel's
/// names (the message ends with a newline, as MLX's does).
pub(crate) fn check_counts(
    op: &str,
    call: &KernelCall,
    n_inputs: usize,
    n_outputs: usize,
) -> Result<()> {
    let check = |what: &str, expected: usize, got: usize| {
        if expected == got {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "[{op}] Expected `{what}` to have size {expected} but got size {got}.\n"
            )))
        }
    };
    check("inputs", n_inputs, call.inputs.len())?;
    check("output_shapes", n_outputs, call.output_shapes.len())?;
    check("output_dtypes", n_outputs, call.output_dtypes.len())
}

/// Checks a custom kernel's names as MLX's factories do: at least one output, and the kernel,
/// input and output names C++ identifiers, no input or output name used twice.
pub(crate) fn check_names(
    op: &str,
    name: &str,
    input_names: &[&str],
    output_names: &[&str],
) -> Result<()> {
    if output_names.is_empty() {
        return Err(Error::invalid(format!(
            "[{op}] Must specify at least one output."
        )));
    }
    check_identifier(op, "kernel name", name)?;
    let mut seen = std::collections::HashSet::new();
    for n in input_names.iter().chain(output_names) {
        check_identifier(op, "input or output name", n)?;
        if !seen.insert(*n) {
            return Err(Error::invalid(format!(
                "[{op}] The name `{n}` is used for more than one input or output."
            )));
        }
    }
    Ok(())
}

/// For each input, whether `source` mentions its `{name}_shape`, `{name}_strides` and
/// `{name}_ndim` (those get kernel parameters).
pub(crate) fn mentions(source: &str, input_names: &[&str]) -> Vec<[bool; 3]> {
    input_names
        .iter()
        .map(|n| {
            ["_shape", "_strides", "_ndim"].map(|suffix| source.contains(&format!("{n}{suffix}")))
        })
        .collect()
}

/// Checks that `name` can be used as (part of) a C++ identifier.
pub(crate) fn check_identifier(op: &str, what: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = match chars.next() {
        Some(c) => {
            (c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "[{op}] Invalid {what} `{name}`: it must be a C++ identifier (letters, digits and \
             underscores, not starting with a digit)."
        )))
    }
}

/// A dtype's names in custom kernels: MLX's type string (the Metal type name, used in kernel
/// names) and the CUDA C++ type of the signature.
fn type_names(dtype: DType) -> (&'static str, &'static str) {
    match dtype {
        DType::Bool => ("bool", "bool"),
        DType::U8 => ("uint8_t", "uint8_t"),
        DType::U32 => ("uint32_t", "uint32_t"),
        DType::I32 => ("int32_t", "int32_t"),
        DType::I64 => ("int64_t", "int64_t"),
        DType::F16 => ("float16_t", "__half"),
        DType::BF16 => ("bfloat16_t", "__nv_bfloat16"),
        DType::F32 => ("float", "float"),
        DType::F64 => ("double", "double"),
    }
}

/// The CUDA C++ type of a dtype in a custom kernel's signature.
pub(crate) fn cuda_type(dtype: DType) -> &'static str {
    type_names(dtype).1
}

/// MLX's type string of a dtype (the Metal type names), used in kernel names: `float`,
/// `float16_t`, `bfloat16_t`, `double`, `bool`, `uint8_t`, `int32_t`, ...
pub(crate) fn type_string(dtype: DType) -> &'static str {
    type_names(dtype).0
}

/// Blocks and block dimensions of a launch whose grid is given in threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dispatch {
    /// Threads per axis.
    pub(crate) grid: [usize; 3],
    /// Blocks per axis: `ceil(grid / block)`.
    pub(crate) blocks: [u32; 3],
    /// Threads per block per axis: `min(threadgroup, grid)`.
    pub(crate) block: [u32; 3],
}

/// One launch of a dispatch: the index of its first block per axis, its blocks per axis and
/// its threads per block per axis.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) type Segment = ([u32; 3], [u32; 3], [u32; 3]);

// Without the `cuda` feature nothing launches; the unit test still checks the plan.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Dispatch {
    /// True when the grid is empty (no thread runs).
    pub(crate) fn is_empty(&self) -> bool {
        self.blocks.contains(&0)
    }

    /// The launches that run this dispatch. Without `split`, one: every block full-sized
    /// (threads past the grid in the last blocks run too). With `split`, the full blocks and,
    /// along each axis whose grid is not a multiple of the block, the last partial block at
    /// its real size, in launches of their own: every combination of full and partial runs
    /// over the three axes (at most eight launches), so no launched thread is past the grid.
    /// None for an empty grid.
    pub(crate) fn segments(&self, split: bool) -> Vec<Segment> {
        if self.is_empty() {
            return Vec::new();
        }
        if !split {
            return vec![([0; 3], self.blocks, self.block)];
        }
        // Per axis: (first block, blocks, threads per block) of each run.
        let runs: Vec<Vec<(u32, u32, u32)>> = (0..3)
            .map(|a| {
                let b = self.block[a] as usize;
                let (full, rem) = (self.grid[a] / b, self.grid[a] % b);
                let mut r = Vec::with_capacity(2);
                if full > 0 {
                    r.push((0, full as u32, b as u32));
                }
                if rem > 0 {
                    r.push((full as u32, 1, rem as u32));
                }
                r
            })
            .collect();
        let mut out = Vec::with_capacity(8);
        for &(ox, nx, tx) in &runs[0] {
            for &(oy, ny, ty) in &runs[1] {
                for &(oz, nz, tz) in &runs[2] {
                    out.push(([ox, oy, oz], [nx, ny, nz], [tx, ty, tz]));
                }
            }
        }
        out
    }
}

/// MLX's dispatch of a grid given in threads: each threadgroup axis clamped to the grid,
/// `ceil(grid / threadgroup)` blocks per axis. Threads past the grid in a partial last block
/// run too (as in MLX's CUDA back end), so kernels bounds-check. Checks CUDA's fixed limits
/// (block 1024 x 1024 x 64, grid (2^31 - 1) x 65535 x 65535); the per-kernel thread limit is
/// checked at launch.
pub(crate) fn dispatch(op: &str, grid: [usize; 3], threadgroup: [usize; 3]) -> Result<Dispatch> {
    if threadgroup.contains(&0) {
        return Err(Error::invalid(format!(
            "[{op}] Every threadgroup dimension must be positive but got ({}, {}, {}).",
            threadgroup[0], threadgroup[1], threadgroup[2]
        )));
    }
    let mut blocks = [0u32; 3];
    let mut block = [0u32; 3];
    let block_limit = [1024usize, 1024, 64];
    let grid_limit = [i32::MAX as usize, 65535, 65535];
    for axis in 0..3 {
        // An empty grid still gets a valid block shape; nothing is launched.
        let b = threadgroup[axis].min(grid[axis].max(1));
        if b > block_limit[axis] {
            return Err(Error::invalid(format!(
                "[{op}] Threadgroup dimension {axis} is {b} but CUDA allows at most {}.",
                block_limit[axis]
            )));
        }
        let n = grid[axis].div_ceil(b);
        if n > grid_limit[axis] {
            return Err(Error::invalid(format!(
                "[{op}] The grid needs {n} blocks along dimension {axis} but CUDA allows at \
                 most {}.",
                grid_limit[axis]
            )));
        }
        block[axis] = b as u32;
        blocks[axis] = n as u32;
    }
    Ok(Dispatch {
        grid,
        blocks,
        block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_clamps_and_rounds_up() {
        let d = dispatch("t", [4, 1, 1], [2, 1, 1]).unwrap();
        assert_eq!(d.blocks, [2, 1, 1]);
        assert_eq!(d.block, [2, 1, 1]);
        let d = dispatch("t", [5, 3, 1], [256, 2, 1]).unwrap();
        assert_eq!(d.block, [5, 2, 1]);
        assert_eq!(d.blocks, [1, 2, 1]);
        let d = dispatch("t", [1000, 1, 1], [256, 1, 1]).unwrap();
        assert_eq!(d.blocks, [4, 1, 1]);
        assert_eq!(dispatch("t", [0, 1, 1], [32, 1, 1]).unwrap().blocks[0], 0);
        assert!(dispatch("t", [8, 1, 1], [0, 1, 1]).is_err());
        assert!(dispatch("t", [4096, 1, 1], [2048, 1, 1]).is_err());
        assert!(dispatch("t", [1, 1, 128], [1, 1, 128]).is_err());
        assert!(dispatch("t", [1, 65536, 1], [1, 1, 1]).is_err());
    }

    #[test]
    fn split_segments_cover_the_grid_once_with_blocks_inside_it() {
        for (grid, tg) in [
            ([1000usize, 1, 1], [256usize, 1, 1]),
            ([1024, 1, 1], [256, 1, 1]),
            ([5, 3, 1], [256, 2, 1]),
            ([70, 9, 5], [32, 4, 2]),
            ([7, 7, 7], [8, 8, 8]),
            ([0, 4, 1], [32, 1, 1]),
        ] {
            let d = dispatch("t", grid, tg).unwrap();
            let whole = d.segments(false);
            let split = d.segments(true);
            if grid.contains(&0) {
                assert!(whole.is_empty() && split.is_empty());
                continue;
            }
            assert_eq!(whole, vec![([0; 3], d.blocks, d.block)]);
            assert!(split.len() <= 8);
            // Each thread of the grid is launched exactly once, and nothing past it.
            let mut seen = vec![0u8; grid.iter().product()];
            for (origin, blocks, block) in split {
                assert!(block.iter().zip(&d.block).all(|(b, full)| b <= full));
                for bz in 0..blocks[2] {
                    for by in 0..blocks[1] {
                        for bx in 0..blocks[0] {
                            let bi = [origin[0] + bx, origin[1] + by, origin[2] + bz];
                            for tz in 0..block[2] {
                                for ty in 0..block[1] {
                                    for tx in 0..block[0] {
                                        let p = [
                                            (bi[0] * d.block[0] + tx) as usize,
                                            (bi[1] * d.block[1] + ty) as usize,
                                            (bi[2] * d.block[2] + tz) as usize,
                                        ];
                                        assert!(p[0] < grid[0] && p[1] < grid[1] && p[2] < grid[2]);
                                        seen[p[0] + grid[0] * (p[1] + grid[1] * p[2])] += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{grid:?} {tg:?}");
        }
    }

    #[test]
    fn identifiers_are_checked() {
        for ok in ["a", "_x1", "inp_shape", "A9"] {
            check_identifier("t", "name", ok).unwrap();
        }
        for bad in ["", "1a", "a-b", "a b", "ä"] {
            assert!(check_identifier("t", "name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_use_mlx_messages() {
        let a = Array::scalar(1.0f32);
        let call = KernelCall::new([1, 1, 1], [1, 1, 1])
            .input(&a)
            .output(&[1], DType::F32);
        check_counts("custom_kernel", &call, 1, 1).unwrap();
        let e = check_counts("custom_kernel", &call, 2, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[custom_kernel] Expected `inputs` to have size 2 but got size 1.\n"
        );
        let e = check_counts("custom_kernel", &call, 1, 2).unwrap_err();
        assert!(e.to_string().contains("`output_shapes` to have size 2"));
    }
}
