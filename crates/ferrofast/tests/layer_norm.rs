//! `fast::layer_norm` against the float64 oracle: MLX's own test cases (spec §11.1), dtype
//! promotion (including the weight-absent rule), every error message, strided and empty
//! inputs, exact rounding order, and a property test over random shapes and layouts.

mod common;

use common::{check_close, randn, random_view, uniform};
use ferrofast::{bf16, f16, fast, reference, Array, DType, Device, Error, Float};
use proptest::prelude::*;

/// MLX's `test_layer_norm` absolute tolerances (spec §11.1), plus f64.
fn mlx_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 5e-2,
        DType::F64 => 1e-12,
        other => panic!("no tolerance for {other}"),
    }
}

/// `(atol, rtol)` for normal-distributed inputs with weights in [0.5, 1.5) and biases in
/// [-1, 1): up to three roundings to the output dtype of terms as large as ~8, so the
/// absolute part covers an ulp of 8 (the result itself may cancel to near 0).
fn randn_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 1e-5),
        DType::F16 => (8e-3, 2e-3),
        DType::BF16 => (6e-2, 1.6e-2),
        DType::F64 => (1e-12, 1e-12),
        other => panic!("no tolerance for {other}"),
    }
}

/// `tol` widened by the conditioning of the statistics: the compute type's mean is off by
/// about an ulp of the row's largest element, and `x - mean` carries that error into the
/// output scaled by `rsqrt(var + eps)` and the weight. That is inherent in MLX's f32
/// definition (rows of nearly equal values with tiny variance hit it), not a kernel error.
fn cond_tol(x: &Array, w: Option<&Array>, eps: f32, (atol, rtol): (f64, f64)) -> (f64, f64) {
    let d = *x.shape().last().unwrap();
    if d == 0 || x.size() == 0 {
        return (atol, rtol);
    }
    let unit = if x.dtype() == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    let w_max = w.map_or(1.0, |w| {
        w.to_f64_vec()
            .unwrap()
            .iter()
            .fold(1.0f64, |m, v| m.max(v.abs()))
    });
    let xs = x.to_f64_vec().unwrap();
    let worst = xs
        .chunks(d)
        .map(|row| {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let big = row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            big / (var + f64::from(eps)).sqrt()
        })
        .fold(0.0f64, f64::max);
    (atol + 4.0 * unit * worst * w_max, rtol)
}

fn check_against_oracle(
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    eps: f32,
    (atol, rtol): (f64, f64),
    what: &str,
) -> Array {
    let out = fast::layer_norm(x, w, b, eps).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = reference::layer_norm(x, w, b, eps).unwrap_or_else(|e| panic!("{what}: {e}"));
    check_close(&out, &want, atol, rtol, what);
    out
}

/// All four weight/bias combinations, as MLX's test runs them.
fn check_all_combos(x: &Array, w: &Array, b: &Array, eps: f32, tol: (f64, f64), what: &str) {
    for (wo, bo, name) in [
        (Some(w), Some(b), "w+b"),
        (Some(w), None, "w"),
        (None, Some(b), "b"),
        (None, None, "none"),
    ] {
        let out = check_against_oracle(x, wo, bo, eps, tol, &format!("{what} {name}"));
        assert_eq!(out.dtype(), x.dtype(), "{what} {name}");
        assert_eq!(out.shape(), x.shape(), "{what} {name}");
    }
}

fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

#[test]
fn mlx_test_layer_norm_dtypes() {
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .enumerate()
    {
        let seed = 10 + i as u64;
        let x = uniform(&[2, 32], 0.0, 1.0, dtype, seed);
        let w = uniform(&[32], 0.0, 1.0, dtype, seed + 100);
        let b = uniform(&[32], 0.0, 1.0, dtype, seed + 200);
        let what = format!("{dtype}, seed {seed}");
        check_all_combos(&x, &w, &b, 1e-5, (mlx_tol(dtype), 0.0), &what);
    }
}

#[test]
fn mlx_test_layer_norm_eps_and_dims() {
    let tol = (mlx_tol(DType::F32), 0.0);
    for (i, eps) in [1e-3f32, 1e-5].into_iter().enumerate() {
        let seed = 20 + i as u64;
        let x = uniform(&[2, 32], 0.0, 1.0, DType::F32, seed);
        let w = uniform(&[32], 0.0, 1.0, DType::F32, seed + 100);
        let b = uniform(&[32], 0.0, 1.0, DType::F32, seed + 200);
        check_all_combos(&x, &w, &b, eps, tol, &format!("eps {eps}, seed {seed}"));
    }
    for (i, d) in [31, 32, 33].into_iter().enumerate() {
        let seed = 30 + i as u64;
        let x = uniform(&[2, d], 0.0, 1.0, DType::F32, seed);
        let w = uniform(&[d], 0.0, 1.0, DType::F32, seed + 100);
        let b = uniform(&[d], 0.0, 1.0, DType::F32, seed + 200);
        check_all_combos(&x, &w, &b, 1e-5, tol, &format!("D {d}, seed {seed}"));
    }
    let x = uniform(&[4099], 0.0, 1.0, DType::F32, 40);
    let w = uniform(&[4099], 0.0, 1.0, DType::F32, 41);
    let b = uniform(&[4099], 0.0, 1.0, DType::F32, 42);
    check_all_combos(&x, &w, &b, 1e-5, tol, "1-D 4099, seed 40");
}

#[test]
fn mlx_test_slice_into_layer_norm() {
    let base = uniform(&[8, 100, 128], 0.0, 1.0, DType::F32, 50);
    let x = base.slice(&[0, 99], &[8, 100], &[1, 1]).unwrap();
    assert_eq!(x.shape(), &[8, 1, 128]);
    check_against_oracle(&x, None, None, 1e-5, (1e-4, 0.0), "x[:, 99:], seed 50");
}

#[test]
fn mlx_test_layer_norm_dim_check() {
    let x = Array::uniform(&[4, 128], 0.0, 10.0, DType::I32, 60, &Device::Cpu).unwrap();
    let ones = Array::ones(&[129], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        fast::layer_norm(&x, Some(&ones), None, 1e-3).unwrap_err(),
        invalid(
            "[layer_norm] weight must have the same size as the last dimension of x but has \
             129 elements."
        )
    );
    assert_eq!(
        fast::layer_norm(&x, None, Some(&ones), 1e-3).unwrap_err(),
        invalid(
            "[layer_norm] bias must have the same size as the last dimension of x but has 129 \
             elements."
        )
    );
}

#[test]
fn odd_sizes_every_dtype() {
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16, DType::F64]
        .into_iter()
        .enumerate()
    {
        for (j, d) in [1usize, 31, 33, 4099].into_iter().enumerate() {
            let seed = 100 + 10 * i as u64 + j as u64;
            let x = randn(&[3, 5, d], dtype, seed);
            let w = uniform(&[d], 0.5, 1.5, dtype, seed + 1000);
            let b = uniform(&[d], -1.0, 1.0, dtype, seed + 2000);
            let what = format!("{dtype} D {d}, seed {seed}");
            let tol = cond_tol(&x, Some(&w), 1e-5, randn_tol(dtype));
            check_all_combos(&x, &w, &b, 1e-5, tol, &what);
        }
    }
}

#[test]
fn many_rows_take_the_parallel_path() {
    for (i, (rows, d)) in [(40_001usize, 1usize), (257, 4099), (1000, 100)]
        .into_iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 200 + i as u64;
            // An offset mean, which the two-pass variance must not be disturbed by.
            let x = uniform(&[rows, d], 10.0, 14.0, dtype, seed);
            let w = uniform(&[d], 0.5, 1.5, dtype, seed + 1);
            let b = uniform(&[d], -1.0, 1.0, dtype, seed + 2);
            let what = format!("{dtype} [{rows},{d}], seed {seed}");
            let tol = cond_tol(&x, Some(&w), 1e-5, randn_tol(dtype));
            check_against_oracle(&x, Some(&w), Some(&b), 1e-5, tol, &what);
        }
    }
}

#[test]
fn f64_is_computed_in_f64() {
    // A large common offset: f32 statistics would lose digits here, f64 does not.
    let x = uniform(&[7, 333], 1000.0, 1001.0, DType::F64, 300);
    let w = randn(&[333], DType::F64, 301);
    let b = randn(&[333], DType::F64, 302);
    let out = check_against_oracle(&x, Some(&w), Some(&b), 1e-6, (1e-10, 1e-10), "f64");
    assert_eq!(out.dtype(), DType::F64);
}

#[test]
fn output_dtype_follows_mlx_promotion() {
    let d = 16;
    let cases: [(DType, Option<DType>, Option<DType>, DType); 10] = [
        // Weight absent: x's dtype, even when the bias is wider (the bias is cast down).
        (DType::F16, None, Some(DType::F32), DType::F16),
        (DType::BF16, None, Some(DType::F64), DType::BF16),
        (DType::F16, Some(DType::F32), None, DType::F32),
        (DType::F16, Some(DType::F16), Some(DType::F32), DType::F32),
        (DType::BF16, Some(DType::F16), None, DType::F32),
        (DType::BF16, Some(DType::BF16), Some(DType::F16), DType::F32),
        (DType::I32, Some(DType::F16), Some(DType::F16), DType::F16),
        (DType::I32, Some(DType::F32), Some(DType::I64), DType::F32),
        (DType::F32, Some(DType::F32), Some(DType::F64), DType::F64),
        (DType::U8, Some(DType::BF16), Some(DType::U8), DType::BF16),
    ];
    for (i, (xt, wt, bt, out_t)) in cases.into_iter().enumerate() {
        let seed = 400 + i as u64;
        let x = uniform(&[3, d], 0.0, 8.0, DType::F64, seed)
            .astype(xt)
            .unwrap();
        let w = wt.map(|t| {
            uniform(&[d], 1.0, 4.0, DType::F64, seed + 1)
                .astype(t)
                .unwrap()
        });
        let b = bt.map(|t| {
            uniform(&[d], 0.0, 4.0, DType::F64, seed + 2)
                .astype(t)
                .unwrap()
        });
        let what = format!("x {xt}, w {wt:?}, b {bt:?}, seed {seed}");
        let out = fast::layer_norm(&x, w.as_ref(), b.as_ref(), 1e-5).unwrap();
        assert_eq!(out.dtype(), out_t, "{what}");
        // The oracle sees the inputs as MLX's kernel does: cast to the output dtype.
        let xc = x.astype(out_t).unwrap();
        let wc = w.as_ref().map(|w| w.astype(out_t).unwrap());
        let bc = b.as_ref().map(|b| b.astype(out_t).unwrap());
        let want = reference::layer_norm(&xc, wc.as_ref(), bc.as_ref(), 1e-5).unwrap();
        let (atol, rtol) = cond_tol(&xc, wc.as_ref(), 1e-5, randn_tol(out_t));
        check_close(&out, &want, atol, rtol, &what);
    }
}

#[test]
fn errors_carry_mlx_messages_in_mlx_order() {
    let dev = Device::Cpu;
    let x = randn(&[4, 8], DType::F32, 500);
    let scalar = Array::scalar(1.0f32);
    let w2 = randn(&[2, 4], DType::F32, 501);
    let w8 = randn(&[8], DType::F32, 502);
    let w7 = randn(&[7], DType::F32, 503);
    let rank0 = "[layer_norm] Input must have at least 1 dimension but got input with 0 \
                 dimensions.";
    assert_eq!(
        fast::layer_norm(&scalar, None, None, 1e-5).unwrap_err(),
        invalid(rank0)
    );
    assert_eq!(
        fast::layer_norm(&scalar, Some(&w2), Some(&w2), 1e-5).unwrap_err(),
        invalid(rank0)
    );
    let w_rank = "[layer_norm] weight must have 1 dimension but has 2 dimensions.";
    assert_eq!(
        fast::layer_norm(&x, Some(&w2), None, 1e-5).unwrap_err(),
        invalid(w_rank)
    );
    // Every weight check comes before any bias check.
    assert_eq!(
        fast::layer_norm(&x, Some(&w2), Some(&w2), 1e-5).unwrap_err(),
        invalid(w_rank)
    );
    let w_size = "[layer_norm] weight must have the same size as the last dimension of x but \
                  has 7 elements.";
    assert_eq!(
        fast::layer_norm(&x, Some(&w7), Some(&w2), 1e-5).unwrap_err(),
        invalid(w_size)
    );
    assert_eq!(
        fast::layer_norm(&x, Some(&w8), Some(&w2), 1e-5).unwrap_err(),
        invalid("[layer_norm] bias must have 1 dimension but has 2 dimensions.")
    );
    assert_eq!(
        fast::layer_norm(&x, None, Some(&scalar), 1e-5).unwrap_err(),
        invalid("[layer_norm] bias must have 1 dimension but has 0 dimensions.")
    );
    assert_eq!(
        fast::layer_norm(&x, Some(&w8), Some(&w7), 1e-5).unwrap_err(),
        invalid(
            "[layer_norm] bias must have the same size as the last dimension of x but has 7 \
             elements."
        )
    );
    // Integer x with only a bias: the output dtype is x's, which is not floating.
    let xi = Array::ones(&[4, 8], DType::I32, &dev).unwrap();
    assert_eq!(
        fast::layer_norm(&xi, None, Some(&w8), 1e-5).unwrap_err(),
        invalid("[layer_norm] Received unsupported type int32.")
    );
    for (dtype, name) in [
        (DType::I32, "int32"),
        (DType::U8, "uint8"),
        (DType::U32, "uint32"),
        (DType::I64, "int64"),
        (DType::Bool, "bool"),
    ] {
        let xi = Array::ones(&[2, 3], dtype, &dev).unwrap();
        assert_eq!(
            fast::layer_norm(&xi, None, None, 1e-5).unwrap_err(),
            invalid(&format!("[layer_norm] Received unsupported type {name}."))
        );
        let wi = Array::ones(&[3], DType::I32, &dev).unwrap();
        let promoted = ferrofast::promote_types(dtype, DType::I32);
        assert_eq!(
            fast::layer_norm(&xi, Some(&wi), Some(&wi), 1e-5).unwrap_err(),
            invalid(&format!(
                "[layer_norm] Received unsupported type {promoted}."
            ))
        );
    }
}

#[test]
fn non_contiguous_inputs() {
    let eps = 1e-5;
    for (i, dtype) in [DType::F32, DType::BF16, DType::F16, DType::F64]
        .into_iter()
        .enumerate()
    {
        let seed = 600 + 10 * i as u64;
        let base = randn(&[24, 40], dtype, seed);
        // Weights are at most 1.5 everywhere below.
        let w_bound = Array::full(&[1], 1.5, DType::F64, &Device::Cpu).unwrap();
        let tol = |x: &Array| cond_tol(x, Some(&w_bound), eps, randn_tol(dtype));
        let params = |d: usize, s: u64| {
            (
                uniform(&[d], 0.5, 1.5, dtype, s),
                uniform(&[d], -1.0, 1.0, dtype, s + 1),
            )
        };
        let t = base.transpose(&[1, 0]).unwrap();
        let (w, b) = params(24, seed + 1);
        check_all_combos(&t, &w, &b, eps, tol(&t), &format!("{dtype} transposed"));
        let s = base.slice(&[1, 2], &[24, 40], &[2, 3]).unwrap();
        let (w, b) = params(s.shape()[1], seed + 3);
        check_all_combos(&s, &w, &b, eps, tol(&s), &format!("{dtype} stepped"));
        let r = base.slice(&[-1, -1], &[-25, -41], &[-1, -1]).unwrap();
        let (w, b) = params(40, seed + 5);
        check_all_combos(&r, &w, &b, eps, tol(&r), &format!("{dtype} reversed"));
        let row = randn(&[1, 40], dtype, seed + 7);
        let rows = row.broadcast_to(&[3, 5, 40]).unwrap();
        check_all_combos(
            &rows,
            &w,
            &b,
            eps,
            tol(&rows),
            &format!("{dtype} bcast rows"),
        );
        // A broadcast last axis is a constant row: variance 0, the worst conditioning.
        let col = randn(&[6, 1], dtype, seed + 8);
        let cols = col.broadcast_to(&[6, 9]).unwrap();
        let (w, b) = params(9, seed + 9);
        check_all_combos(
            &cols,
            &w,
            &b,
            eps,
            tol(&cols),
            &format!("{dtype} bcast last axis"),
        );
        let bthd = randn(&[2, 5, 3, 16], dtype, seed + 11);
        let bhtd = bthd.swapaxes(1, 2).unwrap();
        let (w, b) = params(16, seed + 12);
        check_all_combos(
            &bhtd,
            &w,
            &b,
            eps,
            tol(&bhtd),
            &format!("{dtype} BHTD view"),
        );
        // Strided and broadcast parameters.
        let big = uniform(&[80], 0.5, 1.5, dtype, seed + 14);
        let ws = big.slice(&[1], &[80], &[2]).unwrap();
        let bs = big.slice(&[79], &[-81], &[-2]).unwrap();
        let what = format!("{dtype} params");
        check_against_oracle(&base, Some(&ws), Some(&bs), eps, tol(&base), &what);
        let wb = Array::scalar(1.25f64).astype(dtype).unwrap();
        let wb = wb.broadcast_to(&[40]).unwrap();
        let what = format!("{dtype} bcast params");
        check_against_oracle(&base, Some(&wb), Some(&wb), eps, tol(&base), &what);
    }
}

#[test]
fn empty_and_one_dimensional_inputs() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for shape in [
            vec![0usize, 8],
            vec![3, 0, 8],
            vec![4, 0],
            vec![0],
            vec![2, 3, 0],
        ] {
            let x = Array::zeros(&shape, dtype, &dev).unwrap();
            let d = *shape.last().unwrap();
            let w = Array::ones(&[d], dtype, &dev).unwrap();
            let b = Array::zeros(&[d], dtype, &dev).unwrap();
            for (wo, bo) in [(Some(&w), Some(&b)), (None, None)] {
                let out = fast::layer_norm(&x, wo, bo, 1e-5).unwrap();
                assert_eq!(out.shape(), shape.as_slice());
                assert_eq!(out.dtype(), dtype);
                assert_eq!(out.size(), 0);
            }
        }
        let x = randn(&[33], dtype, 800);
        let w = uniform(&[33], 0.5, 1.5, dtype, 801);
        let b = uniform(&[33], -1.0, 1.0, dtype, 802);
        let tol = cond_tol(&x, Some(&w), 1e-5, randn_tol(dtype));
        check_all_combos(&x, &w, &b, 1e-5, tol, &format!("{dtype} 1-D"));
    }
}

#[test]
fn constant_rows_and_eps() {
    // A constant row has variance 0: the result is the bias (0 without one), for any eps > 0.
    let x = Array::full(&[3, 8], 2.5, DType::F32, &Device::Cpu).unwrap();
    let b = uniform(&[8], -1.0, 1.0, DType::F32, 850);
    let out = check_against_oracle(&x, None, Some(&b), 1e-5, randn_tol(DType::F32), "const");
    let bv = b.to_f64_vec().unwrap();
    let ov = out.to_f64_vec().unwrap();
    assert_eq!(&ov[..8], bv.as_slice());
    // eps is not validated: negative values are accepted as in MLX.
    let x = randn(&[3, 10], DType::F32, 851);
    check_against_oracle(&x, None, None, -1e-4, randn_tol(DType::F32), "negative eps");
    // eps 0 on a constant row: 0 * rsqrt(0) = NaN, as in MLX.
    let c = Array::full(&[1, 4], 1.0, DType::BF16, &Device::Cpu).unwrap();
    let out = fast::layer_norm(&c, None, None, 0.0)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    assert!(out.iter().all(|v| v.is_nan()));
}

/// MLX's definition step by step for rows short enough that the kernel's f32 sums run in
/// index order: mean and variance in f32, normalise, round to the output dtype, then `* w`
/// and `+ b` each rounded to the output dtype.
fn emulate_mlx<T: Float>(x: &[T], w: Option<&[T]>, b: Option<&[T]>, eps: f32) -> Vec<T> {
    let inv_d = (1.0 / x.len() as f64) as f32;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut sum = 0.0f32;
    for v in &xf {
        sum += v;
    }
    let mean = sum * inv_d;
    let mut sq = 0.0f32;
    for v in &xf {
        sq += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (sq * inv_d + eps).sqrt();
    (0..x.len())
        .map(|i| {
            let mut y = T::from_f32((xf[i] - mean) * inv);
            if let Some(w) = w {
                y = T::from_f32(y.to_f32() * w[i].to_f32());
            }
            if let Some(b) = b {
                y = T::from_f32(y.to_f32() + b[i].to_f32());
            }
            y
        })
        .collect()
}

fn check_exact_rounding<T: Float>(dtype: DType) {
    for d in 1..=15usize {
        let seed = 1000 + d as u64;
        let x = randn(&[32, d], dtype, seed);
        let w = uniform(&[d], 0.3, 3.0, dtype, seed + 1);
        let b = uniform(&[d], -2.0, 2.0, dtype, seed + 2);
        let xs = x.to_vec::<T>().unwrap();
        let ws = w.to_vec::<T>().unwrap();
        let bs = b.to_vec::<T>().unwrap();
        for (wo, bo, name) in [
            (Some(&w), Some(&b), "w+b"),
            (Some(&w), None, "w"),
            (None, Some(&b), "b"),
            (None, None, "none"),
        ] {
            let out = fast::layer_norm(&x, wo, bo, 1e-5)
                .unwrap()
                .to_vec::<T>()
                .unwrap();
            for (r, row) in xs.chunks(d).enumerate() {
                let want = emulate_mlx(
                    row,
                    wo.map(|_| ws.as_slice()),
                    bo.map(|_| bs.as_slice()),
                    1e-5,
                );
                let got = &out[r * d..(r + 1) * d];
                assert_eq!(
                    got,
                    want.as_slice(),
                    "{dtype} {name} D {d} row {r}, seed {seed}"
                );
            }
        }
    }
}

#[test]
fn rounding_order_matches_mlx_exactly() {
    check_exact_rounding::<f16>(DType::F16);
    check_exact_rounding::<bf16>(DType::BF16);
    check_exact_rounding::<f32>(DType::F32);
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(64)
    })]

    #[test]
    fn matches_oracle_on_random_views(
        shape in prop::collection::vec(0usize..6, 1..4),
        last in 1usize..70,
        steps in prop::collection::vec(prop::sample::select(vec![1isize, 2, -1, -2]), 4),
        perm_seed in any::<u64>(),
        dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16, DType::F64]),
        with_weight in any::<bool>(),
        with_bias in any::<bool>(),
        seed in 0u64..1_000_000,
    ) {
        let mut full = shape.clone();
        full.push(last);
        let base = randn(&full, dtype, seed);
        let x = random_view(&base, perm_seed, &steps);
        let d = *x.shape().last().unwrap();
        let w = uniform(&[d], 0.5, 1.5, dtype, seed + 1);
        let b = uniform(&[d], -1.0, 1.0, dtype, seed + 2);
        let what = format!("{dtype} view {:?} strides {:?}, seed {seed}", x.shape(), x.strides());
        check_against_oracle(
            &x,
            with_weight.then_some(&w),
            with_bias.then_some(&b),
            1e-5,
            cond_tol(&x, Some(&w), 1e-5, randn_tol(dtype)),
            &what,
        );
    }
}
