//! The backward passes `fast::rms_norm_vjp` and `fast::layer_norm_vjp`: the float64 oracle
//! against central finite differences of the float64 forward, then every case on every
//! device (CPU, then each CUDA device; the CUDA tests are ignored without the `gpu-tests`
//! feature) against the oracle: dtypes, mixed dtypes, odd and long rows (the GPU's looped
//! kernel), strided inputs, empty shapes, NaN, determinism and the errors.

#[macro_use]
mod common;

use common::{by_dtype, check_close, on, randn, uniform};
use ferrofast::{fast, reference, Array, DType, Device, Error};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Rms,
    Layer,
}

/// Gradients `(dx, dweight, dbias)` of one call, from `fast` or from the oracle.
type Grads = (Array, Option<Array>, Option<Array>);

fn fast_vjp(
    kind: Kind,
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    g: &Array,
) -> ferrofast::Result<Grads> {
    match kind {
        Kind::Rms => fast::rms_norm_vjp(x, w, EPS, g).map(|(dx, dw)| (dx, dw, None)),
        Kind::Layer => fast::layer_norm_vjp(x, w, b, EPS, g),
    }
}

fn oracle_vjp(kind: Kind, x: &Array, w: Option<&Array>, b: Option<&Array>, g: &Array) -> Grads {
    match kind {
        Kind::Rms => reference::rms_norm_vjp(x, w, EPS, g)
            .map(|(dx, dw)| (dx, dw, None))
            .unwrap(),
        Kind::Layer => reference::layer_norm_vjp(x, w, b, EPS, g).unwrap(),
    }
}

fn oracle_fwd(kind: Kind, x: &Array, w: Option<&Array>, b: Option<&Array>) -> Array {
    match kind {
        Kind::Rms => reference::rms_norm(x, w, EPS).unwrap(),
        Kind::Layer => reference::layer_norm(x, w, b, EPS).unwrap(),
    }
}

const EPS: f32 = 1e-5;

/// `(atol as a fraction of the largest reference magnitude, rtol)` of a gradient rounded to
/// `dtype` after f32 arithmetic.
fn tol(dtype: DType) -> (f64, f64) {
    by_dtype(
        dtype,
        [(2e-5, 2e-5), (4e-3, 4e-3), (2e-2, 2e-2), (1e-12, 1e-12)],
    )
}

/// The magnitudes the gradients' rounding errors scale with: the largest `|g * w| * n` of
/// any element (dx's terms before they cancel), the largest column sum of `|g * xc| * n`
/// (dweight) and of `|g|` (dbias).
fn scales(kind: Kind, x: &Array, w: Option<&Array>, g: &Array) -> [f64; 3] {
    let d = *x.shape().last().unwrap();
    let xs = x.to_f64_vec().unwrap();
    let gs = g.to_f64_vec().unwrap();
    let ws = w.map(|w| w.to_f64_vec().unwrap());
    let (mut sx, mut sw, mut sb) = (0.0f64, vec![0.0; d], vec![0.0; d]);
    for (xr, gr) in xs.chunks(d.max(1)).zip(gs.chunks(d.max(1))) {
        let mean = match kind {
            Kind::Layer => xr.iter().sum::<f64>() / d as f64,
            Kind::Rms => 0.0,
        };
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let n = 1.0 / (var + f64::from(EPS)).sqrt();
        for i in 0..d {
            let wi = ws.as_ref().map_or(1.0, |w| w[i]);
            sx = sx.max((gr[i] * wi).abs() * n);
            sw[i] += (gr[i] * (xr[i] - mean)).abs() * n;
            sb[i] += gr[i].abs();
        }
    }
    let max = |v: &[f64]| v.iter().fold(0.0f64, |m, &a| m.max(a));
    [sx, max(&sw), max(&sb)]
}

fn check_grad(got: &Array, want: &Array, dtype: DType, scale: f64, what: &str) {
    let (frac, rtol) = tol(dtype);
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    check_close(got, want, frac * scale.max(1e-30), rtol, what);
}

/// Runs one case on `dev`: inputs made on the CPU in the given dtypes, moved to `dev`.
#[allow(clippy::too_many_arguments)]
fn check_case(
    dev: &Device,
    kind: Kind,
    shape: &[usize],
    x_dtype: DType,
    w_dtype: Option<DType>,
    b_dtype: Option<DType>,
    g_dtype: DType,
    seed: u64,
) {
    let x = on(&randn(shape, x_dtype, seed), dev);
    check_inputs(dev, kind, &x, w_dtype, b_dtype, g_dtype, seed);
}

/// [`check_case`] for the given `x` (already on `dev`).
fn check_inputs(
    dev: &Device,
    kind: Kind,
    x: &Array,
    w_dtype: Option<DType>,
    b_dtype: Option<DType>,
    g_dtype: DType,
    seed: u64,
) {
    let (shape, x_dtype) = (x.shape(), x.dtype());
    let d = *shape.last().unwrap();
    let w = w_dtype.map(|t| on(&uniform(&[d], 0.5, 1.5, t, seed + 1), dev));
    let b = b_dtype.map(|t| on(&randn(&[d], t, seed + 2), dev));
    let g = on(&randn(shape, g_dtype, seed + 3), dev);
    let what =
        format!("{kind:?} {shape:?} x {x_dtype} w {w_dtype:?} b {b_dtype:?} seed {seed} on {dev}");
    let x = x.clone();
    let (dx, dw, db) =
        fast_vjp(kind, &x, w.as_ref(), b.as_ref(), &g).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (rx, rw, rb) = oracle_vjp(kind, &x, w.as_ref(), b.as_ref(), &g);
    let [sx, sw, sb] = scales(kind, &x, w.as_ref(), &g);
    assert_eq!(dx.device(), *dev, "{what}: dx device");
    check_grad(&dx, &rx, x_dtype, sx, &format!("{what}: dx"));
    match (&dw, &rw, w_dtype) {
        (Some(dw), Some(rw), Some(t)) => check_grad(dw, rw, t, sw, &format!("{what}: dweight")),
        (None, None, None) => {}
        _ => panic!("{what}: dweight presence"),
    }
    match (&db, &rb, b_dtype) {
        (Some(db), Some(rb), Some(t)) => check_grad(db, rb, t, sb, &format!("{what}: dbias")),
        (None, None, _) if kind == Kind::Rms || b_dtype.is_none() => {}
        _ => panic!("{what}: dbias presence"),
    }
}

#[test]
fn the_oracle_matches_finite_differences() {
    let h = 1e-6;
    for kind in [Kind::Rms, Kind::Layer] {
        for (with_w, with_b) in [(false, false), (true, false), (true, true), (false, true)] {
            let shape = [3, 7];
            let x = randn(&shape, DType::F64, 11);
            let w = with_w.then(|| uniform(&[7], 0.5, 1.5, DType::F64, 12));
            let b = with_b.then(|| randn(&[7], DType::F64, 13));
            let g = randn(&shape, DType::F64, 14);
            let gs = g.to_f64_vec().unwrap();
            // L(x, w, b) = sum(g * y).
            let loss = |x: &Array, w: Option<&Array>, b: Option<&Array>| -> f64 {
                let y = oracle_fwd(kind, x, w, b).to_f64_vec().unwrap();
                y.iter().zip(&gs).map(|(a, b)| a * b).sum()
            };
            let (dx, dw, db) = oracle_vjp(kind, &x, w.as_ref(), b.as_ref(), &g);
            let what = format!("{kind:?} w {with_w} b {with_b}");
            let numeric = |base: &Array, f: &dyn Fn(&Array) -> f64| -> Vec<f64> {
                let v = base.to_f64_vec().unwrap();
                (0..v.len())
                    .map(|i| {
                        let mut p = v.clone();
                        p[i] += h;
                        let mut m = v.clone();
                        m[i] -= h;
                        let ap = Array::from_vec(p, base.shape()).unwrap();
                        let am = Array::from_vec(m, base.shape()).unwrap();
                        (f(&ap) - f(&am)) / (2.0 * h)
                    })
                    .collect()
            };
            let close = |got: &Array, want: Vec<f64>, name: &str| {
                let want = Array::from_vec(want, got.shape()).unwrap();
                check_close(got, &want, 1e-6, 1e-6, &format!("{what}: {name}"));
            };
            close(&dx, numeric(&x, &|x| loss(x, w.as_ref(), b.as_ref())), "dx");
            if let Some(w) = &w {
                close(
                    dw.as_ref().unwrap(),
                    numeric(w, &|w| loss(&x, Some(w), b.as_ref())),
                    "dw",
                );
            } else {
                assert!(dw.is_none(), "{what}: dw without a weight");
            }
            match (kind, &b) {
                (Kind::Layer, Some(b)) => close(
                    db.as_ref().unwrap(),
                    numeric(b, &|b| loss(&x, w.as_ref(), Some(b))),
                    "db",
                ),
                _ => assert!(db.is_none(), "{what}: db"),
            }
        }
    }
}

/// Shapes over the kernels: tiny, odd, one element per row, a row per thread group, long
/// rows (the GPU's widest group kernel, then its looped kernel), many rows.
const SHAPES: [&[usize]; 9] = [
    &[1, 8],
    &[2, 3, 33],
    &[5, 1],
    &[7, 128],
    &[4, 1024],
    &[3, 4096],
    &[2, 6000],
    &[2, 20000],
    &[300, 256],
];

/// Shapes for the GPU backward's group kernel (see `group_kernel_shapes`), and row counts
/// past the resident blocks of the one-block-per-row kernel (two blocks of 512 threads a
/// multiprocessor: each block visits several rows of 3000-4096 elements), with a dx of more
/// than 16 MiB in every dtype at 2100 x 4096 (the CPU kernel's non-temporal stores).
const GROUP_SHAPES: [&[usize]; 15] = [
    &[45, 128],
    &[37, 256],
    &[21, 512],
    &[13, 1024],
    &[7, 2048],
    &[5, 8192],
    &[9, 130],
    &[11, 1001],
    &[3, 2050],
    &[6, 8191],
    &[9001, 128],
    &[4099, 1024],
    &[1100, 4096],
    &[1030, 3001],
    &[2100, 4096],
];

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

on_every_device! {
    /// Every shape and dtype, with and without weight and bias.
    fn gradients_match_the_oracle(dev: &Device) {
        let mut seed = 100;
        for kind in [Kind::Rms, Kind::Layer] {
            for &shape in &SHAPES {
                for dtype in FLOATS {
                    for (w, b) in [(true, true), (true, false), (false, true), (false, false)] {
                        if kind == Kind::Rms && b {
                            continue;
                        }
                        seed += 1;
                        check_case(
                            dev,
                            kind,
                            shape,
                            dtype,
                            w.then_some(dtype),
                            b.then_some(dtype),
                            dtype,
                            seed,
                        );
                    }
                }
            }
        }
    }

    /// MLX's dtype rules: the inputs are promoted to the output dtype, the gradients come
    /// back in each input's own dtype (f16 x with an f32 weight: dx f16, dweight f32).
    fn mixed_dtypes_give_each_input_its_dtype(dev: &Device) {
        let cases = [
            (DType::F16, DType::F32, DType::F32),
            (DType::BF16, DType::F32, DType::F32),
            (DType::F32, DType::BF16, DType::F32),
            (DType::BF16, DType::F16, DType::F32),
        ];
        for (i, (xt, wt, gt)) in cases.into_iter().enumerate() {
            for kind in [Kind::Rms, Kind::Layer] {
                let b = (kind == Kind::Layer).then_some(wt);
                check_case(dev, kind, &[6, 96], xt, Some(wt), b, gt, 300 + i as u64);
            }
        }
    }

    /// The GPU's group kernel (a group of 8-256 threads per row, several rows per block):
    /// rows of 128-8192 elements with row counts that are not multiples of the rows per
    /// block, widths that are not multiples of the 16-byte vector, and bf16 row counts large
    /// enough that each group or block visits several rows (prefetch and register
    /// partials).
    fn group_kernel_shapes(dev: &Device) {
        let mut seed = 1100;
        for kind in [Kind::Rms, Kind::Layer] {
            for &shape in &GROUP_SHAPES {
                let dtypes: &[DType] = if shape[0] > 2000 && shape[1] < 4096 { &[DType::BF16] } else { &FLOATS };
                for &dtype in dtypes {
                    for (w, b) in [(true, true), (false, false)] {
                        seed += 1;
                        let b = (b && kind == Kind::Layer).then_some(dtype);
                        check_case(dev, kind, shape, dtype, w.then_some(dtype), b, dtype, seed);
                    }
                }
            }
        }
    }

    /// Rows far from zero (mean 1000 or -500, spread 1), rows whose first element is an
    /// outlier (the shifted statistics' fallback), constant rows and rows with a single
    /// huge element, at lengths over the vector steps and their scalar tails, and rows past
    /// the GPU's register kernels (9000: looped).
    fn offset_outlier_and_constant_rows(dev: &Device) {
        let mut seed = 1500;
        for kind in [Kind::Rms, Kind::Layer] {
            for d in [64usize, 100, 4096, 9000] {
                for dtype in FLOATS {
                    seed += 4;
                    let rows = 6;
                    let mut xs = randn(&[rows, d], DType::F32, seed).to_vec::<f32>().unwrap();
                    for (r, row) in xs.chunks_mut(d).enumerate() {
                        match r {
                            0 => row.iter_mut().for_each(|v| *v += 1000.0),
                            1 => row.iter_mut().for_each(|v| *v -= 500.0),
                            2 => row[0] = 300.0,
                            3 => row.iter_mut().for_each(|v| *v = 2.5),
                            4 => row[d / 2] = 1e4,
                            _ => row.iter_mut().for_each(|v| *v = *v * 1e-3 + 40.0),
                        }
                    }
                    let x = Array::from_vec(xs, &[rows, d]).unwrap().astype(dtype).unwrap();
                    let b = (kind == Kind::Layer).then_some(dtype);
                    check_inputs(dev, kind, &on(&x, dev), Some(dtype), b, dtype, seed);
                }
            }
        }
    }

    /// Rows that are column slices of wider arrays (the kernels read them in place with a
    /// row stride): 16-byte aligned starts and strides, and starts one element in (scalar
    /// accesses), against the oracle.
    fn row_strided_inputs(dev: &Device) {
        let mut seed = 1200;
        for kind in [Kind::Rms, Kind::Layer] {
            for dtype in FLOATS {
                for (rows, d, pad, start) in [(37, 1024, 64, 0), (37, 1024, 64, 1), (9, 4096, 8, 1), (21, 200, 56, 8)] {
                    seed += 4;
                    let wide = |s: u64| {
                        on(&randn(&[rows, d + pad], dtype, s), dev)
                            .slice(&[0, start as isize], &[rows as isize, (start + d) as isize], &[1, 1])
                            .unwrap()
                    };
                    let (x, g) = (wide(seed), wide(seed + 1));
                    let w = on(&uniform(&[d], 0.5, 1.5, dtype, seed + 2), dev);
                    let b = on(&randn(&[d], dtype, seed + 3), dev);
                    let b = (kind == Kind::Layer).then_some(&b);
                    let what = format!("{kind:?} {dtype} rows {rows} d {d} stride {} start {start} on {dev}", d + pad);
                    let (dx, dw, db) = fast_vjp(kind, &x, Some(&w), b, &g).unwrap();
                    let (rx, rw, rb) = oracle_vjp(kind, &x, Some(&w), b, &g);
                    let [sx, sw, sb] = scales(kind, &x, Some(&w), &g);
                    check_grad(&dx, &rx, dtype, sx, &format!("{what}: dx"));
                    check_grad(&dw.unwrap(), &rw.unwrap(), dtype, sw, &format!("{what}: dweight"));
                    assert_eq!(db.is_some(), b.is_some(), "{what}: dbias presence");
                    if let (Some(db), Some(rb)) = (db, rb) {
                        check_grad(&db, &rb, dtype, sb, &format!("{what}: dbias"));
                    }
                }
            }
        }
    }

    /// Transposed and stepped inputs and cotangents give the contiguous results.
    fn strided_inputs(dev: &Device) {
        for kind in [Kind::Rms, Kind::Layer] {
            for dtype in FLOATS {
                let base = on(&randn(&[64, 10], dtype, 400), dev);
                let x = base.transpose(&[1, 0]).unwrap(); // [10, 64], last axis stride 10
                let g = on(&randn(&[10, 128], dtype, 401), dev)
                    .slice(&[0, 0], &[10, 128], &[1, 2])
                    .unwrap(); // [10, 64], stride 2
                let w = on(&uniform(&[128], 0.5, 1.5, dtype, 402), dev)
                    .slice(&[127], &[-129], &[-2])
                    .unwrap(); // reversed, stride -2
                let b = on(&randn(&[64], dtype, 403), dev);
                let b = (kind == Kind::Layer).then_some(&b);
                let (dx, dw, db) = fast_vjp(kind, &x, Some(&w), b, &g).unwrap();
                let (cx, cw, cb) = fast_vjp(
                    kind,
                    &x.contiguous().unwrap(),
                    Some(&w.contiguous().unwrap()),
                    b.map(|b| b.contiguous().unwrap()).as_ref(),
                    &g.contiguous().unwrap(),
                )
                .unwrap();
                let what = format!("{kind:?} {dtype} strided on {dev}");
                assert_eq!(dx.to_f64_vec().unwrap(), cx.to_f64_vec().unwrap(), "{what}: dx");
                assert_eq!(
                    dw.unwrap().to_f64_vec().unwrap(),
                    cw.unwrap().to_f64_vec().unwrap(),
                    "{what}: dw"
                );
                assert_eq!(db.is_some(), cb.is_some(), "{what}: db");
                let (rx, _, _) = oracle_vjp(kind, &x, Some(&w), b, &g);
                let [sx, _, _] = scales(kind, &x, Some(&w), &g);
                check_grad(&dx, &rx, dtype, sx, &format!("{what}: dx vs oracle"));
            }
        }
    }

    /// No rows gives empty dx and zero parameter gradients; rows of length 0 give empty
    /// everything.
    fn empty_shapes(dev: &Device) {
        for kind in [Kind::Rms, Kind::Layer] {
            let x = on(&Array::zeros(&[0, 16], DType::F32, &Device::Cpu).unwrap(), dev);
            let w = on(&uniform(&[16], 0.5, 1.5, DType::F32, 500), dev);
            let b = on(&randn(&[16], DType::F32, 501), dev);
            let b = (kind == Kind::Layer).then_some(&b);
            let (dx, dw, db) = fast_vjp(kind, &x, Some(&w), b, &x).unwrap();
            assert_eq!(dx.shape(), &[0, 16]);
            assert_eq!(dw.unwrap().to_f64_vec().unwrap(), vec![0.0; 16]);
            if let Some(db) = db {
                assert_eq!(db.to_f64_vec().unwrap(), vec![0.0; 16]);
            }
            let x = on(&Array::zeros(&[3, 0], DType::F32, &Device::Cpu).unwrap(), dev);
            let w = on(&Array::zeros(&[0], DType::F32, &Device::Cpu).unwrap(), dev);
            let (dx, dw, _) = fast_vjp(kind, &x, Some(&w), None, &x).unwrap();
            assert_eq!(dx.shape(), &[3, 0]);
            assert_eq!(dw.unwrap().shape(), &[0]);
        }
    }

    /// A NaN in a row makes that row's dx and every parameter gradient it touches NaN, and
    /// leaves the other rows alone.
    fn nan_propagates_to_its_row(dev: &Device) {
        for kind in [Kind::Rms, Kind::Layer] {
            let mut xs = randn(&[3, 40], DType::F32, 600).to_vec::<f32>().unwrap();
            xs[45] = f32::NAN; // row 1
            let x = on(&Array::from_vec(xs, &[3, 40]).unwrap(), dev);
            let w = on(&uniform(&[40], 0.5, 1.5, DType::F32, 601), dev);
            let g = on(&randn(&[3, 40], DType::F32, 602), dev);
            let (dx, dw, _) = fast_vjp(kind, &x, Some(&w), None, &g).unwrap();
            let dx = dx.to_f64_vec().unwrap();
            assert!(dx[40..80].iter().all(|v| v.is_nan()), "{kind:?}: row 1 of dx");
            assert!(dx[..40].iter().chain(&dx[80..]).all(|v| v.is_finite()), "{kind:?}: rows 0, 2");
            assert!(dw.unwrap().to_f64_vec().unwrap().iter().all(|v| v.is_nan()), "{kind:?}: dw");
        }
    }

    /// The same inputs give bit-identical gradients on every call.
    fn results_are_deterministic(dev: &Device) {
        for kind in [Kind::Rms, Kind::Layer] {
            let x = on(&randn(&[2048, 512], DType::BF16, 700), dev);
            let w = on(&uniform(&[512], 0.5, 1.5, DType::BF16, 701), dev);
            let b = on(&randn(&[512], DType::BF16, 702), dev);
            let g = on(&randn(&[2048, 512], DType::BF16, 703), dev);
            let b = (kind == Kind::Layer).then_some(&b);
            let bits = |r: Grads| -> Vec<Vec<f64>> {
                [Some(r.0), r.1, r.2]
                    .into_iter()
                    .flatten()
                    .map(|a| a.to_f64_vec().unwrap())
                    .collect()
            };
            let first = bits(fast_vjp(kind, &x, Some(&w), b, &g).unwrap());
            for _ in 0..3 {
                let again = bits(fast_vjp(kind, &x, Some(&w), b, &g).unwrap());
                assert_eq!(first, again, "{kind:?} on {dev}");
            }
        }
    }

    /// A cotangent of another shape or a non-floating dtype is an error, as are the
    /// forward's own validation errors.
    fn bad_cotangents_are_errors(dev: &Device) {
        let x = on(&randn(&[2, 8], DType::F32, 800), dev);
        let w = on(&randn(&[8], DType::F32, 801), dev);
        let g = on(&randn(&[2, 4], DType::F32, 802), dev);
        let err = fast::rms_norm_vjp(&x, Some(&w), EPS, &g).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidArgument(
                "[rms_norm_vjp] Output shape (2,8) does not match cotangent shape (2,4).".into()
            )
        );
        let err = fast::layer_norm_vjp(&x, Some(&w), None, EPS, &g).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.starts_with("[layer_norm_vjp] Output shape")),
            "{err}"
        );
        let gi = on(&Array::from_vec(vec![1i32; 16], &[2, 8]).unwrap(), dev);
        let err = fast::rms_norm_vjp(&x, Some(&w), EPS, &gi).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let w3 = on(&randn(&[3], DType::F32, 803), dev);
        let err = fast::rms_norm_vjp(&x, Some(&w3), EPS, &x).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidArgument(
                "[rms_norm] (*weight) must have the same size as the last dimension of x but has 3 elements."
                    .into()
            )
        );
    }
}

/// f64 is computed in f64 on the CPU.
#[test]
fn f64_on_the_cpu() {
    for kind in [Kind::Rms, Kind::Layer] {
        let b = (kind == Kind::Layer).then_some(DType::F64);
        check_case(
            &Device::Cpu,
            kind,
            &[5, 77],
            DType::F64,
            Some(DType::F64),
            b,
            DType::F64,
            900,
        );
    }
}

/// The cotangent on another device than `x` is an error.
#[cfg(feature = "cuda")]
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn cotangent_on_another_device_is_an_error() {
    let Some(dev) = common::gpu() else { return };
    let x = randn(&[2, 8], DType::F32, 1000);
    let g = on(&randn(&[2, 8], DType::F32, 1001), &dev);
    let err = fast::rms_norm_vjp(&x, None, EPS, &g).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
}
