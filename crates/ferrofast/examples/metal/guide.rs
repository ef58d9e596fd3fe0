//! Kernels of MLX's custom Metal kernel guide built the way the guide builds them, and the CPU
//! computation they are checked against, shared by `examples/metal_kernel.rs` and
//! `tests/metal_kernel.rs` (each includes this file).

use ferrofast::fast::{MathMode, MetalKernel};

/// The guide's `grid_sample` backward (`grid_sample_vjp.metal`): inputs `x`, `grid` and
/// `cotangent`, outputs `x_grad` and `grid_grad`, row-contiguous inputs, atomic outputs.
pub fn grid_sample_grad() -> ferrofast::Result<MetalKernel> {
    MetalKernel::new(
        "grid_sample_grad",
        &["x", "grid", "cotangent"],
        &["x_grad", "grid_grad"],
        include_str!("grid_sample_vjp.metal"),
        "",
        true,
        true,
        MathMode::Safe,
    )
}

/// Bilinear grid_sample (zero padding) of `x` `(B, H, W, C)` at `grid` `(B, gN, gM, 2)`, and
/// the gradients of `sum(out * cot)` (the grid gradient with the kernel's integer `W / 2`,
/// `H / 2` factors).
pub fn grid_sample_cpu(
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
