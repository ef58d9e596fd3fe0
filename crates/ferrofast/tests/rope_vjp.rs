//! The backward pass `fast::rope_vjp`: the float64 oracle against the adjoint identity
//! `<rope(x), g> = <x, rope_vjp(g)>`, then every case on every device (CPU, then each CUDA
//! device; the CUDA tests are ignored without the `gpu-tests` feature) against the oracle:
//! MLX's gradient test shapes, both pair layouts, `dims < D`, per-example offsets, `freqs`,
//! strided cotangents, single-token rows, NaN, and the errors.

#[macro_use]
mod common;

use common::{check_close, on, randn, uniform};
use ferrofast::fast::{self, RopeOffset};
use ferrofast::{reference, Array, DType, Device};

fn dot(a: &Array, b: &Array) -> f64 {
    let (x, y) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
    x.iter().zip(&y).map(|(p, q)| p * q).sum()
}

fn max_abs(a: &Array) -> f64 {
    a.to_f64_vec()
        .unwrap()
        .iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// `(atol, rtol)` against the exact oracle for a result rounded once to `dtype` after f32
/// arithmetic whose angles reach `max_theta` (see tests/rope.rs for the derivation).
fn tol(dtype: DType, max_theta: f64, max_abs_g: f64) -> (f64, f64) {
    let angle = 4.0 * f64::from(f32::EPSILON) * max_theta.max(1.0) * max_abs_g;
    match dtype {
        DType::F64 => (1e-12 * (1.0 + max_theta) * max_abs_g, 0.0),
        DType::F32 => (1e-6 + angle, 0.0),
        DType::F16 => (1e-3 + angle, 2f64.powi(-11)),
        _ => (1e-2 + angle, 2f64.powi(-8)),
    }
}

/// Runs `fast::rope_vjp` on `dev` and the oracle and checks them; returns the result (on the
/// CPU). `max_theta` bounds `|scale * position * inv_freq|`.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &Device,
    g: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
    max_theta: f64,
    what: &str,
) -> Array {
    let gd = on(g, dev);
    let out = fast::rope_vjp(&gd, dims, traditional, base, scale, offset, freqs)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), *dev, "{what}: device");
    assert_eq!(out.dtype(), g.dtype(), "{what}: dtype");
    assert_eq!(out.shape(), g.shape(), "{what}: shape");
    let out = on(&out, &Device::Cpu);
    let expect = reference::rope_vjp(g, dims, traditional, base, scale, offset, freqs).unwrap();
    let (atol, rtol) = tol(g.dtype(), max_theta, max_abs(g));
    check_close(&out, &expect, atol, rtol, what);
    out
}

#[test]
fn oracle_is_the_adjoint_of_the_forward() {
    for (traditional, dims, offset) in [(false, 32, 0i64), (true, 16, 7), (false, 8, -3)] {
        let x = randn(&[2, 3, 20, 32], DType::F64, 1);
        let g = randn(&[2, 3, 20, 32], DType::F64, 2);
        let off = RopeOffset::Int(offset);
        let y = reference::rope(&x, dims, traditional, Some(10000.0), 1.5, off, None).unwrap();
        let dx = reference::rope_vjp(&g, dims, traditional, Some(10000.0), 1.5, off, None).unwrap();
        let (lhs, rhs) = (dot(&y, &g), dot(&x, &dx));
        assert!(
            (lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0),
            "trad {traditional} dims {dims}: <rope(x), g> = {lhs} but <x, rope_vjp(g)> = {rhs}"
        );
    }
}

#[test]
fn f64_cotangents_compute_in_f64() {
    let g = randn(&[2, 4, 9, 16], DType::F64, 3);
    check(
        &Device::Cpu,
        &g,
        16,
        false,
        Some(500.0),
        0.75,
        RopeOffset::Int(11),
        None,
        0.75 * 20.0,
        "f64",
    );
}

#[test]
fn asking_for_offset_or_freqs_gradients_is_mlx_s_error() {
    assert!(fast::rope_vjp_check_targets(false, false).is_ok());
    for (o, f) in [(true, false), (false, true), (true, true)] {
        let e = fast::rope_vjp_check_targets(o, f).unwrap_err().to_string();
        assert!(
            e.contains("[RoPE::vjp] vjp for offset or frequencies not supported"),
            "{e}"
        );
    }
}

on_every_device! {
    /// MLX's `test_rope_grad` shapes: D 32, dims {32, 16}, both layouts, in every dtype.
    fn mlx_grad_shapes(dev: &Device) {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for dims in [32, 16] {
                for traditional in [false, true] {
                    let g = randn(&[2, 100, 32], dtype, 10 + dims as u64);
                    let what = format!("{dtype} dims {dims} trad {traditional}");
                    check(
                        dev, &g, dims, traditional, Some(10000.0), 1.0,
                        RopeOffset::Int(0), None, 100.0, &what,
                    );
                }
            }
        }
    }

    /// `<rope(x), g> = <x, rope_vjp(g)>` for the fast ops themselves, in f32.
    fn fast_pair_is_adjoint(dev: &Device) {
        let x = randn(&[3, 5, 17, 64], DType::F32, 20);
        let g = randn(&[3, 5, 17, 64], DType::F32, 21);
        let offs = Array::from_vec(vec![0i32, 5, 40], &[3]).unwrap();
        for traditional in [false, true] {
            let opt = fast::RopeOptions {
                traditional,
                scale: 0.5,
                offset: RopeOffset::Array(&offs),
                ..Default::default()
            };
            let y = on(&fast::rope_with(&on(&x, dev), 48, &opt).unwrap(), &Device::Cpu);
            let dx = on(&fast::rope_vjp_with(&on(&g, dev), 48, &opt).unwrap(), &Device::Cpu);
            let (lhs, rhs) = (dot(&y, &g), dot(&x, &dx));
            assert!(
                (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                "trad {traditional}: <rope(x), g> = {lhs} but <x, rope_vjp(g)> = {rhs}"
            );
        }
    }

    /// Per-example offsets, `freqs`, `dims < D` (the tail passes through) and a large scale.
    fn offsets_freqs_and_partial_dims(dev: &Device) {
        let offs = Array::from_vec(vec![3i32, 0, 1000], &[3]).unwrap();
        let freqs = uniform(&[12], 1.0, 50.0, DType::F32, 30);
        for dtype in [DType::F32, DType::BF16] {
            let g = randn(&[3, 2, 7, 40], dtype, 31);
            let what = format!("{dtype} offsets+freqs");
            let out = check(
                dev, &g, 24, true, None, 2.0, RopeOffset::Array(&offs), Some(&freqs),
                2.0 * 1007.0, &what,
            );
            // Features 24..40 are the cotangent's, bit for bit.
            let (o, gv) = (out.to_f64_vec().unwrap(), g.to_f64_vec().unwrap());
            for (ro, rg) in o.chunks(40).zip(gv.chunks(40)) {
                assert_eq!(&ro[24..], &rg[24..], "{what}: pass-through tail");
            }
            let what = format!("{dtype} base, offset array");
            check(
                dev, &g, 40, false, Some(10000.0), -1.0, RopeOffset::Array(&offs), None,
                1007.0, &what,
            );
        }
    }

    /// Cotangents with transposed heads and sequence (`[B, T, H, D]` in memory), and single
    /// tokens with several batch examples (the cases of MLX's rope regressions).
    fn strided_and_single_token_cotangents(dev: &Device) {
        let base = randn(&[2, 9, 4, 64], DType::F32, 40);
        let g = base.transpose(&[0, 2, 1, 3]).unwrap();
        check(dev, &g, 64, false, Some(10000.0), 1.0, RopeOffset::Int(5), None, 14.0, "strided");
        for b in [2usize, 4] {
            let g = randn(&[b, 7, 1, 128], DType::F16, 41 + b as u64);
            let what = format!("single token B {b}");
            check(dev, &g, 128, true, Some(10000.0), 1.0, RopeOffset::Int(5), None, 5.0, &what);
        }
    }

    /// A NaN in the cotangent reaches exactly its own pair.
    fn nan_reaches_its_pair(dev: &Device) {
        let mut v = randn(&[1, 1, 3, 8], DType::F32, 50).to_vec::<f32>().unwrap();
        v[8 + 1] = f32::NAN;
        let g = Array::from_vec(v, &[1, 1, 3, 8]).unwrap();
        let out = fast::rope_vjp(&on(&g, dev), 8, false, Some(10000.0), 1.0, RopeOffset::Int(0), None)
            .unwrap();
        let o = on(&out, &Device::Cpu).to_f64_vec().unwrap();
        for (i, val) in o.iter().enumerate() {
            let in_pair = i == 9 || i == 13;
            assert_eq!(val.is_nan(), in_pair, "element {i} = {val}");
        }
    }

    /// Bad arguments give rope's own errors.
    fn errors_are_rope_s(dev: &Device) {
        let g = on(&randn(&[1, 4, 64], DType::F32, 60), dev);
        for (dims, msg) in [
            (0, "[rope] dims must be positive but got 0."),
            (7, "[rope] dims must be even but got 7."),
            (128, "[rope] dims must not exceed the input's last dimension (64) but got 128."),
        ] {
            let e = fast::rope_vjp(&g, dims, false, Some(10000.0), 1.0, RopeOffset::Int(0), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(msg), "dims {dims}: {e}");
        }
        let flat = on(&randn(&[4, 64], DType::F32, 61), dev);
        let e = fast::rope_vjp(&flat, 64, false, Some(10000.0), 1.0, RopeOffset::Int(0), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[rope] Input must have at least 3 dimensions"), "{e}");
    }
}
