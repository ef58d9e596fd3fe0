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

/// Bilinear grid_sample (zero padding) of `x` `(B, H, W, C)` at `grid` `(B, gN, gM, 2)`, and
/// the gradients of `sum(out * cot)` (the grid gradient with the kernel's integer `W / 2`,
/// `H / 2` factors).
fn grid_sample_cpu(
    x: &[f64],
    xs: &[usize],
    grid: &[f64],
    gs: &[usize],
    cot: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, h, w, c) = (xs[0], xs[1], xs[2], xs[3]);
    let (gn, gm) = (gs[1], gs[2]);
    let mut out = vec![0.0; b * gn * gm * c];
    let mut xg = vec![0.0; x.len()];
    let mut gg = vec![0.0; grid.len()];
    for q in 0..b * gn * gm {
        let bi = q / (gn * gm);
        let ix = ((grid[2 * q] + 1.0) * w as f64 - 1.0) / 2.0;
        let iy = ((grid[2 * q + 1] + 1.0) * h as f64 - 1.0) / 2.0;
        let (x0, y0) = (ix.floor() as i64, iy.floor() as i64);
        let (x1, y1) = (x0 + 1, y0 + 1);
        let (fx0, fy0, fx1, fy1) = (x0 as f64, y0 as f64, x1 as f64, y1 as f64);
        // (row, column, weight, d weight / d ix, d weight / d iy)
        let corners = [
            (y0, x0, (fx1 - ix) * (fy1 - iy), -(fy1 - iy), -(fx1 - ix)),
            (y0, x1, (ix - fx0) * (fy1 - iy), fy1 - iy, -(ix - fx0)),
            (y1, x0, (fx1 - ix) * (iy - fy0), -(iy - fy0), fx1 - ix),
            (y1, x1, (ix - fx0) * (iy - fy0), iy - fy0, ix - fx0),
        ];
        let (mut gix, mut giy) = (0.0, 0.0);
        for ch in 0..c {
            let ct = cot[q * c + ch];
            for &(yy, xx, wgt, dx, dy) in &corners {
                if yy < 0 || yy >= h as i64 || xx < 0 || xx >= w as i64 {
                    continue;
                }
                let off = ((bi * h + yy as usize) * w + xx as usize) * c + ch;
                out[q * c + ch] += wgt * x[off];
                xg[off] += wgt * ct;
                gix += x[off] * dx * ct;
                giy += x[off] * dy * ct;
            }
        }
        gg[2 * q] = gix * (w / 2) as f64;
        gg[2 * q + 1] = giy * (h / 2) as f64;
    }
    (out, xg, gg)
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

    let (ref_out, ref_xg, ref_gg) = grid_sample_cpu(
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
