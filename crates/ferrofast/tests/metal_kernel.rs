//! `fast::MetalKernel`: MLX Metal kernel sources (the custom-kernel cases of MLX's
//! `test_fast.py` and the examples of its custom Metal kernel guide, as written there) run on
//! the GPU through the translation to CUDA, checked against CPU oracles; every kernel is also
//! translated and compiled through NVRTC for sm_90 without a GPU.
//!
//! GPU tests print a line and return without a CUDA device; the compile check skips without
//! libnvrtc (CI: `. scripts/nvrtc-env`).
#![cfg(feature = "cuda")]

#[macro_use]
mod common;
#[path = "../examples/metal/guide.rs"]
mod guide;

use common::{check_close, randn, uniform};
use ferrofast::fast::{KernelCall, MathMode, MetalKernel, TemplateArg};
use ferrofast::{Array, DType, Device, Error};

/// An owned kernel input.
enum Input {
    A(Array),
    F(f32),
}

/// One kernel call: the kernel and everything its call needs, owned.
struct Case {
    name: &'static str,
    kernel: MetalKernel,
    inputs: Vec<Input>,
    outputs: Vec<(Vec<usize>, DType)>,
    grid: [usize; 3],
    threadgroup: [usize; 3],
    template: Vec<(&'static str, TemplateArg)>,
    init_value: Option<f64>,
}

impl Case {
    fn new(name: &'static str, kernel: MetalKernel, grid: [usize; 3], tg: [usize; 3]) -> Case {
        Case {
            name,
            kernel,
            inputs: Vec::new(),
            outputs: Vec::new(),
            grid,
            threadgroup: tg,
            template: Vec::new(),
            init_value: None,
        }
    }

    fn input(mut self, a: &Array) -> Case {
        self.inputs.push(Input::A(a.clone()));
        self
    }

    fn scalar(mut self, v: f32) -> Case {
        self.inputs.push(Input::F(v));
        self
    }

    fn output(mut self, shape: &[usize], dtype: DType) -> Case {
        self.outputs.push((shape.to_vec(), dtype));
        self
    }

    fn template(mut self, name: &'static str, v: impl Into<TemplateArg>) -> Case {
        self.template.push((name, v.into()));
        self
    }

    fn init(mut self, v: f64) -> Case {
        self.init_value = Some(v);
        self
    }

    fn call(&self) -> KernelCall<'_> {
        let mut c = KernelCall::new(self.grid, self.threadgroup);
        for i in &self.inputs {
            c = match i {
                Input::A(a) => c.input(a),
                Input::F(v) => c.input(*v),
            };
        }
        for (s, d) in &self.outputs {
            c = c.output(s, *d);
        }
        for (n, v) in &self.template {
            c = c.template_arg(n, *v);
        }
        if let Some(v) = self.init_value {
            c = c.init_value(v);
        }
        c
    }

    /// Runs on `device`.
    fn run(&self, device: &Device) -> Vec<Array> {
        let call = self.call().on_device(*device);
        // SAFETY: every test kernel reads and writes only inside its inputs and outputs.
        unsafe { self.kernel.call(&call) }.unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

fn kernel(name: &str, inputs: &[&str], outputs: &[&str], source: &str) -> MetalKernel {
    kernel_with_header(name, inputs, outputs, source, "")
}

/// [`kernel`] with `header` before the kernel.
fn kernel_with_header(
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    source: &str,
    header: &str,
) -> MetalKernel {
    MetalKernel::new(
        name,
        inputs,
        outputs,
        source,
        header,
        true,
        false,
        MathMode::Safe,
    )
    .unwrap()
}

fn f32s(a: &Array) -> Vec<f32> {
    a.astype(DType::F32).unwrap().to_vec::<f32>().unwrap()
}

fn f64s(a: &Array) -> Vec<f64> {
    a.to_f64_vec().unwrap()
}

fn cpu_array(data: Vec<f32>, shape: &[usize]) -> Array {
    Array::from_vec(data, shape).unwrap()
}

// ----- the cases ----------------------------------------------------------------------------

fn case_basic(a: &Array) -> Case {
    let k = kernel(
        "basic",
        &["a"],
        &["out1"],
        "\n                uint elem = thread_position_in_grid.x;\n                out1[elem] = a[elem];\n            ",
    );
    Case::new("basic", k, [4, 1, 1], [2, 1, 1])
        .input(a)
        .output(&[2, 2], DType::F32)
}

const ARGS_SOURCE: &str = "
                uint elem = thread_position_in_grid.x;
                T tmp = a[0];
                if (e) {
                    out1[elem] = a[1] + b[2] + c[3] + d + f;
                } else {
                    out1[elem] = 1;
                }
                out2[elem] = a[1] + b[2] + c[1] - d;
            ";

fn case_args(a: &Array, b: &Array, c: &Array) -> Case {
    let k = kernel(
        "arg_test",
        &["a", "b", "c", "d"],
        &["out1", "out2"],
        ARGS_SOURCE,
    );
    Case::new("args", k, [6, 1, 1], [2, 1, 1])
        .input(a)
        .input(b)
        .input(c)
        .scalar(7.3)
        .template("e", true)
        .template("f", 3)
        .template("T", DType::F16)
        .output(&[3, 2], DType::F32)
        .output(&[3, 2], DType::I32)
}

const STRIDED_SOURCE: &str = "
                uint elem = thread_position_in_grid.x;
                uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
                T tmp = inp[loc];
                out[elem] = metal::precise::exp(tmp) * threads_per_simdgroup;
            ";

const CONTIG_SOURCE: &str = "
                uint elem = thread_position_in_grid.x;
                T tmp = inp[elem];
                out[elem] = metal::precise::exp(tmp) * threads_per_simdgroup;
            ";

/// An element-wise `exp` case over `a` (kernel `inp` -> `out`, `T` = float32, threadgroups
/// of 256): the kernel `kernel_name` with `source`, which reads `inp` row-contiguous when
/// `contiguous` (else with its strides).
fn exp_case(
    name: &'static str,
    kernel_name: &str,
    source: &str,
    contiguous: bool,
    a: &Array,
) -> Case {
    let k = MetalKernel::new(
        kernel_name,
        &["inp"],
        &["out"],
        source,
        "",
        contiguous,
        false,
        MathMode::Safe,
    )
    .unwrap();
    Case::new(name, k, [a.size(), 1, 1], [256, 1, 1])
        .input(a)
        .template("T", DType::F32)
        .output(a.shape(), a.dtype())
}

fn case_strides(a: &Array, contig: bool) -> Case {
    if contig {
        exp_case("strides contiguous", "myexpTrue", CONTIG_SOURCE, true, a)
    } else {
        exp_case(
            "strides elem_to_loc",
            "myexpFalse",
            STRIDED_SOURCE,
            false,
            a,
        )
    }
}

fn case_helper(a: &Array) -> Case {
    let header = "
            template <typename T>
            T do_exp(T x) {
                return metal::precise::exp(x);
            }
            ";
    let source = "
                uint elem = thread_position_in_grid.x;
                out1[elem] = do_exp(a[elem]);
            ";
    let k = kernel_with_header("helper", &["a"], &["out1"], source, header);
    Case::new("helper", k, [4, 1, 1], [2, 1, 1])
        .input(a)
        .output(&[2, 2], DType::F32)
}

fn case_attributes(a: &Array) -> Case {
    let k = kernel(
        "test_fun",
        &["a"],
        &["out"],
        "out[0] = threads_per_threadgroup.x;",
    );
    Case::new("attributes", k, [2, 1, 1], [2, 1, 1])
        .input(a)
        .output(&[1, 1], DType::U32)
}

fn case_named_source(name: &'static str, kernel_name: &str, a: &Array, source: &str) -> Case {
    let k = kernel(kernel_name, &["inp"], &["out"], source);
    Case::new(name, k, [a.size(), 1, 1], [a.size(), 1, 1])
        .input(a)
        .output(a.shape(), a.dtype())
}

const MATH_MODE_SOURCE: &str = "
            uint elem = thread_position_in_grid.x;
            #if defined(__FAST_MATH__) && __FAST_MATH__
            out[elem] = 1.0f;
            #else
            out[elem] = 0.0f;
            #endif
        ";

fn case_math_mode(a: &Array, mode: MathMode) -> Case {
    let k = MetalKernel::new(
        "math_mode",
        &["inp"],
        &["out"],
        MATH_MODE_SOURCE,
        "",
        true,
        false,
        mode,
    )
    .unwrap();
    Case::new("math mode", k, [a.size(), 1, 1], [a.size(), 1, 1])
        .input(a)
        .output(a.shape(), a.dtype())
}

fn mixed_dtypes_kernel() -> MetalKernel {
    kernel(
        "mixed_dtypes",
        &["inp"],
        &["out"],
        "
                uint elem = thread_position_in_grid.x;
                out[elem] = inp[elem] + inp[elem];
            ",
    )
}

// The custom Metal kernel guide (docs/src/dev/custom_metal_kernels.rst).

const DOC_EXP_SOURCE: &str = include_str!("../examples/metal/exp.metal");

const DOC_EXP_STRIDED_SOURCE: &str = "
      uint elem = thread_position_in_grid.x;
      // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
      uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
      T tmp = inp[loc];
      // Output arrays are always row contiguous
      out[elem] = metal::exp(tmp);
  ";

fn case_doc_exp(a: &Array, strided: bool) -> Case {
    if strided {
        exp_case(
            "doc exp strided",
            "myexp_strided",
            DOC_EXP_STRIDED_SOURCE,
            false,
            a,
        )
    } else {
        exp_case("doc exp", "myexp", DOC_EXP_SOURCE, true, a)
    }
}

const GRID_SAMPLE_SOURCE: &str = include_str!("../examples/metal/grid_sample.metal");

fn case_grid_sample(x: &Array, g: &Array) -> Case {
    let k = kernel("grid_sample", &["x", "grid"], &["out"], GRID_SAMPLE_SOURCE);
    let (b, c) = (x.shape()[0], x.shape()[3]);
    let out_shape = [b, g.shape()[1], g.shape()[2], c];
    Case::new(
        "grid_sample",
        k,
        [out_shape.iter().product(), 1, 1],
        [256, 1, 1],
    )
    .input(x)
    .input(g)
    .template("T", x.dtype())
    .output(&out_shape, x.dtype())
}

fn case_grid_sample_grad(x: &Array, g: &Array, cot: &Array) -> Case {
    let k = guide::grid_sample_grad().unwrap();
    let (b, c) = (x.shape()[0], x.shape()[3]);
    let (gn, gm) = (g.shape()[1], g.shape()[2]);
    let c_padded = c.div_ceil(32) * 32;
    Case::new(
        "grid_sample_grad",
        k,
        [b * gn * gm * c_padded, 1, 1],
        [256, 1, 1],
    )
    .input(x)
    .input(g)
    .input(cot)
    .template("T", x.dtype())
    .output(x.shape(), x.dtype())
    .output(g.shape(), x.dtype())
    .init(0.0)
}

/// Records Metal's dispatch as seen by every thread; grids that are not multiples of the
/// threadgroup.
const DISPATCH_SOURCE: &str = "
    uint3 p = thread_position_in_grid;
    uint3 g = threads_per_grid;
    uint i = (p.z * g.y + p.y) * g.x + p.x;
    atomic_store_explicit(&info[4 * i + 0], threads_per_threadgroup.x * 10000u + threads_per_threadgroup.y * 100u + threads_per_threadgroup.z, memory_order_relaxed);
    atomic_store_explicit(&info[4 * i + 1], thread_index_in_threadgroup, memory_order_relaxed);
    atomic_store_explicit(&info[4 * i + 2], threadgroup_position_in_grid.x * 10000u + threadgroup_position_in_grid.y * 100u + threadgroup_position_in_grid.z, memory_order_relaxed);
    atomic_store_explicit(&info[4 * i + 3], in[i] * 2 + 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&count[0], 1, memory_order_relaxed);
    atomic_fetch_max_explicit(&count[1], dispatch_threads_per_threadgroup.x, memory_order_relaxed);
";

fn case_dispatch(input: &Array, grid: [usize; 3], tg: [usize; 3]) -> Case {
    let k = MetalKernel::new(
        "dispatch",
        &["in"],
        &["info", "count"],
        DISPATCH_SOURCE,
        "",
        true,
        true,
        MathMode::Safe,
    )
    .unwrap();
    let n: usize = grid.iter().product();
    Case::new("dispatch", k, grid, tg)
        .input(input)
        .output(&[4 * n], DType::U32)
        .output(&[2], DType::U32)
        .init(0.0)
}

/// Sum of each threadgroup's elements: SIMD-group sums, threadgroup memory, a barrier, a
/// second SIMD-group sum.
const REDUCE_SOURCE: &str = "
    threadgroup float partial[32];
    uint gid = thread_position_in_grid.x;
    float v = inp[gid];
    float s = simd_sum(v);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (simdgroup_index_in_threadgroup == 0) {
        float t = thread_index_in_simdgroup < simdgroups_per_threadgroup
            ? partial[thread_index_in_simdgroup] : 0.0f;
        t = simd_sum(t);
        if (thread_index_in_simdgroup == 0) {
            out[threadgroup_position_in_grid.x] = t;
        }
    }
";

fn case_reduce(a: &Array, tg: usize) -> Case {
    let k = kernel("block_sum", &["inp"], &["out"], REDUCE_SOURCE);
    let n = a.size();
    Case::new("reduce", k, [n, 1, 1], [tg, 1, 1])
        .input(a)
        .output(&[n.div_ceil(tg)], DType::F32)
}

/// SIMD-group scans, reductions and shuffles, one value each per thread.
const SIMD_SOURCE: &str = "
    uint i = thread_position_in_grid.x;
    float v = inp[i];
    out[6 * i + 0] = simd_prefix_inclusive_sum(v);
    out[6 * i + 1] = simd_prefix_exclusive_sum(v);
    out[6 * i + 2] = simd_max(v);
    out[6 * i + 3] = simd_broadcast(v, 0);
    out[6 * i + 4] = simd_shuffle_xor(v, 1);
    out[6 * i + 5] = float(simd_sum(int(thread_index_in_simdgroup)));
";

fn case_simd(a: &Array, tg: usize) -> Case {
    let k = kernel("simd_ops", &["inp"], &["out"], SIMD_SOURCE);
    let n = a.size();
    Case::new("simd", k, [n, 1, 1], [tg, 1, 1])
        .input(a)
        .output(&[6 * n], DType::F32)
}

/// Vector types, swizzles, half arithmetic and the math library.
const VECTOR_SOURCE: &str = "
    uint i = thread_position_in_grid.x;
    float4 v = float4(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3]);
    float2 a = v.xy * 2.0 + v.zw;
    v.zw = a;
    float3 c = v.rgb;
    half h = half(v.x);
    half h2 = h * h + 1;
    half4 hv = half4(v);
    out[5 * i + 0] = dot(c, float3(1.0)) + length(a);
    out[5 * i + 1] = clamp(v.w, -0.5f, 0.5f) + mix(v.x, v.y, 0.25f) + fract(v.x);
    out[5 * i + 2] = select(1.0f, 2.0f, v.x > 0) + (all(v > float4(-10)) ? 1.0f : 0.0f);
    out[5 * i + 3] = float(h2) + float(hv.w);
    out[5 * i + 4] = metal::fast::exp(v.y * 0.5) + as_type<float>(as_type<uint>(v.x)) + rsqrt(abs(v.x) + 1);
";

fn case_vectors(a: &Array) -> Case {
    let k = kernel("vectors", &["inp"], &["out"], VECTOR_SOURCE);
    let n = a.size() / 4;
    Case::new("vectors", k, [n, 1, 1], [32, 1, 1])
        .input(a)
        .output(&[5 * n], DType::F32)
}

// ----- oracles ------------------------------------------------------------------------------

fn grid_sample_ref(x: &Array, g: &Array) -> Vec<f64> {
    let (xs, gs) = (f64s(x), f64s(g));
    let (b, h, w, c) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (gn, gm) = (g.shape()[1], g.shape()[2]);
    let mut out = vec![0.0; b * gn * gm * c];
    let at = |bi: usize, yy: i64, xx: i64, ch: usize| -> f64 {
        if yy < 0 || yy >= h as i64 || xx < 0 || xx >= w as i64 {
            0.0
        } else {
            xs[((bi * h + yy as usize) * w + xx as usize) * c + ch]
        }
    };
    for bi in 0..b {
        for p in 0..gn * gm {
            let gx = gs[(bi * gn * gm + p) * 2];
            let gy = gs[(bi * gn * gm + p) * 2 + 1];
            let ix = ((gx + 1.0) * w as f64 - 1.0) / 2.0;
            let iy = ((gy + 1.0) * h as f64 - 1.0) / 2.0;
            let (x0, y0) = (ix.floor() as i64, iy.floor() as i64);
            let (x1, y1) = (x0 + 1, y0 + 1);
            let nw = (x1 as f64 - ix) * (y1 as f64 - iy);
            let ne = (ix - x0 as f64) * (y1 as f64 - iy);
            let sw = (x1 as f64 - ix) * (iy - y0 as f64);
            let se = (ix - x0 as f64) * (iy - y0 as f64);
            for ch in 0..c {
                out[(bi * gn * gm + p) * c + ch] = nw * at(bi, y0, x0, ch)
                    + ne * at(bi, y0, x1, ch)
                    + sw * at(bi, y1, x0, ch)
                    + se * at(bi, y1, x1, ch);
            }
        }
    }
    out
}

/// Gradients of `sum(grid_sample(x, grid) * cot)`, with the kernel's integer `W / 2`, `H / 2`
/// factors for the grid gradient.
fn grid_sample_grad_ref(x: &Array, g: &Array, cot: &Array) -> (Vec<f64>, Vec<f64>) {
    let (xs, gs, cs) = (f64s(x), f64s(g), f64s(cot));
    let (_, xg, gg) = guide::grid_sample_cpu(&xs, x.shape(), &gs, g.shape(), &cs);
    (xg, gg)
}

fn exp_ref(a: &Array, scale: f64) -> Array {
    let v: Vec<f64> = f64s(a).iter().map(|x| x.exp() * scale).collect();
    Array::from_vec(v, a.shape()).unwrap()
}

// ----- inputs -------------------------------------------------------------------------------

fn args_inputs() -> (Array, Array, Array) {
    // MLX's test expects 14.0484 and -2 from its random values; these inputs are random too,
    // with the three elements the kernel reads set so that the same numbers come out.
    let mut a = f32s(&randn(&[3, 6], DType::F32, 7));
    a[1] = -0.2516;
    let mut c = f32s(&randn(&[2, 2], DType::F32, 8));
    c[1] = 0.25;
    c[3] = -1.0;
    let a = cpu_array(a, &[3, 6]);
    let b = Array::from_vec(vec![3i32, 4, 5], &[3]).unwrap();
    let c = cpu_array(c, &[2, 2]).astype(DType::BF16).unwrap();
    (a, b, c)
}

/// A non-contiguous (3 * 4, 6) view: every second row of a random (24, 6) array.
fn strided_input() -> Array {
    let base = randn(&[24, 6], DType::F32, 7);
    let v = base.slice(&[0, 0], &[24, 6], &[2, 1]).unwrap();
    assert!(!v.is_contiguous());
    v
}

/// `x`, a grid for the forward kernel, a grid for the backward kernel and a cotangent.
///
/// The guide's forward kernel reads all four corners before masking those outside the
/// image (Metal tolerates the out-of-bounds read, CUDA faults), so its sampling points stay
/// where every corner is inside (`|g| < 1 - 1/W`). The backward kernel checks before it
/// reads, so its grid also samples outside the image, exercising the zero padding.
fn grid_sample_inputs() -> (Array, Array, Array, Array) {
    let x = randn(&[2, 8, 10, 5], DType::F32, 21);
    let g = uniform(&[2, 6, 7, 2], -0.85, 0.85, DType::F32, 22);
    let g_wide = uniform(&[2, 6, 7, 2], -1.2, 1.2, DType::F32, 24);
    let cot = randn(&[2, 6, 7, 5], DType::F32, 23);
    (x, g, g_wide, cot)
}

/// Every test kernel with inputs, for the compile check.
fn all_cases() -> Vec<Case> {
    let a22 = randn(&[2, 2], DType::F32, 7);
    let (a, b, c) = args_inputs();
    let strided = strided_input();
    let f16 = randn(&[4, 16], DType::F16, 3);
    let f16_view = f16.slice(&[0, 0], &[4, 16], &[2, 1]).unwrap();
    let (x, g, g_wide, cot) = grid_sample_inputs();
    let a32 = randn(&[32], DType::F32, 4);
    let vec_in = randn(&[64 * 4], DType::F32, 5);
    let u = Array::from_vec((0..40u32).collect::<Vec<_>>(), &[40]).unwrap();
    vec![
        case_basic(&a22),
        case_args(&a, &b, &c),
        case_strides(&strided, true),
        case_strides(&strided, false),
        case_helper(&a22),
        case_attributes(&a22),
        case_named_source(
            "caching",
            "my_kernel",
            &a32,
            "uint elem = thread_position_in_grid.x; out[elem] = 1.0;",
        ),
        case_math_mode(&a32, MathMode::Safe),
        case_math_mode(&a32, MathMode::Relaxed),
        case_math_mode(&a32, MathMode::Fast),
        Case::new("mixed f16", mixed_dtypes_kernel(), [32, 1, 1], [32, 1, 1])
            .input(&randn(&[32], DType::F16, 1))
            .output(&[32], DType::F16),
        case_doc_exp(&f16, false),
        case_doc_exp(&f16_view, true),
        case_grid_sample(&x, &g),
        case_grid_sample_grad(&x, &g_wide, &cot),
        case_dispatch(&u, [37, 1, 1], [8, 1, 1]),
        case_reduce(&a32, 32),
        case_simd(&a32, 32),
        case_vectors(&vec_in),
    ]
}

// ----- tests without a GPU ------------------------------------------------------------------

#[test]
fn every_test_kernel_translates_and_compiles_for_sm_90() {
    match ferrofast::testing::nvrtc_version() {
        Ok(v) => println!("NVRTC {}.{}", v.0, v.1),
        Err(Error::CudaUnavailable(m)) => {
            println!("skipping the MetalKernel compile check: {m}");
            return;
        }
        Err(e) => panic!("NVRTC is present but unusable: {e}"),
    }
    for case in all_cases() {
        let started = std::time::Instant::now();
        case.kernel
            .compile_check(&case.call(), "sm_90")
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        println!(
            "{}: compiled in {:.2} s",
            case.name,
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn compile_errors_point_into_the_metal_source() {
    if ferrofast::testing::nvrtc_version().is_err() {
        println!("skipping: no libnvrtc");
        return;
    }
    let k = kernel(
        "broken",
        &["inp"],
        &["out"],
        "uint elem = thread_position_in_grid.x;\nout[elem] = undefined_thing;",
    );
    let a = randn(&[8], DType::F32, 1);
    let call = KernelCall::new([8, 1, 1], [8, 1, 1])
        .input(&a)
        .output(&[8], DType::F32);
    let e = k.compile_check(&call, "sm_90").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Compile(_)), "{msg}");
    assert!(msg.contains("undefined_thing"), "{msg}");
    // The body's second line is line 6 of the generated Metal source.
    assert!(msg.contains("broken.metal(6)"), "{msg}");
}

#[test]
fn untranslatable_constructs_are_errors_with_their_line() {
    let a = randn(&[8], DType::F32, 1);
    for (source, construct, place) in [
        (
            "uint e = thread_position_in_grid.x;\ntexture2d<float> t;\nout[e] = inp[e];",
            "`texture2d`",
            "line 2 of the source",
        ),
        (
            "simdgroup_float8x8 m;",
            "`simdgroup_float8x8`",
            "line 1 of the source",
        ),
        ("\n\nsampler s;", "`sampler`", "line 3 of the source"),
    ] {
        let k = kernel("bad", &["inp"], &["out"], source);
        let call = KernelCall::new([8, 1, 1], [8, 1, 1])
            .input(&a)
            .output(&[8], DType::F32);
        // SAFETY: the kernel is refused before anything runs.
        let e = unsafe { k.call(&call) }.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)), "{msg}");
        assert!(msg.contains(construct) && msg.contains(place), "{msg}");
    }
    let header = "struct P { float4 p [[stage_in]]; };\n";
    let k = MetalKernel::new(
        "bad",
        &["inp"],
        &["out"],
        "out[0] = inp[0];",
        header,
        true,
        false,
        MathMode::Safe,
    )
    .unwrap();
    let call = KernelCall::new([1, 1, 1], [1, 1, 1])
        .input(&a)
        .output(&[1], DType::F32);
    let msg = k.generate(&call).unwrap_err().to_string();
    assert!(
        msg.contains("`[[stage_in]]` (line 1 of the header)"),
        "{msg}"
    );
}

#[test]
fn calls_check_counts_and_refuse_the_cpu() {
    let k = mixed_dtypes_kernel();
    let a = randn(&[4], DType::F32, 1);
    let call = KernelCall::new([4, 1, 1], [4, 1, 1]).output(&[4], DType::F32);
    // SAFETY: refused before anything runs.
    let e = unsafe { k.call(&call) }.unwrap_err();
    assert_eq!(
        e.to_string(),
        "[metal_kernel] Expected `inputs` to have size 1 but got size 0.\n"
    );
    let call = KernelCall::new([4, 1, 1], [4, 1, 1])
        .input(&a)
        .output(&[4], DType::F32)
        .on_device(Device::Cpu);
    // SAFETY: refused before anything runs.
    let e = unsafe { k.call(&call) }.unwrap_err();
    assert_eq!(e.to_string(), "[metal_kernel] Only supports the GPU.");
}

#[test]
fn verbose_prints_the_metal_source_under_the_user_name() {
    let (a, b, c) = args_inputs();
    let case = case_args(&a, &b, &c);
    let g = case.kernel.generate(&case.call()).unwrap();
    let text = g.verbose_text("arg_test");
    assert!(text.starts_with("Generated source code for `arg_test`:\n```\ntemplate <bool e, int f, typename T>\n[[kernel]] void custom_kernel_arg_test__1_3_float16_t_float_int32_tc_bfloat16_tc_floats_float_int32_t(\n"));
    assert!(text.contains("  const constant float& d [[buffer(3)]],\n"));
}

// ----- GPU tests ----------------------------------------------------------------------------

gpu_test! {
    fn mlx_custom_kernel_tests(dev: Device) {
        let a22 = randn(&[2, 2], DType::F32, 7);

        let out = case_basic(&a22).run(&dev);
        check_close(&out[0], &a22, 0.0, 0.0, "basic");

        let (a, b, c) = args_inputs();
        let out = case_args(&a, &b, &c).run(&dev);
        let (av, cv) = (f32s(&a), f32s(&c));
        let out1 = av[1] + 5.0 + cv[3] + 7.3f32 + 3.0;
        let out2 = (av[1] + 5.0 + cv[1] - 7.3f32) as i32;
        for v in f32s(&out[0]) {
            assert_eq!(v, out1);
            assert!((v - 14.0484).abs() <= 1e-5 * 14.0484 + 1e-8, "{v}");
        }
        assert_eq!(out[1].to_vec::<i32>().unwrap(), vec![out2; 6]);
        assert_eq!(out2, -2);

        let strided = strided_input();
        for contig in [true, false] {
            let out = case_strides(&strided, contig).run(&dev);
            check_close(&out[0], &exp_ref(&strided, 32.0), 1e-5, 1e-5, "strides");
        }
        // A transposed view through elem_to_loc.
        let t = randn(&[6, 5], DType::F32, 9).transpose(&[1, 0]).unwrap();
        let out = case_strides(&t, false).run(&dev);
        check_close(
            &out[0],
            &exp_ref(&t, 32.0),
            1e-5,
            1e-5,
            "strides, transposed",
        );

        let out = case_helper(&a22).run(&dev);
        check_close(&out[0], &exp_ref(&a22, 1.0), 1e-6, 1e-6, "helper");

        let out = case_attributes(&randn(&[1, 1], DType::F32, 2)).run(&dev);
        assert_eq!(out[0].to_vec::<u32>().unwrap(), vec![2]);
    }

    fn same_name_different_sources_do_not_collide(dev: Device) {
        let a = randn(&[32], DType::F32, 11);
        let zeros = case_named_source(
            "caching 0",
            "my_kernel",
            &a,
            "\n            uint elem = thread_position_in_grid.x;\n            out[elem] = 0.0;\n        ",
        )
        .run(&dev);
        let ones = case_named_source(
            "caching 1",
            "my_kernel",
            &a,
            "\n            uint elem = thread_position_in_grid.x;\n            out[elem] = 1.0;\n        ",
        )
        .run(&dev);
        assert_eq!(zeros[0].to_vec::<f32>().unwrap(), vec![0.0; 32]);
        assert_eq!(ones[0].to_vec::<f32>().unwrap(), vec![1.0; 32]);

        // Both launched before either is read.
        let ar = Array::from_vec((0..32).map(|i| i as f32).collect::<Vec<_>>(), &[32]).unwrap();
        let k1 = case_named_source(
            "dup 1",
            "dup_name",
            &ar,
            "uint e = thread_position_in_grid.x; out[e] = inp[e] * 2.0f;",
        );
        let k2 = case_named_source(
            "dup 2",
            "dup_name",
            &ar,
            "uint e = thread_position_in_grid.x; out[e] = inp[e] + 100.0f;",
        );
        let (o1, o2) = (k1.run(&dev), k2.run(&dev));
        let expect1: Vec<f32> = (0..32).map(|i| i as f32 * 2.0).collect();
        let expect2: Vec<f32> = (0..32).map(|i| i as f32 + 100.0).collect();
        assert_eq!(o1[0].to_vec::<f32>().unwrap(), expect1);
        assert_eq!(o2[0].to_vec::<f32>().unwrap(), expect2);
    }

    fn math_modes_reach_the_compiler(dev: Device) {
        let a = randn(&[4], DType::F32, 12);
        for (mode, expected) in [
            (MathMode::Safe, 0.0f32),
            (MathMode::Fast, 1.0),
            (MathMode::Relaxed, 0.0),
        ] {
            let out = case_math_mode(&a, mode).run(&dev);
            assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![expected; 4], "{mode}");
        }
    }

    fn one_kernel_with_f16_and_f32_inputs(dev: Device) {
        let k = mixed_dtypes_kernel();
        let run = |a: &Array| {
            let call = KernelCall::new([a.size(), 1, 1], [a.size(), 1, 1])
                .input(a)
                .output(a.shape(), a.dtype())
                .on_device(dev);
            // SAFETY: the kernel writes out[0..32] of a 32-element output.
            unsafe { k.call(&call) }.unwrap().remove(0)
        };
        let a = Array::full(&[32], 1.5, DType::F16, &Device::Cpu).unwrap();
        let b = Array::full(&[32], 2.5, DType::F32, &Device::Cpu).unwrap();
        let (oa, ob) = (run(&a), run(&b));
        let sum: Vec<f32> = f32s(&oa)
            .iter()
            .zip(f32s(&ob))
            .map(|(x, y)| x + y)
            .collect();
        assert_eq!(sum, vec![8.0; 32]);
        let r = randn(&[32], DType::F16, 13);
        let out = run(&r);
        let twice: Vec<f64> = f64s(&r).iter().map(|v| 2.0 * v).collect();
        assert_eq!(f64s(&out), twice);
    }

    fn guide_examples_exp_and_grid_sample(dev: Device) {
        let a = randn(&[4, 16], DType::F16, 3);
        let out = case_doc_exp(&a, false).run(&dev);
        assert_eq!(out[0].dtype(), DType::F16);
        check_close(&out[0], &exp_ref(&a, 1.0), 1e-3, 1e-3, "doc exp");
        let view = a.slice(&[0, 0], &[4, 16], &[2, 1]).unwrap();
        let out = case_doc_exp(&view, true).run(&dev);
        check_close(&out[0], &exp_ref(&view, 1.0), 1e-3, 1e-3, "doc exp strided");

        let (x, g, g_wide, cot) = grid_sample_inputs();
        let out = case_grid_sample(&x, &g).run(&dev);
        let expect = Array::from_vec(grid_sample_ref(&x, &g), out[0].shape()).unwrap();
        check_close(&out[0], &expect, 1e-4, 1e-4, "grid_sample");

        for grid in [&g, &g_wide] {
            let out = case_grid_sample_grad(&x, grid, &cot).run(&dev);
            let (xg, gg) = grid_sample_grad_ref(&x, grid, &cot);
            let xg = Array::from_vec(xg, x.shape()).unwrap();
            let gg = Array::from_vec(gg, grid.shape()).unwrap();
            check_close(&out[0], &xg, 1e-4, 1e-4, "grid_sample x_grad");
            check_close(&out[1], &gg, 1e-3, 1e-4, "grid_sample grid_grad");
        }
    }

    fn grids_that_are_not_multiples_of_the_threadgroup(dev: Device) {
        for (grid, tg) in [
            ([37usize, 1, 1], [8usize, 1, 1]),
            ([37, 5, 1], [8, 4, 1]),
            ([5, 3, 3], [2, 2, 2]),
            ([100, 1, 1], [1024, 1, 1]),
        ] {
            let n: usize = grid.iter().product();
            let input =
                Array::from_vec((0..n as u32).map(|v| v * 7 + 3).collect::<Vec<_>>(), &[n]).unwrap();
            let out = case_dispatch(&input, grid, tg).run(&dev);
            let info = out[0].to_vec::<u32>().unwrap();
            let count = out[1].to_vec::<u32>().unwrap();
            let tgc: Vec<usize> = (0..3).map(|a| tg[a].min(grid[a])).collect();
            assert_eq!(
                count[0] as usize, n,
                "{grid:?} {tg:?}: threads that ran the body"
            );
            assert_eq!(count[1] as usize, tgc[0], "{grid:?} {tg:?}: dispatch size");
            for z in 0..grid[2] {
                for y in 0..grid[1] {
                    for x in 0..grid[0] {
                        let i = (z * grid[1] + y) * grid[0] + x;
                        let p = [x, y, z];
                        let group: Vec<usize> = (0..3).map(|a| p[a] / tgc[a]).collect();
                        let size: Vec<usize> = (0..3)
                            .map(|a| tgc[a].min(grid[a] - group[a] * tgc[a]))
                            .collect();
                        let local: Vec<usize> = (0..3).map(|a| p[a] - group[a] * tgc[a]).collect();
                        let expect = [
                            size[0] * 10000 + size[1] * 100 + size[2],
                            local[0] + size[0] * (local[1] + size[1] * local[2]),
                            group[0] * 10000 + group[1] * 100 + group[2],
                            (i * 7 + 3) * 2 + 1,
                        ];
                        let got: Vec<usize> =
                            info[4 * i..4 * i + 4].iter().map(|&v| v as usize).collect();
                        assert_eq!(got, expect, "{grid:?} {tg:?} thread {p:?}");
                    }
                }
            }
        }
    }

    fn reduction_with_threadgroup_memory_barriers_and_simd_sum(dev: Device) {
        for (n, tg) in [(1000usize, 256usize), (4096, 1024), (77, 64), (5, 32)] {
            let a = randn(&[n], DType::F32, n as u64);
            let out = case_reduce(&a, tg).run(&dev);
            let v = f64s(&a);
            let expect: Vec<f64> = v.chunks(tg).map(|c| c.iter().sum()).collect();
            let expect = Array::from_vec(expect, &[n.div_ceil(tg)]).unwrap();
            check_close(
                &out[0],
                &expect,
                1e-4,
                1e-5,
                &format!("reduce n={n} tg={tg}"),
            );
        }
    }

    fn simd_group_functions(dev: Device) {
        // 70 threads in threadgroups of 64: the second group has one partial SIMD group of 6.
        let n = 70;
        let a = randn(&[n], DType::F32, 31);
        let out = f32s(&case_simd(&a, 64).run(&dev)[0]);
        let v = f32s(&a);
        for i in 0..n {
            let group_start = i / 64 * 64;
            let warp_start = group_start + (i - group_start) / 32 * 32;
            let warp_end = (warp_start + 32).min(group_start + 64).min(n);
            let lane = i - warp_start;
            let lanes = &v[warp_start..warp_end];
            let inc: f32 = lanes[..=lane].iter().sum();
            let exc: f32 = lanes[..lane].iter().sum();
            let max = lanes.iter().cloned().fold(f32::MIN, f32::max);
            let got = &out[6 * i..6 * i + 6];
            assert!(
                (got[0] - inc).abs() <= 1e-4,
                "thread {i}: inclusive {} vs {inc}",
                got[0]
            );
            assert!(
                (got[1] - exc).abs() <= 1e-4,
                "thread {i}: exclusive {} vs {exc}",
                got[1]
            );
            assert_eq!(got[2], max, "thread {i}: max");
            assert_eq!(got[3], lanes[0], "thread {i}: broadcast");
            if (lane ^ 1) < lanes.len() {
                assert_eq!(got[4], lanes[lane ^ 1], "thread {i}: shuffle_xor");
            }
            let lane_sum: usize = (0..lanes.len()).sum();
            assert_eq!(got[5], lane_sum as f32, "thread {i}: integer sum");
        }
    }

    fn vectors_swizzles_half_and_math(dev: Device) {
        let n = 64;
        let a = randn(&[4 * n], DType::F32, 41);
        let out = f32s(&case_vectors(&a).run(&dev)[0]);
        let v = f32s(&a);
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        for i in 0..n {
            let (x, y, z, w) = (v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
            let (a0, a1) = (x * 2.0 + z, y * 2.0 + w);
            let (vz, vw) = (a0, a1);
            let len = (a0 * a0 + a1 * a1).sqrt();
            let e0 = x + y + vz + len;
            let fract = x - x.floor();
            let e1 = vw.clamp(-0.5, 0.5) + (x + (y - x) * 0.25) + fract;
            let all = [x, y, vz, vw].iter().all(|&q| q > -10.0);
            let e2 = if x > 0.0 { 2.0 } else { 1.0 } + if all { 1.0 } else { 0.0 };
            let h = f16(x);
            let e3 = f16(f16(h * h) + 1.0) + f16(vw);
            let e4 = (y * 0.5).exp() + x + 1.0 / (x.abs() + 1.0).sqrt();
            let got = &out[5 * i..5 * i + 5];
            let close = |g: f32, e: f32, tol: f32, what: &str| {
                assert!(
                    (g - e).abs() <= tol * (1.0 + e.abs()),
                    "thread {i} {what}: {g} vs {e}"
                );
            };
            close(got[0], e0, 1e-5, "dot/length");
            close(got[1], e1, 1e-5, "clamp/mix/fract");
            close(got[2], e2, 0.0, "select/all");
            close(got[3], e3, 1e-3, "half");
            close(got[4], e4, 1e-4, "fast exp/as_type/rsqrt");
        }
    }
}
