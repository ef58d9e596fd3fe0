//! `fast::rms_norm` and `fast::layer_norm` against the float64 oracles on every device (the
//! CPU, then each CUDA device; the CUDA tests are ignored without the `gpu-tests` feature).
//!
//! Two oracles, two ways to account for low-precision rounding: `reference::rms_norm` /
//! `layer_norm` compute in exact f64 and the cases in `rms` and `layer` allow for the output
//! roundings with per-dtype `(atol, rtol)` (MLX's own tolerances for its cases); the cases at
//! the top level compare with `reference::rms_norm_rounded` / `layer_norm_rounded`, which
//! round where MLX's kernels round and give each element its tolerance.
//!
//! `rms` and `layer`: MLX's own test cases (spec §11.1), dtype promotion, every error
//! message, strided and empty inputs, NaN and infinities, and a property test over random
//! shapes and layouts. Top level: row lengths over every kernel plan, rows with offsets,
//! outliers and constants, strided, offset and broadcast inputs and parameters, and the
//! promotion of mixed dtypes. The CPU alone: f64 results and the exact rounding order of
//! MLX's kernels (in the CPU's summation order); CUDA alone: explicit streams, f64's
//! `Unsupported`, inputs on other devices, and strided GPU views against the CPU path. GPU
//! output buffers are poisoned, so unwritten elements fail.

#[macro_use]
mod common;

use common::{by_dtype, check_close, float_dtypes, on, randn, random_view, uniform, Input};
use ferrofast::fast::{layer_norm, layer_norm_on, rms_norm, rms_norm_on};
use ferrofast::reference::{self, RoundedNorm};
use ferrofast::{Array, DType, Device, Error, Stream};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// The dtypes every device takes.
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `Error::InvalidArgument(msg)`.
fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

/// The device array of `p`, if any.
fn dev_of(p: Option<&Input>) -> Option<&Array> {
    p.map(|p| &p.dev)
}

/// The CPU array of `p`, if any.
fn host_of(p: Option<&Input>) -> Option<&Array> {
    p.map(|p| &p.host)
}

/// Which norm a case computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Rms,
    Layer,
}

/// Runs the norm of `kind` on the device inputs (on `stream` when given) and checks it
/// against the rounding-aware oracle on the CPU inputs: device (and stream), shape, dtype,
/// a row-major output, and every element within the oracle's tolerance and not NaN
/// (unwritten elements of a poisoned GPU buffer are NaN). The CPU kernels compute layer
/// norm's mean plainly in f32 (MLX's definition) and also get the oracle's conditioning
/// allowance; the CUDA kernels' statistics (sums about each row's first element, two-pass
/// where those are inexact) are held to the rounding tolerance alone.
#[allow(clippy::too_many_arguments)]
fn check_rounded(
    kind: Kind,
    x: &Input,
    w: Option<&Input>,
    b: Option<&Input>,
    eps: f32,
    what: &str,
    stream: Option<&Stream>,
) {
    let dev = x.dev.device();
    let what = format!("{what} on {dev}");
    let (dx, dw, db) = (&x.dev, dev_of(w), dev_of(b));
    let out = match (kind, stream) {
        (Kind::Rms, None) => rms_norm(dx, dw, eps),
        (Kind::Rms, Some(s)) => rms_norm_on(s, dx, dw, eps),
        (Kind::Layer, None) => layer_norm(dx, dw, db, eps),
        (Kind::Layer, Some(s)) => layer_norm_on(s, dx, dw, db, eps),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let oracle: RoundedNorm = match kind {
        Kind::Rms => reference::rms_norm_rounded(&x.host, host_of(w), eps),
        Kind::Layer => reference::layer_norm_rounded(&x.host, host_of(w), host_of(b), eps),
    }
    .expect("oracle");
    assert_eq!(out.device(), dev, "{what}: device");
    assert_eq!(out.shape(), x.host.shape(), "{what}: shape");
    assert_eq!(out.dtype(), oracle.dtype, "{what}: dtype");
    assert!(out.is_contiguous(), "{what}: output is row-major");
    if let Some(s) = stream {
        assert_eq!(out.stream().as_ref(), Some(s), "{what}: stream");
    }
    let got = out.to_f64_vec().unwrap();
    let want = oracle.values.to_f64_vec().unwrap();
    let mut tol = oracle.tolerance.to_f64_vec().unwrap();
    if dev.is_cpu() {
        for (t, c) in tol
            .iter_mut()
            .zip(oracle.conditioning.to_f64_vec().unwrap())
        {
            *t += c;
        }
    }
    for (i, ((&g, &r), &t)) in got.iter().zip(&want).zip(&tol).enumerate() {
        assert!(
            !g.is_nan(),
            "{what}: element {i} is NaN (unwritten?), reference {r}"
        );
        assert!(
            (g - r).abs() <= t,
            "{what}: element {i} = {g}, reference {r} (tolerance {t})"
        );
    }
}

/// Rows for a row length: enough blocks to fill 132 SMs for short rows, fewer for long ones.
fn rows_for(d: usize) -> usize {
    (1usize << 20).div_ceil(d).clamp(3, 300)
}

/// Runs `body` for each dtype on its own thread (on a GPU every dtype needs its own kernels
/// compiled).
fn per_dtype(body: impl Fn(DType) + Sync) {
    std::thread::scope(|scope| {
        for dtype in DTYPES {
            let body = &body;
            scope.spawn(move || body(dtype));
        }
    });
}

/// Checks both norms (layer norm with the bias) on `base` seen through `view`, the view
/// made on each device, with the weight `w` and the bias `b`.
fn check_view(
    dev: &Device,
    base: &Array,
    view: impl Fn(&Array) -> Array,
    w: &Array,
    b: &Array,
    what: &str,
) {
    let x = Input::view(base, dev, view);
    let (w, b) = (Input::new(w, dev), Input::new(b, dev));
    check_rounded(Kind::Rms, &x, Some(&w), None, 1e-5, what, None);
    check_rounded(Kind::Layer, &x, Some(&w), Some(&b), 1e-5, what, None);
}

/// Takes a length-`d` view of a length-`2d` parameter.
type ParamView = fn(&Array, usize) -> Array;

/// The `(atol, rtol)` of the promotion case against the exact oracle.
fn promotion_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (5e-3, 5e-3),
        _ => (5e-2, 5e-2),
    }
}

/// The property test's strategy: a random shape (its last axis `1..70`), steps, a
/// permutation seed, a dtype from `dtypes`, the parameters present, a data seed.
#[allow(clippy::type_complexity)]
fn views(
    dtypes: Vec<DType>,
) -> impl Strategy<Value = (Vec<usize>, usize, Vec<isize>, u64, DType, bool, bool, u64)> {
    (
        prop::collection::vec(0usize..6, 1..4),
        1usize..70,
        prop::collection::vec(prop::sample::select(vec![1isize, 2, -1, -2]), 4),
        any::<u64>(),
        prop::sample::select(dtypes),
        any::<bool>(),
        any::<bool>(),
        0u64..1_000_000,
    )
}

/// The property tests' configuration: 64 cases, no failure persistence.
fn prop_config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(64)
    }
}

/// Runs `op` (a norm on the device inputs) and `oracle` (the exact oracle on the CPU
/// inputs), checks the output's device and compares at `(atol, rtol)`. Returns the output.
fn check_exact(
    x: &Input,
    (atol, rtol): (f64, f64),
    what: &str,
    op: impl FnOnce() -> ferrofast::Result<Array>,
    oracle: impl FnOnce() -> ferrofast::Result<Array>,
) -> Array {
    let dev = x.dev.device();
    let what = format!("{what} on {dev}");
    let out = op().unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = oracle().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), dev, "{what}: device");
    check_close(&out, &want, atol, rtol, &what);
    out
}

/// The dtypes of the strided-view cases with their seeds: f32, bf16, f16 and f64, those
/// `dev` takes.
fn view_dtypes(dev: &Device) -> impl Iterator<Item = (u64, DType)> + '_ {
    [DType::F32, DType::BF16, DType::F16, DType::F64]
        .into_iter()
        .enumerate()
        .filter(|(_, dtype)| float_dtypes(dev).contains(dtype))
        .map(|(i, dtype)| (600 + 10 * i as u64, dtype))
}

/// `norm(x, param)` (`op` names it in MLX's messages) refuses integer and bool inputs with
/// MLX's message, without parameters and with an int32 one (the promoted dtype named).
fn check_unsupported_types(
    op: &str,
    put: impl Fn(Array) -> Array,
    norm: impl Fn(&Array, Option<&Array>) -> ferrofast::Result<Array>,
) {
    for (dtype, name) in [
        (DType::I32, "int32"),
        (DType::U8, "uint8"),
        (DType::U32, "uint32"),
        (DType::I64, "int64"),
        (DType::Bool, "bool"),
    ] {
        let xi = put(Array::ones(&[2, 3], dtype, &Device::Cpu).unwrap());
        let expected = invalid(&format!("[{op}] Received unsupported type {name}."));
        assert_eq!(norm(&xi, None).unwrap_err(), expected);
        // An integer parameter keeps the output integer too.
        let wi = put(Array::ones(&[3], DType::I32, &Device::Cpu).unwrap());
        let promoted = ferrofast::promote_types(dtype, DType::I32);
        assert_eq!(
            norm(&xi, Some(&wi)).unwrap_err(),
            invalid(&format!("[{op}] Received unsupported type {promoted}."))
        );
    }
}

/// The odd row lengths (one element, around 32, past 4096) in every dtype `dev` takes, with
/// their seeds: `(seed, dtype, D)`.
fn odd_sizes(dev: &Device) -> impl Iterator<Item = (u64, DType, usize)> {
    float_dtypes(dev)
        .into_iter()
        .enumerate()
        .flat_map(|(i, dtype)| {
            [1usize, 31, 33, 4099]
                .into_iter()
                .enumerate()
                .map(move |(j, d)| (100 + 10 * i as u64 + j as u64, dtype, d))
        })
}

/// Inputs large enough to split across threads (row counts that do not divide evenly into
/// tasks, a single-element row, a long row) in f32 and bf16: `(seed, rows, D, dtype)`.
fn parallel_sizes() -> impl Iterator<Item = (u64, usize, usize, DType)> {
    [(40_001usize, 1usize), (257, 4099), (1000, 100)]
        .into_iter()
        .enumerate()
        .flat_map(|(i, (rows, d))| {
            [DType::F32, DType::BF16]
                .into_iter()
                .map(move |dtype| (200 + i as u64, rows, d, dtype))
        })
}

/// A promotion case's input: uniform in `[lo, hi)` (f64, from `seed`) cast to `dtype`.
fn promotion_input(shape: &[usize], lo: f64, hi: f64, seed: u64, dtype: DType) -> Array {
    uniform(shape, lo, hi, DType::F64, seed)
        .astype(dtype)
        .unwrap()
}

/// A promotion case's output: `Some` when it has the dtype `out_t`; `None` when `out_t` is
/// f64 on CUDA, which must be `Error::Unsupported`.
fn promoted_output(
    out: ferrofast::Result<Array>,
    out_t: DType,
    dev: &Device,
    what: &str,
) -> Option<Array> {
    if out_t == DType::F64 && dev.is_cuda() {
        assert!(matches!(out, Err(Error::Unsupported(_))), "{what}: {out:?}");
        return None;
    }
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.dtype(), out_t, "{what}");
    Some(out)
}

/// The property test over [`views`] on `dev`: `body(x, dtype, with_weight, with_bias, seed,
/// what)` for each random view `x` of a normal array drawn from `seed`.
fn for_random_views(dev: &Device, body: impl Fn(&Input, DType, bool, bool, u64, &str)) {
    TestRunner::new(prop_config())
        .run(
            &views(float_dtypes(dev)),
            |(shape, last, steps, perm_seed, dtype, with_weight, with_bias, seed)| {
                let mut full = shape.clone();
                full.push(last);
                let base = randn(&full, dtype, seed);
                let x = Input::view(&base, dev, |b| random_view(b, perm_seed, &steps));
                let what = format!(
                    "{dtype} view {:?} strides {:?}, seed {seed}",
                    x.host.shape(),
                    x.host.strides()
                );
                body(&x, dtype, with_weight, with_bias, seed, &what);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Asserts that `out` is an empty `shape` array of `dtype` on `dev`.
fn assert_empty(out: &Array, shape: &[usize], dtype: DType, dev: &Device) {
    assert_eq!(out.shape(), shape);
    assert_eq!(out.dtype(), dtype);
    assert_eq!(out.size(), 0);
    assert_eq!(out.device(), *dev);
}

/// `fast::rms_norm` against the exact oracle.
mod rms {
    use super::*;

    /// MLX's `test_rms_norm` absolute tolerances (spec §11.1), plus f64.
    fn mlx_tol(dtype: DType) -> f64 {
        by_dtype(dtype, [1e-6, 1e-3, 1e-2, 1e-12])
    }

    /// `(atol, rtol)` for normal-distributed inputs, where `|x_hat * w|` reaches ~10: two
    /// roundings to the output dtype (normalised value, then the product) plus f32
    /// statistics.
    fn randn_tol(dtype: DType) -> (f64, f64) {
        by_dtype(
            dtype,
            [(1e-5, 1e-5), (2e-3, 2e-3), (2e-2, 1.6e-2), (1e-12, 1e-12)],
        )
    }

    /// Runs `fast::rms_norm` on the device inputs and the oracle on the CPU ones, checks the
    /// output's device and compares at `(atol, rtol)`. Returns the output.
    pub(super) fn check(
        x: &Input,
        w: Option<&Input>,
        eps: f32,
        tol: (f64, f64),
        what: &str,
    ) -> Array {
        check_exact(
            x,
            tol,
            what,
            || rms_norm(&x.dev, dev_of(w), eps),
            || reference::rms_norm(&x.host, host_of(w), eps),
        )
    }

    on_every_device! {
        /// MLX's dtypes case: uniform [0, 1) inputs, with and without a weight.
        fn mlx_test_rms_norm_dtypes(dev: &Device) {
            let eps = 1e-5;
            let d = 32;
            for (i, dtype) in DTYPES.into_iter().enumerate() {
                let seed = 10 + i as u64;
                let x = Input::new(&uniform(&[2, d], 0.0, 1.0, dtype, seed), dev);
                let w = Input::new(&uniform(&[d], 0.0, 1.0, dtype, seed + 100), dev);
                let tol = (mlx_tol(dtype), 0.0);
                let out = check(&x, Some(&w), eps, tol, &format!("{dtype} seed {seed}"));
                assert_eq!(out.dtype(), dtype);
                let out = check(&x, None, eps, tol, &format!("{dtype} no w, seed {seed}"));
                assert_eq!(out.dtype(), dtype);
            }
        }

        /// MLX's eps and row-length cases, and its "> 4096" case: a single 1-D row of 4099.
        fn mlx_test_rms_norm_eps_and_dims(dev: &Device) {
            let tol = (mlx_tol(DType::F32), 0.0);
            for (i, eps) in [1e-3f32, 1e-5].into_iter().enumerate() {
                let seed = 20 + i as u64;
                let x = Input::new(&uniform(&[2, 32], 0.0, 1.0, DType::F32, seed), dev);
                let w = Input::new(&uniform(&[32], 0.0, 1.0, DType::F32, seed + 100), dev);
                check(&x, Some(&w), eps, tol, &format!("eps {eps}, seed {seed}"));
                check(&x, None, eps, tol, &format!("eps {eps} no w, seed {seed}"));
            }
            for (i, d) in [31, 32, 33, 256, 512].into_iter().enumerate() {
                let seed = 30 + i as u64;
                let x = Input::new(&uniform(&[2, d], 0.0, 1.0, DType::F32, seed), dev);
                let w = Input::new(&uniform(&[d], 0.0, 1.0, DType::F32, seed + 100), dev);
                check(&x, Some(&w), 1e-5, tol, &format!("D {d}, seed {seed}"));
                check(&x, None, 1e-5, tol, &format!("D {d} no w, seed {seed}"));
            }
            let x = Input::new(&uniform(&[4099], 0.0, 1.0, DType::F32, 40), dev);
            let w = Input::new(&uniform(&[4099], 0.0, 1.0, DType::F32, 41), dev);
            check(&x, Some(&w), 1e-5, (1e-6, 0.0), "1-D 4099, seed 40");
        }

        /// Odd row lengths (one element, around 32, past 4096) in every dtype the device
        /// takes.
        fn odd_sizes_every_dtype(dev: &Device) {
            for (seed, dtype, d) in odd_sizes(dev) {
                let x = Input::new(&randn(&[3, 5, d], dtype, seed), dev);
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1000), dev);
                let what = format!("{dtype} D {d}, seed {seed}");
                check(&x, Some(&w), 1e-5, randn_tol(dtype), &what);
                check(&x, None, 1e-5, randn_tol(dtype), &format!("{what}, no w"));
            }
        }

        /// Enough elements to split across threads, with row counts that do not divide
        /// evenly into tasks, a single-element row and a long row.
        fn many_rows_take_the_parallel_path(dev: &Device) {
            for (seed, rows, d, dtype) in parallel_sizes() {
                let x = Input::new(&randn(&[rows, d], dtype, seed), dev);
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1), dev);
                let what = format!("{dtype} [{rows},{d}], seed {seed}");
                check(&x, Some(&w), 1e-5, randn_tol(dtype), &what);
            }
        }

        /// MLX's promotion of x and the weight to the output dtype (integer and bool inputs
        /// included); an f64 output has no CUDA kernel.
        fn output_dtype_follows_mlx_promotion(dev: &Device) {
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
                let x = promotion_input(&[3, d], 0.0, 8.0, seed, xt);
                let w = wt.map(|t| promotion_input(&[d], 1.0, 4.0, seed + 1, t));
                let what = format!("x {xt}, w {wt:?}, seed {seed} on {dev}");
                let dw = w.as_ref().map(|w| on(w, dev));
                let out = rms_norm(&on(&x, dev), dw.as_ref(), 1e-5);
                let Some(out) = promoted_output(out, out_t, dev, &what) else {
                    continue;
                };
                // The oracle sees the inputs as MLX's kernel does: cast to the output dtype.
                let xc = x.astype(out_t).unwrap();
                let wc = w.as_ref().map(|w| w.astype(out_t).unwrap());
                let want = reference::rms_norm(&xc, wc.as_ref(), 1e-5).unwrap();
                let (atol, rtol) = randn_tol(out_t);
                check_close(&out, &want, 4.0 * atol, rtol, &what);
            }
        }

        /// Every error, with MLX's messages in MLX's order.
        fn errors_carry_mlx_messages_in_mlx_order(dev: &Device) {
            let put = |a: Array| on(&a, dev);
            let x = put(randn(&[4, 8], DType::F32, 500));
            let scalar = put(Array::scalar(1.0f32));
            assert_eq!(
                rms_norm(&scalar, None, 1e-5).unwrap_err(),
                invalid(
                    "[rms_norm] Input must have at least 1 dimension but got input with 0 \
                     dimensions."
                )
            );
            // The rank check on x comes before anything about the weight.
            let w2 = put(randn(&[2, 4], DType::F32, 501));
            assert!(matches!(
                rms_norm(&scalar, Some(&w2), 1e-5).unwrap_err(),
                Error::InvalidArgument(m) if m.contains("at least 1 dimension")
            ));
            // Weight rank before weight size: a (2,4) weight has 8 elements = D but is 2-D.
            assert_eq!(
                rms_norm(&x, Some(&w2), 1e-5).unwrap_err(),
                invalid("[rms_norm] (*weight) must have 1 dimension but has 2 dimensions.")
            );
            let w0 = put(Array::scalar(1.0f32));
            assert_eq!(
                rms_norm(&x, Some(&w0), 1e-5).unwrap_err(),
                invalid("[rms_norm] (*weight) must have 1 dimension but has 0 dimensions.")
            );
            let size_error = |n: usize| {
                invalid(&format!(
                    "[rms_norm] (*weight) must have the same size as the last dimension of x \
                     but has {n} elements."
                ))
            };
            // MLX's test: x (1,5) with a (4,) weight.
            let x5 = put(uniform(&[1, 5], 0.0, 1.0, DType::F32, 502));
            let w4 = put(Array::ones(&[4], DType::F32, &Device::Cpu).unwrap());
            assert_eq!(rms_norm(&x5, Some(&w4), 1e-5).unwrap_err(), size_error(4));
            // Size before dtype: an int x with a wrongly sized int weight reports the size.
            let xi = put(Array::zeros(&[4, 128], DType::I32, &Device::Cpu).unwrap());
            let wi = put(Array::ones(&[129], DType::I32, &Device::Cpu).unwrap());
            assert_eq!(rms_norm(&xi, Some(&wi), 1e-5).unwrap_err(), size_error(129));
            check_unsupported_types("rms_norm", put, |x, w| rms_norm(x, w, 1e-5));
        }

        /// Transposed, stepped, reversed, inner-sliced, broadcast (rows and the last axis)
        /// and [B, H, T, D] views in every dtype the device takes.
        fn non_contiguous_inputs(dev: &Device) {
            let eps = 1e-5;
            for (seed, dtype) in view_dtypes(dev) {
                let tol = randn_tol(dtype);
                let base = randn(&[24, 40], dtype, seed);
                let param = |n: usize, s: u64| Input::new(&uniform(&[n], 0.5, 1.5, dtype, s), dev);
                let w24 = param(24, seed + 1);
                // Transposed: the normalised axis has stride 40.
                let t = Input::view(&base, dev, |a| a.transpose(&[1, 0]).unwrap());
                check(&t, Some(&w24), eps, tol, &format!("{dtype} transposed"));
                // Stepped slices on both axes, and reversed ones.
                let s = Input::view(&base, dev, |a| a.slice(&[1, 2], &[24, 40], &[2, 3]).unwrap());
                let ws = param(s.host.shape()[1], seed + 2);
                check(&s, Some(&ws), eps, tol, &format!("{dtype} stepped"));
                let r = Input::view(&base, dev, |a| {
                    a.slice(&[-1, -1], &[-25, -41], &[-1, -1]).unwrap()
                });
                let w40 = param(40, seed + 3);
                check(&r, Some(&w40), eps, tol, &format!("{dtype} reversed"));
                // Rows sliced out of a larger last axis (unit stride, gaps between rows).
                let inner = Input::view(&base, dev, |a| a.slice(&[0, 3], &[24, 36], &[1, 1]).unwrap());
                let w33 = param(33, seed + 4);
                check(&inner, Some(&w33), eps, tol, &format!("{dtype} inner slice"));
                // Broadcast rows (leading stride 0) and a broadcast last axis (stride 0).
                let rows = Input::view(&randn(&[1, 40], dtype, seed + 5), dev, |a| {
                    a.broadcast_to(&[3, 5, 40]).unwrap()
                });
                let out = check(&rows, Some(&w40), eps, tol, &format!("{dtype} bcast rows"));
                assert_eq!(out.shape(), &[3, 5, 40]);
                let cols = Input::view(&randn(&[6, 1], dtype, seed + 6), dev, |a| {
                    a.broadcast_to(&[6, 9]).unwrap()
                });
                let w9 = param(9, seed + 7);
                check(&cols, Some(&w9), eps, tol, &format!("{dtype} bcast last axis"));
                // A 3-D view whose leading axes do not merge: [B,T,H,D] read as [B,H,T,D].
                let bhtd = Input::view(&randn(&[2, 5, 3, 16], dtype, seed + 8), dev, |a| {
                    a.swapaxes(1, 2).unwrap()
                });
                let w16 = param(16, seed + 9);
                check(&bhtd, Some(&w16), eps, tol, &format!("{dtype} BHTD view"));
            }
        }

        /// Stepped, reversed and broadcast weights.
        fn strided_and_broadcast_weights(dev: &Device) {
            let x = Input::new(&randn(&[5, 20], DType::F32, 700), dev);
            let big = uniform(&[40], 0.5, 1.5, DType::F32, 701);
            let tol = randn_tol(DType::F32);
            let stepped = Input::view(&big, dev, |a| a.slice(&[1], &[40], &[2]).unwrap());
            check(&x, Some(&stepped), 1e-5, tol, "stepped weight");
            let reversed = Input::view(&big, dev, |a| a.slice(&[19], &[-41], &[-1]).unwrap());
            check(&x, Some(&reversed), 1e-5, tol, "reversed weight");
            let bcast = Input::view(&Array::scalar(1.25f32), dev, |a| a.broadcast_to(&[20]).unwrap());
            check(&x, Some(&bcast), 1e-5, tol, "broadcast weight");
        }

        /// No rows, rows of length 0 (nothing to normalise, no division by zero), and a
        /// 1-D input, in every dtype the device takes.
        fn empty_and_one_dimensional_inputs(dev: &Device) {
            for dtype in float_dtypes(dev) {
                for shape in [vec![0usize, 8], vec![3, 0, 8], vec![0, 0, 1], vec![0, 16]] {
                    let x = Array::zeros(&shape, dtype, dev).unwrap();
                    let d = *shape.last().unwrap();
                    let w = Array::ones(&[d], dtype, dev).unwrap();
                    let out = rms_norm(&x, Some(&w), 1e-5).unwrap();
                    assert_empty(&out, &shape, dtype, dev);
                }
                for shape in [vec![4usize, 0], vec![0], vec![2, 3, 0]] {
                    let x = Array::zeros(&shape, dtype, dev).unwrap();
                    let w = Array::zeros(&[0], dtype, dev).unwrap();
                    let out = rms_norm(&x, Some(&w), 1e-5).unwrap();
                    assert_eq!(out.shape(), shape.as_slice());
                    assert_eq!(out.device(), *dev);
                    let out = rms_norm(&x, None, 1e-5).unwrap();
                    assert_eq!(out.shape(), shape.as_slice());
                }
                let x = Input::new(&randn(&[33], dtype, 800), dev);
                let w = Input::new(&uniform(&[33], 0.5, 1.5, dtype, 801), dev);
                let out = check(&x, Some(&w), 1e-5, randn_tol(dtype), "1-D");
                assert_eq!(out.shape(), &[33]);
            }
        }

        /// MLX accepts any eps, negative and zero included.
        fn eps_is_not_validated(dev: &Device) {
            let x = Input::new(&uniform(&[3, 10], 1.0, 2.0, DType::F32, 900), dev);
            check(&x, None, -1e-3, randn_tol(DType::F32), "negative eps");
            check(&x, None, 0.0, randn_tol(DType::F32), "zero eps");
        }

        /// NaN and infinities propagate as in MLX; a zero row with eps 0 is NaN.
        fn non_finite_values_propagate(dev: &Device) {
            for dtype in float_dtypes(dev) {
                let mut vals = vec![1.0f64; 16];
                vals[2] = f64::NAN;
                vals[7] = f64::INFINITY;
                vals[9] = f64::NEG_INFINITY;
                let x = Array::from_vec(vals, &[4, 4])
                    .unwrap()
                    .astype(dtype)
                    .unwrap();
                let x = Input::new(&x, dev);
                // Row 0 is all NaN; rows 1 and 2 have rsqrt(inf) = 0, so 0 except inf * 0 =
                // NaN.
                let out = check(&x, None, 1e-5, randn_tol(dtype), &format!("{dtype}"));
                let v = out.to_f64_vec().unwrap();
                assert!(v[..4].iter().all(|v| v.is_nan()), "{dtype} on {dev}");
                assert_eq!(&v[4..7], &[0.0, 0.0, 0.0], "{dtype} on {dev}");
                assert!(v[7].is_nan(), "{dtype} on {dev}");
                let w = Input::new(&uniform(&[4], 0.5, 1.5, dtype, 950), dev);
                check(&x, Some(&w), 1e-5, randn_tol(dtype), &format!("{dtype} w"));
                // A zero row with eps 0 is 0 * rsqrt(0) = 0 * inf = NaN.
                let z = Array::zeros(&[1, 4], dtype, dev).unwrap();
                let out = rms_norm(&z, None, 0.0).unwrap().to_f64_vec().unwrap();
                assert!(out.iter().all(|v| v.is_nan()), "{dtype} on {dev}: {out:?}");
            }
        }

        /// Random shapes, strided and permuted views, dtypes and weights.
        fn matches_oracle_on_random_views(dev: &Device) {
            for_random_views(dev, |x, dtype, with_weight, _, seed, what| {
                let d = *x.host.shape().last().unwrap();
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1), dev);
                check(x, with_weight.then_some(&w), 1e-5, randn_tol(dtype), what);
            });
        }
    }
}

/// `fast::layer_norm` against the exact oracle.
mod layer {
    use super::*;

    /// MLX's `test_layer_norm` absolute tolerances (spec §11.1), plus f64.
    fn mlx_tol(dtype: DType) -> f64 {
        by_dtype(dtype, [1e-5, 5e-3, 5e-2, 1e-12])
    }

    /// `(atol, rtol)` for normal-distributed inputs with weights in [0.5, 1.5) and biases in
    /// [-1, 1): up to three roundings to the output dtype of terms as large as ~8, so the
    /// absolute part covers an ulp of 8 (the result itself may cancel to near 0).
    fn randn_tol(dtype: DType) -> (f64, f64) {
        by_dtype(
            dtype,
            [(2e-5, 1e-5), (8e-3, 2e-3), (6e-2, 1.6e-2), (1e-12, 1e-12)],
        )
    }

    /// `tol` widened by the conditioning of the statistics: the compute type's mean is off
    /// by about an ulp of the row's largest element, and `x - mean` carries that error into
    /// the output scaled by `rsqrt(var + eps)` and the weight. That is inherent in MLX's f32
    /// definition (rows of nearly equal values with tiny variance hit it), not a kernel
    /// error.
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

    /// Runs `fast::layer_norm` on the device inputs and the oracle on the CPU ones, checks
    /// the output's device and compares at `(atol, rtol)`. Returns the output.
    pub(super) fn check(
        x: &Input,
        w: Option<&Input>,
        b: Option<&Input>,
        eps: f32,
        tol: (f64, f64),
        what: &str,
    ) -> Array {
        check_exact(
            x,
            tol,
            what,
            || layer_norm(&x.dev, dev_of(w), dev_of(b), eps),
            || reference::layer_norm(&x.host, host_of(w), host_of(b), eps),
        )
    }

    /// All four weight/bias combinations, as MLX's test runs them.
    fn check_all_combos(x: &Input, w: &Input, b: &Input, eps: f32, tol: (f64, f64), what: &str) {
        for (wo, bo, name) in [
            (Some(w), Some(b), "w+b"),
            (Some(w), None, "w"),
            (None, Some(b), "b"),
            (None, None, "none"),
        ] {
            let out = check(x, wo, bo, eps, tol, &format!("{what} {name}"));
            assert_eq!(out.dtype(), x.host.dtype(), "{what} {name}");
            assert_eq!(out.shape(), x.host.shape(), "{what} {name}");
        }
    }

    on_every_device! {
        /// MLX's dtypes case: uniform [0, 1) inputs, every weight/bias combination.
        fn mlx_test_layer_norm_dtypes(dev: &Device) {
            for (i, dtype) in DTYPES.into_iter().enumerate() {
                let seed = 10 + i as u64;
                let x = Input::new(&uniform(&[2, 32], 0.0, 1.0, dtype, seed), dev);
                let w = Input::new(&uniform(&[32], 0.0, 1.0, dtype, seed + 100), dev);
                let b = Input::new(&uniform(&[32], 0.0, 1.0, dtype, seed + 200), dev);
                let what = format!("{dtype}, seed {seed}");
                check_all_combos(&x, &w, &b, 1e-5, (mlx_tol(dtype), 0.0), &what);
            }
        }

        /// MLX's eps and row-length cases, and a single 1-D row of 4099.
        fn mlx_test_layer_norm_eps_and_dims(dev: &Device) {
            let tol = (mlx_tol(DType::F32), 0.0);
            let params = |d: usize, seed: u64| {
                (
                    Input::new(&uniform(&[d], 0.0, 1.0, DType::F32, seed + 100), dev),
                    Input::new(&uniform(&[d], 0.0, 1.0, DType::F32, seed + 200), dev),
                )
            };
            for (i, eps) in [1e-3f32, 1e-5].into_iter().enumerate() {
                let seed = 20 + i as u64;
                let x = Input::new(&uniform(&[2, 32], 0.0, 1.0, DType::F32, seed), dev);
                let (w, b) = params(32, seed);
                check_all_combos(&x, &w, &b, eps, tol, &format!("eps {eps}, seed {seed}"));
            }
            for (i, d) in [31, 32, 33].into_iter().enumerate() {
                let seed = 30 + i as u64;
                let x = Input::new(&uniform(&[2, d], 0.0, 1.0, DType::F32, seed), dev);
                let (w, b) = params(d, seed);
                check_all_combos(&x, &w, &b, 1e-5, tol, &format!("D {d}, seed {seed}"));
            }
            let x = Input::new(&uniform(&[4099], 0.0, 1.0, DType::F32, 40), dev);
            let w = Input::new(&uniform(&[4099], 0.0, 1.0, DType::F32, 41), dev);
            let b = Input::new(&uniform(&[4099], 0.0, 1.0, DType::F32, 42), dev);
            check_all_combos(&x, &w, &b, 1e-5, tol, "1-D 4099, seed 40");
        }

        /// MLX's `test_slice_into_layer_norm`: `x[:, 99:]` of a (8, 100, 128) array.
        fn mlx_test_slice_into_layer_norm(dev: &Device) {
            let base = uniform(&[8, 100, 128], 0.0, 1.0, DType::F32, 50);
            let x = Input::view(&base, dev, |a| a.slice(&[0, 99], &[8, 100], &[1, 1]).unwrap());
            assert_eq!(x.host.shape(), &[8, 1, 128]);
            check(&x, None, None, 1e-5, (1e-4, 0.0), "x[:, 99:], seed 50");
        }

        /// MLX's `test_layer_norm_dim_check`: a weight or bias of the wrong size.
        fn mlx_test_layer_norm_dim_check(dev: &Device) {
            let x = Array::uniform(&[4, 128], 0.0, 10.0, DType::I32, 60, &Device::Cpu).unwrap();
            let x = on(&x, dev);
            let ones = on(&Array::ones(&[129], DType::F32, &Device::Cpu).unwrap(), dev);
            assert_eq!(
                layer_norm(&x, Some(&ones), None, 1e-3).unwrap_err(),
                invalid(
                    "[layer_norm] weight must have the same size as the last dimension of x but \
                     has 129 elements."
                )
            );
            assert_eq!(
                layer_norm(&x, None, Some(&ones), 1e-3).unwrap_err(),
                invalid(
                    "[layer_norm] bias must have the same size as the last dimension of x but has \
                     129 elements."
                )
            );
        }

        /// Odd row lengths (one element, around 32, past 4096) in every dtype the device
        /// takes, every weight/bias combination.
        fn odd_sizes_every_dtype(dev: &Device) {
            for (seed, dtype, d) in odd_sizes(dev) {
                let x = Input::new(&randn(&[3, 5, d], dtype, seed), dev);
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1000), dev);
                let b = Input::new(&uniform(&[d], -1.0, 1.0, dtype, seed + 2000), dev);
                let what = format!("{dtype} D {d}, seed {seed}");
                let tol = cond_tol(&x.host, Some(&w.host), 1e-5, randn_tol(dtype));
                check_all_combos(&x, &w, &b, 1e-5, tol, &what);
            }
        }

        /// Enough elements to split across threads, with an offset mean, which the two-pass
        /// variance must not be disturbed by.
        fn many_rows_take_the_parallel_path(dev: &Device) {
            for (seed, rows, d, dtype) in parallel_sizes() {
                let x = Input::new(&uniform(&[rows, d], 10.0, 14.0, dtype, seed), dev);
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1), dev);
                let b = Input::new(&uniform(&[d], -1.0, 1.0, dtype, seed + 2), dev);
                let what = format!("{dtype} [{rows},{d}], seed {seed}");
                let tol = cond_tol(&x.host, Some(&w.host), 1e-5, randn_tol(dtype));
                check(&x, Some(&w), Some(&b), 1e-5, tol, &what);
            }
        }

        /// MLX's promotion, including the weight-absent rule (x's dtype, the bias cast
        /// down); an f64 output has no CUDA kernel.
        fn output_dtype_follows_mlx_promotion(dev: &Device) {
            let d = 16;
            let cases: [(DType, Option<DType>, Option<DType>, DType); 10] = [
                // Weight absent: x's dtype, even when the bias is wider (the bias is cast
                // down).
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
                let x = promotion_input(&[3, d], 0.0, 8.0, seed, xt);
                let w = wt.map(|t| promotion_input(&[d], 1.0, 4.0, seed + 1, t));
                let b = bt.map(|t| promotion_input(&[d], 0.0, 4.0, seed + 2, t));
                let what = format!("x {xt}, w {wt:?}, b {bt:?}, seed {seed} on {dev}");
                let (dw, db) = (w.as_ref().map(|w| on(w, dev)), b.as_ref().map(|b| on(b, dev)));
                let out = layer_norm(&on(&x, dev), dw.as_ref(), db.as_ref(), 1e-5);
                let Some(out) = promoted_output(out, out_t, dev, &what) else {
                    continue;
                };
                // The oracle sees the inputs as MLX's kernel does: cast to the output dtype.
                let xc = x.astype(out_t).unwrap();
                let wc = w.as_ref().map(|w| w.astype(out_t).unwrap());
                let bc = b.as_ref().map(|b| b.astype(out_t).unwrap());
                let want = reference::layer_norm(&xc, wc.as_ref(), bc.as_ref(), 1e-5).unwrap();
                let (atol, rtol) = cond_tol(&xc, wc.as_ref(), 1e-5, randn_tol(out_t));
                check_close(&out, &want, atol, rtol, &what);
            }
        }

        /// Every error, with MLX's messages in MLX's order.
        fn errors_carry_mlx_messages_in_mlx_order(dev: &Device) {
            let put = |a: Array| on(&a, dev);
            let x = put(randn(&[4, 8], DType::F32, 500));
            let scalar = put(Array::scalar(1.0f32));
            let w2 = put(randn(&[2, 4], DType::F32, 501));
            let w8 = put(randn(&[8], DType::F32, 502));
            let w7 = put(randn(&[7], DType::F32, 503));
            let rank0 = "[layer_norm] Input must have at least 1 dimension but got input with 0 \
                         dimensions.";
            assert_eq!(layer_norm(&scalar, None, None, 1e-5).unwrap_err(), invalid(rank0));
            assert_eq!(
                layer_norm(&scalar, Some(&w2), Some(&w2), 1e-5).unwrap_err(),
                invalid(rank0)
            );
            let w_rank = "[layer_norm] weight must have 1 dimension but has 2 dimensions.";
            assert_eq!(layer_norm(&x, Some(&w2), None, 1e-5).unwrap_err(), invalid(w_rank));
            // Every weight check comes before any bias check.
            assert_eq!(
                layer_norm(&x, Some(&w2), Some(&w2), 1e-5).unwrap_err(),
                invalid(w_rank)
            );
            let w_size = "[layer_norm] weight must have the same size as the last dimension of \
                          x but has 7 elements.";
            assert_eq!(
                layer_norm(&x, Some(&w7), Some(&w2), 1e-5).unwrap_err(),
                invalid(w_size)
            );
            assert_eq!(
                layer_norm(&x, Some(&w8), Some(&w2), 1e-5).unwrap_err(),
                invalid("[layer_norm] bias must have 1 dimension but has 2 dimensions.")
            );
            assert_eq!(
                layer_norm(&x, None, Some(&scalar), 1e-5).unwrap_err(),
                invalid("[layer_norm] bias must have 1 dimension but has 0 dimensions.")
            );
            assert_eq!(
                layer_norm(&x, Some(&w8), Some(&w7), 1e-5).unwrap_err(),
                invalid(
                    "[layer_norm] bias must have the same size as the last dimension of x but \
                     has 7 elements."
                )
            );
            // Integer x with only a bias: the output dtype is x's, which is not floating.
            let xi = put(Array::ones(&[4, 8], DType::I32, &Device::Cpu).unwrap());
            assert_eq!(
                layer_norm(&xi, None, Some(&w8), 1e-5).unwrap_err(),
                invalid("[layer_norm] Received unsupported type int32.")
            );
            check_unsupported_types("layer_norm", put, |x, p| layer_norm(x, p, p, 1e-5));
        }

        /// Transposed, stepped, reversed, broadcast (rows and the last axis: variance 0) and
        /// [B, H, T, D] views, and strided and broadcast parameters, in every dtype the device
        /// takes.
        fn non_contiguous_inputs(dev: &Device) {
            let eps = 1e-5;
            for (seed, dtype) in view_dtypes(dev) {
                let base = randn(&[24, 40], dtype, seed);
                // Weights are at most 1.5 everywhere below.
                let w_bound = Array::full(&[1], 1.5, DType::F64, &Device::Cpu).unwrap();
                let tol = |x: &Input| cond_tol(&x.host, Some(&w_bound), eps, randn_tol(dtype));
                let params = |d: usize, s: u64| {
                    (
                        Input::new(&uniform(&[d], 0.5, 1.5, dtype, s), dev),
                        Input::new(&uniform(&[d], -1.0, 1.0, dtype, s + 1), dev),
                    )
                };
                let t = Input::view(&base, dev, |a| a.transpose(&[1, 0]).unwrap());
                let (w, b) = params(24, seed + 1);
                check_all_combos(&t, &w, &b, eps, tol(&t), &format!("{dtype} transposed"));
                let s = Input::view(&base, dev, |a| a.slice(&[1, 2], &[24, 40], &[2, 3]).unwrap());
                let (w, b) = params(s.host.shape()[1], seed + 3);
                check_all_combos(&s, &w, &b, eps, tol(&s), &format!("{dtype} stepped"));
                let r = Input::view(&base, dev, |a| {
                    a.slice(&[-1, -1], &[-25, -41], &[-1, -1]).unwrap()
                });
                let (w, b) = params(40, seed + 5);
                check_all_combos(&r, &w, &b, eps, tol(&r), &format!("{dtype} reversed"));
                let rows = Input::view(&randn(&[1, 40], dtype, seed + 7), dev, |a| {
                    a.broadcast_to(&[3, 5, 40]).unwrap()
                });
                let what = format!("{dtype} bcast rows");
                check_all_combos(&rows, &w, &b, eps, tol(&rows), &what);
                // A broadcast last axis is a constant row: variance 0, the worst conditioning.
                let cols = Input::view(&randn(&[6, 1], dtype, seed + 8), dev, |a| {
                    a.broadcast_to(&[6, 9]).unwrap()
                });
                let (w, b) = params(9, seed + 9);
                let what = format!("{dtype} bcast last axis");
                check_all_combos(&cols, &w, &b, eps, tol(&cols), &what);
                let bhtd = Input::view(&randn(&[2, 5, 3, 16], dtype, seed + 11), dev, |a| {
                    a.swapaxes(1, 2).unwrap()
                });
                let (w, b) = params(16, seed + 12);
                let what = format!("{dtype} BHTD view");
                check_all_combos(&bhtd, &w, &b, eps, tol(&bhtd), &what);
                // Strided and broadcast parameters.
                let base = Input::new(&base, dev);
                let big = uniform(&[80], 0.5, 1.5, dtype, seed + 14);
                let ws = Input::view(&big, dev, |a| a.slice(&[1], &[80], &[2]).unwrap());
                let bs = Input::view(&big, dev, |a| a.slice(&[79], &[-81], &[-2]).unwrap());
                let what = format!("{dtype} params");
                check(&base, Some(&ws), Some(&bs), eps, tol(&base), &what);
                let wb = Array::scalar(1.25f64).astype(dtype).unwrap();
                let wb = Input::view(&wb, dev, |a| a.broadcast_to(&[40]).unwrap());
                let what = format!("{dtype} bcast params");
                check(&base, Some(&wb), Some(&wb), eps, tol(&base), &what);
            }
        }

        /// No rows, rows of length 0, and a 1-D input, in every dtype the device takes.
        fn empty_and_one_dimensional_inputs(dev: &Device) {
            for dtype in float_dtypes(dev) {
                for shape in [
                    vec![0usize, 8],
                    vec![3, 0, 8],
                    vec![4, 0],
                    vec![0],
                    vec![2, 3, 0],
                    vec![0, 16],
                ] {
                    let x = Array::zeros(&shape, dtype, dev).unwrap();
                    let d = *shape.last().unwrap();
                    let w = Array::ones(&[d], dtype, dev).unwrap();
                    let b = Array::zeros(&[d], dtype, dev).unwrap();
                    for (wo, bo) in [(Some(&w), Some(&b)), (None, None)] {
                        let out = layer_norm(&x, wo, bo, 1e-5).unwrap();
                        assert_empty(&out, &shape, dtype, dev);
                    }
                }
                let x = Input::new(&randn(&[33], dtype, 800), dev);
                let w = Input::new(&uniform(&[33], 0.5, 1.5, dtype, 801), dev);
                let b = Input::new(&uniform(&[33], -1.0, 1.0, dtype, 802), dev);
                let tol = cond_tol(&x.host, Some(&w.host), 1e-5, randn_tol(dtype));
                check_all_combos(&x, &w, &b, 1e-5, tol, &format!("{dtype} 1-D"));
            }
        }

        /// A constant row has variance 0: the result is the bias exactly (0 without one), for
        /// any eps > 0; eps is not validated (negative accepted); eps 0 on a constant row is
        /// 0 * rsqrt(0) = NaN, as in MLX.
        fn constant_rows_and_eps(dev: &Device) {
            let x = Input::new(&Array::full(&[3, 8], 2.5, DType::F32, &Device::Cpu).unwrap(), dev);
            let b = Input::new(&uniform(&[8], -1.0, 1.0, DType::F32, 850), dev);
            let out = check(&x, None, Some(&b), 1e-5, randn_tol(DType::F32), "const");
            let bv = b.host.to_f64_vec().unwrap();
            let ov = out.to_f64_vec().unwrap();
            assert_eq!(&ov[..8], bv.as_slice(), "on {dev}");
            let x = Input::new(&randn(&[3, 10], DType::F32, 851), dev);
            check(&x, None, None, -1e-4, randn_tol(DType::F32), "negative eps");
            let c = Array::full(&[1, 4], 1.0, DType::BF16, dev).unwrap();
            let out = layer_norm(&c, None, None, 0.0)
                .unwrap()
                .to_f64_vec()
                .unwrap();
            assert!(out.iter().all(|v| v.is_nan()), "on {dev}: {out:?}");
        }

        /// Random shapes, strided and permuted views, dtypes, weights and biases.
        fn matches_oracle_on_random_views(dev: &Device) {
            for_random_views(dev, |x, dtype, with_weight, with_bias, seed, what| {
                let d = *x.host.shape().last().unwrap();
                let w = Input::new(&uniform(&[d], 0.5, 1.5, dtype, seed + 1), dev);
                let b = Input::new(&uniform(&[d], -1.0, 1.0, dtype, seed + 2), dev);
                let tol = cond_tol(&x.host, Some(&w.host), 1e-5, randn_tol(dtype));
                let (wo, bo) = (with_weight.then_some(&w), with_bias.then_some(&b));
                check(x, wo, bo, 1e-5, tol, what);
            });
        }
    }
}

on_every_device! {
    // ----- against the rounding-aware oracle -------------------------------------------------

    /// RMS norm over every dtype, with and without a weight, and row lengths over every
    /// kernel plan (one element, a warp, a block, past 4096 and 16384, 65537).
    fn rms_norm_over_dtypes_sizes_and_weights(dev: &Device) {
        per_dtype(|dtype| {
            let mut seed = 1000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
            for d in [
                1usize, 8, 31, 32, 33, 127, 128, 256, 1000, 1024, 2048, 2049, 3000, 4096, 4099,
                8192, 8200, 16384, 16385, 40000, 65537,
            ] {
                for with_w in [true, false] {
                    seed += 1;
                    let rows = rows_for(d);
                    let x = Input::new(&randn(&[rows, d], dtype, seed), dev);
                    let w = Input::new(&randn(&[d], dtype, seed + 50_000), dev);
                    let what = format!("rms_norm {dtype} D={d} rows={rows} w={with_w} seed={seed}");
                    let w = with_w.then_some(&w);
                    check_rounded(Kind::Rms, &x, w, None, 1e-5, &what, None);
                }
            }
        });
    }

    /// Layer norm over every dtype, every weight/bias combination and row lengths over every
    /// kernel plan, with a nonzero mean so the centring matters.
    fn layer_norm_over_dtypes_sizes_weights_and_biases(dev: &Device) {
        per_dtype(|dtype| {
            let mut seed = 2000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
            for d in [1usize, 8, 31, 33, 128, 1024, 2048, 3000, 4096, 4099, 8192, 16385, 40000] {
                for (with_w, with_b) in [(true, true), (true, false), (false, true), (false, false)]
                {
                    seed += 1;
                    let rows = rows_for(d);
                    let x = Input::new(&uniform(&[rows, d], -1.0, 3.0, dtype, seed), dev);
                    let w = Input::new(&randn(&[d], dtype, seed + 50_000), dev);
                    let b = Input::new(&randn(&[d], dtype, seed + 60_000), dev);
                    let what = format!(
                        "layer_norm {dtype} D={d} rows={rows} w={with_w} b={with_b} seed={seed}"
                    );
                    let (w, b) = (with_w.then_some(&w), with_b.then_some(&b));
                    check_rounded(Kind::Layer, &x, w, b, 1e-5, &what, None);
                }
            }
        });
    }

    /// Rows that steer the GPU's one-reduction moments (sums about the row's first element)
    /// to both of its outcomes: a large mean with a small spread (trusted), the first element
    /// an outlier of its row (the exact two-pass fallback), constant rows, and a constant row
    /// but its first element.
    fn layer_norm_rows_with_offsets_outliers_and_constants(dev: &Device) {
        per_dtype(|dtype| {
            let mut seed = 7000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
            // Offsets the 16-bit types still resolve into distinct values around the mean.
            let (offset, outlier) = match dtype {
                DType::F32 => (1000.0f32, 5000.0f32),
                DType::F16 => (100.0, 2000.0),
                _ => (30.0, 2000.0),
            };
            for d in [8usize, 100, 1024, 2048, 3000, 4096, 4099, 16385, 40000] {
                seed += 1;
                let rows = 8;
                let noise = randn(&[rows, d], DType::F32, seed).to_vec::<f32>().unwrap();
                let mut data = Vec::with_capacity(rows * d);
                for r in 0..rows {
                    let z = &noise[r * d..(r + 1) * d];
                    for (i, &n) in z.iter().enumerate() {
                        data.push(match r % 4 {
                            0 => offset + n,
                            1 if i == 0 => outlier,
                            1 => n,
                            2 => offset,
                            _ if i == 0 => -outlier,
                            _ => 1.5,
                        });
                    }
                }
                let x = Array::from_vec(data, &[rows, d])
                    .unwrap()
                    .astype(dtype)
                    .unwrap();
                let x = Input::new(&x, dev);
                let w = Input::new(&randn(&[d], dtype, seed + 50_000), dev);
                let b = Input::new(&randn(&[d], dtype, seed + 60_000), dev);
                let what = format!("layer_norm {dtype} D={d} offsets/outliers seed={seed}");
                check_rounded(Kind::Layer, &x, Some(&w), Some(&b), 1e-5, &what, None);
                check_rounded(Kind::Layer, &x, None, None, 1e-5, &what, None);
            }
        });
    }

    /// 3-D inputs with other eps values, and a 1-D input (a single row).
    fn three_dimensional_inputs_and_other_eps(dev: &Device) {
        for dtype in DTYPES {
            let x = Input::new(&randn(&[4, 50, 96], dtype, 3001), dev);
            let w = Input::new(&randn(&[96], dtype, 3002), dev);
            let b = Input::new(&randn(&[96], dtype, 3003), dev);
            for eps in [1e-3f32, 1e-6] {
                let what = format!("{dtype} [4,50,96] eps={eps}");
                check_rounded(Kind::Rms, &x, Some(&w), None, eps, &what, None);
                check_rounded(Kind::Layer, &x, Some(&w), Some(&b), eps, &what, None);
            }
            let x1 = Input::new(&randn(&[4099], dtype, 3004), dev);
            let w1 = Input::new(&randn(&[4099], dtype, 3005), dev);
            check_rounded(Kind::Rms, &x1, Some(&w1), None, 1e-5, "1-D rms", None);
            check_rounded(Kind::Layer, &x1, Some(&w1), None, 1e-5, "1-D layer", None);
        }
    }

    /// Gapped rows at an odd offset, every other row, reversed rows, 16-byte and one-element
    /// offsets, leading axes that do not merge, a strided last axis and broadcast rows.
    fn strided_and_offset_inputs(dev: &Device) {
        for dtype in DTYPES {
            for d in [64usize, 33, 4096] {
                let w = randn(&[d], dtype, 4001);
                let b = randn(&[d], dtype, 4002);
                let what = |s: &str| format!("{dtype} D={d} {s}");
                // Rows with a gap after each (row stride D + 3), starting at an odd offset.
                let base = randn(&[200, d + 3], dtype, 4003);
                let slice = |a: &Array| a.slice(&[0, 1], &[200, d as isize + 1], &[1, 1]).unwrap();
                check_view(dev, &base, slice, &w, &b, &what("gapped rows"));
                // Every other row, and rows in reverse order (negative row stride).
                let base = randn(&[301, d], dtype, 4004);
                let every_other = |a: &Array| a.slice(&[0], &[301], &[2]).unwrap();
                check_view(dev, &base, every_other, &w, &b, &what("every other row"));
                let reversed = |a: &Array| a.slice(&[-1], &[-302], &[-1]).unwrap();
                check_view(dev, &base, reversed, &w, &b, &what("reversed rows"));
                // Aligned (offset of 16 bytes) and misaligned (one element) starts.
                let flat = randn(&[150 * d + 8], dtype, 4005);
                let shift = |k: usize| {
                    move |a: &Array| {
                        a.slice(&[k as isize], &[(k + 150 * d) as isize], &[1])
                            .unwrap()
                            .reshape(&[150, d])
                            .unwrap()
                    }
                };
                let what16 = what("offset 16B");
                check_view(dev, &flat, shift(16 / dtype.size()), &w, &b, &what16);
                check_view(dev, &flat, shift(1), &w, &b, &what("offset 1"));
                // Leading axes that do not merge: a contiguous copy first on CUDA.
                let base = randn(&[3, 60, d], dtype, 4006);
                let unmergeable = |a: &Array| a.slice(&[0, 7], &[3, 60], &[1, 1]).unwrap();
                check_view(dev, &base, unmergeable, &w, &b, &what("[3,53,D] of [3,60,D]"));
                // Last axis not contiguous: a copy first on CUDA.
                let base = randn(&[d, 140], dtype, 4007);
                let transposed = |a: &Array| a.transpose(&[1, 0]).unwrap();
                check_view(dev, &base, transposed, &w, &b, &what("transposed"));
                // One row broadcast to many (row stride 0).
                let base = randn(&[1, d], dtype, 4008);
                let broadcast = |a: &Array| a.broadcast_to(&[140, d]).unwrap();
                check_view(dev, &base, broadcast, &w, &b, &what("broadcast rows"));
            }
        }
    }

    /// Weights and biases read with stride 2, reversed, and one element in.
    fn strided_weights_and_biases(dev: &Device) {
        for dtype in DTYPES {
            let d = 4096;
            let x = Input::new(&randn(&[150, d], dtype, 5001), dev);
            let w2 = randn(&[2 * d], dtype, 5002);
            let b2 = randn(&[2 * d], dtype, 5003);
            let views: [(&str, ParamView); 3] = [
                ("stride 2", |a, d| a.slice(&[0], &[2 * d as isize], &[2]).unwrap()),
                ("reversed", |a, d| a.slice(&[-1], &[-(d as isize) - 1], &[-1]).unwrap()),
                ("offset 1", |a, d| a.slice(&[1], &[d as isize + 1], &[1]).unwrap()),
            ];
            for (name, view) in views {
                let w = Input::view(&w2, dev, |a| view(a, d));
                let b = Input::view(&b2, dev, |a| view(a, d));
                let what = format!("{dtype} weight {name}");
                check_rounded(Kind::Rms, &x, Some(&w), None, 1e-5, &what, None);
                check_rounded(Kind::Layer, &x, Some(&w), Some(&b), 1e-5, &what, None);
            }
        }
    }

    /// A weight of another dtype than x is cast first: f32 x with an f16 weight gives f32.
    fn mixed_parameter_dtypes_are_cast_first(dev: &Device) {
        let x = Input::new(&randn(&[4, 8], DType::F32, 7001), dev);
        let w16 = randn(&[8], DType::F32, 7002).astype(DType::F16).unwrap();
        let w16 = Input::new(&w16, dev);
        let what = "f32 x, f16 weight";
        check_rounded(Kind::Layer, &x, Some(&w16), None, 1e-5, what, None);
        let y = layer_norm(&x.dev, Some(&w16.dev), None, 1e-5).unwrap();
        assert_eq!((y.dtype(), y.device()), (DType::F32, *dev));
    }

    // ----- against the exact oracle ----------------------------------------------------------

    /// The norms run where their inputs live and promote as MLX does (mixed f16 / bf16 / f32
    /// inputs), for one element, odd and long rows; layer norm without parameters keeps x's
    /// dtype.
    fn norms_run_on_the_inputs_device_with_mlx_promotion(dev: &Device) {
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
                let x = randn(&[3, 5, d], xd, seed);
                let w = uniform(&[d], 0.5, 1.5, wd, seed + 1);
                let b = randn(&[d], wd, seed + 2);
                let (xg, wg, bg) = (on(&x, dev), on(&w, dev), on(&b, dev));
                let (atol, rtol) = promotion_tol(out);
                let what = format!("rms_norm x {xd} w {wd} d {d} seed {seed} on {dev}");
                let y = rms_norm(&xg, Some(&wg), 1e-5).unwrap();
                assert_eq!(y.device(), *dev, "{what}");
                assert_eq!(y.dtype(), out, "{what}");
                let r = reference::rms_norm(&x, Some(&w), 1e-5).unwrap();
                check_close(&y, &r, atol, rtol, &what);

                let what = format!("layer_norm x {xd} w {wd} d {d} seed {seed} on {dev}");
                let y = layer_norm(&xg, Some(&wg), Some(&bg), 1e-5).unwrap();
                assert_eq!(y.device(), *dev, "{what}");
                assert_eq!(y.dtype(), out, "{what}");
                let r = reference::layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap();
                check_close(&y, &r, atol, rtol, &what);

                let y = layer_norm(&xg, None, None, 1e-5).unwrap();
                assert_eq!(y.dtype(), xd, "{what} without params");
                let r = reference::layer_norm(&x, None, None, 1e-5).unwrap();
                let (atol, rtol) = promotion_tol(xd);
                check_close(&y, &r, atol, rtol, &format!("{what} without params"));
            }
        }
    }
}

/// Cases only the CPU has: f64 results (CUDA has no f64 norm), and the exact rounding order
/// of MLX's kernels, whose emulation sums in the CPU kernels' order.
mod cpu_only {
    use super::*;
    use ferrofast::{bf16, f16, Float};

    /// The CPU.
    const CPU: Device = Device::Cpu;

    /// RMS norm of f64 inputs is computed in f64.
    #[test]
    fn rms_norm_f64_is_computed_in_f64() {
        let x = Input::new(&randn(&[7, 333], DType::F64, 300), &CPU);
        let w = Input::new(&randn(&[333], DType::F64, 301), &CPU);
        let out = rms::check(&x, Some(&w), 1e-6, (1e-13, 1e-13), "f64, seed 300");
        assert_eq!(out.dtype(), DType::F64);
    }

    /// Layer norm of f64 inputs is computed in f64: with a large common offset, where f32
    /// statistics would lose digits.
    #[test]
    fn layer_norm_f64_is_computed_in_f64() {
        let x = Input::new(&uniform(&[7, 333], 1000.0, 1001.0, DType::F64, 300), &CPU);
        let w = Input::new(&randn(&[333], DType::F64, 301), &CPU);
        let b = Input::new(&randn(&[333], DType::F64, 302), &CPU);
        let out = layer::check(&x, Some(&w), Some(&b), 1e-6, (1e-10, 1e-10), "f64");
        assert_eq!(out.dtype(), DType::F64);
    }

    /// MLX's `rsqrt(mean(x^2) + eps)` in f32, summing in index order as the kernel does for
    /// rows shorter than its 16 accumulator lanes.
    fn rms_inv<T: Float>(x: &[T], eps: f32) -> f32 {
        let mut sum = 0.0f32;
        for v in x {
            sum += v.to_f32() * v.to_f32();
        }
        1.0 / (sum * (1.0 / x.len() as f64) as f32 + eps).sqrt()
    }

    /// MLX's RMS norm step by step: normalise in f32, round to the output dtype, multiply by
    /// the weight in the output dtype.
    fn rms_emulate<T: Float>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
        let inv = rms_inv(x, eps);
        x.iter()
            .zip(w)
            .map(|(v, w)| T::from_f32(T::from_f32(v.to_f32() * inv).to_f32() * w.to_f32()))
            .collect()
    }

    /// RMS norm equals [`rms_emulate`] bit for bit on rows of 1 to 15 elements, and rounding
    /// once (after the weight multiply) would give other answers on the same data.
    fn rms_exact_rounding<T: Float>(dtype: DType) {
        let mut single_rounding_differs = 0;
        for d in 1..=15usize {
            let seed = 1000 + d as u64;
            let x = randn(&[64, d], dtype, seed);
            let w = uniform(&[d], 0.3, 3.0, dtype, seed + 1);
            let out = rms_norm(&x, Some(&w), 1e-5).unwrap().to_vec::<T>().unwrap();
            let xs = x.to_vec::<T>().unwrap();
            let ws = w.to_vec::<T>().unwrap();
            for (r, row) in xs.chunks(d).enumerate() {
                let got = &out[r * d..(r + 1) * d];
                let want = rms_emulate(row, &ws, 1e-5);
                assert_eq!(got, want.as_slice(), "{dtype} D {d} row {r}, seed {seed}");
                let inv = rms_inv(row, 1e-5);
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

    /// RMS norm in f32 equals [`rms_emulate`] bit for bit on rows of 1 to 15 elements.
    fn rms_exact_rounding_f32() {
        for d in 1..=15usize {
            let x = randn(&[16, d], DType::F32, 1100 + d as u64);
            let w = uniform(&[d], 0.3, 3.0, DType::F32, 1200 + d as u64);
            let out = rms_norm(&x, Some(&w), 1e-5)
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            let xs = x.to_vec::<f32>().unwrap();
            let ws = w.to_vec::<f32>().unwrap();
            for (r, row) in xs.chunks(d).enumerate() {
                let want = rms_emulate(row, &ws, 1e-5);
                assert_eq!(
                    &out[r * d..(r + 1) * d],
                    want.as_slice(),
                    "f32 D {d} row {r}"
                );
            }
        }
    }

    /// RMS norm rounds where MLX's kernel rounds, bit for bit.
    #[test]
    fn rms_norm_rounding_order_matches_mlx_exactly() {
        rms_exact_rounding::<f16>(DType::F16);
        rms_exact_rounding::<bf16>(DType::BF16);
        rms_exact_rounding_f32();
    }

    /// MLX's layer norm step by step for rows short enough that the kernel's f32 sums run
    /// in index order: mean and variance in f32, normalise, round to the output dtype, then
    /// `* w` and `+ b` each rounded to the output dtype.
    fn layer_emulate<T: Float>(x: &[T], w: Option<&[T]>, b: Option<&[T]>, eps: f32) -> Vec<T> {
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

    /// Layer norm equals [`layer_emulate`] bit for bit on rows of 1 to 15 elements, for every
    /// weight/bias combination.
    fn layer_exact_rounding<T: Float>(dtype: DType) {
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
                let out = layer_norm(&x, wo, bo, 1e-5).unwrap().to_vec::<T>().unwrap();
                for (r, row) in xs.chunks(d).enumerate() {
                    let want = layer_emulate(
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

    /// Layer norm rounds where MLX's kernel rounds, bit for bit.
    #[test]
    fn layer_norm_rounding_order_matches_mlx_exactly() {
        layer_exact_rounding::<f16>(DType::F16);
        layer_exact_rounding::<bf16>(DType::BF16);
        layer_exact_rounding::<f32>(DType::F32);
    }
}

/// Cases only CUDA has: explicit streams, f64 (no CUDA kernel), inputs on other devices,
/// and strided GPU views against the CPU path.
#[cfg(feature = "cuda")]
mod cuda_only {
    use super::*;

    on_every_gpu! {
        /// Both norms on a stream of their own, and an input produced on another stream.
        fn explicit_streams(gpu: Device) {
            let s = Stream::new(&gpu).unwrap();
            for dtype in DTYPES {
                let x = Input::new(&randn(&[300, 1000], dtype, 6001), &gpu);
                let w = Input::new(&randn(&[1000], dtype, 6002), &gpu);
                let b = Input::new(&randn(&[1000], dtype, 6003), &gpu);
                let what = "rms on a stream";
                check_rounded(Kind::Rms, &x, Some(&w), None, 1e-5, what, Some(&s));
                let what = "layer on a stream";
                check_rounded(Kind::Layer, &x, Some(&w), Some(&b), 1e-5, what, Some(&s));
                // Input produced on one stream, consumed on another.
                let s2 = Stream::new(&gpu).unwrap();
                let x2 = Input {
                    host: x.host.clone(),
                    dev: x.host.to_stream(&s2).unwrap(),
                };
                let what = "cross-stream input";
                check_rounded(Kind::Rms, &x2, Some(&w), None, 1e-5, what, Some(&s));
            }
        }

        /// f64 has no CUDA kernel: `Error::Unsupported`.
        fn f64_is_unsupported(gpu: Device) {
            let x64 = on(&randn(&[4, 8], DType::F64, 7001), &gpu);
            let r = rms_norm(&x64, None, 1e-5);
            assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        }

        /// A weight on the CPU with a GPU x, and a CPU x with a GPU stream, are `Error::Device`;
        /// validation comes first, with MLX's messages.
        fn inputs_on_other_devices_are_errors(gpu: Device) {
            let x = Array::randn(&[4, 128], DType::F32, 1, &gpu).unwrap();
            let w = Array::randn(&[129], DType::F32, 2, &gpu).unwrap();
            let e = rms_norm(&x, Some(&w), 1e-5).unwrap_err().to_string();
            assert_eq!(
                e,
                "[rms_norm] (*weight) must have the same size as the last dimension of x but has \
                 129 elements."
            );
            let w_cpu = Array::randn(&[128], DType::F32, 3, &Device::Cpu).unwrap();
            let r = rms_norm(&x, Some(&w_cpu), 1e-5);
            assert!(matches!(r, Err(Error::Device(_))), "{r:?}");
            let x8 = on(&randn(&[4, 8], DType::F32, 7001), &gpu);
            let host_w = randn(&[8], DType::F32, 7004);
            let r = rms_norm(&x8, Some(&host_w), 1e-5);
            assert!(matches!(r, Err(Error::Device(_))), "{r:?}");
            let host_x = randn(&[4, 8], DType::F32, 7005);
            let stream = gpu.default_stream().unwrap();
            let r = rms_norm_on(&stream, &host_x, None, 1e-5);
            assert!(matches!(r, Err(Error::Device(_))), "{r:?}");
        }

        /// Strided GPU views give the CPU path's result on the same views: MLX's
        /// `test_slice_into_layer_norm` (`x[:, 99:]`) and a transposed view.
        fn strided_gpu_views_match_the_cpu(gpu: Device) {
            for (seed, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
                let base = randn(&[8, 100, 128], dtype, 70 + seed as u64);
                let views: [fn(&Array) -> Array; 2] = [
                    |a| a.slice(&[0, 99], &[8, 100], &[1, 1]).unwrap(),
                    |a| a.swapaxes(0, 1).unwrap(),
                ];
                for view in views {
                    let v = Input::view(&base, &gpu, view);
                    let (atol, rtol) = promotion_tol(dtype);
                    let y = layer_norm(&v.dev, None, None, 1e-5).unwrap();
                    let c = layer_norm(&v.host, None, None, 1e-5).unwrap();
                    check_close(&y, &c, atol, rtol, &format!("strided layer_norm {dtype}"));
                    let y = rms_norm(&v.dev, None, 1e-5).unwrap();
                    let c = rms_norm(&v.host, None, 1e-5).unwrap();
                    check_close(&y, &c, atol, rtol, &format!("strided rms_norm {dtype}"));
                }
            }
        }
    }
}
