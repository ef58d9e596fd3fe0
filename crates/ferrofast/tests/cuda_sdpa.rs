//! `fast::scaled_dot_product_attention` with inputs on a CUDA device against the float64
//! oracle: the cases of `tests/sdpa.rs` (MLX's shapes, every mask kind, sinks, GQA and MQA,
//! head dims, dtypes, strided views, edge cases) run on the GPU with the same tolerances,
//! plus GPU-specific ones: long caches, split-KV boundaries, grids of more than 132 blocks,
//! unaligned rows, streams and devices. Output buffers are poisoned, so unwritten elements
//! fail. Without a CUDA device each test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{check_close, gpu, randn, uniform};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::{Array, DType, Device, Error, Stream};
use proptest::prelude::*;

/// As in `tests/sdpa.rs`.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-12),
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (1e-3, 1e-3),
        _ => (8e-3, 8e-3),
    }
}

/// MLX's `test_sdpa` tolerances, as in `tests/sdpa.rs`.
fn mlx_tol(dtype: DType) -> (f64, f64) {
    let atol = match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 3e-4,
        _ => 5e-3,
    };
    (atol, atol)
}

fn up(a: &Array, dev: &Device) -> Array {
    a.to_device(dev).unwrap()
}

/// Runs the op on GPU copies of the host inputs (`gq`, `gk`, `gv`: the same values, possibly
/// in other layouts) and compares with the oracle on the host inputs.
#[allow(clippy::too_many_arguments)]
fn check_views(
    dev: &Device,
    (q, k, v): (&Array, &Array, &Array),
    (gq, gk, gv): (&Array, &Array, &Array),
    scale: f32,
    mask: Option<&Array>,
    causal: bool,
    sinks: Option<&Array>,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let gm = mask.map(|m| up(m, dev));
    let gs = sinks.map(|s| up(s, dev));
    let (hmask, dmask) = match (mask, &gm) {
        (Some(m), Some(g)) => (Mask::Array(m), Mask::Array(g)),
        _ if causal => (Mask::Causal, Mask::Causal),
        _ => (Mask::None, Mask::None),
    };
    let out = sdpa(gq, gk, gv, scale, dmask, gs.as_ref()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), *dev, "{what}");
    let reference = sdpa_ref(q, k, v, scale, hmask, sinks).expect("oracle");
    let (atol, rtol) = tolerance(out.dtype());
    check_close(&out, &reference, atol, rtol, what);
    out
}

/// [`check_views`] with row-major GPU copies of the inputs.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &Device,
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Option<&Array>,
    causal: bool,
    sinks: Option<&Array>,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let (gq, gk, gv) = (up(q, dev), up(k, dev), up(v, dev));
    check_views(
        dev,
        (q, k, v),
        (&gq, &gk, &gv),
        scale,
        mask,
        causal,
        sinks,
        tolerance,
        what,
    )
}

fn bool_mask(shape: &[usize], p_true: f64, seed: u64) -> Array {
    let u = uniform(shape, 0.0, 1.0, DType::F32, seed)
        .to_vec::<f32>()
        .unwrap();
    let m: Vec<bool> = u.iter().map(|&x| f64::from(x) < p_true).collect();
    Array::from_vec(m, shape).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    None,
    Additive,
    Bool,
    Causal,
}

const KINDS: [Kind; 4] = [Kind::None, Kind::Additive, Kind::Bool, Kind::Causal];

/// The mask of `kind` for q `[B, N_q, T_q, _]` and `T_kv` keys: additive U(0, 0.5) or bool
/// with half the keys kept, full shape.
fn mask_for(kind: Kind, q: &Array, tkv: usize, seed: u64) -> (Option<Array>, bool) {
    let s = q.shape();
    let shape = [s[0], s[1], s[2], tkv];
    match kind {
        Kind::None => (None, false),
        Kind::Causal => (None, true),
        Kind::Additive => (Some(uniform(&shape, 0.0, 0.5, q.dtype(), seed)), false),
        Kind::Bool => (Some(bool_mask(&shape, 0.5, seed)), false),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_kind(
    dev: &Device,
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    kind: Kind,
    seed: u64,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let (m, causal) = mask_for(kind, q, k.shape()[2], seed);
    check(
        dev,
        q,
        k,
        v,
        scale,
        m.as_ref(),
        causal,
        None,
        tolerance,
        what,
    )
}

/// MLX's `prepare_inputs`: q, k ~ U(0, 0.5), v ~ U(0, scale), `[B, H, T, D]`.
fn mlx_inputs(
    (b, ql, kl, d, qh, kh): (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    seed: u64,
) -> (Array, Array, Array, f32) {
    let scale = 1.0 / (d as f32).sqrt();
    (
        uniform(&[b, qh, ql, d], 0.0, 0.5, dtype, seed),
        uniform(&[b, kh, kl, d], 0.0, 0.5, dtype, seed + 1),
        uniform(&[b, kh, kl, d], 0.0, f64::from(scale), dtype, seed + 2),
        scale,
    )
}

/// A `[B, H, T, D]` input made on both sides: the host array, and the same values on the
/// GPU as the same view of uploaded memory. `kind` 0: row-major; 1: `[B, T, H, D]` memory
/// through `swapaxes(1, 2)`; 2: every other position and feature of a larger array; 3: the
/// features start one element into wider rows (rows not 16-byte aligned).
#[allow(clippy::too_many_arguments)]
fn layout(
    dev: &Device,
    (b, h, t, d): (usize, usize, usize, usize),
    kind: u8,
    dtype: DType,
    seed: u64,
) -> (Array, Array) {
    let view = |a: &Array| -> Array {
        match kind {
            0 => a.clone(),
            1 => a.swapaxes(1, 2).unwrap(),
            2 => a
                .slice(
                    &[0, 0, 1, 0],
                    &[b as isize, h as isize, (2 * t) as isize, (2 * d) as isize],
                    &[1, 1, 2, 2],
                )
                .unwrap(),
            _ => a
                .slice(
                    &[0, 0, 0, 1],
                    &[b as isize, h as isize, t as isize, (d + 1) as isize],
                    &[1, 1, 1, 1],
                )
                .unwrap(),
        }
    };
    let base = match kind {
        0 => randn(&[b, h, t, d], dtype, seed),
        1 => randn(&[b, t, h, d], dtype, seed),
        2 => randn(&[b, h, 2 * t, 2 * d], dtype, seed),
        _ => randn(&[b, h, t, d + 1], dtype, seed),
    };
    let host = view(&base);
    let dev_view = view(&up(&base, dev));
    assert_eq!(host.shape(), &[b, h, t, d]);
    (host, dev_view)
}

// ----- the CPU suite's cases -----------------------------------------------------------------

/// MLX's shapes_64 / shapes_128 (head counts divided down, as in `tests/sdpa.rs`), each with
/// every mask kind, a rotating dtype and both layouts.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn mlx_shapes_64_and_128() {
    let Some(dev) = gpu() else { return };
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
    let dtypes = [DType::F16, DType::F32, DType::BF16];
    for (si, &(b, ql, kl, d, qh, kh)) in shapes.iter().enumerate() {
        let f = if qh == kh { qh / 2 } else { kh / 2 }.max(1);
        let (qh, kh) = (qh / f, kh / f);
        for (ki, kind) in KINDS.into_iter().enumerate() {
            let dtype = dtypes[(si + ki) % 3];
            let seed = 100 + (si * 4 + ki) as u64 * 7;
            let (q, k, v, scale) = mlx_inputs((b, ql, kl, d, qh, kh), dtype, seed);
            let what = format!(
                "shape {:?} {kind:?} {dtype} seed {seed}",
                (b, ql, kl, d, qh, kh)
            );
            let out = run_kind(&dev, &q, &k, &v, scale, kind, seed + 3, mlx_tol, &what);
            assert_eq!(out.shape(), &[b, qh, ql, d]);
            assert_eq!(out.dtype(), dtype);
        }
    }
}

/// MLX's single-query shapes: T_q 1 over many key lengths, GQA 1 and 4, every mask kind and
/// dtype.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn mlx_single_query_many_key_lengths() {
    let Some(dev) = gpu() else { return };
    let mut n = 0u64;
    for &kl in &[7usize, 9, 32, 63, 67, 129, 400, 2000] {
        for &kh in &[8usize, 2] {
            for kind in KINDS {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    n += 1;
                    let seed = 5000 + n * 11;
                    let (q, k, v, scale) = mlx_inputs((1, 1, kl, 128, 8, kh), dtype, seed);
                    let what = format!("qL 1 kL {kl} kH {kh} {kind:?} {dtype} seed {seed}");
                    run_kind(&dev, &q, &k, &v, scale, kind, seed + 5, mlx_tol, &what);
                }
            }
        }
    }
}

/// Decode and prefill query lengths around the decode kernel's limit of 8, every mask kind
/// and dtype, GQA 4 and MQA.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn query_lengths_around_the_decode_limit() {
    let Some(dev) = gpu() else { return };
    let mut n = 0u64;
    for &tq in &[1usize, 2, 3, 7, 8, 9, 16] {
        for &(nq, nkv) in &[(8usize, 2usize), (8, 1), (3, 3)] {
            for kind in KINDS {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    n += 1;
                    let seed = 7000 + n * 5;
                    let q = randn(&[2, nq, tq, 64], dtype, seed);
                    let k = randn(&[2, nkv, 300, 64], dtype, seed + 1);
                    let v = randn(&[2, nkv, 300, 64], dtype, seed + 2);
                    let what = format!("tq {tq} {nq}/{nkv} {kind:?} {dtype} seed {seed}");
                    run_kind(&dev, &q, &k, &v, 0.125, kind, seed + 3, tol, &what);
                }
            }
        }
    }
}

/// q `(1, 4, 1, 64)`, k/v `(1, L, 1, 64)` swapped to `(1, 1, L, 64)`, with the masks of
/// MLX's vector tests: scalar, `(L,)`, `(N_q, 1, L)`, transposed, additive, log(bool),
/// causal.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn mlx_vector_masks() {
    let Some(dev) = gpu() else { return };
    let (nq, d) = (4usize, 64usize);
    for &l in &[43usize, 4096] {
        let seed = l as u64;
        let q = randn(&[1, nq, 1, d], DType::F32, seed);
        let kb = randn(&[1, l, 1, d], DType::F32, seed + 1);
        let vb = randn(&[1, l, 1, d], DType::F32, seed + 2);
        let (k, v) = (kb.swapaxes(1, 2).unwrap(), vb.swapaxes(1, 2).unwrap());
        let (gk, gv) = (
            up(&kb, &dev).swapaxes(1, 2).unwrap(),
            up(&vb, &dev).swapaxes(1, 2).unwrap(),
        );
        let gq = up(&q, &dev);
        let scale = 1.0 / (d as f32).sqrt();
        let mut tail = vec![true; l];
        for x in tail.iter_mut().skip(l - l / 4) {
            *x = false;
        }
        let heads = bool_mask(&[nq, 1, l], 0.5, seed + 3);
        let logs: Vec<f32> = heads
            .to_vec::<bool>()
            .unwrap()
            .iter()
            .map(|&b| if b { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let masks = [
            ("scalar True", Array::scalar(true)),
            ("(L,) tail False", Array::from_vec(tail, &[l]).unwrap()),
            ("(Nq,1,L)", heads),
            (
                "(L,1,Nq).T",
                bool_mask(&[l, 1, nq], 0.5, seed + 4)
                    .transpose(&[2, 1, 0])
                    .unwrap(),
            ),
            (
                "additive",
                uniform(&[nq, 1, l], -1.0, 1.0, DType::F32, seed + 5),
            ),
            ("log(bool)", Array::from_vec(logs, &[nq, 1, l]).unwrap()),
        ];
        for (name, m) in &masks {
            check_views(
                &dev,
                (&q, &k, &v),
                (&gq, &gk, &gv),
                scale,
                Some(m),
                false,
                None,
                tol,
                &format!("vector L {l} mask {name}"),
            );
        }
        check_views(
            &dev,
            (&q, &k, &v),
            (&gq, &gk, &gv),
            scale,
            None,
            true,
            None,
            tol,
            &format!("vector L {l} causal"),
        );
    }
}

/// MLX's `test_sdpa_vector_gqa_long`, shortened: GQA with K/V sliced out of a longer cache.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn gqa_cache_slices() {
    let Some(dev) = gpu() else { return };
    for (i, &(nq, nkv, d, l)) in [(32usize, 4usize, 128usize, 1000usize), (64, 8, 64, 1001)]
        .iter()
        .enumerate()
    {
        let seed = 40 + i as u64;
        let q = randn(&[1, nq, 1, d], DType::F32, seed);
        let kb = randn(&[1, nkv, l + 32, d], DType::F32, seed + 1);
        let vb = randn(&[1, nkv, l + 32, d], DType::F32, seed + 2);
        let cut = |a: &Array| {
            a.slice(&[0, 0, 0], &[1, nkv as isize, l as isize], &[1, 1, 1])
                .unwrap()
        };
        let (gq, gk, gv) = (up(&q, &dev), cut(&up(&kb, &dev)), cut(&up(&vb, &dev)));
        for causal in [false, true] {
            check_views(
                &dev,
                (&q, &cut(&kb), &cut(&vb)),
                (&gq, &gk, &gv),
                1.0 / (d as f32).sqrt(),
                None,
                causal,
                None,
                tol,
                &format!("gqa cache {nq}/{nkv} causal {causal}"),
            );
        }
    }
}

/// Every key masked gives 0 (MLX's `test_sdpa_fully_masked`), for decode and prefill.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn fully_masked_rows_are_zero() {
    let Some(dev) = gpu() else { return };
    for &lq in &[1usize, 8, 32] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let seed = 70 + lq as u64;
            let q = randn(&[1, 4, lq, 128], dtype, seed);
            let k = randn(&[1, 4, 8, 128], dtype, seed + 1);
            let v = randn(&[1, 4, 8, 128], dtype, seed + 2);
            let none = Array::scalar(false);
            let minus_inf = Array::scalar(f32::NEG_INFINITY).astype(dtype).unwrap();
            for (name, m) in [("False", &none), ("-inf", &minus_inf)] {
                let what = format!("mask {name} lq {lq} {dtype}");
                let out = check(&dev, &q, &k, &v, 0.1, Some(m), false, None, tol, &what);
                assert!(
                    out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0),
                    "{what}"
                );
            }
        }
    }
}

/// T_q > T_kv with a causal mask: the first rows see no key and are 0.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn causal_longer_queries_than_keys() {
    let Some(dev) = gpu() else { return };
    for (i, &(ql, kl, d, qh, kh)) in [
        (127usize, 65usize, 64usize, 4usize, 1usize),
        (9, 3, 32, 2, 2),
        (8, 3, 64, 2, 2),
        (40, 1, 16, 3, 1),
        (5, 2, 128, 4, 2),
    ]
    .iter()
    .enumerate()
    {
        let seed = 900 + i as u64;
        let q = randn(&[1, qh, ql, d], DType::F32, seed);
        let k = randn(&[1, kh, kl, d], DType::F32, seed + 1);
        let v = randn(&[1, kh, kl, d], DType::F32, seed + 2);
        let out = check(
            &dev,
            &q,
            &k,
            &v,
            0.5,
            None,
            true,
            None,
            tol,
            &format!("qL {ql} kL {kl}"),
        );
        let o = out.to_vec::<f32>().unwrap();
        for h in 0..qh {
            for t in 0..ql - kl {
                let row = &o[(h * ql + t) * d..][..d];
                assert!(row.iter().all(|&x| x == 0.0), "row {t} of head {h}");
            }
        }
    }
}

/// A key row of -inf gives -inf scores for that key (MLX's `test_sdpa_inf_score`).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn minus_inf_key_score() {
    let Some(dev) = gpu() else { return };
    for &d in &[4usize, 128] {
        for &lq in &[1usize, 8, 12] {
            let seed = 80 + d as u64 + lq as u64;
            let q = uniform(&[1, 4, lq, d], 0.01, 0.5, DType::F32, seed);
            let mut kd = uniform(&[1, 1, 8, d], 0.0, 0.5, DType::F32, seed + 1)
                .to_vec::<f32>()
                .unwrap();
            kd[..d].fill(f32::NEG_INFINITY);
            let k = Array::from_vec(kd, &[1, 1, 8, d]).unwrap();
            let v = randn(&[1, 1, 8, d], DType::F32, seed + 2);
            let what = format!("inf score D {d} Lq {lq}");
            let out = check(&dev, &q, &k, &v, 1.0, None, false, None, tol, &what);
            assert!(out.to_f64_vec().unwrap().iter().all(|x| x.is_finite()));
        }
    }
}

/// MLX's `test_sdpa_few_query` and `test_sdpa_vector_batched`: q in `[B, T, H, D]` memory,
/// MQA, bool masks of several shapes, a broadcast additive mask.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn mlx_few_query_and_batched() {
    let Some(dev) = gpu() else { return };
    for &l in &[43usize, 4096] {
        let seed = 300 + l as u64;
        let (q, gq) = layout(&dev, (1, 8, 8, 128), 1, DType::F32, seed);
        let k = randn(&[1, 1, l, 128], DType::F32, seed + 1);
        let v = randn(&[1, 1, l, 128], DType::F32, seed + 2);
        let (gk, gv) = (up(&k, &dev), up(&v, &dev));
        let scale = 1.0 / 128f32.sqrt();
        let masks = [
            Array::scalar(true),
            bool_mask(&[8, 1, l], 0.5, seed + 3),
            bool_mask(&[l, 1, 8], 0.5, seed + 4)
                .transpose(&[2, 1, 0])
                .unwrap(),
        ];
        for (i, m) in masks.iter().enumerate() {
            let what = format!("few query L {l} mask {i}");
            check_views(
                &dev,
                (&q, &k, &v),
                (&gq, &gk, &gv),
                scale,
                Some(m),
                false,
                None,
                tol,
                &what,
            );
        }
        let what = format!("few query L {l} causal");
        check_views(
            &dev,
            (&q, &k, &v),
            (&gq, &gk, &gv),
            scale,
            None,
            true,
            None,
            tol,
            &what,
        );
    }
    let (q, gq) = layout(&dev, (2, 4, 3, 64), 1, DType::F32, 11);
    let (k, gk) = layout(&dev, (2, 1, 3, 64), 1, DType::F32, 12);
    let (v, gv) = layout(&dev, (2, 1, 3, 64), 0, DType::F32, 13);
    let m = randn(&[1, 2, 3, 3], DType::F32, 14).swapaxes(0, 1).unwrap();
    check_views(
        &dev,
        (&q, &k, &v),
        (&gq, &gk, &gv),
        0.125,
        Some(&m),
        false,
        None,
        tol,
        "batched broadcast mask",
    );
}

/// MLX's `test_sdpa_attention_sinks`, plus sinks with every mask kind on both kernels and a
/// fully masked row whose sink takes all the weight (output 0).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn attention_sinks() {
    let Some(dev) = gpu() else { return };
    let mut n = 0u64;
    for &(tq, tkv) in &[
        (1usize, 128usize),
        (1, 4096),
        (4, 4096),
        (8, 300),
        (33, 300),
    ] {
        for &nkv in &[2usize, 8] {
            for dtype in [DType::F16, DType::F32, DType::BF16] {
                n += 1;
                let seed = 600 + n * 5;
                let q = randn(&[2, 8, tq, 64], dtype, seed);
                let k = randn(&[2, nkv, tkv, 64], dtype, seed + 1);
                let v = randn(&[2, nkv, tkv, 64], dtype, seed + 2);
                let sinks: Vec<f32> = randn(&[8], DType::F32, seed + 3)
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| 10.0 * x)
                    .collect();
                let sinks = Array::from_vec(sinks, &[8]).unwrap().astype(dtype).unwrap();
                let kind = KINDS[(n % 4) as usize];
                let (m, causal) = mask_for(kind, &q, tkv, seed + 4);
                let what = format!("sinks tq {tq} tkv {tkv} nkv {nkv} {dtype} {kind:?}");
                check(
                    &dev,
                    &q,
                    &k,
                    &v,
                    0.125,
                    m.as_ref(),
                    causal,
                    Some(&sinks),
                    tol,
                    &what,
                );
            }
        }
    }
    for &tq in &[3usize, 12] {
        let q = randn(&[1, 2, tq, 16], DType::F32, 1);
        let k = randn(&[1, 1, 5, 16], DType::F32, 2);
        let v = randn(&[1, 1, 5, 16], DType::F32, 3);
        let sinks = Array::from_vec(vec![1.0f32, -2.0], &[2]).unwrap();
        let none = Array::scalar(false);
        let out = check(
            &dev,
            &q,
            &k,
            &v,
            0.3,
            Some(&none),
            false,
            Some(&sinks),
            tol,
            "masked with sink",
        );
        assert!(out.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
        // Sinks through a strided view, and integer sinks promoted to float32.
        let wide = Array::from_vec(vec![0.5f32, 9.0, -1.5, 9.0], &[4]).unwrap();
        let strided = wide.slice(&[0], &[4], &[2]).unwrap();
        let gs = up(&wide, &dev).slice(&[0], &[4], &[2]).unwrap();
        let (gq, gk, gv) = (up(&q, &dev), up(&k, &dev), up(&v, &dev));
        let out = sdpa(&gq, &gk, &gv, 0.3, Mask::Causal, Some(&gs)).unwrap();
        let r = sdpa_ref(&q, &k, &v, 0.3, Mask::Causal, Some(&strided)).unwrap();
        check_close(&out, &r, 2e-5, 2e-5, "strided sinks");
        let isinks = Array::from_vec(vec![1i32, -1], &[2]).unwrap();
        check(
            &dev,
            &q,
            &k,
            &v,
            0.3,
            None,
            false,
            Some(&isinks),
            tol,
            "int sinks",
        );
    }
}

/// Head dims the decode kernel takes (multiples of 8 up to 256, (192, 128)) and those only
/// the general kernel takes (33, 512, (5, 3)), for decode and prefill query lengths.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn head_dims_and_value_dims() {
    let Some(dev) = gpu() else { return };
    let dims = [
        (64usize, 64usize),
        (80, 80),
        (96, 96),
        (128, 128),
        (256, 256),
        (192, 128),
        (96, 64),
        (33, 33),
        (512, 512),
        (5, 3),
        (8, 264),
    ];
    let mut n = 0u64;
    for &(d, dv) in &dims {
        for &tq in &[1usize, 2, 8, 9, 70] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                n += 1;
                let seed = 1000 + n * 3;
                let q = randn(&[1, 4, tq, d], dtype, seed);
                let k = randn(&[1, 2, 75, d], dtype, seed + 1);
                let v = randn(&[1, 2, 75, dv], dtype, seed + 2);
                let kind = KINDS[(n % 4) as usize];
                let what = format!("D {d} Dv {dv} tq {tq} {dtype} {kind:?}");
                let scale = 1.0 / (d as f32).sqrt();
                let out = run_kind(&dev, &q, &k, &v, scale, kind, seed + 3, tol, &what);
                assert_eq!(out.shape(), &[1, 4, tq, dv]);
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn odd_sequence_lengths() {
    let Some(dev) = gpu() else { return };
    let lens = [1usize, 2, 8, 9, 31, 33, 65, 129];
    let mut n = 0u64;
    for &tq in &lens {
        for &tkv in &lens {
            let seed = 2000 + n;
            n += 1;
            let dtype = [DType::F32, DType::F16, DType::BF16][(n % 3) as usize];
            let q = randn(&[1, 2, tq, 32], dtype, seed);
            let k = randn(&[1, 1, tkv, 32], dtype, seed + 1);
            let v = randn(&[1, 1, tkv, 32], dtype, seed + 2);
            let kind = KINDS[(n % 4) as usize];
            let what = format!("tq {tq} tkv {tkv} {kind:?} {dtype}");
            run_kind(&dev, &q, &k, &v, 0.2, kind, seed + 3, tol, &what);
        }
    }
}

/// Mixed input dtypes promote as on the CPU; a float64 result is not run on the GPU.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn dtypes_mixed_and_f64() {
    let Some(dev) = gpu() else { return };
    let q = randn(&[1, 2, 5, 16], DType::BF16, 1);
    let k = randn(&[1, 2, 7, 16], DType::F16, 2);
    let v = randn(&[1, 2, 7, 16], DType::F16, 3);
    let out = check(
        &dev,
        &q,
        &k,
        &v,
        0.25,
        None,
        false,
        None,
        tol,
        "bf16 q, f16 kv",
    );
    assert_eq!(out.dtype(), DType::F32);
    let m = uniform(&[5, 7], -1.0, 1.0, DType::BF16, 4);
    check(
        &dev,
        &q.astype(DType::F32).unwrap(),
        &k,
        &v,
        0.25,
        Some(&m),
        false,
        None,
        tol,
        "bf16 mask, f32 result",
    );
    let q64 = up(&randn(&[1, 2, 1, 16], DType::F64, 5), &dev);
    let k64 = up(&randn(&[1, 2, 7, 16], DType::F64, 6), &dev);
    assert!(matches!(
        sdpa(&q64, &k64, &k64, 1.0, Mask::None, None),
        Err(Error::Unsupported(_))
    ));
}

/// Strided views on the GPU, read in place or copied: transposed, stepped, reversed, a
/// strided feature axis, broadcast keys (stride 0), unaligned rows; for decode and prefill.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_layouts() {
    let Some(dev) = gpu() else { return };
    let mut n = 0u64;
    for &tq in &[1usize, 4, 40] {
        for dtype in [DType::F32, DType::BF16] {
            for kinds in [[1u8, 1, 1], [2, 2, 2], [3, 3, 3], [0, 1, 2], [1, 3, 0]] {
                n += 1;
                let seed = 50 + n * 3;
                let (q, gq) = layout(&dev, (2, 4, tq, 64), kinds[0], dtype, seed);
                let (k, gk) = layout(&dev, (2, 2, 50, 64), kinds[1], dtype, seed + 1);
                let (v, gv) = layout(&dev, (2, 2, 50, 64), kinds[2], dtype, seed + 2);
                let kind = KINDS[(n % 4) as usize];
                let (m, causal) = mask_for(kind, &q, 50, seed + 3);
                check_views(
                    &dev,
                    (&q, &k, &v),
                    (&gq, &gk, &gv),
                    0.2,
                    m.as_ref(),
                    causal,
                    None,
                    tol,
                    &format!("layouts {kinds:?} tq {tq} {dtype} {kind:?}"),
                );
            }
        }
        // Reversed keys (negative strides) and keys broadcast along the sequence.
        let kb = randn(&[2, 2, 100, 32], DType::F32, 52);
        let rev = |a: &Array| a.slice(&[0, 0, 99], &[2, 2, -100], &[1, 1, -2]).unwrap();
        let q = randn(&[2, 4, tq, 32], DType::F32, 51);
        let v = randn(&[2, 2, 50, 32], DType::F32, 53);
        let (gq, gv) = (up(&q, &dev), up(&v, &dev));
        check_views(
            &dev,
            (&q, &rev(&kb), &v),
            (&gq, &rev(&up(&kb, &dev)), &gv),
            0.2,
            None,
            true,
            None,
            tol,
            &format!("reversed k tq {tq}"),
        );
        let k1 = randn(&[2, 2, 1, 32], DType::F32, 57);
        let bc = |a: &Array| a.broadcast_to(&[2, 2, 50, 32]).unwrap();
        check_views(
            &dev,
            (&q, &bc(&k1), &v),
            (&gq, &bc(&up(&k1, &dev)), &gv),
            0.2,
            None,
            false,
            None,
            tol,
            &format!("broadcast k tq {tq}"),
        );
    }
}

/// T_kv == 0 gives zeros (sinks or not); empty queries and heads give empty outputs.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn zero_length_keys_and_empty_shapes() {
    let Some(dev) = gpu() else { return };
    for &tq in &[1usize, 3, 20] {
        for &d in &[8usize, 64, 33] {
            let q = up(&randn(&[1, 2, tq, d], DType::F32, 1), &dev);
            let k = up(&randn(&[1, 1, 0, d], DType::F32, 2), &dev);
            let v = up(&randn(&[1, 1, 0, 16], DType::F32, 3), &dev);
            let sinks = up(&Array::from_vec(vec![0.5f32, 1.0], &[2]).unwrap(), &dev);
            for s in [None, Some(&sinks)] {
                for mask in [Mask::None, Mask::Causal] {
                    let out = sdpa(&q, &k, &v, 1.0, mask, s).unwrap();
                    assert_eq!(out.shape(), &[1, 2, tq, 16]);
                    assert!(out.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
                }
            }
        }
    }
    let q0 = up(&randn(&[1, 2, 0, 8], DType::F32, 4), &dev);
    let k1 = up(&randn(&[1, 1, 4, 8], DType::F32, 5), &dev);
    let v1 = up(&randn(&[1, 1, 4, 5], DType::F32, 6), &dev);
    let out = sdpa(&q0, &k1, &v1, 1.0, Mask::None, None).unwrap();
    assert_eq!(out.shape(), &[1, 2, 0, 5]);
    // D = 0: every score is 0.
    let qd = randn(&[1, 2, 3, 0], DType::F32, 7);
    let kd = randn(&[1, 1, 4, 0], DType::F32, 8);
    let v = randn(&[1, 1, 4, 5], DType::F32, 9);
    check(&dev, &qd, &kd, &v, 1.0, None, true, None, tol, "D = 0");
}

// ----- GPU-specific -----------------------------------------------------------------------------

/// A long cache: 32768 keys, GQA 4, D 128, in every dtype, with each mask kind and sinks.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn long_cache_decode() {
    let Some(dev) = gpu() else { return };
    let tkv = 32768usize;
    for (i, dtype) in [DType::BF16, DType::F16, DType::F32]
        .into_iter()
        .enumerate()
    {
        let seed = 11_000 + i as u64 * 10;
        let q = randn(&[1, 8, 1, 128], dtype, seed);
        let k = randn(&[1, 2, tkv, 128], dtype, seed + 1);
        let v = randn(&[1, 2, tkv, 128], dtype, seed + 2);
        let sinks = randn(&[8], dtype, seed + 3);
        let kind = KINDS[i % 4];
        let (m, causal) = mask_for(kind, &q, tkv, seed + 4);
        let what = format!("T_kv {tkv} {dtype} {kind:?}");
        check(
            &dev,
            &q,
            &k,
            &v,
            0.088,
            m.as_ref(),
            causal,
            Some(&sinks),
            tol,
            &what,
        );
        let what = format!("T_kv {tkv} {dtype} T_q 8 bool");
        let q8 = randn(&[1, 8, 8, 128], dtype, seed + 5);
        let (m, _) = mask_for(Kind::Bool, &q8, tkv, seed + 6);
        check(
            &dev,
            &q8,
            &k,
            &v,
            0.088,
            m.as_ref(),
            false,
            None,
            tol,
            &what,
        );
    }
}

/// Key lengths just below, at and above the split lengths the planner picks (multiples of
/// 64 and 256) for one (batch, kv head), where the keys are cut into many ranges.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn split_kv_boundaries() {
    let Some(dev) = gpu() else { return };
    let mut n = 0u64;
    for &tkv in &[
        63usize, 64, 65, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 4095, 4097, 16383, 16385,
        65537,
    ] {
        n += 1;
        let dtype = [DType::F32, DType::BF16, DType::F16][(n % 3) as usize];
        let seed = 12_000 + n * 7;
        let q = randn(&[1, 4, 2, 64], dtype, seed);
        let k = randn(&[1, 1, tkv, 64], dtype, seed + 1);
        let v = randn(&[1, 1, tkv, 64], dtype, seed + 2);
        let sinks = randn(&[4], dtype, seed + 3);
        let kind = KINDS[(n % 4) as usize];
        let (m, causal) = mask_for(kind, &q, tkv, seed + 4);
        let what = format!("split T_kv {tkv} {dtype} {kind:?}");
        let sinks = (n % 2 == 0).then_some(&sinks);
        check(
            &dev,
            &q,
            &k,
            &v,
            0.125,
            m.as_ref(),
            causal,
            sinks,
            tol,
            &what,
        );
    }
}

/// The tensor-core decode kernel (f16 / bf16, `(D, D_v)` in its table): GQA groups times
/// query lengths from 1 to 24 rows (one 16-row block and two), causal with `T_q` up to 8,
/// every mask kind, sinks, every head-dim pair it takes, key lengths that are not multiples
/// of its 16-key tiles, and one (batch, kv head) so the keys are split into many ranges.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn tensor_core_decode_rows_masks_and_dims() {
    let Some(dev) = gpu() else { return };
    let rows: [(usize, usize); 9] = [
        (4, 1),
        (4, 4),
        (8, 2),
        (16, 1),
        (5, 3),
        (2, 8),
        (3, 8),
        (1, 7),
        (6, 3),
    ];
    let dims: [(usize, usize); 6] = [
        (64, 64),
        (128, 128),
        (80, 80),
        (96, 96),
        (256, 256),
        (192, 128),
    ];
    let mut n = 0u64;
    for (ri, &(group, tq)) in rows.iter().enumerate() {
        for kind in KINDS {
            n += 1;
            let dtype = [DType::BF16, DType::F16][(n % 2) as usize];
            // D 64 and 128 everywhere, the other pairs in turn.
            let (d, dv) = match n % 4 {
                0 => dims[2 + (ri % 4)],
                1 | 3 => dims[0],
                _ => dims[1],
            };
            let tkv = [1usize, 15, 17, 333, 1001, 2049, 4999][(n % 7) as usize];
            let nkv = 1 + (n % 2) as usize;
            let seed = 13_000 + n * 13;
            let q = randn(&[1, nkv * group, tq, d], dtype, seed);
            let k = randn(&[1, nkv, tkv, d], dtype, seed + 1);
            let v = randn(&[1, nkv, tkv, dv], dtype, seed + 2);
            let sinks = randn(&[nkv * group], dtype, seed + 3);
            let sinks = (n % 3 == 0).then_some(&sinks);
            let (m, causal) = mask_for(kind, &q, tkv, seed + 4);
            let what = format!(
                "mma group {group} T_q {tq} ({d}, {dv}) T_kv {tkv} kv heads {nkv} {kind:?} \
                 {dtype} sinks {} seed {seed}",
                sinks.is_some()
            );
            let out = check(
                &dev,
                &q,
                &k,
                &v,
                1.0 / (d as f32).sqrt(),
                m.as_ref(),
                causal,
                sinks,
                tol,
                &what,
            );
            assert_eq!(out.shape(), &[1, nkv * group, tq, dv], "{what}");
        }
    }
}

/// The tensor-core decode with broadcast masks (a `(T_kv,)` bool row, an `(N_q, 1, T_kv)`
/// additive mask, a stride-0 key axis), rows whose keys are all masked (0, or all weight on
/// the sink), a causal mask hiding every key of the first query positions, a batch of 3, and
/// key lengths around its split sizes.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn tensor_core_decode_broadcast_masks_and_empty_rows() {
    let Some(dev) = gpu() else { return };
    let (b, nq, nkv, tq, d) = (3usize, 8usize, 2usize, 2usize, 128usize);
    for (i, &tkv) in [511usize, 512, 513, 1023, 1025, 3000].iter().enumerate() {
        let dtype = [DType::BF16, DType::F16][i % 2];
        let seed = 14_000 + i as u64 * 17;
        let q = randn(&[b, nq, tq, d], dtype, seed);
        let k = randn(&[b, nkv, tkv, d], dtype, seed + 1);
        let v = randn(&[b, nkv, tkv, d], dtype, seed + 2);
        let scale = 1.0 / (d as f32).sqrt();
        let row = bool_mask(&[tkv], 0.3, seed + 3);
        let heads = uniform(&[nq, 1, tkv], -2.0, 1.0, dtype, seed + 4);
        let one_key = Array::from_vec(
            (0..tkv).map(|j| j == tkv / 2).collect::<Vec<bool>>(),
            &[1, 1, 1, tkv],
        )
        .unwrap();
        let key_bcast = uniform(&[b, nq, tq, 1], -1.0, 1.0, dtype, seed + 5)
            .broadcast_to(&[b, nq, tq, tkv])
            .unwrap();
        for (name, m) in [
            ("(T_kv,) bool", &row),
            ("(N_q, 1, T_kv) additive", &heads),
            ("one key", &one_key),
            ("stride-0 keys", &key_bcast),
        ] {
            let what = format!("mma T_kv {tkv} {dtype} mask {name}");
            check(&dev, &q, &k, &v, scale, Some(m), false, None, tol, &what);
        }
        // Query head 1 sees no key: 0 without sinks; with sinks too (the sink takes all).
        let mut keep = vec![true; b * nq * tq * tkv];
        for bi in 0..b {
            for t in 0..tq {
                let at = ((bi * nq + 1) * tq + t) * tkv;
                keep[at..at + tkv].iter_mut().for_each(|x| *x = false);
            }
        }
        let m = Array::from_vec(keep, &[b, nq, tq, tkv]).unwrap();
        let sinks = randn(&[nq], dtype, seed + 6);
        for sk in [None, Some(&sinks)] {
            let what = format!(
                "mma T_kv {tkv} {dtype} head 1 masked sinks {}",
                sk.is_some()
            );
            let out = check(&dev, &q, &k, &v, scale, Some(&m), false, sk, tol, &what);
            let o = out.to_f64_vec().unwrap();
            for bi in 0..b {
                let at = (bi * nq + 1) * tq * d;
                assert!(o[at..at + tq * d].iter().all(|&x| x == 0.0), "{what}");
            }
        }
    }
    // Causal with T_q 8 over 5 keys: positions 0..3 see no key and are 0.
    let q = randn(&[1, 8, 8, 64], DType::BF16, 14_500);
    let k = randn(&[1, 2, 5, 64], DType::BF16, 14_501);
    let v = randn(&[1, 2, 5, 64], DType::BF16, 14_502);
    let out = check(
        &dev,
        &q,
        &k,
        &v,
        0.125,
        None,
        true,
        None,
        tol,
        "mma causal 8 x 5",
    );
    let o = out.to_f64_vec().unwrap();
    for h in 0..8 {
        for t in 0..3 {
            let row = &o[(h * 8 + t) * 64..][..64];
            assert!(row.iter().all(|&x| x == 0.0), "row {t} of head {h}");
        }
    }
}

/// Grids of more than 132 blocks in both kernels, and GQA groups larger than a decode block
/// (MQA with 32 query heads and T_q 8: 256 rows per kv head).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn large_grids_and_groups() {
    let Some(dev) = gpu() else { return };
    let q = randn(&[3, 100, 1, 64], DType::BF16, 1);
    let k = randn(&[3, 50, 300, 64], DType::BF16, 2);
    let v = randn(&[3, 50, 300, 64], DType::BF16, 3);
    check(
        &dev,
        &q,
        &k,
        &v,
        0.125,
        None,
        true,
        None,
        tol,
        "300 kv heads",
    );
    let q = randn(&[2, 32, 8, 128], DType::F16, 4);
    let k = randn(&[2, 1, 3000, 128], DType::F16, 5);
    let v = randn(&[2, 1, 3000, 128], DType::F16, 6);
    let (m, _) = mask_for(Kind::Additive, &q, 3000, 7);
    check(
        &dev,
        &q,
        &k,
        &v,
        0.09,
        m.as_ref(),
        false,
        None,
        tol,
        "MQA 32 T_q 8",
    );
    let q = randn(&[2, 16, 300, 48], DType::F32, 8);
    let k = randn(&[2, 4, 300, 48], DType::F32, 9);
    let v = randn(&[2, 4, 300, 48], DType::F32, 10);
    check(
        &dev,
        &q,
        &k,
        &v,
        0.14,
        None,
        true,
        None,
        tol,
        "general 300 x 300",
    );
}

/// Inputs produced on other streams of the device are waited for; the explicit-stream entry
/// runs on the stream it is given; inputs on the CPU or another device are clear errors.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn streams_and_devices() {
    let Some(dev) = gpu() else { return };
    let q = randn(&[1, 8, 1, 64], DType::F32, 1);
    let k = randn(&[1, 2, 5000, 64], DType::F32, 2);
    let v = randn(&[1, 2, 5000, 64], DType::F32, 3);
    let r = sdpa_ref(&q, &k, &v, 0.125, Mask::None, None).unwrap();
    let s1 = Stream::new(&dev).unwrap();
    let s2 = Stream::new(&dev).unwrap();
    let (gq, gk, gv) = (
        up(&q, &dev).to_stream(&s1).unwrap(),
        up(&k, &dev).to_stream(&s2).unwrap(),
        up(&v, &dev).to_stream(&s2).unwrap(),
    );
    let out = sdpa(&gq, &gk, &gv, 0.125, Mask::None, None).unwrap();
    assert_eq!(out.stream().as_ref(), Some(&s1));
    check_close(&out, &r, 2e-5, 2e-5, "inputs from two streams");
    let s3 = Stream::new(&dev).unwrap();
    let out = ferrofast::fast::scaled_dot_product_attention_on(
        &s3,
        &gq,
        &gk,
        &gv,
        0.125,
        Mask::None,
        None,
    )
    .unwrap();
    assert_eq!(out.stream().as_ref(), Some(&s3));
    check_close(&out, &r, 2e-5, 2e-5, "explicit stream");
    let out =
        ferrofast::fast::scaled_dot_product_attention(&gq, &gk, &gv, 0.125, Mask::Causal, None)
            .unwrap();
    let rc = sdpa_ref(&q, &k, &v, 0.125, Mask::Causal, None).unwrap();
    check_close(&out, &rc, 2e-5, 2e-5, "cuda entry");

    // A mask or sinks left on the host.
    let m = bool_mask(&[5000], 0.5, 4);
    let e = sdpa(&gq, &gk, &gv, 0.125, Mask::Array(&m), None).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert!(e.to_string().contains("the mask is on cpu"), "{e}");
    let s = randn(&[8], DType::F32, 5);
    let e = sdpa(&gq, &gk, &gv, 0.125, Mask::None, Some(&s)).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let e = sdpa(&gq, &k, &gv, 0.125, Mask::None, None).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    let e = ferrofast::fast::scaled_dot_product_attention(&gq, &k, &gv, 0.1, Mask::None, None)
        .unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    // Validation comes first, with MLX's messages.
    let bad = up(&randn(&[1, 3, 5000, 64], DType::F32, 6), &dev);
    let e = sdpa(&gq, &bad, &bad, 0.1, Mask::None, None).unwrap_err();
    assert!(e.to_string().contains("n_heads must be a multiple"), "{e}");
    // A second device, where there is one.
    if let Ok(dev1) = Device::cuda(1).and_then(|d| up(&q, &d).to_device(&d).map(|_| d)) {
        let e = sdpa(&gq, &up(&k, &dev1), &gv, 0.1, Mask::None, None).unwrap_err();
        assert!(matches!(e, Error::Device(_)), "{e}");
        let s = Stream::new(&dev1).unwrap();
        let e = ferrofast::fast::scaled_dot_product_attention_on(
            &s,
            &gq,
            &gk,
            &gv,
            0.1,
            Mask::None,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Device(_)), "{e}");
    }
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
        (
            1usize..3,
            1usize..3,
            1usize..6,
            prop_oneof![1usize..10, 1usize..80],
            0usize..600,
        ),
        (
            prop_oneof![(1usize..33).prop_map(|x| 8 * x), 1usize..70],
            prop_oneof![(1usize..33).prop_map(|x| 8 * x), 1usize..70],
            [0u8..4, 0u8..4, 0u8..4],
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn matches_oracle(c in case()) {
        let Some(dev) = gpu() else { return Ok(()) };
        let dtype = [DType::F32, DType::F16, DType::BF16][c.dtype as usize];
        let nq = c.nkv * c.r;
        let (q, gq) = layout(&dev, (c.b, nq, c.tq, c.d), c.layouts[0], dtype, c.seed);
        let (k, gk) = layout(&dev, (c.b, c.nkv, c.tkv, c.d), c.layouts[1], dtype, c.seed ^ 1);
        let (v, gv) = layout(&dev, (c.b, c.nkv, c.tkv, c.dv), c.layouts[2], dtype, c.seed ^ 2);
        let seed = c.seed ^ 3;
        let mask = match c.mask {
            2 => Some(bool_mask(&[c.b, nq, c.tq, c.tkv], 0.6, seed)),
            3 => Some(bool_mask(&[nq, 1, c.tkv], 0.6, seed)),
            4 => Some(randn(&[c.tq, c.tkv], dtype, seed)),
            5 => Some(randn(&[c.b, 1, 1, c.tkv], dtype, seed)),
            _ => None,
        };
        let sinks = c.sinks.then(|| randn(&[nq], dtype, c.seed ^ 4));
        let scale = 1.0 / (c.d as f32).sqrt();
        check_views(
            &dev,
            (&q, &k, &v),
            (&gq, &gk, &gv),
            scale,
            mask.as_ref(),
            c.mask == 1,
            sinks.as_ref(),
            tol,
            &format!("{c:?}"),
        );
    }
}
