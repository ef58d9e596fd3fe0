//! MLX's custom Metal kernel guide, run on an NVIDIA GPU: the element-wise `exp` kernel, the
//! bilinear `grid_sample` forward kernel and its backward pass with atomic outputs, each
//! Metal source exactly as the guide writes it, checked against a CPU computation.
//!
//! `cargo run --release --example metal_kernel` (needs a CUDA GPU; says so and exits
//! without one).

use ferrofast::fast::{KernelCall, MathMode, MetalKernel};
use ferrofast::{Array, DType, Device, Error};

const EXP_SOURCE: &str = "
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
";

const GRID_SAMPLE_SOURCE: &str = "
    uint elem = thread_position_in_grid.x;
    int H = x_shape[1];
    int W = x_shape[2];
    int C = x_shape[3];
    int gH = grid_shape[1];
    int gW = grid_shape[2];

    int w_stride = C;
    int h_stride = W * w_stride;
    int b_stride = H * h_stride;

    uint grid_idx = elem / C * 2;
    float ix = ((grid[grid_idx] + 1) * W - 1) / 2;
    float iy = ((grid[grid_idx + 1] + 1) * H - 1) / 2;

    int ix_nw = floor(ix);
    int iy_nw = floor(iy);

    int ix_ne = ix_nw + 1;
    int iy_ne = iy_nw;

    int ix_sw = ix_nw;
    int iy_sw = iy_nw + 1;

    int ix_se = ix_nw + 1;
    int iy_se = iy_nw + 1;

    T nw = (ix_se - ix)    * (iy_se - iy);
    T ne = (ix    - ix_sw) * (iy_sw - iy);
    T sw = (ix_ne - ix)    * (iy    - iy_ne);
    T se = (ix    - ix_nw) * (iy    - iy_nw);

    int batch_idx = elem / C / gH / gW * b_stride;
    int channel_idx = elem % C;
    int base_idx = batch_idx + channel_idx;

    T I_nw = x[base_idx + iy_nw * h_stride + ix_nw * w_stride];
    T I_ne = x[base_idx + iy_ne * h_stride + ix_ne * w_stride];
    T I_sw = x[base_idx + iy_sw * h_stride + ix_sw * w_stride];
    T I_se = x[base_idx + iy_se * h_stride + ix_se * w_stride];

    I_nw = iy_nw >= 0 && iy_nw <= H - 1 && ix_nw >= 0 && ix_nw <= W - 1 ? I_nw : 0;
    I_ne = iy_ne >= 0 && iy_ne <= H - 1 && ix_ne >= 0 && ix_ne <= W - 1 ? I_ne : 0;
    I_sw = iy_sw >= 0 && iy_sw <= H - 1 && ix_sw >= 0 && ix_sw <= W - 1 ? I_sw : 0;
    I_se = iy_se >= 0 && iy_se <= H - 1 && ix_se >= 0 && ix_se <= W - 1 ? I_se : 0;

    out[elem] = nw * I_nw + ne * I_ne + sw * I_sw + se * I_se;
";

const GRID_SAMPLE_GRAD_SOURCE: &str = "
    uint elem = thread_position_in_grid.x;
    int H = x_shape[1];
    int W = x_shape[2];
    int C = x_shape[3];
    // Pad C to the nearest larger simdgroup size multiple
    int C_padded = ceildiv(C, threads_per_simdgroup) * threads_per_simdgroup;

    int gH = grid_shape[1];
    int gW = grid_shape[2];

    int w_stride = C;
    int h_stride = W * w_stride;
    int b_stride = H * h_stride;

    uint grid_idx = elem / C_padded * 2;
    float ix = ((grid[grid_idx] + 1) * W - 1) / 2;
    float iy = ((grid[grid_idx + 1] + 1) * H - 1) / 2;

    int ix_nw = floor(ix);
    int iy_nw = floor(iy);

    int ix_ne = ix_nw + 1;
    int iy_ne = iy_nw;

    int ix_sw = ix_nw;
    int iy_sw = iy_nw + 1;

    int ix_se = ix_nw + 1;
    int iy_se = iy_nw + 1;

    T nw = (ix_se - ix)    * (iy_se - iy);
    T ne = (ix    - ix_sw) * (iy_sw - iy);
    T sw = (ix_ne - ix)    * (iy    - iy_ne);
    T se = (ix    - ix_nw) * (iy    - iy_nw);

    int batch_idx = elem / C_padded / gH / gW * b_stride;
    int channel_idx = elem % C_padded;
    int base_idx = batch_idx + channel_idx;

    T gix = T(0);
    T giy = T(0);
    if (channel_idx < C) {
        int cot_index = elem / C_padded * C + channel_idx;
        T cot = cotangent[cot_index];
        if (iy_nw >= 0 && iy_nw <= H - 1 && ix_nw >= 0 && ix_nw <= W - 1) {
            int offset = base_idx + iy_nw * h_stride + ix_nw * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], nw * cot, memory_order_relaxed);

            T I_nw = x[offset];
            gix -= I_nw * (iy_se - iy) * cot;
            giy -= I_nw * (ix_se - ix) * cot;
        }
        if (iy_ne >= 0 && iy_ne <= H - 1 && ix_ne >= 0 && ix_ne <= W - 1) {
            int offset = base_idx + iy_ne * h_stride + ix_ne * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], ne * cot, memory_order_relaxed);

            T I_ne = x[offset];
            gix += I_ne * (iy_sw - iy) * cot;
            giy -= I_ne * (ix - ix_sw) * cot;
        }
        if (iy_sw >= 0 && iy_sw <= H - 1 && ix_sw >= 0 && ix_sw <= W - 1) {
            int offset = base_idx + iy_sw * h_stride + ix_sw * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], sw * cot, memory_order_relaxed);

            T I_sw = x[offset];
            gix -= I_sw * (iy - iy_ne) * cot;
            giy += I_sw * (ix_ne - ix) * cot;
        }
        if (iy_se >= 0 && iy_se <= H - 1 && ix_se >= 0 && ix_se <= W - 1) {
            int offset = base_idx + iy_se * h_stride + ix_se * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], se * cot, memory_order_relaxed);

            T I_se = x[offset];
            gix += I_se * (iy - iy_nw) * cot;
            giy += I_se * (ix - ix_nw) * cot;
        }
    }

    T gix_mult = W / 2;
    T giy_mult = H / 2;

    // Reduce across each simdgroup first.
    // This is much faster than relying purely on atomics.
    gix = simd_sum(gix);
    giy = simd_sum(giy);

    if (thread_index_in_simdgroup == 0) {
        atomic_fetch_add_explicit(&grid_grad[grid_idx], gix * gix_mult, memory_order_relaxed);
        atomic_fetch_add_explicit(&grid_grad[grid_idx + 1], giy * giy_mult, memory_order_relaxed);
    }
";

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

    let backward = MetalKernel::new(
        "grid_sample_grad",
        &["x", "grid", "cotangent"],
        &["x_grad", "grid_grad"],
        GRID_SAMPLE_GRAD_SOURCE,
        "",
        true,
        true,
        MathMode::Safe,
    )?;
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
