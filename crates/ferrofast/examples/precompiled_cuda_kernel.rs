//! A precompiled kernel (MLX's `mx.fast.precompiled_cuda_kernel`): compile a kernel to CUBIN
//! for this GPU with NVRTC (any tool that makes PTX or CUBIN would do: Triton, CuTe DSL,
//! nvcc), then launch the image with scalar arguments.
//!
//! Run with `cargo run --example precompiled_cuda_kernel`. Needs a CUDA GPU and libnvrtc;
//! without them it says what is missing.

#[cfg(feature = "cuda")]
fn main() -> Result<(), ferrofast::Error> {
    use ferrofast::fast::{compile_to_cubin, cuda_architecture, precompiled_cuda_kernel};
    use ferrofast::fast::{KernelCall, ScalarArg};
    use ferrofast::{Array, DType, Device};

    const SOURCE: &str = r#"
extern "C" __global__ void saxpy(const float* x, const float* y, float* out, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + y[i];
}
"#;

    let gpu = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("This example needs a CUDA GPU: {e}");
            return Ok(());
        }
    };
    let arch = cuda_architecture(&gpu)?;
    let cubin = match compile_to_cubin(SOURCE, "saxpy", &arch, &[]) {
        Ok(c) => c,
        Err(e) => {
            println!("NVRTC could not compile the kernel: {e}");
            return Ok(());
        }
    };
    println!(
        "compiled `{}` to {} bytes of CUBIN for {arch}",
        cubin.symbol,
        cubin.image.len()
    );

    let n = 1 << 20;
    let x = Array::randn(&[n], DType::F32, 1, &gpu)?;
    let y = Array::randn(&[n], DType::F32, 2, &gpu)?;
    let a = 0.5f32;
    let call = KernelCall::new([n, 1, 1], [256, 1, 1])
        .input(&x)
        .input(&y)
        .output(&[n], DType::F32);
    // SAFETY: saxpy takes (x, y, out, float, int) in that order, bounds-checks with n and
    // writes only `out`.
    let out = unsafe {
        precompiled_cuda_kernel(
            &cubin.symbol,
            &cubin.image,
            &call,
            &[ScalarArg::Float(a), ScalarArg::Int(n as i32)],
            0,
            false,
        )
    }?;
    let (xs, ys, got) = (
        x.to_vec::<f32>()?,
        y.to_vec::<f32>()?,
        out[0].to_vec::<f32>()?,
    );
    // The GPU fuses `a * x + y` into one rounding, as `mul_add` does.
    let mismatches = (0..n)
        .filter(|&i| got[i] != a.mul_add(xs[i], ys[i]))
        .count();
    println!("saxpy over {n} elements on {gpu}: {mismatches} mismatches");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("This example needs ferrofast's `cuda` feature.");
}
