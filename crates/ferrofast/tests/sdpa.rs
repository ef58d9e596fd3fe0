//! `fast::scaled_dot_product_attention` against the float64 oracle: the cases of MLX's
//! `test_fast_sdpa.py` that apply to a CPU (spec §11.2), layouts, dtypes, edge cases, every
//! error message, and a property test. Benchmarks are `#[ignore]`d tests at the end.

mod common;

use common::{check_close, randn, uniform};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::{Array, DType, Error};
use proptest::prelude::*;

/// `(atol, rtol)` for outputs of `dtype` against the f64 oracle, for unit-scale (normal)
/// inputs: the rounding of the output to `dtype` (up to 2^-11 relative for f16, 2^-8 for
/// bf16) plus f32 arithmetic.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-12),
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (1e-3, 1e-3),
        _ => (8e-3, 8e-3),
    }
}

/// MLX's tolerances for `test_sdpa` (`|out - ref| <= atol + atol * |ref|`: f32 2e-5, f16
/// 3e-4, bf16 5e-3), which hold for its small inputs (`mlx_inputs`).
fn mlx_tol(dtype: DType) -> (f64, f64) {
    let atol = match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 3e-4,
        _ => 5e-3,
    };
    (atol, atol)
}

/// Runs the kernel and the oracle and compares them with `tolerance(output dtype)`.
#[allow(clippy::too_many_arguments)]
fn check_with(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let out = sdpa(q, k, v, scale, mask, sinks).unwrap_or_else(|e| panic!("{what}: {e}"));
    let reference = sdpa_ref(q, k, v, scale, mask, sinks).expect("oracle");
    let (atol, rtol) = tolerance(out.dtype());
    check_close(&out, &reference, atol, rtol, what);
    out
}

/// [`check_with`] at the tolerance of [`tol`].
fn check(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
    what: &str,
) -> Array {
    check_with(q, k, v, scale, mask, sinks, tol, what)
}

/// A `[B, H, T, D]` input: row-major, or `[B, T, H, D]` memory seen through `swapaxes(1, 2)`.
fn input(
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    transposed: bool,
    dtype: DType,
    seed: u64,
) -> Array {
    if transposed {
        randn(&[b, t, h, d], dtype, seed).swapaxes(1, 2).unwrap()
    } else {
        randn(&[b, h, t, d], dtype, seed)
    }
}

/// MLX's `prepare_inputs`: q, k ~ U(0, 0.5), v ~ U(0, scale).
#[allow(clippy::too_many_arguments)]
fn mlx_inputs(
    b: usize,
    ql: usize,
    kl: usize,
    d: usize,
    qh: usize,
    kh: usize,
    transposed: bool,
    dtype: DType,
    seed: u64,
) -> (Array, Array, Array, f32) {
    let scale = 1.0 / (d as f32).sqrt();
    let make = |h: usize, l: usize, lo: f64, hi: f64, s: u64| {
        if transposed {
            uniform(&[b, l, h, d], lo, hi, dtype, s)
                .swapaxes(1, 2)
                .unwrap()
        } else {
            uniform(&[b, h, l, d], lo, hi, dtype, s)
        }
    };
    (
        make(qh, ql, 0.0, 0.5, seed),
        make(kh, kl, 0.0, 0.5, seed + 1),
        make(kh, kl, 0.0, f64::from(scale), seed + 2),
        scale,
    )
}

fn err_text(r: ferrofast::Result<Array>) -> String {
    match r {
        Ok(a) => panic!("expected an error, got an array of shape {:?}", a.shape()),
        Err(e) => e.to_string(),
    }
}

fn bool_mask(shape: &[usize], p_true: f64, seed: u64) -> Array {
    let u = uniform(shape, 0.0, 1.0, DType::F32, seed)
        .to_vec::<f32>()
        .unwrap();
    let m: Vec<bool> = u.iter().map(|&x| f64::from(x) < p_true).collect();
    Array::from_vec(m, shape).unwrap()
}

// ----- MLX test_sdpa: shapes_64 / shapes_128 ------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Kind {
    None,
    Additive,
    Bool,
    Causal,
}

#[allow(clippy::too_many_arguments)]
fn run_kind(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    kind: Kind,
    seed: u64,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let (b, qh, ql) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let kl = k.shape()[2];
    match kind {
        Kind::None => check_with(q, k, v, scale, Mask::None, None, tolerance, what),
        Kind::Causal => check_with(q, k, v, scale, Mask::Causal, None, tolerance, what),
        Kind::Additive => {
            let m = uniform(&[b, qh, ql, kl], 0.0, 0.5, q.dtype(), seed);
            check_with(q, k, v, scale, Mask::Array(&m), None, tolerance, what)
        }
        Kind::Bool => {
            let m = bool_mask(&[b, qh, ql, kl], 0.5, seed);
            check_with(q, k, v, scale, Mask::Array(&m), None, tolerance, what)
        }
    }
}

/// MLX's shapes, `(B, qL, kL, D, qH, kH)`, with the head counts divided down (same GQA
/// ratio) to keep the float64 oracle quick; every shape runs one rotating combination of
/// mask kind, dtype and layout so that all of them are covered.
#[test]
fn mlx_shapes_64_and_128() {
    let shapes: [(usize, usize, usize, usize, usize, usize); 14] = [
        (1, 20, 20, 64, 3, 3),
        (1, 63, 63, 64, 24, 24),
        (1, 129, 129, 64, 24, 24),
        (1, 400, 400, 64, 24, 24),
        (1, 128, 128, 64, 32, 32),
        (1, 64, 128, 64, 32, 32),
        (1, 65, 128, 64, 32, 8),
        (1, 64, 127, 64, 32, 8),
        (1, 65, 127, 64, 32, 8),
        (1, 127, 65, 64, 32, 8),
        (1, 128, 128, 128, 32, 8),
        (1, 64, 128, 128, 32, 8),
        (1, 65, 127, 128, 32, 8),
        (1, 127, 65, 128, 32, 8),
    ];
    let kinds = [Kind::None, Kind::Additive, Kind::Bool, Kind::Causal];
    let dtypes = [DType::F16, DType::F32, DType::BF16];
    let mut n = 0usize;
    for (si, &(b, ql, kl, d, qh, kh)) in shapes.iter().enumerate() {
        let f = if qh == kh { qh / 2 } else { kh / 2 }.max(1);
        let (qh, kh) = (qh / f, kh / f);
        for rep in 0..2 {
            let kind = kinds[(si + rep) % 4];
            let dtype = dtypes[(si + 2 * rep) % 3];
            let transposed = (si + rep) % 2 == 1;
            let seed = 100 + n as u64 * 7;
            n += 1;
            let (q, k, v, scale) = mlx_inputs(b, ql, kl, d, qh, kh, transposed, dtype, seed);
            let what = format!(
                "shape {:?} {kind:?} {dtype} transposed={transposed} seed {seed}",
                (b, ql, kl, d, qh, kh)
            );
            let out = run_kind(&q, &k, &v, scale, kind, seed + 3, mlx_tol, &what);
            assert_eq!(out.shape(), &[b, qh, ql, d]);
            assert_eq!(out.dtype(), dtype);
        }
    }
}

/// MLX's single-query shapes: qL = 1, kL in {7, 9, 32, 63, 67, 129, 400, 2000}, D 128, every
/// mask kind; MLX's qH 32 with kH 32 or 8 become qH 8 with kH 8 or 2 (same GQA ratios).
#[test]
fn mlx_single_query_many_key_lengths() {
    let mut n = 0u64;
    for &kl in &[7usize, 9, 32, 63, 67, 129, 400, 2000] {
        for &kh in &[8usize, 2] {
            for (i, kind) in [Kind::None, Kind::Additive, Kind::Bool, Kind::Causal]
                .into_iter()
                .enumerate()
            {
                let dtype = if (n + i as u64) % 2 == 0 {
                    DType::F32
                } else {
                    DType::F16
                };
                let transposed = n % 2 == 1;
                let seed = 5000 + n * 11 + i as u64;
                let (q, k, v, scale) = mlx_inputs(1, 1, kl, 128, 8, kh, transposed, dtype, seed);
                let what = format!("qL 1 kL {kl} kH {kh} {kind:?} {dtype} seed {seed}");
                run_kind(&q, &k, &v, scale, kind, seed + 5, mlx_tol, &what);
            }
            n += 1;
        }
    }
}

/// qL > kL with a causal mask: the first qL - kL rows see no key and are 0 (our documented
/// choice); the oracle says the same, so the whole output is compared.
#[test]
fn causal_longer_queries_than_keys() {
    for (i, &(ql, kl, d, qh, kh)) in [
        (127usize, 65usize, 64usize, 4usize, 1usize),
        (9, 3, 32, 2, 2),
        (40, 1, 16, 3, 1),
    ]
    .iter()
    .enumerate()
    {
        let seed = 900 + i as u64;
        let (q, k, v) = (
            randn(&[1, qh, ql, d], DType::F32, seed),
            randn(&[1, kh, kl, d], DType::F32, seed + 1),
            randn(&[1, kh, kl, d], DType::F32, seed + 2),
        );
        let out = check(
            &q,
            &k,
            &v,
            0.5,
            Mask::Causal,
            None,
            &format!("qL {ql} kL {kl}"),
        );
        let o = out.to_vec::<f32>().unwrap();
        for h in 0..qh {
            for t in 0..ql - kl {
                let row = &o[(h * ql + t) * d..][..d];
                assert!(
                    row.iter().all(|&x| x == 0.0),
                    "row {t} of head {h} not zero"
                );
            }
        }
    }
}

// ----- MLX vector tests -----------------------------------------------------------------------

/// q `(1, 4, 1, 64)`, k/v `(1, L, 1, 64)` swapped to `(1, 1, L, 64)`, with the bool masks of
/// `test_sdpa_vector_kv_transposed_head_seq` and the additive and causal ones of
/// `test_sdpa_vector`.
#[test]
fn mlx_vector_masks() {
    let (nq, d) = (4usize, 64usize);
    for &l in &[43usize, 4096] {
        let seed = l as u64;
        let q = randn(&[1, nq, 1, d], DType::F32, seed);
        let k = randn(&[1, l, 1, d], DType::F32, seed + 1)
            .swapaxes(1, 2)
            .unwrap();
        let v = randn(&[1, l, 1, d], DType::F32, seed + 2)
            .swapaxes(1, 2)
            .unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let what = |m: &str| format!("vector L {l} mask {m}");

        let all = Array::scalar(true);
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&all),
            None,
            &what("scalar True"),
        );

        let mut tail: Vec<bool> = vec![true; l];
        for x in tail.iter_mut().skip(l - l / 4) {
            *x = false;
        }
        let tail = Array::from_vec(tail, &[l]).unwrap();
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&tail),
            None,
            &what("(L,) tail False"),
        );

        let heads = bool_mask(&[nq, 1, l], 0.5, seed + 3);
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&heads),
            None,
            &what("(Nq,1,L)"),
        );

        let transposed = bool_mask(&[l, 1, nq], 0.5, seed + 4)
            .transpose(&[2, 1, 0])
            .unwrap();
        assert_eq!(transposed.shape(), &[nq, 1, l]);
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&transposed),
            None,
            &what("(L,1,Nq).T"),
        );

        let additive = uniform(&[nq, 1, l], -1.0, 1.0, DType::F32, seed + 5);
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&additive),
            None,
            &what("additive"),
        );

        let logs: Vec<f32> = heads
            .to_vec::<bool>()
            .unwrap()
            .iter()
            .map(|&b| if b { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let logs = Array::from_vec(logs, &[nq, 1, l]).unwrap();
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&logs),
            None,
            &what("log(bool)"),
        );

        check(&q, &k, &v, scale, Mask::Causal, None, &what("causal"));

        let bad = bool_mask(&[nq, 2, l], 0.5, seed + 6);
        assert_eq!(
            err_text(sdpa(&q, &k, &v, scale, Mask::Array(&bad), None)),
            format!("Cannot broadcast array of shape ({nq},2,{l}) into shape (1,{nq},1,{l}).")
        );
    }
}

/// MLX's `test_sdpa_vector_gqa_long`, shortened: GQA with K/V sliced out of a longer cache.
#[test]
fn mlx_vector_gqa_sliced_cache() {
    for (i, &(nq, nkv, d, l)) in [(32usize, 4usize, 128usize, 1000usize), (64, 8, 64, 1001)]
        .iter()
        .enumerate()
    {
        let seed = 40 + i as u64;
        let q = randn(&[1, nq, 1, d], DType::F32, seed);
        let k = randn(&[1, nkv, l + 32, d], DType::F32, seed + 1)
            .slice(&[0, 0, 0], &[1, nkv as isize, l as isize], &[1, 1, 1])
            .unwrap();
        let v = randn(&[1, nkv, l + 32, d], DType::F32, seed + 2)
            .slice(&[0, 0, 0], &[1, nkv as isize, l as isize], &[1, 1, 1])
            .unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::None,
            None,
            &format!("gqa long {nq}/{nkv}"),
        );
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Causal,
            None,
            &format!("gqa long causal {nq}/{nkv}"),
        );
    }
}

/// `test_sdpa_fully_masked`: every key masked gives 0 (no NaN).
#[test]
fn fully_masked_rows_are_zero() {
    for &lq in &[1usize, 8, 32] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let seed = 70 + lq as u64;
            let q = randn(&[1, 4, lq, 128], dtype, seed);
            let k = randn(&[1, 4, 8, 128], dtype, seed + 1);
            let v = randn(&[1, 4, 8, 128], dtype, seed + 2);
            let none = Array::scalar(false);
            let out = check(&q, &k, &v, 0.1, Mask::Array(&none), None, "mask False");
            assert!(out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
            let minus_inf = Array::scalar(f32::NEG_INFINITY).astype(dtype).unwrap();
            let out = check(&q, &k, &v, 0.1, Mask::Array(&minus_inf), None, "mask -inf");
            assert!(out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
        }
    }
}

/// `test_sdpa_inf_score`: a key row of -inf gives -inf scores for that key.
#[test]
fn minus_inf_key_score() {
    for &d in &[4usize, 128] {
        for &lq in &[1usize, 8] {
            let seed = 80 + d as u64 + lq as u64;
            let q = uniform(&[1, 4, lq, d], 0.0, 0.5, DType::F32, seed);
            let mut kd = uniform(&[1, 1, 8, d], 0.0, 0.5, DType::F32, seed + 1)
                .to_vec::<f32>()
                .unwrap();
            kd[..d].fill(f32::NEG_INFINITY);
            let k = Array::from_vec(kd, &[1, 1, 8, d]).unwrap();
            let v = randn(&[1, 1, 8, d], DType::F32, seed + 2);
            let out = check(
                &q,
                &k,
                &v,
                1.0,
                Mask::None,
                None,
                &format!("inf score D {d} Lq {lq}"),
            );
            assert!(out.to_f64_vec().unwrap().iter().all(|x| x.is_finite()));
        }
    }
}

/// `test_sdpa_few_query`: Lq 8, Nq 8 over one kv head, q in `[B, T, H, D]` memory.
#[test]
fn mlx_few_query_mqa() {
    for &l in &[43usize, 4096] {
        let seed = 300 + l as u64;
        let q = input(1, 8, 8, 128, true, DType::F32, seed);
        let k = input(1, 1, l, 128, false, DType::F32, seed + 1);
        let v = input(1, 1, l, 128, false, DType::F32, seed + 2);
        let scale = 1.0 / 128f32.sqrt();
        let all = Array::scalar(true);
        check(&q, &k, &v, scale, Mask::Array(&all), None, "few query True");
        let m = bool_mask(&[8, 1, l], 0.5, seed + 3);
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&m),
            None,
            "few query (Nq,1,L)",
        );
        let mt = bool_mask(&[l, 1, 8], 0.5, seed + 4)
            .transpose(&[2, 1, 0])
            .unwrap();
        check(
            &q,
            &k,
            &v,
            scale,
            Mask::Array(&mt),
            None,
            "few query (L,1,Nq).T",
        );
        check(&q, &k, &v, scale, Mask::Causal, None, "few query causal");
    }
}

/// `test_sdpa_vector_batched`: B = 2, one kv head, transposed q and k, additive mask
/// `(1, 2, 3, 3).swapaxes(0, 1)` broadcast over the query heads.
#[test]
fn mlx_vector_batched_broadcast_mask() {
    let q = input(2, 4, 3, 64, true, DType::F32, 11);
    let k = input(2, 1, 3, 64, true, DType::F32, 12);
    let v = input(2, 1, 3, 64, false, DType::F32, 13);
    let m = randn(&[1, 2, 3, 3], DType::F32, 14).swapaxes(0, 1).unwrap();
    assert_eq!(m.shape(), &[2, 1, 3, 3]);
    check(
        &q,
        &k,
        &v,
        0.125,
        Mask::Array(&m),
        None,
        "batched broadcast mask",
    );
    check(&q, &k, &v, 0.125, Mask::Causal, None, "batched causal");
}

/// `test_sdpa_broadcast_mask` and `test_sdpa_promote_mask`.
#[test]
fn mlx_broadcast_and_promoted_scalar_masks() {
    let q = randn(&[1, 4, 256, 32], DType::F32, 21);
    let k = randn(&[1, 1, 256, 32], DType::F32, 22);
    let v = randn(&[1, 1, 256, 32], DType::F32, 23);
    let t = Array::scalar(true);
    let a = check(&q, &k, &v, 0.2, Mask::Array(&t), None, "mask True");
    let b = check(&q, &k, &v, 0.2, Mask::None, None, "no mask");
    assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let two = Array::scalar(ferrofast::bf16::from_f32(2.0));
    let c = check(&q, &k, &v, 0.2, Mask::Array(&two), None, "bf16 scalar mask");
    assert_eq!(c.dtype(), DType::F32);
    // An int32 additive mask promotes to float32 too.
    let ints = Array::from_vec((0..256).map(|i| -(i % 3)).collect::<Vec<i32>>(), &[256]).unwrap();
    check(&q, &k, &v, 0.2, Mask::Array(&ints), None, "int32 mask");
}

/// `test_sdpa_noncontiguous_inputs`.
#[test]
fn mlx_noncontiguous_inputs() {
    let q = randn(&[4, 7, 32, 64], DType::F32, 31)
        .swapaxes(1, 2)
        .unwrap();
    let k = randn(&[4, 7, 8, 64], DType::F32, 32)
        .swapaxes(1, 2)
        .unwrap();
    let v = randn(&[4, 7, 8, 64], DType::F32, 33)
        .swapaxes(1, 2)
        .unwrap();
    let m = bool_mask(&[4, 1, 7, 7], 0.7, 34);
    check(&q, &k, &v, 0.125, Mask::Array(&m), None, "noncontiguous");
}

/// `test_sdpa_nan_bug`: a windowed causal bool mask and its log (0 / -inf additive).
#[test]
fn mlx_windowed_mask_no_nan() {
    let n = 128usize;
    let mut keep = vec![false; n * n];
    for i in 0..n {
        for j in 0..n {
            keep[i * n + j] = j <= i && i - j < 111;
        }
    }
    let logs: Vec<f32> = keep
        .iter()
        .map(|&b| if b { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let keep = Array::from_vec(keep, &[n, n]).unwrap();
    let logs = Array::from_vec(logs, &[n, n]).unwrap();
    let q = randn(&[1, 2, n, 128], DType::F32, 41);
    let k = randn(&[1, 2, n, 128], DType::F32, 42);
    let v = randn(&[1, 2, n, 128], DType::F32, 43);
    let a = check(&q, &k, &v, 0.1, Mask::Array(&keep), None, "window bool");
    let b = check(&q, &k, &v, 0.1, Mask::Array(&logs), None, "window log");
    assert!(a.to_f64_vec().unwrap().iter().all(|x| x.is_finite()));
    check_close(&a, &b, 1e-6, 1e-6, "bool and log masks agree");
}

/// `test_sdpa_attention_sinks`: B 2, N_q 8, D 64, sinks 10 * normal; every (N_kv, dtype)
/// for single queries (N_kv 2 only for the long keys), a rotating one of them for the longer
/// query sequences, to keep the test quick.
#[test]
fn mlx_attention_sinks() {
    let mut n = 0u64;
    for &(tq, tkv) in &[(1usize, 128usize), (1, 4096), (128, 128), (33, 300)] {
        for &nkv in &[2usize, 8] {
            for dtype in [DType::F16, DType::F32] {
                n += 1;
                if (tq > 1 && n % 2 == 0) || (tkv > 1000 && nkv > 2) {
                    continue;
                }
                let seed = 600 + n * 5;
                let q = randn(&[2, 8, tq, 64], dtype, seed);
                let k = randn(&[2, nkv, tkv, 64], dtype, seed + 1);
                let v = randn(&[2, nkv, tkv, 64], dtype, seed + 2);
                let sinks = Array::randn(&[8], DType::F32, seed + 3, &ferrofast::Device::Cpu)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
                let sinks: Vec<f32> = sinks.iter().map(|x| 10.0 * x).collect();
                let sinks = Array::from_vec(sinks, &[8]).unwrap().astype(dtype).unwrap();
                let scale = 0.125;
                let what = format!("sinks tq {tq} tkv {tkv} nkv {nkv} {dtype}");
                check(&q, &k, &v, scale, Mask::None, Some(&sinks), &what);
                check(&q, &k, &v, scale, Mask::Causal, Some(&sinks), &what);
            }
        }
    }
    // A fully masked row with a sink: the sink takes all the weight, the output is 0.
    let q = randn(&[1, 2, 3, 16], DType::F32, 1);
    let k = randn(&[1, 1, 5, 16], DType::F32, 2);
    let v = randn(&[1, 1, 5, 16], DType::F32, 3);
    let sinks = Array::from_vec(vec![1.0f32, -2.0], &[2]).unwrap();
    let none = Array::scalar(false);
    let out = check(
        &q,
        &k,
        &v,
        0.3,
        Mask::Array(&none),
        Some(&sinks),
        "masked with sink",
    );
    assert!(out.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
    // Integer sinks promote to float32.
    let isinks = Array::from_vec(vec![1i32, -1], &[2]).unwrap();
    check(&q, &k, &v, 0.3, Mask::None, Some(&isinks), "int sinks");
}

// ----- head dims, odd sizes, dtypes, layouts --------------------------------------------------

#[test]
fn head_dims_and_value_dims() {
    for (i, &(d, dv)) in [
        (64usize, 64usize),
        (72, 72),
        (80, 80),
        (96, 96),
        (128, 128),
        (256, 256),
        (192, 128),
        (96, 64),
        (5, 3),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1000 + i as u64 * 3;
        let q = randn(&[1, 4, 70, d], DType::F32, seed);
        let k = randn(&[1, 2, 75, d], DType::F32, seed + 1);
        let v = randn(&[1, 2, 75, dv], DType::F32, seed + 2);
        let scale = 1.0 / (d as f32).sqrt();
        let out = check(
            &q,
            &k,
            &v,
            scale,
            Mask::Causal,
            None,
            &format!("D {d} Dv {dv}"),
        );
        assert_eq!(out.shape(), &[1, 4, 70, dv]);
        let q1 = q.slice(&[0, 0, 0], &[1, 4, 1], &[1, 1, 1]).unwrap();
        check(
            &q1,
            &k,
            &v,
            scale,
            Mask::None,
            None,
            &format!("decode D {d} Dv {dv}"),
        );
    }
}

#[test]
fn odd_sequence_lengths() {
    let lens = [1usize, 31, 33, 65, 127, 129];
    let mut n = 0u64;
    for &tq in &lens {
        for &tkv in &lens {
            let seed = 2000 + n;
            n += 1;
            let q = randn(&[1, 2, tq, 32], DType::F32, seed);
            let k = randn(&[1, 1, tkv, 32], DType::F32, seed + 1);
            let v = randn(&[1, 1, tkv, 32], DType::F32, seed + 2);
            let kind = [Kind::None, Kind::Causal, Kind::Bool, Kind::Additive][(n % 4) as usize];
            run_kind(
                &q,
                &k,
                &v,
                0.2,
                kind,
                seed + 3,
                tol,
                &format!("tq {tq} tkv {tkv} {kind:?}"),
            );
        }
    }
}

#[test]
fn dtypes_including_f64_and_mixed() {
    for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        for &tq in &[1usize, 100] {
            let seed = 3000 + tq as u64;
            let q = randn(&[2, 6, tq, 48], dtype, seed);
            let k = randn(&[2, 3, 90, 48], dtype, seed + 1);
            let v = randn(&[2, 3, 90, 40], dtype, seed + 2);
            for kind in [Kind::None, Kind::Causal, Kind::Bool, Kind::Additive] {
                let what = format!("{dtype} tq {tq} {kind:?}");
                let out = run_kind(&q, &k, &v, 0.15, kind, seed + 3, tol, &what);
                assert_eq!(out.dtype(), dtype);
            }
        }
    }
    // bf16 queries with f16 keys and values compute and return float32, as in MLX.
    let q = randn(&[1, 2, 5, 16], DType::BF16, 1);
    let k = randn(&[1, 2, 7, 16], DType::F16, 2);
    let v = randn(&[1, 2, 7, 16], DType::F16, 3);
    let out = check(&q, &k, &v, 0.25, Mask::None, None, "bf16 q, f16 kv");
    assert_eq!(out.dtype(), DType::F32);
}

/// Strided views read in place: transposed, sliced with steps, reversed (negative strides),
/// a last axis with stride != 1, and stride-0 (broadcast) keys.
#[test]
fn strided_layouts() {
    let q = input(2, 4, 40, 32, true, DType::F32, 51);
    let k = randn(&[2, 2, 100, 32], DType::F32, 52)
        .slice(&[0, 0, 99], &[2, 2, -100], &[1, 1, -2])
        .unwrap();
    let v = randn(&[2, 2, 50, 64], DType::F32, 53)
        .slice(&[0, 0, 0, 0], &[2, 2, 50, 64], &[1, 1, 1, 2])
        .unwrap();
    assert_eq!(k.shape(), &[2, 2, 50, 32]);
    assert_eq!(v.shape(), &[2, 2, 50, 32]);
    check(&q, &k, &v, 0.2, Mask::Causal, None, "reversed k, strided v");
    // The last axis of q read with stride 2 and of k reversed.
    let q2 = randn(&[2, 4, 40, 64], DType::BF16, 54)
        .slice(&[0, 0, 0, 1], &[2, 4, 40, 64], &[1, 1, 1, 2])
        .unwrap();
    let k2 = randn(&[2, 2, 50, 32], DType::BF16, 55)
        .slice(&[0, 0, 0, 31], &[2, 2, 50, -33], &[1, 1, 1, -1])
        .unwrap();
    let v2 = randn(&[2, 2, 50, 32], DType::BF16, 56);
    check(&q2, &k2, &v2, 0.2, Mask::None, None, "strided last axes");
    // Keys broadcast along the sequence (stride 0): every key is the same.
    let k3 = randn(&[2, 2, 1, 32], DType::F32, 57)
        .broadcast_to(&[2, 2, 50, 32])
        .unwrap();
    check(&q, &k3, &v, 0.2, Mask::None, None, "broadcast keys");
}

#[test]
fn zero_length_keys_and_empty_shapes() {
    let q = randn(&[1, 2, 3, 8], DType::F32, 1);
    let k = randn(&[1, 1, 0, 8], DType::F32, 2);
    let v = randn(&[1, 1, 0, 5], DType::F32, 3);
    let out = sdpa(&q, &k, &v, 1.0, Mask::None, None).unwrap();
    assert_eq!(out.shape(), &[1, 2, 3, 5]);
    assert!(out.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
    let sinks = Array::from_vec(vec![0.5f32, 1.0], &[2]).unwrap();
    let out = sdpa(&q, &k, &v, 1.0, Mask::Causal, Some(&sinks)).unwrap();
    assert!(out.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
    check(&q, &k, &v, 1.0, Mask::None, None, "T_kv 0 against oracle");
    // Empty queries and a zero head dimension.
    let q0 = randn(&[1, 2, 0, 8], DType::F32, 4);
    let k1 = randn(&[1, 1, 4, 8], DType::F32, 5);
    let v1 = randn(&[1, 1, 4, 5], DType::F32, 6);
    assert_eq!(
        sdpa(&q0, &k1, &v1, 1.0, Mask::None, None).unwrap().shape(),
        &[1, 2, 0, 5]
    );
    let qd = randn(&[1, 2, 3, 0], DType::F32, 7);
    let kd = randn(&[1, 1, 4, 0], DType::F32, 8);
    check(&qd, &kd, &v1, 1.0, Mask::Causal, None, "D = 0");
}

/// More threads than tasks: keys split into ranges whose partial results are merged. (The
/// shapes are big enough, over 2^22 multiply-adds, not to be run on the calling thread.)
#[test]
fn split_keys_across_threads() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    pool.install(|| {
        let shapes = [
            (8usize, 1usize, 1usize, 5000usize),
            (4, 2, 3, 3000),
            (2, 1, 130, 1500),
        ];
        for (i, &(nq, nkv, tq, tkv)) in shapes.iter().enumerate() {
            let seed = 4000 + i as u64 * 4;
            let q = randn(&[1, nq, tq, 64], DType::F32, seed);
            let k = randn(&[1, nkv, tkv, 64], DType::F32, seed + 1);
            let v = randn(&[1, nkv, tkv, 64], DType::F32, seed + 2);
            let sinks = randn(&[nq], DType::F32, seed + 3);
            for kind in [Kind::None, Kind::Causal, Kind::Bool] {
                run_kind(
                    &q,
                    &k,
                    &v,
                    0.125,
                    kind,
                    seed,
                    tol,
                    &format!("split {i} {kind:?}"),
                );
            }
            check(
                &q,
                &k,
                &v,
                0.125,
                Mask::Causal,
                Some(&sinks),
                "split with sinks",
            );
            let none = Array::scalar(false);
            check(
                &q,
                &k,
                &v,
                0.125,
                Mask::Array(&none),
                Some(&sinks),
                "split all masked",
            );
        }
    });
}

// ----- errors -----------------------------------------------------------------------------------

#[test]
fn every_error_message() {
    let z = |shape: &[usize], dtype: DType| randn(shape, dtype, 9);
    let q = z(&[1, 4, 3, 8], DType::F32);
    let k = z(&[1, 1, 5, 8], DType::F32);
    let v = z(&[1, 1, 5, 8], DType::F32);
    let p = "[scaled_dot_product_attention]";
    let e = |r| err_text(r);

    assert_eq!(
        err_text(Mask::parse("foo").map(|_| q.clone())),
        format!("{p} invalid mask option 'foo'. Must be 'causal', or an array.")
    );
    assert!(matches!(Mask::parse("causal"), Ok(Mask::Causal)));
    assert_eq!(
        e(sdpa(
            &z(&[4, 3, 8], DType::F32),
            &k,
            &v,
            1.0,
            Mask::None,
            None
        )),
        format!("{p} input with shape (4,3,8) expected to be rank 4")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &z(&[1, 1, 5, 8, 1], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!("{p} input with shape (1,1,5,8,1) expected to be rank 4")
    );
    let m5 = z(&[1, 1, 1, 1, 1], DType::F32);
    assert_eq!(
        e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m5), None)),
        format!("{p} the mask with shape (1,1,1,1,1) expected to have at most rank 4.")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &z(&[2, 1, 5, 8], DType::F32),
            &v,
            1.0,
            Mask::None,
            None
        )),
        format!("{p} mismatching batch dimension for input with shape (2,1,5,8).")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &z(&[2, 1, 5, 8], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!("{p} mismatching batch dimension for input with shape (2,1,5,8).")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &z(&[1, 1, 5, 7], DType::F32),
            &v,
            1.0,
            Mask::None,
            None
        )),
        format!(
            "{p} query, keys expected to have matching last dimension; found query shape \
             (1,4,3,8) for keys shape (1,1,5,7)."
        )
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &z(&[1, 2, 5, 8], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!(
            "{p} keys, values expected to have matching n_kv_heads; found keys with n_heads 1 \
             for values with n_heads 2."
        )
    );
    let k3 = z(&[1, 3, 5, 8], DType::F32);
    assert_eq!(
        e(sdpa(
            &q,
            &k3,
            &z(&[1, 3, 5, 8], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!("{p} n_heads must be a multiple of n_kv_heads, found n_heads 4 for n_kv_heads 3.")
    );
    let k0 = z(&[1, 0, 5, 8], DType::F32);
    assert_eq!(
        e(sdpa(
            &q,
            &k0,
            &z(&[1, 0, 5, 8], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!("{p} n_heads must be a multiple of n_kv_heads, found n_heads 4 for n_kv_heads 0.")
    );
    let qi = Array::zeros(&[1, 4, 3, 8], DType::I32, &ferrofast::Device::Cpu).unwrap();
    let ki = Array::zeros(&[1, 1, 5, 8], DType::I32, &ferrofast::Device::Cpu).unwrap();
    assert_eq!(
        e(sdpa(&qi, &ki, &ki, 1.0, Mask::None, None)),
        format!("{p} Received unsupported type int32.")
    );
    // The mask's rank is checked before the dtype, as in MLX.
    assert_eq!(
        e(sdpa(&qi, &ki, &ki, 1.0, Mask::Array(&m5), None)),
        format!("{p} the mask with shape (1,1,1,1,1) expected to have at most rank 4.")
    );
    let qh = q.astype(DType::F16).unwrap();
    let kh = k.astype(DType::F16).unwrap();
    let m32 = z(&[5], DType::F32);
    assert_eq!(
        e(sdpa(&qh, &kh, &kh, 1.0, Mask::Array(&m32), None)),
        format!("{p} Mask type must promote to output type float16.")
    );
    let m64 = z(&[4, 2, 5], DType::F64);
    assert_eq!(
        e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m64), None)),
        format!("{p} Mask type must promote to output type float32.")
    );
    let m_bad = bool_mask(&[4, 2, 5], 0.5, 1);
    assert_eq!(
        e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m_bad), None)),
        "[broadcast_shapes] Shapes (4,2,5) and (1,4,3,5) cannot be broadcast."
    );
    let m_big = z(&[2, 1, 1, 1], DType::F32);
    assert_eq!(
        e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m_big), None)),
        "Cannot broadcast array of shape (2,1,1,1) into shape (1,4,3,5)."
    );
    let s32 = z(&[4], DType::F32);
    assert_eq!(
        e(sdpa(&qh, &kh, &kh, 1.0, Mask::None, Some(&s32))),
        format!("{p} Type of sinks must promote to output type float16.")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &v,
            1.0,
            Mask::None,
            Some(&z(&[5], DType::F32))
        )),
        format!("{p} Received invalid shape for sinks (5).")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &v,
            1.0,
            Mask::None,
            Some(&Array::scalar(1.0f32))
        )),
        format!("{p} Received invalid shape for sinks ().")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &v,
            1.0,
            Mask::None,
            Some(&z(&[4, 1], DType::F32))
        )),
        format!("{p} Received invalid shape for sinks (4,1).")
    );
    assert_eq!(
        e(sdpa(
            &q,
            &k,
            &z(&[1, 1, 6, 8], DType::F32),
            1.0,
            Mask::None,
            None
        )),
        format!(
            "{p} keys and values expected to have the same sequence length; found keys shape \
             (1,1,5,8) for values shape (1,1,6,8)."
        )
    );
    // The oracle validates identically.
    assert!(matches!(
        sdpa_ref(&q, &k, &z(&[1, 1, 6, 8], DType::F32), 1.0, Mask::None, None),
        Err(Error::InvalidArgument(_))
    ));
}

// ----- property test ------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    nkv: usize,
    r: usize,
    tq: usize,
    tkv: usize,
    d: usize,
    dv: usize,
    layouts: [u8; 3],
    mask: u8,
    sinks: bool,
    dtype: u8,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..3, 1usize..3, 1usize..5, 1usize..80, 0usize..150),
        (
            1usize..40,
            1usize..40,
            [0u8..3, 0u8..3, 0u8..3],
            0u8..6,
            any::<bool>(),
            0u8..3,
        ),
        any::<u64>(),
    )
        .prop_map(
            |((b, nkv, r, tq, tkv), (d, dv, layouts, mask, sinks, dtype), seed)| Case {
                b,
                nkv,
                r,
                tq,
                tkv,
                d,
                dv,
                layouts,
                mask,
                sinks,
                dtype,
                seed,
            },
        )
}

/// A `[b, h, t, d]` input in one of three layouts: row-major, `[B, T, H, D]` memory
/// transposed, or every other element of a larger array along the sequence and feature axes.
fn layout(b: usize, h: usize, t: usize, d: usize, kind: u8, dtype: DType, seed: u64) -> Array {
    match kind {
        0 => randn(&[b, h, t, d], dtype, seed),
        1 => randn(&[b, t, h, d], dtype, seed).swapaxes(1, 2).unwrap(),
        _ => randn(&[b, h, 2 * t, 2 * d], dtype, seed)
            .slice(
                &[0, 0, 1, 0],
                &[b as isize, h as isize, (2 * t) as isize, (2 * d) as isize],
                &[1, 1, 2, 2],
            )
            .unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matches_oracle(c in case()) {
        let dtype = [DType::F32, DType::F16, DType::BF16][c.dtype as usize];
        let nq = c.nkv * c.r;
        let q = layout(c.b, nq, c.tq, c.d, c.layouts[0], dtype, c.seed);
        let k = layout(c.b, c.nkv, c.tkv, c.d, c.layouts[1], dtype, c.seed ^ 1);
        let v = layout(c.b, c.nkv, c.tkv, c.dv, c.layouts[2], dtype, c.seed ^ 2);
        let seed = c.seed ^ 3;
        let mask_arr = match c.mask {
            2 => Some(bool_mask(&[c.b, nq, c.tq, c.tkv], 0.6, seed)),
            3 => Some(bool_mask(&[nq, 1, c.tkv], 0.6, seed)),
            4 => Some(randn(&[c.tq, c.tkv], dtype, seed)),
            5 => Some(randn(&[c.b, 1, 1, c.tkv], dtype, seed)),
            _ => None,
        };
        let mask = match (c.mask, &mask_arr) {
            (1, _) => Mask::Causal,
            (_, Some(m)) => Mask::Array(m),
            _ => Mask::None,
        };
        let sinks = c.sinks.then(|| randn(&[nq], dtype, c.seed ^ 4));
        let scale = 1.0 / (c.d as f32).sqrt();
        check(&q, &k, &v, scale, mask, sinks.as_ref(), &format!("{c:?}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Few queries over long keys on more threads than tasks: the split-key path (shapes of
    /// at least 2^22 multiply-adds, so that the call is not kept on the calling thread).
    #[test]
    fn split_keys_match_oracle(
        r in 4usize..9,
        tq in 2usize..4,
        tkv in 2048usize..4096,
        mask in 0u8..3,
        sinks in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| {
            let q = randn(&[1, r, tq, 128], DType::F32, seed);
            let k = layout(1, 1, tkv, 128, (seed % 3) as u8, DType::F32, seed ^ 1);
            let v = randn(&[1, 1, tkv, 128], DType::F32, seed ^ 2);
            let m = bool_mask(&[r, tq, tkv], 0.8, seed ^ 3);
            let mask = [Mask::None, Mask::Causal, Mask::Array(&m)][mask as usize];
            let s = sinks.then(|| randn(&[r], DType::F32, seed ^ 4));
            check(&q, &k, &v, 0.125, mask, s.as_ref(), &format!("r {r} tq {tq} tkv {tkv} seed {seed}"));
        });
    }
}

// ----- benchmarks (run with --ignored --nocapture in release) -------------------------------------

/// Process CPU time (all threads), from /proc (10 ms ticks).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Best wall time of `n` runs, and the mean CPU time per run (all threads): on a busy
/// machine the CPU time per thread is the steadier measure.
fn best_of<F: FnMut()>(n: usize, mut f: F) -> (f64, f64) {
    let mut best = f64::INFINITY;
    let cpu0 = cpu_seconds();
    for _ in 0..n {
        let t = std::time::Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, (cpu_seconds() - cpu0) / n as f64)
}

#[test]
#[ignore = "benchmark"]
fn bench_prefill() {
    let threads = rayon::current_num_threads();
    // SDPA_BENCH_DTYPES=float32,bfloat16 picks dtypes (default: all three).
    let pick = std::env::var("SDPA_BENCH_DTYPES").unwrap_or_default();
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    for dtype in dtypes
        .into_iter()
        .filter(|d| pick.is_empty() || pick.contains(d.name()))
    {
        for transposed in [false, true] {
            let (b, h, t, d) = (1usize, 16usize, 1024usize, 128usize);
            let q = input(b, h, t, d, transposed, dtype, 1);
            let k = input(b, h, t, d, transposed, dtype, 2);
            let v = input(b, h, t, d, transposed, dtype, 3);
            let scale = 1.0 / (d as f32).sqrt();
            for causal in [false, true] {
                let mask = if causal { Mask::Causal } else { Mask::None };
                let (secs, cpu) = best_of(10, || {
                    sdpa(&q, &k, &v, scale, mask, None).unwrap();
                });
                let flops = 4.0 * (b * h * t * t * d) as f64 / if causal { 2.0 } else { 1.0 };
                println!(
                    "prefill {dtype} B{b} H{h} T{t} D{d} transposed={transposed} causal={causal} \
                     threads={threads}: {:.2} ms, {:.1} GFLOP/s ({:.1} GFLOP per CPU second)",
                    secs * 1e3,
                    flops / secs / 1e9,
                    flops / cpu / 1e9
                );
            }
        }
    }
}

#[test]
#[ignore = "benchmark"]
fn bench_decode() {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let n = 64usize << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let (copy, _) = best_of(10, || {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let copy_gbs = 2.0 * (n * 4) as f64 / copy / 1e9;
    println!("copy 256 MiB threads={threads}: {copy_gbs:.1} GB/s (read + write)");
    for dtype in [DType::F32, DType::BF16] {
        let (nq, nkv, tkv, d) = (32usize, 8usize, 8192usize, 128usize);
        let q = randn(&[1, nq, 1, d], dtype, 1);
        let k = randn(&[1, nkv, tkv, d], dtype, 2);
        let v = randn(&[1, nkv, tkv, d], dtype, 3);
        let (secs, cpu) = best_of(40, || {
            sdpa(&q, &k, &v, 0.088, Mask::None, None).unwrap();
        });
        let bytes = (k.nbytes() + v.nbytes()) as f64;
        let gbs = bytes / secs / 1e9;
        println!(
            "decode {dtype} Nq{nq} Nkv{nkv} Tkv{tkv} D{d} threads={threads}: {:.3} ms, {gbs:.1} GB/s \
             of K+V = {:.0}% of copy ({:.3} CPU ms per call)",
            secs * 1e3,
            100.0 * gbs / copy_gbs,
            cpu * 1e3
        );
    }
}

#[test]
#[ignore = "benchmark"]
fn bench_shapes() {
    let threads = rayon::current_num_threads();
    // (B, N_q, N_kv, T_q, T_kv, D, causal)
    let shapes = [
        (
            1usize, 32usize, 8usize, 1024usize, 1024usize, 128usize, true,
        ),
        (1, 32, 8, 4, 4096, 128, false),
        (1, 32, 8, 8, 4096, 128, false),
        (8, 32, 8, 1, 2048, 128, false),
        (1, 32, 1, 1, 8192, 128, false),
        (1, 8, 8, 512, 512, 64, true),
        (1, 64, 8, 1, 8192, 128, false),
    ];
    // SDPA_BENCH_SHAPE=i runs only shape i.
    let only: Option<usize> = std::env::var("SDPA_BENCH_SHAPE")
        .ok()
        .and_then(|x| x.parse().ok());
    for (i, &(b, nq, nkv, tq, tkv, d, causal)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let q = randn(&[b, nq, tq, d], DType::F32, 1);
        let k = randn(&[b, nkv, tkv, d], DType::F32, 2);
        let v = randn(&[b, nkv, tkv, d], DType::F32, 3);
        let mask = if causal { Mask::Causal } else { Mask::None };
        let (secs, _) = best_of(10, || {
            sdpa(&q, &k, &v, 0.088, mask, None).unwrap();
        });
        let flops = 4.0 * (b * nq * tq * tkv * d) as f64 / if causal { 2.0 } else { 1.0 };
        let gbs = (k.nbytes() + v.nbytes()) as f64 / secs / 1e9;
        println!(
            "B{b} Nq{nq} Nkv{nkv} Tq{tq} Tkv{tkv} D{d} causal={causal} threads={threads}: \
             {:.3} ms, {:.1} GFLOP/s, {gbs:.1} GB/s of K+V",
            secs * 1e3,
            flops / secs / 1e9
        );
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|x| x.parse().ok()))
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "benchmark"]
fn bench_long_sequence_memory() {
    // SDPA_BENCH_T overrides the sequence length (default 16384).
    let t = std::env::var("SDPA_BENCH_T")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(16384usize);
    let (h, d) = (8usize, 128usize);
    let q = randn(&[1, h, t, d], DType::F32, 1);
    let k = randn(&[1, h, t, d], DType::F32, 2);
    let v = randn(&[1, h, t, d], DType::F32, 3);
    let before = peak_rss_kib();
    let start = std::time::Instant::now();
    let out = sdpa(&q, &k, &v, 0.088, Mask::Causal, None).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let after = peak_rss_kib();
    let flops = 2.0 * (h * t * t * d) as f64;
    println!(
        "T{t} H{h} D{d} causal: {secs:.2} s, {:.1} GFLOP/s; peak RSS {} MiB before, {} MiB after \
         (output {} MiB)",
        flops / secs / 1e9,
        before / 1024,
        after / 1024,
        out.nbytes() >> 20
    );
}
