//! `fast::precompiled_cuda_kernel`: CUBIN (compiled here through NVRTC with
//! `fast::compile_to_cubin`) and PTX images, scalar arguments, the launch rules and errors.
//! GPU tests print a line and pass without a CUDA device.
#![cfg(feature = "cuda")]

#[macro_use]
mod common;

use common::{gpu, uniform};
use ferrofast::fast::{
    compile_to_cubin, cuda_architecture, precompiled_cuda_kernel, KernelCall, ScalarArg,
};
use ferrofast::{Array, DType, Device, Error};

/// `y = sign * (a * x + b)` over n elements, with scalars after the outputs.
const AXPB: &str = r#"
extern "C" __global__ void axpb(const float* x, float* y, float a, int b, bool negate, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = a * x[i] + (float)b;
        y[i] = negate ? -v : v;
    }
}
"#;

/// A templated C++ kernel: its symbol is mangled.
const SCALE: &str = r#"
template <typename T>
__global__ void scale(const T* x, T* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * T(3);
}
"#;

fn axpb_expected(x: &[f32], a: f32, b: i32, negate: bool) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            // The GPU fuses the multiply and add into one rounding.
            let r = a.mul_add(v, b as f32);
            if negate {
                -r
            } else {
                r
            }
        })
        .collect()
}

fn call_axpb(image: &[u8], x: &Array, a: f32, b: i32, negate: bool) -> Vec<Array> {
    let n = x.size();
    let call = KernelCall::new([n, 1, 1], [128, 1, 1])
        .input(x)
        .output(x.shape(), DType::F32);
    let scalars = [
        ScalarArg::Float(a),
        ScalarArg::Int(b),
        ScalarArg::Bool(negate),
        ScalarArg::Int(n as i32),
    ];
    // SAFETY: `axpb` takes one input, one output, then (float, int, bool, int), and
    // bounds-checks with n.
    unsafe { precompiled_cuda_kernel("axpb", image, &call, &scalars, 0, false) }.unwrap()
}

#[test]
fn cubin_compiles_without_a_gpu() {
    match compile_to_cubin(SCALE, "scale<float>", "sm_90", &[]) {
        Ok(c) => {
            assert!(c.image.starts_with(b"\x7fELF"));
            assert!(c.symbol.contains("scale"), "{}", c.symbol);
            assert_ne!(c.symbol, "scale", "a template instantiation is mangled");
        }
        Err(Error::CudaUnavailable(m)) => println!("skipping: {m}"),
        Err(e) => panic!("{e}"),
    }
    if let Err(e) = compile_to_cubin("__global__ void k() { oops; }", "k", "sm_90", &[]) {
        assert!(
            matches!(&e, Error::Compile(m) if m.contains("oops"))
                || matches!(e, Error::CudaUnavailable(_)),
            "{e}"
        );
    } else {
        panic!("a broken source compiled");
    }
}

gpu_test! {
    fn cubin_with_scalars(dev: Device) {
        let arch = cuda_architecture(&dev).unwrap();
        let cubin = compile_to_cubin(AXPB, "axpb", &arch, &[]).unwrap();
        assert_eq!(cubin.symbol, "axpb");
        let x = uniform(&[1000], -2.0, 2.0, DType::F32, 21)
            .to_device(&dev)
            .unwrap();
        let xs = x.to_vec::<f32>().unwrap();
        for (a, b, negate) in [(1.5f32, 2, false), (-0.25, -7, true)] {
            let out = call_axpb(&cubin.image, &x, a, b, negate);
            assert_eq!(
                out[0].to_vec::<f32>().unwrap(),
                axpb_expected(&xs, a, b, negate)
            );
        }
    }

    fn ptx_image_and_mangled_symbol(dev: Device) {
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(
            SCALE.to_string() + "template __global__ void scale<float>(const float*, float*, int);\n",
            cudarc::nvrtc::CompileOptions {
                arch: Some("compute_80"),
                ..Default::default()
            },
        )
        .unwrap();
        let text = ptx.to_src();
        let symbol = text
            .lines()
            .find_map(|l| l.split_once(".entry ").map(|(_, rest)| rest))
            .map(|rest| rest.trim_end_matches('(').trim().to_string())
            .unwrap_or_else(|| panic!("no .entry in the PTX:\n{text}"));
        // Template instantiations are weak symbols, and mangled.
        assert_eq!(symbol, "_Z5scaleIfEvPKT_PS0_i");
        let x = uniform(&[33, 5], -1.0, 1.0, DType::F32, 22)
            .to_device(&dev)
            .unwrap();
        let n = x.size();
        // A transposed view, made row-contiguous first.
        let xt = x.transpose(&[1, 0]).unwrap();
        let call = KernelCall::new([n, 1, 1], [64, 1, 1])
            .input(&xt)
            .output(xt.shape(), DType::F32);
        // SAFETY: scale<float>(const float*, float*, int) bounds-checks with n.
        let out = unsafe {
            precompiled_cuda_kernel(
                &symbol,
                text.as_bytes(),
                &call,
                &[ScalarArg::Int(n as i32)],
                0,
                true,
            )
        }
        .unwrap();
        let expected: Vec<f32> = xt
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v * 3.0)
            .collect();
        assert_eq!(out[0].to_vec::<f32>().unwrap(), expected);
    }

    fn init_value_and_shared_memory(dev: Device) {
        let arch = cuda_architecture(&dev).unwrap();
        let src = r#"
    extern "C" __global__ void block_sums(const float* x, float* sums, int n) {
        extern __shared__ float buf[];
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        buf[threadIdx.x] = i < n ? x[i] : 0.0f;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = 0.0f;
            for (int j = 0; j < blockDim.x; ++j) s += buf[j];
            atomicAdd(&sums[0], s);
        }
    }
    "#;
        let cubin = compile_to_cubin(src, "block_sums", &arch, &[]).unwrap();
        let x = uniform(&[5000], 0.0, 1.0, DType::F32, 23)
            .to_device(&dev)
            .unwrap();
        let call = KernelCall::new([5000, 1, 1], [256, 1, 1])
            .input(&x)
            .output(&[1], DType::F32)
            .init_value(10.0);
        // SAFETY: one input, one output, one int; 256 floats of shared memory per block (more
        // is requested, to exercise the limit above 48 KiB).
        let out = unsafe {
            precompiled_cuda_kernel(
                "block_sums",
                &cubin.image,
                &call,
                &[ScalarArg::Int(5000)],
                64 * 1024,
                false,
            )
        }
        .unwrap();
        let total: f32 = 10.0 + x.to_vec::<f32>().unwrap().iter().sum::<f32>();
        let got = out[0].to_vec::<f32>().unwrap()[0];
        assert!((got - total).abs() < 1e-2, "{got} vs {total}");
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn errors() {
    let x = uniform(&[4], 0.0, 1.0, DType::F32, 24);
    let call = KernelCall::new([4, 1, 1], [4, 1, 1])
        .input(&x)
        .output(&[4], DType::F32);
    // SAFETY: every call below is rejected before a launch.
    unsafe {
        let e = precompiled_cuda_kernel("k", b"", &call, &[], 0, false).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e =
            precompiled_cuda_kernel("k", b"x", &call.clone().template_arg("T", 1), &[], 0, false)
                .unwrap_err();
        assert!(e.to_string().contains("template"), "{e}");
        let mut bad = call.clone();
        bad.output_dtypes.push(DType::F32);
        let e = precompiled_cuda_kernel("k", b"x", &bad, &[], 0, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[precompiled_cuda_kernel] Expected `output_dtypes` to have size 1 but got size 2.\n"
        );
        let e = precompiled_cuda_kernel(
            "k",
            b"x",
            &call.clone().on_device(Device::Cpu),
            &[],
            0,
            false,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "[precompiled_cuda_kernel] Only supports the GPU."
        );
    }
    let Some(dev) = gpu() else { return };
    let arch = cuda_architecture(&dev).unwrap();
    let cubin = compile_to_cubin(AXPB, "axpb", &arch, &[]).unwrap();
    // SAFETY: rejected before a launch (no such symbol; image not loadable; too many
    // threads per block).
    unsafe {
        let e = precompiled_cuda_kernel("nope", &cubin.image, &call, &[], 0, false).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = precompiled_cuda_kernel("axpb", b"not an image", &call, &[], 0, false).unwrap_err();
        assert!(matches!(e, Error::Cuda(_)), "{e}");
        let mut wide = call.clone();
        wide.grid = [1024, 2, 1];
        wide.threadgroup = [1024, 2, 1];
        let e = precompiled_cuda_kernel("axpb", &cubin.image, &wide, &[], 0, false).unwrap_err();
        assert!(e.to_string().starts_with("Thread group size (2048)"), "{e}");
    }
}
