//! `fast::rms_norm` against the float64 oracle: MLX's own test cases (spec §11.1), dtype
//! promotion, every error message, strided and empty inputs, exact rounding order, and a
//! property test over random shapes and layouts.

mod common;

use common::{check_close, randn, random_view, uniform};
use ferrofast::{bf16, f16, fast, reference, Array, DType, Device, Error, Float};
use proptest::prelude::*;

/// MLX's `test_rms_norm` absolute tolerances (spec §11.1), plus f64.
fn mlx_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 1e-2,
        DType::F64 => 1e-12,
        other => panic!("no tolerance for {other}"),
    }
}

/// `(atol, rtol)` for normal-distributed inputs, where `|x_hat * w|` reaches ~10: two
/// roundings to the output dtype (normalised value, then the product) plus f32 statistics.
fn randn_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (2e-2, 1.6e-2),
        DType::F64 => (1e-12, 1e-12),
        other => panic!("no tolerance for {other}"),
    }
}

fn check_against_oracle(
    x: &Array,
    w: Option<&Array>,
    eps: f32,
    (atol, rtol): (f64, f64),
    what: &str,
) -> Array {
    let out = fast::rms_norm(x, w, eps).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = reference::rms_norm(x, w, eps).unwrap_or_else(|e| panic!("{what}: {e}"));
    check_close(&out, &want, atol, rtol, what);
    out
}

fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

#[test]
fn mlx_test_rms_norm_dtypes() {
    let eps = 1e-5;
    let d = 32;
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .enumerate()
    {
        let seed = 10 + i as u64;
        let x = uniform(&[2, d], 0.0, 1.0, dtype, seed);
        let w = uniform(&[d], 0.0, 1.0, dtype, seed + 100);
        let tol = (mlx_tol(dtype), 0.0);
        let out = check_against_oracle(&x, Some(&w), eps, tol, &format!("{dtype} seed {seed}"));
        assert_eq!(out.dtype(), dtype);
        let out = check_against_oracle(&x, None, eps, tol, &format!("{dtype} no w, seed {seed}"));
        assert_eq!(out.dtype(), dtype);
    }
}

#[test]
fn mlx_test_rms_norm_eps_and_dims() {
    let tol = (mlx_tol(DType::F32), 0.0);
    for (i, eps) in [1e-3f32, 1e-5].into_iter().enumerate() {
        let seed = 20 + i as u64;
        let x = uniform(&[2, 32], 0.0, 1.0, DType::F32, seed);
        let w = uniform(&[32], 0.0, 1.0, DType::F32, seed + 100);
        check_against_oracle(&x, Some(&w), eps, tol, &format!("eps {eps}, seed {seed}"));
        check_against_oracle(&x, None, eps, tol, &format!("eps {eps} no w, seed {seed}"));
    }
    for (i, d) in [31, 32, 33, 256, 512].into_iter().enumerate() {
        let seed = 30 + i as u64;
        let x = uniform(&[2, d], 0.0, 1.0, DType::F32, seed);
        let w = uniform(&[d], 0.0, 1.0, DType::F32, seed + 100);
        check_against_oracle(&x, Some(&w), 1e-5, tol, &format!("D {d}, seed {seed}"));
        check_against_oracle(&x, None, 1e-5, tol, &format!("D {d} no w, seed {seed}"));
    }
    // MLX's "> 4096" case: a single 1-D row of 4099 (the looped kernel on GPUs).
    let x = uniform(&[4099], 0.0, 1.0, DType::F32, 40);
    let w = uniform(&[4099], 0.0, 1.0, DType::F32, 41);
    check_against_oracle(&x, Some(&w), 1e-5, (1e-6, 0.0), "1-D 4099, seed 40");
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
            let what = format!("{dtype} D {d}, seed {seed}");
            check_against_oracle(&x, Some(&w), 1e-5, randn_tol(dtype), &what);
            check_against_oracle(&x, None, 1e-5, randn_tol(dtype), &format!("{what}, no w"));
        }
    }
}

#[test]
fn many_rows_take_the_parallel_path() {
    // Enough elements to split across threads, with row counts that do not divide evenly
    // into tasks, a single-element row and a long row.
    for (i, (rows, d)) in [(40_001usize, 1usize), (257, 4099), (1000, 100)]
        .into_iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 200 + i as u64;
            let x = randn(&[rows, d], dtype, seed);
            let w = uniform(&[d], 0.5, 1.5, dtype, seed + 1);
            let what = format!("{dtype} [{rows},{d}], seed {seed}");
            check_against_oracle(&x, Some(&w), 1e-5, randn_tol(dtype), &what);
        }
    }
}

#[test]
fn f64_is_computed_in_f64() {
    let x = randn(&[7, 333], DType::F64, 300);
    let w = randn(&[333], DType::F64, 301);
    let out = check_against_oracle(&x, Some(&w), 1e-6, (1e-13, 1e-13), "f64, seed 300");
    assert_eq!(out.dtype(), DType::F64);
}

#[test]
fn output_dtype_follows_mlx_promotion() {
    let d = 16;
    let cases: [(DType, Option<DType>, DType); 9] = [
        (DType::I32, Some(DType::F16), DType::F16),
        (DType::BF16, Some(DType::F16), DType::F32),
        (DType::F16, Some(DType::F32), DType::F32),
        (DType::F32, Some(DType::F16), DType::F32),
        (DType::F32, Some(DType::F64), DType::F64),
        (DType::U8, Some(DType::BF16), DType::BF16),
        (DType::Bool, Some(DType::F32), DType::F32),
        (DType::F16, Some(DType::I64), DType::F16),
        (DType::BF16, None, DType::BF16),
    ];
    for (i, (xt, wt, out_t)) in cases.into_iter().enumerate() {
        let seed = 400 + i as u64;
        // Small non-negative values so integer and bool inputs are meaningful.
        let x = uniform(&[3, d], 0.0, 8.0, DType::F64, seed)
            .astype(xt)
            .unwrap();
        let w = wt.map(|t| {
            uniform(&[d], 1.0, 4.0, DType::F64, seed + 1)
                .astype(t)
                .unwrap()
        });
        let what = format!("x {xt}, w {wt:?}, seed {seed}");
        let out = fast::rms_norm(&x, w.as_ref(), 1e-5).unwrap();
        assert_eq!(out.dtype(), out_t, "{what}");
        // The oracle sees the inputs as MLX's kernel does: cast to the output dtype.
        let xc = x.astype(out_t).unwrap();
        let wc = w.as_ref().map(|w| w.astype(out_t).unwrap());
        let want = reference::rms_norm(&xc, wc.as_ref(), 1e-5).unwrap();
        let (atol, rtol) = randn_tol(out_t);
        check_close(&out, &want, 4.0 * atol, rtol, &what);
    }
}

#[test]
fn errors_carry_mlx_messages_in_mlx_order() {
    let x = randn(&[4, 8], DType::F32, 500);
    let scalar = Array::scalar(1.0f32);
    assert_eq!(
        fast::rms_norm(&scalar, None, 1e-5).unwrap_err(),
        invalid("[rms_norm] Input must have at least 1 dimension but got input with 0 dimensions.")
    );
    // The rank check on x comes before anything about the weight.
    let w2 = randn(&[2, 4], DType::F32, 501);
    assert!(matches!(
        fast::rms_norm(&scalar, Some(&w2), 1e-5).unwrap_err(),
        Error::InvalidArgument(m) if m.contains("at least 1 dimension")
    ));
    // Weight rank before weight size: a (2,4) weight has 8 elements = D but is 2-D.
    assert_eq!(
        fast::rms_norm(&x, Some(&w2), 1e-5).unwrap_err(),
        invalid("[rms_norm] (*weight) must have 1 dimension but has 2 dimensions.")
    );
    let w0 = Array::scalar(1.0f32);
    assert_eq!(
        fast::rms_norm(&x, Some(&w0), 1e-5).unwrap_err(),
        invalid("[rms_norm] (*weight) must have 1 dimension but has 0 dimensions.")
    );
    // MLX's test: x (1,5) with a (4,) weight.
    let x5 = uniform(&[1, 5], 0.0, 1.0, DType::F32, 502);
    let w4 = Array::ones(&[4], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        fast::rms_norm(&x5, Some(&w4), 1e-5).unwrap_err(),
        invalid(
            "[rms_norm] (*weight) must have the same size as the last dimension of x but has \
             4 elements."
        )
    );
    // Size before dtype: an int x with a wrongly sized int weight reports the size.
    let xi = Array::zeros(&[4, 128], DType::I32, &Device::Cpu).unwrap();
    let wi = Array::ones(&[129], DType::I32, &Device::Cpu).unwrap();
    assert_eq!(
        fast::rms_norm(&xi, Some(&wi), 1e-5).unwrap_err(),
        invalid(
            "[rms_norm] (*weight) must have the same size as the last dimension of x but has \
             129 elements."
        )
    );
    for (dtype, name) in [
        (DType::I32, "int32"),
        (DType::U8, "uint8"),
        (DType::U32, "uint32"),
        (DType::I64, "int64"),
        (DType::Bool, "bool"),
    ] {
        let xi = Array::ones(&[2, 3], dtype, &Device::Cpu).unwrap();
        let expected = invalid(&format!("[rms_norm] Received unsupported type {name}."));
        assert_eq!(fast::rms_norm(&xi, None, 1e-5).unwrap_err(), expected);
        // An integer weight keeps the output integer too.
        let wi = Array::ones(&[3], DType::I32, &Device::Cpu).unwrap();
        let promoted = ferrofast::promote_types(dtype, DType::I32);
        assert_eq!(
            fast::rms_norm(&xi, Some(&wi), 1e-5).unwrap_err(),
            invalid(&format!("[rms_norm] Received unsupported type {promoted}."))
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
        let tol = randn_tol(dtype);
        let base = randn(&[24, 40], dtype, seed);
        let w24 = uniform(&[24], 0.5, 1.5, dtype, seed + 1);
        // Transposed: the normalised axis has stride 40.
        let t = base.transpose(&[1, 0]).unwrap();
        check_against_oracle(&t, Some(&w24), eps, tol, &format!("{dtype} transposed"));
        // Stepped slices on both axes, and reversed ones.
        let s = base.slice(&[1, 2], &[24, 40], &[2, 3]).unwrap();
        let ws = uniform(&[s.shape()[1]], 0.5, 1.5, dtype, seed + 2);
        check_against_oracle(&s, Some(&ws), eps, tol, &format!("{dtype} stepped"));
        let r = base.slice(&[-1, -1], &[-25, -41], &[-1, -1]).unwrap();
        let w40 = uniform(&[40], 0.5, 1.5, dtype, seed + 3);
        check_against_oracle(&r, Some(&w40), eps, tol, &format!("{dtype} reversed"));
        // Rows sliced out of a larger last axis (unit stride, gaps between rows).
        let inner = base.slice(&[0, 3], &[24, 36], &[1, 1]).unwrap();
        let w33 = uniform(&[33], 0.5, 1.5, dtype, seed + 4);
        check_against_oracle(
            &inner,
            Some(&w33),
            eps,
            tol,
            &format!("{dtype} inner slice"),
        );
        // Broadcast rows (leading stride 0) and a broadcast last axis (stride 0).
        let row = randn(&[1, 40], dtype, seed + 5);
        let rows = row.broadcast_to(&[3, 5, 40]).unwrap();
        let out = check_against_oracle(&rows, Some(&w40), eps, tol, &format!("{dtype} bcast rows"));
        assert_eq!(out.shape(), &[3, 5, 40]);
        let col = randn(&[6, 1], dtype, seed + 6);
        let cols = col.broadcast_to(&[6, 9]).unwrap();
        let w9 = uniform(&[9], 0.5, 1.5, dtype, seed + 7);
        check_against_oracle(
            &cols,
            Some(&w9),
            eps,
            tol,
            &format!("{dtype} bcast last axis"),
        );
        // A 3-D view whose leading axes do not merge: [B,T,H,D] read as [B,H,T,D].
        let bthd = randn(&[2, 5, 3, 16], dtype, seed + 8);
        let bhtd = bthd.swapaxes(1, 2).unwrap();
        let w16 = uniform(&[16], 0.5, 1.5, dtype, seed + 9);
        check_against_oracle(&bhtd, Some(&w16), eps, tol, &format!("{dtype} BHTD view"));
    }
}

#[test]
fn strided_and_broadcast_weights() {
    let x = randn(&[5, 20], DType::F32, 700);
    let big = uniform(&[40], 0.5, 1.5, DType::F32, 701);
    let stepped = big.slice(&[1], &[40], &[2]).unwrap();
    check_against_oracle(
        &x,
        Some(&stepped),
        1e-5,
        randn_tol(DType::F32),
        "stepped weight",
    );
    let reversed = big.slice(&[19], &[-41], &[-1]).unwrap();
    check_against_oracle(
        &x,
        Some(&reversed),
        1e-5,
        randn_tol(DType::F32),
        "reversed weight",
    );
    let bcast = Array::scalar(1.25f32).broadcast_to(&[20]).unwrap();
    check_against_oracle(
        &x,
        Some(&bcast),
        1e-5,
        randn_tol(DType::F32),
        "broadcast weight",
    );
}

#[test]
fn empty_and_one_dimensional_inputs() {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for shape in [vec![0usize, 8], vec![3, 0, 8], vec![0, 0, 1]] {
            let x = Array::zeros(&shape, dtype, &Device::Cpu).unwrap();
            let d = *shape.last().unwrap();
            let w = Array::ones(&[d], dtype, &Device::Cpu).unwrap();
            let out = fast::rms_norm(&x, Some(&w), 1e-5).unwrap();
            assert_eq!(out.shape(), shape.as_slice());
            assert_eq!(out.dtype(), dtype);
            assert_eq!(out.size(), 0);
        }
        // Rows of length 0: nothing to normalise, no panic, no division by zero.
        for shape in [vec![4usize, 0], vec![0], vec![2, 3, 0]] {
            let x = Array::zeros(&shape, dtype, &Device::Cpu).unwrap();
            let w = Array::zeros(&[0], dtype, &Device::Cpu).unwrap();
            let out = fast::rms_norm(&x, Some(&w), 1e-5).unwrap();
            assert_eq!(out.shape(), shape.as_slice());
            let out = fast::rms_norm(&x, None, 1e-5).unwrap();
            assert_eq!(out.shape(), shape.as_slice());
        }
        let x = randn(&[33], dtype, 800);
        let w = uniform(&[33], 0.5, 1.5, dtype, 801);
        let out = check_against_oracle(&x, Some(&w), 1e-5, randn_tol(dtype), "1-D");
        assert_eq!(out.shape(), &[33]);
    }
}

#[test]
fn eps_is_not_validated() {
    // MLX accepts any eps, negative included.
    let x = uniform(&[3, 10], 1.0, 2.0, DType::F32, 900);
    check_against_oracle(&x, None, -1e-3, randn_tol(DType::F32), "negative eps");
    check_against_oracle(&x, None, 0.0, randn_tol(DType::F32), "zero eps");
}

#[test]
fn non_finite_values_propagate() {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let mut vals = vec![1.0f64; 16];
        vals[2] = f64::NAN;
        vals[7] = f64::INFINITY;
        vals[9] = f64::NEG_INFINITY;
        let x = Array::from_vec(vals, &[4, 4])
            .unwrap()
            .astype(dtype)
            .unwrap();
        // Row 0 is all NaN; rows 1 and 2 have rsqrt(inf) = 0, so 0 except inf * 0 = NaN.
        let out = check_against_oracle(&x, None, 1e-5, randn_tol(dtype), &format!("{dtype}"));
        let v = out.to_f64_vec().unwrap();
        assert!(v[..4].iter().all(|v| v.is_nan()));
        assert_eq!(&v[4..7], &[0.0, 0.0, 0.0]);
        assert!(v[7].is_nan());
        let w = uniform(&[4], 0.5, 1.5, dtype, 950);
        check_against_oracle(&x, Some(&w), 1e-5, randn_tol(dtype), &format!("{dtype} w"));
        // A zero row with eps 0 is 0 * rsqrt(0) = 0 * inf = NaN.
        let z = Array::zeros(&[1, 4], dtype, &Device::Cpu).unwrap();
        let out = fast::rms_norm(&z, None, 0.0).unwrap().to_f64_vec().unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{dtype}: {out:?}");
    }
}

/// MLX's `rsqrt(mean(x^2) + eps)` in f32, summing in index order as the kernel does for rows
/// shorter than its 16 accumulator lanes.
fn mlx_inv<T: Float>(x: &[T], eps: f32) -> f32 {
    let mut sum = 0.0f32;
    for v in x {
        sum += v.to_f32() * v.to_f32();
    }
    1.0 / (sum * (1.0 / x.len() as f64) as f32 + eps).sqrt()
}

/// MLX's definition step by step: normalise in f32, round to the output dtype, multiply by
/// the weight in the output dtype.
fn emulate_mlx<T: Float>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let inv = mlx_inv(x, eps);
    x.iter()
        .zip(w)
        .map(|(v, w)| T::from_f32(T::from_f32(v.to_f32() * inv).to_f32() * w.to_f32()))
        .collect()
}

fn check_exact_rounding<T: Float>(dtype: DType) {
    let mut single_rounding_differs = 0;
    for d in 1..=15usize {
        let seed = 1000 + d as u64;
        let x = randn(&[64, d], dtype, seed);
        let w = uniform(&[d], 0.3, 3.0, dtype, seed + 1);
        let out = fast::rms_norm(&x, Some(&w), 1e-5)
            .unwrap()
            .to_vec::<T>()
            .unwrap();
        let xs = x.to_vec::<T>().unwrap();
        let ws = w.to_vec::<T>().unwrap();
        for (r, row) in xs.chunks(d).enumerate() {
            let got = &out[r * d..(r + 1) * d];
            let want = emulate_mlx(row, &ws, 1e-5);
            assert_eq!(got, want.as_slice(), "{dtype} D {d} row {r}, seed {seed}");
            // Rounding once, after the weight multiply, would give other answers.
            let inv = mlx_inv(row, 1e-5);
            single_rounding_differs += (0..d)
                .filter(|&i| T::from_f32(row[i].to_f32() * inv * ws[i].to_f32()) != got[i])
                .count();
        }
    }
    assert!(
        single_rounding_differs > 0,
        "{dtype}: the data does not tell the orders apart"
    );
}

#[test]
fn rounding_order_matches_mlx_exactly() {
    check_exact_rounding::<f16>(DType::F16);
    check_exact_rounding::<bf16>(DType::BF16);
    check_exact_rounding_f32();
}

fn check_exact_rounding_f32() {
    for d in 1..=15usize {
        let x = randn(&[16, d], DType::F32, 1100 + d as u64);
        let w = uniform(&[d], 0.3, 3.0, DType::F32, 1200 + d as u64);
        let out = fast::rms_norm(&x, Some(&w), 1e-5)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let xs = x.to_vec::<f32>().unwrap();
        let ws = w.to_vec::<f32>().unwrap();
        for (r, row) in xs.chunks(d).enumerate() {
            let want = emulate_mlx(row, &ws, 1e-5);
            assert_eq!(
                &out[r * d..(r + 1) * d],
                want.as_slice(),
                "f32 D {d} row {r}"
            );
        }
    }
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
        seed in 0u64..1_000_000,
    ) {
        let mut full = shape.clone();
        full.push(last);
        let base = randn(&full, dtype, seed);
        let x = random_view(&base, perm_seed, &steps);
        let d = *x.shape().last().unwrap();
        let w = uniform(&[d], 0.5, 1.5, dtype, seed + 1);
        let w = with_weight.then_some(&w);
        let what = format!("{dtype} view {:?} strides {:?}, seed {seed}", x.shape(), x.strides());
        check_against_oracle(&x, w, 1e-5, randn_tol(dtype), &what);
    }
}
