//! `fast::CudaKernel` (MLX's `cuda_kernel`): the custom-kernel cases of MLX's
//! `test_fast.py`, the generated source, every error the library checks, and a compile check
//! of every test kernel through NVRTC (needs libnvrtc and the CUDA headers, no GPU). GPU
//! tests print a line and pass without a CUDA device.
#![cfg(feature = "cuda")]

#[macro_use]
mod common;

use common::{check_close, uniform};
use ferrofast::fast::{CudaKernel, KernelCall, KernelInput, TemplateArg};
use ferrofast::{bf16, f16, Array, DType, Device, Error, Stream};

/// A kernel and one call of it, with inputs held by value.
struct Case {
    name: &'static str,
    kernel: CudaKernel,
    inputs: Vec<Input>,
    outputs: Vec<(Vec<usize>, DType)>,
    grid: [usize; 3],
    threadgroup: [usize; 3],
    template: Vec<(String, TemplateArg)>,
    init_value: Option<f64>,
}

enum Input {
    Array(Array),
    Float(f32),
}

impl Case {
    /// `kernel` over `grid` in blocks of `threadgroup`, with no inputs, outputs, template
    /// arguments or initial value.
    fn new(
        name: &'static str,
        kernel: CudaKernel,
        grid: [usize; 3],
        threadgroup: [usize; 3],
    ) -> Case {
        Case {
            name,
            kernel,
            inputs: vec![],
            outputs: vec![],
            grid,
            threadgroup,
            template: vec![],
            init_value: None,
        }
    }

    fn call(&self) -> KernelCall<'_> {
        let mut call = KernelCall::new(self.grid, self.threadgroup);
        for i in &self.inputs {
            call = call.input(match i {
                Input::Array(a) => KernelInput::Array(a),
                Input::Float(v) => KernelInput::Float(*v),
            });
        }
        for (shape, dtype) in &self.outputs {
            call = call.output(shape, *dtype);
        }
        call.template = self.template.clone();
        call.init_value = self.init_value;
        call
    }

    fn run(&self) -> Vec<Array> {
        // SAFETY: every test kernel bounds-checks and stays inside its buffers.
        unsafe { self.kernel.call(&self.call()) }.unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn array(&self, i: usize) -> &Array {
        match &self.inputs[i] {
            Input::Array(a) => a,
            Input::Float(_) => panic!("input {i} is a scalar"),
        }
    }
}

fn kernel(name: &str, inputs: &[&str], outputs: &[&str], source: &str) -> CudaKernel {
    CudaKernel::new(name, inputs, outputs, source, "", true, 0).unwrap()
}

fn on(a: Array, device: &Device) -> Array {
    a.to_device(device).unwrap()
}

// ----- the cases ------------------------------------------------------------------------------

fn basic(dev: &Device) -> Case {
    Case {
        inputs: vec![Input::Array(on(
            uniform(&[2, 2], -1.0, 1.0, DType::F32, 1),
            dev,
        ))],
        outputs: vec![(vec![2, 2], DType::F32)],
        ..Case::new(
            "basic",
            kernel(
                "basic",
                &["a"],
                &["out1"],
                "  uint elem = blockIdx.x * blockDim.x + threadIdx.x;\n  out1[elem] = a[elem];\n",
            ),
            [4, 1, 1],
            [2, 1, 1],
        )
    }
}

const ARGS_SOURCE: &str = r#"
  uint elem = blockIdx.x * blockDim.x + threadIdx.x;
  if (elem >= 6) return;
  T tmp = T(a[0]);
  if (e) {
    out1[elem] = a[1] + b[2] + static_cast<float>(c[3]) + d[0] + f + static_cast<float>(tmp) * 0.0f;
  } else {
    out1[elem] = 1;
  }
  out2[elem] = a[1] + b[2] + static_cast<float>(c[1]) - d[0];
"#;

fn args(dev: &Device) -> Case {
    Case {
        inputs: vec![
            Input::Array(on(uniform(&[3, 6], -1.0, 1.0, DType::F32, 2), dev)),
            Input::Array(on(Array::from_vec(vec![3i32, 4, 5], &[3]).unwrap(), dev)),
            Input::Array(on(uniform(&[2, 2], -1.0, 1.0, DType::BF16, 3), dev)),
            Input::Float(7.3),
        ],
        outputs: vec![(vec![3, 2], DType::F32), (vec![3, 2], DType::I32)],
        template: vec![
            ("e".into(), TemplateArg::Bool(true)),
            ("f".into(), TemplateArg::Int(3)),
            ("T".into(), TemplateArg::DType(DType::F16)),
        ],
        ..Case::new(
            "args",
            kernel(
                "arg_test",
                &["a", "b", "c", "d"],
                &["out1", "out2"],
                ARGS_SOURCE,
            ),
            [6, 1, 1],
            [2, 1, 1],
        )
    }
}

const EXP_CONTIGUOUS: &str = r#"
  uint elem = blockIdx.x * blockDim.x + threadIdx.x;
  if (elem < N) {
    out[elem] = exp(inp[elem]) * WARP_SIZE;
  }
"#;

const EXP_STRIDED: &str = r#"
  uint elem = blockIdx.x * blockDim.x + threadIdx.x;
  if (elem < N) {
    int64_t loc = elem_to_loc(elem, inp_shape.data(), inp_strides.data(), inp_ndim);
    float tmp = inp[loc];
    out[elem] = exp(tmp) * WARP_SIZE;
  }
"#;

/// A view that is not row-contiguous: every other row of an (8, 6) array, transposed to
/// shape (6, 4) with strides (1, 12).
fn strided_input(dev: &Device) -> Array {
    let base = on(uniform(&[8, 6], -2.0, 2.0, DType::F32, 4), dev);
    let rows = base.slice(&[0, 0], &[8, 6], &[2, 1]).unwrap();
    let v = rows.transpose(&[1, 0]).unwrap();
    assert!(!v.is_contiguous());
    v
}

fn strides(dev: &Device, contiguous: bool) -> Case {
    let inp = strided_input(dev);
    let n = inp.size();
    Case {
        outputs: vec![(inp.shape().to_vec(), DType::F32)],
        inputs: vec![Input::Array(inp)],
        template: vec![("N".into(), TemplateArg::Int(n as i32))],
        ..Case::new(
            if contiguous {
                "strides (copied)"
            } else {
                "strides (elem_to_loc)"
            },
            CudaKernel::new(
                if contiguous { "exp_rc" } else { "exp_strided" },
                &["inp"],
                &["out"],
                if contiguous {
                    EXP_CONTIGUOUS
                } else {
                    EXP_STRIDED
                },
                "",
                contiguous,
                0,
            )
            .unwrap(),
            [n, 1, 1],
            [16, 1, 1],
        )
    }
}

fn helper(dev: &Device) -> Case {
    let inp = on(uniform(&[5, 7], -2.0, 2.0, DType::F32, 5), dev);
    let n = inp.size();
    Case {
        inputs: vec![Input::Array(inp)],
        outputs: vec![(vec![5, 7], DType::F32)],
        template: vec![("N".into(), TemplateArg::Int(n as i32))],
        ..Case::new("helper", CudaKernel::new(
            "helper",
            &["inp"],
            &["out"],
            "  uint i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < N) out[i] = do_exp(inp[i]);\n",
            "template <typename T>\nT do_exp(T x) {\n  return exp(x);\n}\n",
            true,
            0,
        )
        .unwrap(), [n, 1, 1], [32, 1, 1])
    }
}

fn attributes() -> Case {
    Case {
        inputs: vec![],
        outputs: vec![(vec![1], DType::U32)],
        ..Case::new(
            "attributes",
            kernel("test_fun", &[], &["out"], "  out[0] = blockDim.x;\n"),
            [2, 1, 1],
            [2, 1, 1],
        )
    }
}

fn same_name(dev: &Device, add: bool) -> Case {
    let src = if add {
        "  uint i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < 8) out[i] = a[i] + 1.0f;\n"
    } else {
        "  uint i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < 8) out[i] = a[i] * 2.0f;\n"
    };
    Case {
        inputs: vec![Input::Array(on(
            uniform(&[8], -1.0, 1.0, DType::F32, 6),
            dev,
        ))],
        outputs: vec![(vec![8], DType::F32)],
        ..Case::new(
            if add {
                "same name (add)"
            } else {
                "same name (mul)"
            },
            kernel("same_name", &["a"], &["out"], src),
            [8, 1, 1],
            [8, 1, 1],
        )
    }
}

fn mixed(dev: &Device, dtype: DType) -> Case {
    Case {
        inputs: vec![Input::Array(on(uniform(&[33], -4.0, 4.0, dtype, 7), dev))],
        outputs: vec![(vec![33], dtype)],
        ..Case::new("mixed dtypes", kernel(
            "mixed",
            &["a"],
            &["out"],
            "  uint i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < 33) out[i] = a[i] + a[i];\n",
        ), [33, 1, 1], [32, 1, 1])
    }
}

const INIT_SOURCE: &str = r#"
  uint i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 100) {
    atomicAdd(&total[0], a[i]);
    if (i % 2 == 0) evens[i] = 7;
  }
"#;

fn init(dev: &Device) -> Case {
    Case {
        inputs: vec![Input::Array(on(
            uniform(&[100], 0.0, 1.0, DType::F32, 8),
            dev,
        ))],
        outputs: vec![(vec![1], DType::F32), (vec![100], DType::I32)],
        init_value: Some(1.5),
        ..Case::new(
            "init_value",
            kernel("init", &["a"], &["total", "evens"], INIT_SOURCE),
            [100, 1, 1],
            [64, 1, 1],
        )
    }
}

/// 64 KiB of dynamic shared memory: above the 48 KiB default.
const SHARED_ELEMS: usize = 16384;

const SHARED_SOURCE: &str = r#"
  extern __shared__ float buf[];
  uint t = threadIdx.x;
  for (uint j = t; j < M; j += blockDim.x) buf[j] = a[j];
  __syncthreads();
  for (uint j = t; j < M; j += blockDim.x) out[j] = buf[M - 1 - j];
"#;

fn shared(dev: &Device) -> Case {
    Case {
        inputs: vec![Input::Array(on(
            uniform(&[SHARED_ELEMS], -1.0, 1.0, DType::F32, 9),
            dev,
        ))],
        outputs: vec![(vec![SHARED_ELEMS], DType::F32)],
        template: vec![("M".into(), TemplateArg::Int(SHARED_ELEMS as i32))],
        ..Case::new(
            "shared memory",
            CudaKernel::new(
                "reverse_shared",
                &["a"],
                &["out"],
                SHARED_SOURCE,
                "",
                true,
                SHARED_ELEMS * 4,
            )
            .unwrap(),
            [1024, 1, 1],
            [1024, 1, 1],
        )
    }
}

const COOP_SOURCE: &str = r#"
  auto block = cg::this_thread_block();
  auto warp = cg::tiled_partition<32>(block);
  uint i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < N ? __half2float(x[i]) : 0.0f;
  for (int o = 16; o > 0; o /= 2) v += warp.shfl_down(v, o);
  if (warp.thread_rank() == 0 && i < N) sums[i / 32] = __float2bfloat16(v);
"#;

fn coop(dev: &Device) -> Case {
    Case {
        inputs: vec![Input::Array(on(
            uniform(&[128], -1.0, 1.0, DType::F16, 10),
            dev,
        ))],
        outputs: vec![(vec![4], DType::BF16)],
        template: vec![("N".into(), TemplateArg::Int(128))],
        ..Case::new(
            "cooperative groups",
            kernel("warp_sums", &["x"], &["sums"], COOP_SOURCE),
            [128, 1, 1],
            [64, 1, 1],
        )
    }
}

/// Every case that compiles, with inputs on `dev` (the CPU for the compile check).
fn cases(dev: &Device) -> Vec<Case> {
    vec![
        basic(dev),
        args(dev),
        strides(dev, true),
        strides(dev, false),
        helper(dev),
        attributes(),
        same_name(dev, true),
        same_name(dev, false),
        mixed(dev, DType::F16),
        mixed(dev, DType::F32),
        mixed(dev, DType::BF16),
        init(dev),
        shared(dev),
        coop(dev),
    ]
}

// ----- without a GPU --------------------------------------------------------------------------

fn nvrtc_and_headers() -> bool {
    let probe = basic(&Device::Cpu);
    match probe.kernel.compile_check(&probe.call(), "sm_90") {
        Ok(()) => true,
        Err(Error::CudaUnavailable(m)) => {
            println!("skipping the NVRTC compile check: {m}");
            false
        }
        Err(e) => panic!("basic kernel failed to compile: {e}"),
    }
}

#[test]
fn every_test_kernel_compiles_through_nvrtc() {
    if !nvrtc_and_headers() {
        return;
    }
    let cases = cases(&Device::Cpu);
    // NVRTC compiles independent programs in parallel.
    std::thread::scope(|scope| {
        for arch in ["sm_80", "sm_90a"] {
            for case in &cases {
                scope.spawn(move || {
                    case.kernel
                        .compile_check(&case.call(), arch)
                        .unwrap_or_else(|e| panic!("{} ({arch}): {e}", case.name));
                });
            }
        }
    });
}

#[test]
fn compile_errors_point_into_the_users_source_and_header() {
    if !nvrtc_and_headers() {
        return;
    }
    let a = Array::scalar(1.0f32);
    let call = KernelCall::new([1, 1, 1], [1, 1, 1])
        .input(&a)
        .output(&[1], DType::F32);
    let k = kernel(
        "broken",
        &["a"],
        &["out"],
        "\n  float x = a[0];\n  out[0] = x + not_declared;\n",
    );
    match k.compile_check(&call, "sm_90") {
        Err(Error::Compile(m)) => {
            assert!(
                m.starts_with("[custom_kernel] Failed to compile kernel `custom_kernel_broken`"),
                "{m}"
            );
            assert!(m.contains("source(3)"), "{m}");
            assert!(m.contains("not_declared"), "{m}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    let k = CudaKernel::new(
        "broken_header",
        &["a"],
        &["out"],
        "  out[0] = helper(a[0]);\n",
        "float helper(float x) {\n  return x * missing;\n}\n",
        true,
        0,
    )
    .unwrap();
    match k.compile_check(&call, "sm_90") {
        Err(Error::Compile(m)) => assert!(m.contains("header(2)"), "{m}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn generated_source_has_mlx_shape() {
    let case = args(&Device::Cpu);
    let g = case.kernel.generate(&case.call()).unwrap();
    assert_eq!(g.kernel_name, "custom_kernel_arg_test_t_3_float16_t");
    let expected_signature = "__global__ void custom_kernel_arg_test_t_3_float16_t(\n    \
        const float* a,\n    \
        const int32_t* b,\n    \
        const __nv_bfloat16* c,\n    \
        const float* d,\n    \
        float* out1,\n    \
        int32_t* out2) {\n  \
        constexpr bool e = true;\n  \
        constexpr int f = 3;\n  \
        using T = __half;\n";
    assert!(g.source.contains(expected_signature), "{}", g.source);
    assert!(g.source.starts_with(
        "#include \"mlx/backend/cuda/device/utils.cuh\"\n#include <cooperative_groups.h>\n"
    ));
    assert!(g
        .source
        .contains("namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n"));
    assert!(g.source.ends_with("}\n\n} // namespace mlx::core::cu"));
    assert!(g.source.contains(ARGS_SOURCE.trim_start_matches('\n')));
    assert!(!g.source.contains("#line"));
    assert!(g.compiled_source.contains("#line 1 \"source\""));
    assert!(g.compiled_source.contains("#line 1 \"header\""));

    // Shape, strides and ndim only where the source mentions them, and never for 0-d inputs.
    let strided = strides(&Device::Cpu, false);
    let g = strided.kernel.generate(&strided.call()).unwrap();
    assert!(g.source.contains(
        "const float* inp,\n    const __grid_constant__ Shape inp_shape,\n    \
         const __grid_constant__ Strides inp_strides,\n    const __grid_constant__ int inp_ndim,\n    float* out)"
    ));
    assert_eq!(g.kernel_name, "custom_kernel_exp_strided_24");
    let k = kernel(
        "zero_d",
        &["s"],
        &["out"],
        "out[0] = s[0] + s_ndim + s_shape[0];",
    );
    let s = Array::scalar(2i32);
    let g = k
        .generate(
            &KernelCall::new([1, 1, 1], [1, 1, 1])
                .input(&s)
                .output(&[1], DType::I32),
        )
        .unwrap();
    assert!(
        g.source.contains("const int32_t* s,\n    int32_t* out)"),
        "{}",
        g.source
    );

    // Template suffixes: negative ints, false, dtypes.
    let call = KernelCall::new([1, 1, 1], [1, 1, 1])
        .input(&s)
        .output(&[1], DType::I32)
        .template_arg("n", -4)
        .template_arg("b", false)
        .template_arg("U", DType::BF16);
    let g = k.generate(&call).unwrap();
    assert_eq!(g.kernel_name, "custom_kernel_zero_d_n4_f_bfloat16_t");
    assert!(g.source.contains(
        "  constexpr int n = -4;\n  constexpr bool b = false;\n  using U = __nv_bfloat16;\n"
    ));
}

#[test]
fn verbose_prints_the_generated_source() {
    if std::env::var_os("FERROFAST_VERBOSE_CHILD").is_some() {
        let case = basic(&Device::Cpu);
        let call = case.call().verbose(true);
        // The source is printed before anything touches a device; the call itself may fail
        // on a machine without one.
        // SAFETY: the basic kernel stays inside its buffers.
        let _ = unsafe { case.kernel.call(&call) };
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "verbose_prints_the_generated_source",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FERROFAST_VERBOSE_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let case = basic(&Device::Cpu);
    let g = case.kernel.generate(&case.call()).unwrap();
    let expected = format!(
        "Generated source code for `custom_kernel_basic`:\n```\n{}\n```\n",
        g.source
    );
    assert!(stdout.contains(&expected), "{stdout}");
}

#[test]
fn factory_and_call_errors_use_mlx_messages() {
    let no_outputs = CudaKernel::new("k", &["a"], &[], "", "", true, 0).unwrap_err();
    assert_eq!(
        no_outputs.to_string(),
        "[custom_kernel] Must specify at least one output."
    );
    assert!(CudaKernel::new("bad name", &["a"], &["o"], "", "", true, 0).is_err());
    assert!(CudaKernel::new("k", &["a"], &["a"], "", "", true, 0).is_err());
    assert!(CudaKernel::new("k", &["1a"], &["o"], "", "", true, 0).is_err());

    let case = basic(&Device::Cpu);
    let mut call = case.call();
    call.inputs.push(KernelInput::Int(1));
    // SAFETY: rejected before any launch.
    let e = unsafe { case.kernel.call(&call) }.unwrap_err();
    assert_eq!(
        e.to_string(),
        "[custom_kernel] Expected `inputs` to have size 1 but got size 2.\n"
    );
    let mut call = case.call();
    call.output_dtypes.push(DType::F32);
    // SAFETY: rejected before any launch.
    let e = unsafe { case.kernel.call(&call) }.unwrap_err();
    assert_eq!(
        e.to_string(),
        "[custom_kernel] Expected `output_dtypes` to have size 1 but got size 2.\n"
    );
    // SAFETY: rejected before any launch.
    let e = unsafe { case.kernel.call(&case.call().on_device(Device::Cpu)) }.unwrap_err();
    assert_eq!(e.to_string(), "[custom_kernel] Only supports the GPU.");
    let mut call = case.call();
    call.threadgroup = [0, 1, 1];
    // SAFETY: rejected before any launch.
    assert!(matches!(
        unsafe { case.kernel.call(&call) },
        Err(Error::InvalidArgument(_))
    ));
    let call = case.call().template_arg("a", 1);
    assert!(
        case.kernel.generate(&call).is_err(),
        "template named like an input"
    );
    let call = case.call().template_arg("not valid", 1);
    assert!(case.kernel.generate(&call).is_err());
}

// ----- on a GPU -------------------------------------------------------------------------------

fn f32s(a: &Array) -> Vec<f32> {
    a.astype(DType::F32).unwrap().to_vec::<f32>().unwrap()
}

gpu_test! {
    fn basic_copy_from_cpu_and_gpu_inputs(dev: Device) {
        for d in [Device::Cpu, dev] {
            let case = basic(&d);
            let out = case.run();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].device(), dev);
            assert_eq!(
                out[0].to_vec::<f32>().unwrap(),
                case.array(0).to_vec::<f32>().unwrap()
            );
        }
    }

    fn args_template_and_scalars(dev: Device) {
        let case = args(&dev);
        let out = case.run();
        let a = f32s(case.array(0));
        let c = f32s(case.array(2));
        let d = 7.3f32;
        let one = a[1] + 5.0 + c[3] + d + 3.0;
        let two = (a[1] + 5.0 + c[1] - d) as i32;
        assert_eq!(out[0].shape(), &[3, 2]);
        assert_eq!(out[0].dtype(), DType::F32);
        for v in out[0].to_vec::<f32>().unwrap() {
            assert!((v - one).abs() <= 1e-5 * one.abs(), "{v} vs {one}");
        }
        assert_eq!(out[1].to_vec::<i32>().unwrap(), vec![two; 6]);
    }

    fn strides_with_and_without_row_contiguous_copies(dev: Device) {
        for contiguous in [true, false] {
            let case = strides(&dev, contiguous);
            let out = case.run();
            let x = case.array(0).to_f64_vec().unwrap();
            let expected: Vec<f32> = x.iter().map(|&v| (v as f32).exp() * 32.0).collect();
            let expected = Array::from_vec(expected, case.array(0).shape()).unwrap();
            check_close(&out[0], &expected, 1e-5, 1e-5, case.name);
        }
    }

    fn helper_header(dev: Device) {
        let case = helper(&dev);
        let out = case.run();
        let x = f32s(case.array(0));
        let expected = Array::from_vec(x.iter().map(|v| v.exp()).collect(), &[5, 7]).unwrap();
        check_close(&out[0], &expected, 1e-6, 1e-6, "helper");
    }

    fn attributes_block_dim(_dev: Device) {
        let out = attributes().run();
        assert_eq!(out[0].to_vec::<u32>().unwrap(), vec![2]);
    }

    fn same_name_different_source_in_one_batch_and_across_calls(dev: Device) {
        let add = same_name(&dev, true);
        let mul = same_name(&dev, false);
        let x = f32s(add.array(0));
        let plus: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        let times: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        // Both queued before either is read (MLX's "one eval").
        let (a, m) = (add.run(), mul.run());
        assert_eq!(a[0].to_vec::<f32>().unwrap(), plus);
        assert_eq!(m[0].to_vec::<f32>().unwrap(), times);
        // Across calls, alternating.
        for _ in 0..2 {
            assert_eq!(mul.run()[0].to_vec::<f32>().unwrap(), times);
            assert_eq!(add.run()[0].to_vec::<f32>().unwrap(), plus);
        }
    }

    fn mixed_dtypes_share_a_name(dev: Device) {
        let cases = [
            mixed(&dev, DType::F16),
            mixed(&dev, DType::F32),
            mixed(&dev, DType::BF16),
        ];
        let outs: Vec<Vec<Array>> = cases.iter().map(|c| c.run()).collect();
        for (case, out) in cases.iter().zip(&outs) {
            let x = case.array(0).to_f64_vec().unwrap();
            let dtype = case.array(0).dtype();
            assert_eq!(out[0].dtype(), dtype);
            let got = out[0].to_f64_vec().unwrap();
            let expected: Vec<f64> = x
                .iter()
                .map(|&v| match dtype {
                    DType::F16 => f16::from_f64(2.0 * v).to_f64(),
                    DType::BF16 => bf16::from_f64(2.0 * v).to_f64(),
                    _ => (2.0 * v as f32) as f64,
                })
                .collect();
            assert_eq!(got, expected, "{dtype}");
        }
    }

    fn init_value_fills_outputs_cast_to_their_dtype(dev: Device) {
        let case = init(&dev);
        let out = case.run();
        let a = f32s(case.array(0));
        let total: f32 = 1.5 + a.iter().sum::<f32>();
        let got = out[0].to_vec::<f32>().unwrap()[0];
        assert!((got - total).abs() < 1e-3, "{got} vs {total}");
        let evens = out[1].to_vec::<i32>().unwrap();
        for (i, v) in evens.iter().enumerate() {
            assert_eq!(*v, if i % 2 == 0 { 7 } else { 1 }, "element {i}");
        }
    }

    fn shared_memory_above_48_kib(dev: Device) {
        let case = shared(&dev);
        let out = case.run();
        let mut x = case.array(0).to_vec::<f32>().unwrap();
        x.reverse();
        assert_eq!(out[0].to_vec::<f32>().unwrap(), x);
    }

    fn cooperative_groups_and_half_types(dev: Device) {
        let case = coop(&dev);
        let out = case.run();
        let x = f32s(case.array(0));
        let expected: Vec<f64> = x
            .chunks(32)
            .map(|c| bf16::from_f32(c.iter().sum::<f32>()).to_f64())
            .collect();
        let expected = Array::from_vec(expected, &[4]).unwrap();
        check_close(&out[0], &expected, 1e-2, 1e-2, "warp sums");
    }

    fn runs_on_the_given_stream(dev: Device) {
        let stream = Stream::new(&dev).unwrap();
        let case = basic(&dev);
        let call = case.call().on_stream(&stream);
        // SAFETY: the basic kernel stays inside its buffers.
        let out = unsafe { case.kernel.call(&call) }.unwrap();
        assert_eq!(out[0].stream(), Some(stream));
        assert_eq!(
            out[0].to_vec::<f32>().unwrap(),
            case.array(0).to_vec::<f32>().unwrap()
        );
    }

    fn gpu_errors_are_checked_before_launch(dev: Device) {
        let case = basic(&dev);

        let mut call = case.call();
        call.threadgroup = [1024, 2, 1];
        call.grid = [1024, 2, 1];
        // SAFETY: rejected before the launch.
        let e = unsafe { case.kernel.call(&call) }.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Thread group size (2048) is greater than"),
            "{e}"
        );

        let big = CudaKernel::new(
            "big_shared",
            &["a"],
            &["out1"],
            "out1[0] = a[0];",
            "",
            true,
            1 << 30,
        )
        .unwrap();
        // SAFETY: rejected before the launch.
        let e = unsafe { big.call(&case.call()) }.unwrap_err();
        assert!(e.to_string().contains("dynamic shared memory"), "{e}");

        let deep = Array::ones(&[1; 11], DType::F32, &dev).unwrap();
        let k = kernel("deep", &["x"], &["out"], "out[0] = x[0] + x_ndim;");
        let call = KernelCall::new([1, 1, 1], [1, 1, 1])
            .input(&deep)
            .output(&[1], DType::F32);
        // SAFETY: rejected before the launch.
        let e = unsafe { k.call(&call) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            "[custom_kernel] ndim can not be larger than 10."
        );

        let broken = kernel("broken_gpu", &["a"], &["out1"], "\n\n  out1[0] = a[0] +;\n");
        // SAFETY: fails to compile.
        match unsafe { broken.call(&case.call()) } {
            Err(Error::Compile(m)) => assert!(m.contains("source(3)"), "{m}"),
            other => panic!("expected a compile error, got {other:?}"),
        }
    }
}
