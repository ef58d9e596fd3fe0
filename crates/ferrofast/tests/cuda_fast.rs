//! The public `fast` ops with inputs on a CUDA device: dispatch, dtype promotion and results
//! against the float64 oracle and the CPU path. Without a CUDA device each test prints a
//! line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use common::check_close;
use ferrofast::{fast, reference, Array, DType, Device};

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (5e-3, 5e-3),
        _ => (5e-2, 5e-2),
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn norms_dispatch_to_the_gpu_with_mlx_promotion() {
    let Some(dev) = gpu() else { return };
    let cases = [
        (DType::F32, DType::F32, DType::F32),
        (DType::F16, DType::F16, DType::F16),
        (DType::BF16, DType::BF16, DType::BF16),
        (DType::BF16, DType::F16, DType::F32),
        (DType::F16, DType::F32, DType::F32),
    ];
    for (seed, &(xd, wd, out)) in cases.iter().enumerate() {
        for &d in &[1usize, 33, 4096, 4099] {
            let seed = seed as u64 * 100 + d as u64;
            let x = common::randn(&[3, 5, d], xd, seed);
            let w = common::uniform(&[d], 0.5, 1.5, wd, seed + 1);
            let b = common::randn(&[d], wd, seed + 2);
            let (xg, wg, bg) = (
                x.to_device(&dev).unwrap(),
                w.to_device(&dev).unwrap(),
                b.to_device(&dev).unwrap(),
            );
            let (atol, rtol) = tol(out);
            let what = format!("rms_norm x {xd} w {wd} d {d} seed {seed}");
            let y = fast::rms_norm(&xg, Some(&wg), 1e-5).unwrap();
            assert_eq!(y.device(), dev, "{what}");
            assert_eq!(y.dtype(), out, "{what}");
            let r = reference::rms_norm(&x, Some(&w), 1e-5).unwrap();
            check_close(&y, &r, atol, rtol, &what);

            let what = format!("layer_norm x {xd} w {wd} d {d} seed {seed}");
            let y = fast::layer_norm(&xg, Some(&wg), Some(&bg), 1e-5).unwrap();
            assert_eq!(y.dtype(), out, "{what}");
            let r = reference::layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap();
            check_close(&y, &r, atol, rtol, &what);

            let y = fast::layer_norm(&xg, None, None, 1e-5).unwrap();
            assert_eq!(y.dtype(), xd, "{what} without params");
            let r = reference::layer_norm(&x, None, None, 1e-5).unwrap();
            let (atol, rtol) = tol(xd);
            check_close(&y, &r, atol, rtol, &format!("{what} without params"));
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn norms_on_strided_gpu_views_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    for (seed, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let x = common::randn(&[8, 100, 128], dtype, 70 + seed as u64);
        // MLX's test_slice_into_layer_norm: x[:, 99:], plus a transposed view.
        let views = [
            x.slice(&[0, 99], &[8, 100], &[1, 1]).unwrap(),
            x.swapaxes(0, 1).unwrap(),
        ];
        for v in &views {
            let g = v.to_device(&dev).unwrap();
            let y = fast::layer_norm(&g, None, None, 1e-5).unwrap();
            let c = fast::layer_norm(v, None, None, 1e-5).unwrap();
            let (atol, rtol) = tol(dtype);
            check_close(&y, &c, atol, rtol, &format!("strided layer_norm {dtype}"));
            let y = fast::rms_norm(&g, None, 1e-5).unwrap();
            let c = fast::rms_norm(v, None, 1e-5).unwrap();
            check_close(&y, &c, atol, rtol, &format!("strided rms_norm {dtype}"));
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn norm_errors_are_the_same_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let x = Array::randn(&[4, 128], DType::F32, 1, &dev).unwrap();
    let w = Array::randn(&[129], DType::F32, 2, &dev).unwrap();
    let e = fast::rms_norm(&x, Some(&w), 1e-5).unwrap_err().to_string();
    assert_eq!(
        e,
        "[rms_norm] (*weight) must have the same size as the last dimension of x but has 129 elements."
    );
    let w_cpu = Array::randn(&[128], DType::F32, 3, &Device::Cpu).unwrap();
    assert!(matches!(
        fast::rms_norm(&x, Some(&w_cpu), 1e-5),
        Err(ferrofast::Error::Device(_))
    ));
}
