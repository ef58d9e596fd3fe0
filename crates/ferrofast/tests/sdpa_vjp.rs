//! The attention backward pass `fast::scaled_dot_product_attention_vjp` and the forward that
//! saves the log-sum-exp: the float64 oracle against central finite differences, then every
//! case on every device (CPU, then each CUDA device; the CUDA tests are ignored without the
//! `gpu-tests` feature) against the oracle: dtypes, grouped-query heads, causal masks of
//! every alignment, bool and additive masks with broadcasting and empty rows, sinks and
//! their gradient, strided inputs, mixed dtypes, empty shapes, NaN, determinism and errors.

#[macro_use]
mod common;

use common::{
    by_dtype, check_close, on, randn, uniform, AttnGrads as Grads, AttnProblem as Problem,
};
use ferrofast::fast::{self, Mask};
use ferrofast::{reference, Array, DType, Device};
use std::sync::Mutex;

/// Held by the tests that set the kernel-choice variables below (each test binary is one
/// process: two such tests must not interleave). Other tests may run meanwhile; the
/// variables change which kernel runs, never the result beyond rounding.
static ENV: Mutex<()> = Mutex::new(());
/// Picks the attention backward's kernels (`mma`: never the Hopper kernels).
const KERNEL_VAR: &str = "FERROFAST_BACKWARD_KERNEL";
/// `1`: bit-reproducible kernels only (the Hopper backward's two passes).
const DETERMINISTIC_VAR: &str = "FERROFAST_DETERMINISTIC";

/// One attention problem, made on the CPU: sinks (when `sinks`) in [-1, 2), scale
/// `1 / sqrt(D)`.
fn problem(
    dims: (usize, usize, usize, usize, usize, usize, usize),
    dtype: DType,
    sinks: bool,
    seed: u64,
) -> Problem {
    let scale = 1.0 / (dims.5 as f32).sqrt();
    Problem::new(dims, dtype, sinks.then_some((-1.0, 2.0)), scale, seed)
}

/// The `wide` problem (`T_q < T_kv`, seed `seed`) with no mask, causal, and the bool mask
/// `[1, 1, T_q, T_kv]` keeping the entries `e` (row-major) where `keep(e)`; the `tall` one
/// (`T_q > T_kv`, with sinks, seed `seed + 1`) causal, named `tall_what`. Each check is
/// named `what(case)`.
fn check_masks(
    dev: &Device,
    [wide, tall]: [(usize, usize, usize, usize, usize, usize, usize); 2],
    dtype: DType,
    seed: u64,
    keep: impl Fn(usize) -> bool,
    what: &dyn Fn(&str) -> String,
    tall_what: &str,
) {
    let p = problem(wide, dtype, false, seed);
    check(&p, Mask::None, dev, &what("no mask"));
    check(&p, Mask::Causal, dev, &what("causal, T_q < T_kv"));
    let t = problem(tall, dtype, true, seed + 1);
    check(&t, Mask::Causal, dev, &what(tall_what));
    let (tq, tkv) = (wide.3, wide.4);
    let keep: Vec<bool> = (0..tq * tkv).map(keep).collect();
    let keep = Array::from_vec(keep, &[1, 1, tq, tkv]).unwrap();
    check(&p, Mask::Array(&keep), dev, &what("bool mask"));
}

fn max_abs(a: &Array) -> f64 {
    a.to_f64_vec()
        .unwrap()
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// `(fraction of the largest reference magnitude, rtol)` for gradients of `dtype`.
fn tol(dtype: DType) -> (f64, f64) {
    by_dtype(
        dtype,
        [(1e-4, 1e-4), (5e-3, 5e-3), (3e-2, 3e-2), (1e-11, 1e-11)],
    )
}

/// Runs the forward with its log-sum-exp and the backward on `dev`.
fn fast_grads(p: &Problem, mask: Mask<'_>, dev: &Device) -> (Array, Array, Grads) {
    let (q, k, v, g) = (
        on(&p.q, dev),
        on(&p.k, dev),
        on(&p.v, dev),
        on(&p.d_out, dev),
    );
    let sinks = p.sinks.as_ref().map(|s| on(s, dev));
    let mask_dev = match mask {
        Mask::Array(m) => Some(on(m, dev)),
        _ => None,
    };
    let mask = match (&mask_dev, mask) {
        (Some(m), _) => Mask::Array(m),
        (None, m) => m,
    };
    let (out, lse) =
        fast::scaled_dot_product_attention_with_lse(&q, &k, &v, p.scale, mask, sinks.as_ref())
            .expect("forward with lse");
    let grads = fast::scaled_dot_product_attention_vjp(
        &q,
        &k,
        &v,
        p.scale,
        mask,
        sinks.as_ref(),
        &out,
        &lse,
        &g,
    )
    .expect("backward");
    (out, lse, grads)
}

/// [`check_masks`] on the tensor-core kernels' cases at head dims `(d, dv)`: GQA
/// `[1, 4 / 2, 77 x 131]` with no mask, causal (T_q < T_kv) and a bool mask hiding row 9
/// entirely; MQA `[2, 2 / 1, 150 x 40]` causal (T_q > T_kv) with sinks.
fn check_tile_masks(
    dev: &Device,
    d: usize,
    dv: usize,
    dtype: DType,
    seed: u64,
    what: &dyn Fn(&str) -> String,
) {
    check_masks(
        dev,
        [(1, 4, 2, 77, 131, d, dv), (2, 2, 1, 150, 40, d, dv)],
        dtype,
        seed,
        |e| e / 131 != 9 && (e * 13) % 7 != 0,
        what,
        "causal, T_q > T_kv, sinks, MQA",
    );
}

/// Checks the fast gradients on `dev` against the oracle's.
fn check(p: &Problem, mask: Mask<'_>, dev: &Device, what: &str) -> Grads {
    let (_, _, (dq, dk, dv, ds)) = fast_grads(p, mask, dev);
    let (rq, rk, rv, rs) = p.oracle_grads(mask);
    let (frac, rtol) = tol(p.q.dtype());
    let back = |a: &Array| on(a, &Device::Cpu);
    let grads = (back(&dq), back(&dk), back(&dv), ds.as_ref().map(back));
    for (name, got, want, primal) in [
        ("dq", &grads.0, &rq, &p.q),
        ("dk", &grads.1, &rk, &p.k),
        ("dv", &grads.2, &rv, &p.v),
    ] {
        assert_eq!(got.dtype(), primal.dtype(), "{what}: {name} dtype");
        assert_eq!(got.device(), Device::Cpu);
        check_close(
            got,
            want,
            frac * max_abs(want),
            rtol,
            &format!("{what}: {name}"),
        );
    }
    match (&grads.3, &rs, &p.sinks) {
        (Some(got), Some(want), Some(s)) => {
            assert_eq!(got.dtype(), s.dtype(), "{what}: dsinks dtype");
            // A sum over every row of the head: compare with the sum's scale.
            check_close(
                got,
                want,
                2.0 * frac * max_abs(want),
                rtol,
                &format!("{what}: dsinks"),
            );
        }
        (None, None, None) => {}
        _ => panic!("{what}: dsinks present where it should not be, or missing"),
    }
    grads
}

#[test]
fn oracle_matches_finite_differences() {
    let p = problem((1, 4, 2, 5, 7, 6, 3), DType::F64, true, 1);
    let add = uniform(&[1, 1, 5, 7], -1.0, 1.0, DType::F64, 9);
    for mask in [Mask::None, Mask::Causal, Mask::Array(&add)] {
        let loss = |q: &Array, k: &Array, v: &Array, s: &Array| -> f64 {
            let out = reference::scaled_dot_product_attention(q, k, v, p.scale, mask, Some(s))
                .unwrap()
                .to_f64_vec()
                .unwrap();
            let g = p.d_out.to_f64_vec().unwrap();
            out.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let sinks = p.sinks.as_ref().unwrap();
        let grads = p.oracle_grads(mask);
        let dsinks = grads.3.clone().unwrap();
        let inputs = [&p.q, &p.k, &p.v, sinks];
        let analytic = [&grads.0, &grads.1, &grads.2, &dsinks];
        for which in 0..4 {
            let base = inputs[which].to_f64_vec().unwrap();
            let g = analytic[which].to_f64_vec().unwrap();
            for idx in (0..base.len()).step_by(base.len().div_ceil(9).max(1)) {
                let h = 1e-6;
                let bump = |delta: f64| {
                    let mut x = base.clone();
                    x[idx] += delta;
                    let a = Array::from_vec(x, inputs[which].shape()).unwrap();
                    let mut args = inputs.map(|t| t.clone());
                    args[which] = a;
                    loss(&args[0], &args[1], &args[2], &args[3])
                };
                let fd = (bump(h) - bump(-h)) / (2.0 * h);
                assert!(
                    (fd - g[idx]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "mask {mask:?} input {which} element {idx}: analytic {} vs finite difference {fd}",
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn f64_calls_compute_in_f64() {
    let p = problem((2, 4, 2, 19, 23, 16, 8), DType::F64, true, 5);
    check(&p, Mask::Causal, &Device::Cpu, "f64 causal with sinks");
    let (_, lse, _) = fast_grads(&p, Mask::None, &Device::Cpu);
    assert_eq!(lse.dtype(), DType::F64);
}

/// The CPU forward splits the keys into ranges merged afterwards when it has more threads
/// than tasks (few kv heads, few queries): its log-sum-exp, and the backward that reads it,
/// must not depend on the thread count. Each case runs in pools of 1, 2, 4 and 16 threads
/// (shapes over 2^22 multiply-adds, so the forward is not kept on the calling thread).
#[test]
fn cpu_results_do_not_depend_on_the_thread_count() {
    let cases = [
        ((1, 8, 2, 300, 333, 64, 64), DType::BF16, false, Mask::None),
        ((1, 4, 1, 3, 4000, 128, 128), DType::F32, true, Mask::None),
        ((1, 4, 1, 70, 2100, 64, 64), DType::F32, false, Mask::Causal),
    ];
    for (i, (dims, dtype, sinks, mask)) in cases.into_iter().enumerate() {
        let p = problem(dims, dtype, sinks, 700 + i as u64);
        let (_, want_lse) = p.oracle_with_lse(mask);
        // The backward over the one-thread forward's results, per pool: its tasks own what
        // they write, so its gradients are bit-equal for every pool.
        /// The first pool's forward `(out, lse)` and its gradients as f64.
        type FirstRun = ((Array, Array), Vec<Vec<f64>>);
        let mut first: Option<FirstRun> = None;
        for threads in [1, 2, 4, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let what = format!("{dtype} {dims:?} {mask:?} on {threads} threads");
            pool.install(|| {
                let (out, lse, _) = fast_grads(&p, mask, &Device::Cpu);
                check_close(&lse, &want_lse, 2e-5, 2e-6, &format!("{what}: lse"));
                check(&p, mask, &Device::Cpu, &what);
                let (o1, l1) = first.as_ref().map_or((&out, &lse), |f| (&f.0 .0, &f.0 .1));
                let g = fast::scaled_dot_product_attention_vjp(
                    &p.q,
                    &p.k,
                    &p.v,
                    p.scale,
                    mask,
                    p.sinks.as_ref(),
                    o1,
                    l1,
                    &p.d_out,
                )
                .unwrap();
                let got: Vec<Vec<f64>> =
                    [&g.0, &g.1, &g.2].map(|a| a.to_f64_vec().unwrap()).to_vec();
                match &first {
                    None => first = Some(((out.clone(), lse.clone()), got)),
                    Some(f) => assert_eq!(f.1, got, "{what}: gradients differ"),
                }
            });
        }
    }
}

#[test]
fn asking_for_the_mask_gradient_is_mlx_s_error() {
    assert!(fast::scaled_dot_product_attention_vjp_check_targets(false).is_ok());
    let e = fast::scaled_dot_product_attention_vjp_check_targets(true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "[scale_dot_product_attention] Does not support VJP with respect  to mask or \
             attention sinks."
        ),
        "{e}"
    );
}

on_every_device! {
    /// The forward's log-sum-exp against the oracle's, and its output equal to the plain
    /// forward's.
    fn lse_matches_the_oracle(dev: &Device) {
        for (dtype, causal, sinks) in [
            (DType::F32, false, false),
            (DType::F32, true, true),
            (DType::BF16, true, false),
            (DType::F16, false, true),
        ] {
            let p = problem((2, 4, 2, 33, 47, 64, 64), dtype, sinks, 10);
            let mask = if causal { Mask::Causal } else { Mask::None };
            let (out, lse, _) = fast_grads(&p, mask, dev);
            assert_eq!(lse.dtype(), DType::F32);
            assert_eq!(lse.shape(), &[2, 4, 33]);
            let (_, want) = p.oracle_with_lse(mask);
            let what = format!("{dtype} causal {causal} sinks {sinks}");
            check_close(&on(&lse, &Device::Cpu), &want, 2e-5, 2e-6, &format!("{what}: lse"));
            let plain = fast::scaled_dot_product_attention(
                &on(&p.q, dev), &on(&p.k, dev), &on(&p.v, dev), p.scale, mask,
                p.sinks.as_ref().map(|s| on(s, dev)).as_ref(),
            )
            .unwrap();
            assert_eq!(
                on(&out, &Device::Cpu).to_f64_vec().unwrap(),
                on(&plain, &Device::Cpu).to_f64_vec().unwrap(),
                "{what}: output differs from the plain forward's"
            );
        }
    }

    /// Dtypes, grouped-query and multi-query heads, head dims, and causal masks with
    /// `T_q = T_kv`, `T_q < T_kv` and `T_q > T_kv` (whose first rows see nothing).
    fn dtypes_heads_and_causal_alignments(dev: &Device) {
        let shapes = [
            ((2, 4, 2, 37, 53, 64, 64), false),
            ((1, 8, 1, 64, 64, 128, 128), true),
            ((1, 2, 2, 20, 70, 80, 48), true),
            ((1, 2, 1, 70, 20, 32, 32), true),
            ((1, 3, 3, 1, 40, 96, 96), false),
        ];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (i, &(dims, causal)) in shapes.iter().enumerate() {
                let p = problem(dims, dtype, false, 20 + i as u64);
                let mask = if causal { Mask::Causal } else { Mask::None };
                check(&p, mask, dev, &format!("{dtype} {dims:?} causal {causal}"));
            }
        }
    }

    /// Bool and additive masks with broadcasting, rows that see nothing, sinks (with their
    /// gradient) alone and with masks.
    fn masks_and_sinks(dev: &Device) {
        let dims = (2, 4, 2, 24, 40, 32, 32);
        for dtype in [DType::F32, DType::BF16] {
            let p = problem(dims, dtype, true, 30);
            check(&p, Mask::None, dev, &format!("{dtype} sinks"));
            check(&p, Mask::Causal, dev, &format!("{dtype} causal sinks"));
            // Bool mask [1, 1, T_q, T_kv], row 3 hidden entirely.
            let keep: Vec<bool> = (0..24 * 40).map(|i| i / 40 != 3 && (i * 7) % 5 != 0).collect();
            let keep = Array::from_vec(keep, &[1, 1, 24, 40]).unwrap();
            let no_sinks = Problem { sinks: None, ..problem(dims, dtype, false, 31) };
            check(&no_sinks, Mask::Array(&keep), dev, &format!("{dtype} bool mask"));
            check(&p, Mask::Array(&keep), dev, &format!("{dtype} bool mask with sinks"));
            // Additive mask [B, 1, T_q, T_kv] with -inf entries and a fully hidden row.
            let mut add = uniform(&[2, 1, 24, 40], -2.0, 1.0, dtype, 32).to_f64_vec().unwrap();
            for (i, x) in add.iter_mut().enumerate() {
                if i % 11 == 0 || (i / 40) % 24 == 5 {
                    *x = f64::NEG_INFINITY;
                }
            }
            let add = Array::from_vec(add, &[2, 1, 24, 40]).unwrap().astype(dtype).unwrap();
            check(&no_sinks, Mask::Array(&add), dev, &format!("{dtype} additive mask"));
            check(&p, Mask::Array(&add), dev, &format!("{dtype} additive mask with sinks"));
        }
    }

    /// `[B, T, H, D]` memory viewed as `[B, H, T, D]` for every input and the cotangent
    /// (f32 on the SIMT kernels; bf16 with D = 64 read in place by the tensor-core kernels).
    fn strided_inputs(dev: &Device) {
        let t = |a: Array| a.transpose(&[0, 2, 1, 3]).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let p = Problem {
                q: t(randn(&[2, 30, 4, 64], dtype, 40)),
                k: t(randn(&[2, 45, 2, 64], dtype, 41)),
                v: t(randn(&[2, 45, 2, 64], dtype, 42)),
                d_out: t(randn(&[2, 30, 4, 64], dtype, 43)),
                sinks: None,
                scale: 0.125,
            };
            check(&p, Mask::Causal, dev, &format!("{dtype} strided causal"));
            check(&p, Mask::None, dev, &format!("{dtype} strided"));
        }
    }

    /// Lengths spanning several of the backward kernels' tiles (128-key and 128-query
    /// blocks, 64-row tiles on Hopper) with four query heads per kv head, causal with
    /// `T_q < T_kv` and `T_q > T_kv`, and a bool mask over several blocks.
    fn multi_tile_lengths(dev: &Device) {
        for (i, d) in [64usize, 128].into_iter().enumerate() {
            for dtype in [DType::BF16, DType::F16] {
                let seed = 500 + 10 * i as u64;
                let what = |m: &str| format!("{dtype} D {d} {m}");
                check_masks(
                    dev,
                    [(1, 8, 2, 300, 333, d, d), (1, 4, 1, 333, 200, d, d)],
                    dtype,
                    seed,
                    |e| (e / 333) % 97 != 5 && (e * 11) % 13 != 0,
                    &what,
                    "causal, T_q > T_kv, sinks",
                );
            }
        }
    }

    /// The head dims of the tensor-core backward (f16 / bf16 on CUDA), each with no mask,
    /// causal masks with T_q < T_kv and T_q > T_kv (rows that see nothing), bool and additive
    /// masks with broadcasting, sinks, grouped-query and multi-query heads, and lengths that
    /// are not multiples of the kernels' tiles.
    fn tensor_core_head_dims(dev: &Device) {
        let dims = [(64, 64), (80, 80), (96, 96), (128, 128), (192, 128), (256, 256)];
        for (i, &(d, dv)) in dims.iter().enumerate() {
            for dtype in [DType::BF16, DType::F16] {
                let seed = 100 + 10 * i as u64;
                let what = |m: &str| format!("{dtype} D {d} D_v {dv} {m}");
                check_tile_masks(dev, d, dv, dtype, seed, &what);
                // Additive mask [1, 4, 1, T_kv] (broadcast over queries) with -inf keys.
                let mut add = uniform(&[1, 4, 1, 131], -3.0, 1.0, dtype, seed + 2)
                    .to_f64_vec()
                    .unwrap();
                for (e, x) in add.iter_mut().enumerate() {
                    if e % 9 == 4 {
                        *x = f64::NEG_INFINITY;
                    }
                }
                let add = Array::from_vec(add, &[1, 4, 1, 131]).unwrap().astype(dtype).unwrap();
                let with_sinks = problem((1, 4, 2, 77, 131, d, dv), dtype, true, seed + 3);
                check(&with_sinks, Mask::Array(&add), dev, &what("additive mask, sinks"));
            }
        }
    }

    /// Each gradient comes back in its primal's dtype.
    fn mixed_dtypes(dev: &Device) {
        let mut p = problem((1, 2, 2, 16, 16, 32, 32), DType::F32, true, 50);
        p.q = p.q.astype(DType::F16).unwrap();
        p.sinks = Some(p.sinks.unwrap().astype(DType::BF16).unwrap());
        let (dq, dk, dv, ds) = check(&p, Mask::Causal, dev, "mixed dtypes");
        assert_eq!(dq.dtype(), DType::F16);
        assert_eq!((dk.dtype(), dv.dtype()), (DType::F32, DType::F32));
        assert_eq!(ds.map(|s| s.dtype()), Some(DType::BF16));
    }

    /// No keys: zero gradients (the sink takes all the weight, and its gradient is 0). No
    /// queries: empty gradients and zero key gradients.
    fn empty_shapes(dev: &Device) {
        let p = problem((1, 2, 1, 5, 0, 16, 16), DType::F32, true, 60);
        let (_, lse, (dq, dk, dv, ds)) = fast_grads(&p, Mask::None, dev);
        let sinks = p.sinks.as_ref().unwrap().to_f64_vec().unwrap();
        let lse = on(&lse, &Device::Cpu).to_f64_vec().unwrap();
        for (i, l) in lse.iter().enumerate() {
            assert!((l - sinks[(i / 5) % 2]).abs() < 1e-6, "lse {i} = {l}");
        }
        assert!(on(&dq, &Device::Cpu).to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
        assert_eq!((dk.shape(), dv.shape()), (&[1, 1, 0, 16][..], &[1, 1, 0, 16][..]));
        assert!(on(&ds.unwrap(), &Device::Cpu).to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
        let p = problem((1, 2, 1, 0, 9, 16, 16), DType::F32, false, 61);
        let (_, _, (dq, dk, _, _)) = fast_grads(&p, Mask::Causal, dev);
        assert_eq!(dq.shape(), &[1, 2, 0, 16]);
        assert!(on(&dk, &Device::Cpu).to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
    }

    /// A NaN in one query row makes that row's output and log-sum-exp NaN, and reaches that
    /// row's dq and its kv head's dk and dv, and nothing of the other kv head.
    fn nan_reaches_its_head(dev: &Device) {
        let mut p = problem((1, 2, 2, 8, 8, 16, 16), DType::F32, false, 70);
        let mut q = p.q.to_vec::<f32>().unwrap();
        q[3 * 16 + 2] = f32::NAN;
        p.q = Array::from_vec(q, &[1, 2, 8, 16]).unwrap();
        let (out, lse, (dq, dk, dv, _)) = fast_grads(&p, Mask::None, dev);
        // The forward: the row's output and log-sum-exp are NaN, the others are not.
        let (out, lse) = (
            on(&out, &Device::Cpu).to_f64_vec().unwrap(),
            on(&lse, &Device::Cpu).to_f64_vec().unwrap(),
        );
        assert!(out[3 * 16..4 * 16].iter().all(|x| x.is_nan()), "output of the NaN row");
        assert!(lse[3].is_nan() && lse.iter().filter(|x| x.is_nan()).count() == 1, "{lse:?}");
        let (dq, dk, dv) = (
            on(&dq, &Device::Cpu).to_f64_vec().unwrap(),
            on(&dk, &Device::Cpu).to_f64_vec().unwrap(),
            on(&dv, &Device::Cpu).to_f64_vec().unwrap(),
        );
        assert!(dq[3 * 16..4 * 16].iter().all(|x| x.is_nan()), "dq of the NaN row: {:?}", &dq[3 * 16..4 * 16]);
        assert!(dq[8 * 16..].iter().all(|x| x.is_finite()), "dq of head 1");
        assert!(dk[..8 * 16].iter().any(|x| x.is_nan()), "dk of kv head 0");
        assert!(dv[..8 * 16].iter().any(|x| x.is_nan()), "dv of kv head 0");
        assert!(dk[8 * 16..].iter().chain(&dv[8 * 16..]).all(|x| x.is_finite()), "kv head 1");
    }

    /// With `FERROFAST_DETERMINISTIC=1` the same call gives the same bits (at D 128 the
    /// Hopper backward then takes its two passes instead of the fused one).
    fn deterministic(dev: &Device) {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var(DETERMINISTIC_VAR, "1");
        for d in [64, 128] {
            let p = problem((2, 8, 2, 150, 170, d, d), DType::BF16, true, 80);
            let (_, _, a) = fast_grads(&p, Mask::Causal, dev);
            let (_, _, b) = fast_grads(&p, Mask::Causal, dev);
            for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
                assert_eq!(
                    on(x, &Device::Cpu).to_f64_vec().unwrap(),
                    on(y, &Device::Cpu).to_f64_vec().unwrap(),
                    "D {d}"
                );
            }
        }
        std::env::remove_var(DETERMINISTIC_VAR);
    }

    /// Every form of the Hopper backward on the cases it takes (D 64 and 128, f16 / bf16, no
    /// mask, causal both ways, bool masks, sinks, grouped-query and multi-query heads, lengths
    /// over several tiles and not multiples of them): the fused pass (the default), the two
    /// passes (`FERROFAST_DETERMINISTIC=1`), and the `mma.sync` kernels these head dims take
    /// on other GPUs (`FERROFAST_BACKWARD_KERNEL=mma`), each against the oracle. On other
    /// devices the variables choose nothing: the cases run once.
    fn hopper_backward_forms(dev: &Device) {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let forms: &[(Option<&str>, bool)] = if matches!(dev, Device::Cuda(_)) {
            &[(None, false), (None, true), (Some("mma"), false)]
        } else {
            &[(None, false)]
        };
        for &(kernel, exact) in forms {
            match kernel {
                Some(k) => std::env::set_var(KERNEL_VAR, k),
                None => std::env::remove_var(KERNEL_VAR),
            }
            if exact {
                std::env::set_var(DETERMINISTIC_VAR, "1");
            } else {
                std::env::remove_var(DETERMINISTIC_VAR);
            }
            for d in [64, 128] {
                for (i, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
                    let seed = 300 + 10 * i as u64 + d as u64;
                    let what = |m: &str| {
                        format!("{dtype} D {d} kernel {kernel:?} deterministic {exact}: {m}")
                    };
                    check_tile_masks(dev, d, d, dtype, seed, &what);
                    let long = problem((1, 4, 2, 300, 257, d, d), dtype, true, seed + 5);
                    check(&long, Mask::Causal, dev, &what("causal over several tiles, GQA"));
                    check(&long, Mask::None, dev, &what("several tiles, GQA"));
                }
            }
        }
        std::env::remove_var(KERNEL_VAR);
        std::env::remove_var(DETERMINISTIC_VAR);
    }

    /// Wrong saved tensors give clear errors.
    fn errors(dev: &Device) {
        let p = problem((1, 2, 1, 4, 6, 8, 8), DType::F32, false, 90);
        let (q, k, v, g) = (on(&p.q, dev), on(&p.k, dev), on(&p.v, dev), on(&p.d_out, dev));
        let (out, lse) =
            fast::scaled_dot_product_attention_with_lse(&q, &k, &v, 0.5, Mask::None, None).unwrap();
        let bad_out = on(&randn(&[1, 2, 4, 7], DType::F32, 91), dev);
        let e = fast::scaled_dot_product_attention_vjp(
            &q, &k, &v, 0.5, Mask::None, None, &bad_out, &lse, &g,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("[scaled_dot_product_attention_vjp] out has shape (1,2,4,7) but the attention output has shape (1,2,4,8)."),
            "{e}"
        );
        let bad_lse = lse.astype(DType::F16).unwrap();
        let e = fast::scaled_dot_product_attention_vjp(
            &q, &k, &v, 0.5, Mask::None, None, &out, &bad_lse, &g,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lse must be float32 of shape (1,2,4)"), "{e}");
        let e = fast::scaled_dot_product_attention_vjp(
            &q, &k, &v, 0.5, Mask::None, None, &out, &lse, &out.reshape(&[1, 2, 8, 4]).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("d_out has shape (1,2,8,4)"), "{e}");
    }
}
