//! MLX's custom Metal kernel guide, run on an NVIDIA GPU: the element-wise `exp` kernel, the
//! bilinear `grid_sample` forward kernel and its backward pass with atomic outputs, each
//! Metal source exactly as the guide writes it (`examples/metal/*.metal`, which the tests
//! include too), checked against a CPU computation.
//!
//! `cargo run --release --example metal_kernel` (needs a CUDA GPU; says so and exits
//! without one).

#[path = "metal/guide.rs"]
mod guide;

use ferrofast::fast::{KernelCall, MathMode, MetalKernel};
use ferrofast::{Array, DType, Device, Error};

const EXP_SOURCE: &str = include_str!("metal/exp.metal");

const GRID_SAMPLE_SOURCE: &str = include_str!("metal/grid_sample.metal");

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn run(gpu: Device) -> Result<(), Error> {
    // Element-wise exp of an f16 array, computed in f32 (T = float).
    let exp_kernel = MetalKernel::new(
        "myexp",
        &["inp"],
        &["out"],
        EXP_SOURCE,
        "",
        true,
        false,
        MathMode::Safe,
    )?;
    let a = Array::randn(&[4, 16], DType::F16, 0, &gpu)?;
    let call = KernelCall::new([a.size(), 1, 1], [256, 1, 1])
        .input(&a)
        .template_arg("T", DType::F32)
        .output(a.shape(), a.dtype())
        .verbose(true);
    // SAFETY: the kernel reads inp[elem] and writes out[elem] for elem < a.size().
    let out = unsafe { exp_kernel.call(&call) }?.remove(0);
    let expect: Vec<f64> = a.to_f64_vec()?.iter().map(|v| v.exp()).collect();
    println!(
        "exp: max |gpu - cpu| = {:.2e} (f16)",
        max_diff(&out.to_f64_vec()?, &expect)
    );

    // grid_sample forward and backward.
    let (x_shape, g_shape) = ([2, 32, 48, 8], [2, 20, 24, 2]);
    let x = Array::randn(&x_shape, DType::F32, 1, &gpu)?;
    // The guide's forward kernel reads all four corners before masking those outside the
    // image: Metal tolerates that out-of-bounds read, CUDA faults on it. So the sampling
    // points stay where every corner is inside the image (|g| < 1 - 1/W).
    let grid = Array::uniform(&g_shape, -0.9, 0.9, DType::F32, 2, &gpu)?;
    let out_shape = [2, 20, 24, 8];
    let cot = Array::randn(&out_shape, DType::F32, 3, &gpu)?;
    let forward = MetalKernel::new(
        "grid_sample",
        &["x", "grid"],
        &["out"],
        GRID_SAMPLE_SOURCE,
        "",
        true,
        false,
        MathMode::Safe,
    )?;
    let call = KernelCall::new([out_shape.iter().product(), 1, 1], [256, 1, 1])
        .input(&x)
        .input(&grid)
        .template_arg("T", DType::F32)
        .output(&out_shape, DType::F32);
    // SAFETY: every index the kernel forms is checked against the shapes it reads.
    let out = unsafe { forward.call(&call) }?.remove(0);

    let backward = guide::grid_sample_grad()?;
    let c_padded = x_shape[3].div_ceil(32) * 32;
    let call = KernelCall::new([2 * 20 * 24 * c_padded, 1, 1], [256, 1, 1])
        .input(&x)
        .input(&grid)
        .input(&cot)
        .template_arg("T", DType::F32)
        .output(&x_shape, DType::F32)
        .output(&g_shape, DType::F32)
        .init_value(0.0);
    // SAFETY: as above; the atomic updates stay inside x_grad and grid_grad.
    let grads = unsafe { backward.call(&call) }?;

    let (ref_out, ref_xg, ref_gg) = guide::grid_sample_cpu(
        &x.to_f64_vec()?,
        &x_shape,
        &grid.to_f64_vec()?,
        &g_shape,
        &cot.to_f64_vec()?,
    );
    println!(
        "grid_sample: max |gpu - cpu| = {:.2e}",
        max_diff(&out.to_f64_vec()?, &ref_out)
    );
    println!(
        "grid_sample backward: x_grad {:.2e}, grid_grad {:.2e}",
        max_diff(&grads[0].to_f64_vec()?, &ref_xg),
        max_diff(&grads[1].to_f64_vec()?, &ref_gg)
    );
    Ok(())
}

fn main() {
    let gpu = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("This example runs Metal kernels on an NVIDIA GPU, and none is usable: {e}");
            return;
        }
    };
    if let Err(e) = run(gpu) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
