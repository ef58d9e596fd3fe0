//! `fast::scaled_dot_product_attention` against the float64 oracle on every device (the CPU,
//! then each CUDA device; the CUDA tests are ignored without the `gpu-tests` feature): the
//! cases of MLX's `test_fast_sdpa.py` (spec §11.2), every mask kind, sinks, GQA and MQA, head
//! dims, dtypes, strided views, edge cases, every error message and a property test, and the
//! sizes around the CUDA kernels' limits (decode query lengths, long caches, split-KV
//! boundaries, the tensor-core decode's tables, large grids). The CPU alone: key ranges split
//! across threads and the benchmarks (`#[ignore]`d); CUDA alone: streams, devices and f64's
//! `Unsupported`. GPU output buffers are poisoned, so unwritten elements fail.

#[macro_use]
mod common;
#[path = "common/sdpa.rs"]
mod attn;

use attn::{
    bool_mask, check, layout, mask_array, masking, mlx_inputs, mlx_tol, run_kind, tol, Kind,
    Masking, BTHD, KINDS, ROW_MAJOR,
};
use common::{check_close, float_dtypes, on, randn, uniform, Input};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::{Array, DType, Device, Error};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// The dtypes every device takes.
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The message of an error; panics on a result.
fn err_text(r: ferrofast::Result<Array>) -> String {
    match r {
        Ok(a) => panic!("expected an error, got an array of shape {:?}", a.shape()),
        Err(e) => e.to_string(),
    }
}

/// Asserts that every element of `out` is 0.
fn assert_zeros(out: &Array, what: &str) {
    assert!(
        out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0),
        "{what}: not all 0"
    );
}

/// One case of the property test.
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

/// Batches, GQA ratios, decode and prefill query lengths, key lengths from 0, head dims the
/// CUDA kernels take (multiples of 8) and any others, every layout of [`layout`], every mask
/// form (none, causal, full bool, broadcast bool, 2-D and broadcast additive), sinks, dtypes.
fn cases() -> impl Strategy<Value = Case> {
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

on_every_device! {
    // ----- MLX test_sdpa: shapes_64 / shapes_128 --------------------------------------------

    /// MLX's shapes, `(B, qL, kL, D, qH, kH)`, with the head counts divided down (same GQA
    /// ratio) to keep the float64 oracle quick, each with every mask kind, dtype and both
    /// layouts (row-major and `[B, T, H, D]` memory), at MLX's tolerances.
    fn mlx_shapes_64_and_128(dev: &Device) {
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
        let mut n = 0u64;
        for &(b, ql, kl, d, qh, kh) in &shapes {
            let f = if qh == kh { qh / 2 } else { kh / 2 }.max(1);
            let (qh, kh) = (qh / f, kh / f);
            for kind in KINDS {
                for dtype in FLOATS {
                    for transposed in [false, true] {
                        n += 1;
                        let seed = 100 + n * 7;
                        let (q, k, v, scale) =
                            mlx_inputs(dev, (b, ql, kl, d, qh, kh), transposed, dtype, seed);
                        let what = format!(
                            "shape {:?} {kind:?} {dtype} transposed={transposed} seed {seed}",
                            (b, ql, kl, d, qh, kh)
                        );
                        let out = run_kind(&q, &k, &v, scale, kind, seed + 3, mlx_tol, &what);
                        assert_eq!(out.shape(), &[b, qh, ql, d], "{what}");
                        assert_eq!(out.dtype(), dtype, "{what}");
                    }
                }
            }
        }
    }

    /// MLX's single-query shapes: qL = 1, kL in {7, 9, 32, 63, 67, 129, 400, 2000}, D 128,
    /// every mask kind, dtype and both layouts; MLX's qH 32 with kH 32 or 8 become qH 8 with
    /// kH 8 or 2 (same GQA ratios).
    fn mlx_single_query_many_key_lengths(dev: &Device) {
        let mut n = 0u64;
        for &kl in &[7usize, 9, 32, 63, 67, 129, 400, 2000] {
            for &kh in &[8usize, 2] {
                for kind in KINDS {
                    for dtype in FLOATS {
                        for transposed in [false, true] {
                            n += 1;
                            let seed = 5000 + n * 11;
                            let (q, k, v, scale) =
                                mlx_inputs(dev, (1, 1, kl, 128, 8, kh), transposed, dtype, seed);
                            let what = format!(
                                "qL 1 kL {kl} kH {kh} {kind:?} {dtype} transposed={transposed} \
                                 seed {seed}"
                            );
                            run_kind(&q, &k, &v, scale, kind, seed + 5, mlx_tol, &what);
                        }
                    }
                }
            }
        }
    }

    /// qL > kL with a causal mask: the first qL - kL rows see no key and are 0 (our
    /// documented choice); the oracle says the same, so the whole output is compared.
    fn causal_longer_queries_than_keys(dev: &Device) {
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
            let q = Input::new(&randn(&[1, qh, ql, d], DType::F32, seed), dev);
            let k = Input::new(&randn(&[1, kh, kl, d], DType::F32, seed + 1), dev);
            let v = Input::new(&randn(&[1, kh, kl, d], DType::F32, seed + 2), dev);
            let what = format!("qL {ql} kL {kl}");
            let out = check(&q, &k, &v, 0.5, Masking::Causal, None, &what);
            let o = out.to_vec::<f32>().unwrap();
            for h in 0..qh {
                for t in 0..ql - kl {
                    let row = &o[(h * ql + t) * d..][..d];
                    assert!(
                        row.iter().all(|&x| x == 0.0),
                        "{what} on {dev}: row {t} of head {h} not zero"
                    );
                }
            }
        }
    }

    // ----- MLX vector tests ------------------------------------------------------------------

    /// q `(1, 4, 1, 64)`, k/v `(1, L, 1, 64)` swapped to `(1, 1, L, 64)`, with the bool masks
    /// of `test_sdpa_vector_kv_transposed_head_seq` and the additive and causal ones of
    /// `test_sdpa_vector`; a mask that does not broadcast is an error.
    fn mlx_vector_masks(dev: &Device) {
        let (nq, d) = (4usize, 64usize);
        for &l in &[43usize, 4096] {
            let seed = l as u64;
            let q = Input::new(&randn(&[1, nq, 1, d], DType::F32, seed), dev);
            let swap = |a: &Array| a.swapaxes(1, 2).unwrap();
            let k = Input::view(&randn(&[1, l, 1, d], DType::F32, seed + 1), dev, swap);
            let v = Input::view(&randn(&[1, l, 1, d], DType::F32, seed + 2), dev, swap);
            let scale = 1.0 / (d as f32).sqrt();
            let what = |m: &str| format!("vector L {l} mask {m}");

            let mut tail: Vec<bool> = vec![true; l];
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
            let transposed = Input::view(&bool_mask(&[l, 1, nq], 0.5, seed + 4), dev, |a| {
                a.transpose(&[2, 1, 0]).unwrap()
            });
            assert_eq!(transposed.host.shape(), &[nq, 1, l]);
            let masks = [
                ("scalar True", Input::new(&Array::scalar(true), dev)),
                (
                    "(L,) tail False",
                    Input::new(&Array::from_vec(tail, &[l]).unwrap(), dev),
                ),
                ("(Nq,1,L)", Input::new(&heads, dev)),
                ("(L,1,Nq).T", transposed),
                (
                    "additive",
                    Input::new(&uniform(&[nq, 1, l], -1.0, 1.0, DType::F32, seed + 5), dev),
                ),
                (
                    "log(bool)",
                    Input::new(&Array::from_vec(logs, &[nq, 1, l]).unwrap(), dev),
                ),
            ];
            for (name, m) in &masks {
                check(&q, &k, &v, scale, Masking::Array(m), None, &what(name));
            }
            check(&q, &k, &v, scale, Masking::Causal, None, &what("causal"));

            let bad = on(&bool_mask(&[nq, 2, l], 0.5, seed + 6), dev);
            assert_eq!(
                err_text(sdpa(&q.dev, &k.dev, &v.dev, scale, Mask::Array(&bad), None)),
                format!(
                    "Cannot broadcast array of shape ({nq},2,{l}) into shape (1,{nq},1,{l}). \
                     (scaled_dot_product_attention: the mask of shape ({nq},2,{l}) does not \
                     broadcast to the attention scores' shape [B, N_q, T_q, T_kv] = \
                     (1,{nq},1,{l}))"
                )
            );
        }
    }

    /// MLX's `test_sdpa_vector_gqa_long`, shortened: GQA with K/V sliced out of a longer
    /// cache, causal and not.
    fn mlx_vector_gqa_sliced_cache(dev: &Device) {
        for (i, &(nq, nkv, d, l)) in [(32usize, 4usize, 128usize, 1000usize), (64, 8, 64, 1001)]
            .iter()
            .enumerate()
        {
            let seed = 40 + i as u64;
            let cut = |a: &Array| {
                a.slice(&[0, 0, 0], &[1, nkv as isize, l as isize], &[1, 1, 1])
                    .unwrap()
            };
            let q = Input::new(&randn(&[1, nq, 1, d], DType::F32, seed), dev);
            let k = Input::view(&randn(&[1, nkv, l + 32, d], DType::F32, seed + 1), dev, cut);
            let v = Input::view(&randn(&[1, nkv, l + 32, d], DType::F32, seed + 2), dev, cut);
            let scale = 1.0 / (d as f32).sqrt();
            for (mask, name) in [(Masking::None, ""), (Masking::Causal, " causal")] {
                check(&q, &k, &v, scale, mask, None, &format!("gqa long{name} {nq}/{nkv}"));
            }
        }
    }

    /// `test_sdpa_fully_masked`: every key masked (`False` or `-inf`) gives 0, no NaN, for
    /// decode and prefill.
    fn fully_masked_rows_are_zero(dev: &Device) {
        for &lq in &[1usize, 8, 32] {
            for dtype in FLOATS {
                let seed = 70 + lq as u64;
                let q = Input::new(&randn(&[1, 4, lq, 128], dtype, seed), dev);
                let k = Input::new(&randn(&[1, 4, 8, 128], dtype, seed + 1), dev);
                let v = Input::new(&randn(&[1, 4, 8, 128], dtype, seed + 2), dev);
                let none = Input::new(&Array::scalar(false), dev);
                let minus_inf = Input::new(
                    &Array::scalar(f32::NEG_INFINITY).astype(dtype).unwrap(),
                    dev,
                );
                for (name, m) in [("False", &none), ("-inf", &minus_inf)] {
                    let what = format!("mask {name} lq {lq} {dtype}");
                    let out = check(&q, &k, &v, 0.1, Masking::Array(m), None, &what);
                    assert_zeros(&out, &what);
                }
            }
        }
    }

    /// `test_sdpa_inf_score`: a key row of -inf gives -inf scores for that key, and finite
    /// outputs (q is kept off 0, where 0 * -inf would be NaN).
    fn minus_inf_key_score(dev: &Device) {
        for &d in &[4usize, 128] {
            for &lq in &[1usize, 8, 12] {
                let seed = 80 + d as u64 + lq as u64;
                let q = Input::new(&uniform(&[1, 4, lq, d], 0.01, 0.5, DType::F32, seed), dev);
                let mut kd = uniform(&[1, 1, 8, d], 0.0, 0.5, DType::F32, seed + 1)
                    .to_vec::<f32>()
                    .unwrap();
                kd[..d].fill(f32::NEG_INFINITY);
                let k = Input::new(&Array::from_vec(kd, &[1, 1, 8, d]).unwrap(), dev);
                let v = Input::new(&randn(&[1, 1, 8, d], DType::F32, seed + 2), dev);
                let what = format!("inf score D {d} Lq {lq}");
                let out = check(&q, &k, &v, 1.0, Masking::None, None, &what);
                assert!(
                    out.to_f64_vec().unwrap().iter().all(|x| x.is_finite()),
                    "{what} on {dev}"
                );
            }
        }
    }

    /// `test_sdpa_few_query`: Lq 8, Nq 8 over one kv head, q in `[B, T, H, D]` memory, bool
    /// masks of several shapes and causal.
    fn mlx_few_query_mqa(dev: &Device) {
        for &l in &[43usize, 4096] {
            let seed = 300 + l as u64;
            let q = layout(dev, (1, 8, 8, 128), BTHD, DType::F32, seed);
            let k = layout(dev, (1, 1, l, 128), ROW_MAJOR, DType::F32, seed + 1);
            let v = layout(dev, (1, 1, l, 128), ROW_MAJOR, DType::F32, seed + 2);
            let scale = 1.0 / 128f32.sqrt();
            let all = Input::new(&Array::scalar(true), dev);
            check(&q, &k, &v, scale, Masking::Array(&all), None, "few query True");
            let m = Input::new(&bool_mask(&[8, 1, l], 0.5, seed + 3), dev);
            check(&q, &k, &v, scale, Masking::Array(&m), None, "few query (Nq,1,L)");
            let mt = Input::view(&bool_mask(&[l, 1, 8], 0.5, seed + 4), dev, |a| {
                a.transpose(&[2, 1, 0]).unwrap()
            });
            check(&q, &k, &v, scale, Masking::Array(&mt), None, "few query (L,1,Nq).T");
            check(&q, &k, &v, scale, Masking::Causal, None, "few query causal");
        }
    }

    /// `test_sdpa_vector_batched`: B = 2, one kv head, transposed q and k, additive mask
    /// `(1, 2, 3, 3).swapaxes(0, 1)` broadcast over the query heads; and causal.
    fn mlx_vector_batched_broadcast_mask(dev: &Device) {
        let q = layout(dev, (2, 4, 3, 64), BTHD, DType::F32, 11);
        let k = layout(dev, (2, 1, 3, 64), BTHD, DType::F32, 12);
        let v = layout(dev, (2, 1, 3, 64), ROW_MAJOR, DType::F32, 13);
        let m = Input::view(&randn(&[1, 2, 3, 3], DType::F32, 14), dev, |a| {
            a.swapaxes(0, 1).unwrap()
        });
        assert_eq!(m.host.shape(), &[2, 1, 3, 3]);
        check(&q, &k, &v, 0.125, Masking::Array(&m), None, "batched broadcast mask");
        check(&q, &k, &v, 0.125, Masking::Causal, None, "batched causal");
    }

    /// `test_sdpa_broadcast_mask` and `test_sdpa_promote_mask`: a `True` mask is no mask (bit
    /// for bit); bf16 and int32 masks promote to float32.
    fn mlx_broadcast_and_promoted_scalar_masks(dev: &Device) {
        let q = Input::new(&randn(&[1, 4, 256, 32], DType::F32, 21), dev);
        let k = Input::new(&randn(&[1, 1, 256, 32], DType::F32, 22), dev);
        let v = Input::new(&randn(&[1, 1, 256, 32], DType::F32, 23), dev);
        let t = Input::new(&Array::scalar(true), dev);
        let a = check(&q, &k, &v, 0.2, Masking::Array(&t), None, "mask True");
        let b = check(&q, &k, &v, 0.2, Masking::None, None, "no mask");
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "on {dev}");
        let two = Input::new(&Array::scalar(ferrofast::bf16::from_f32(2.0)), dev);
        let c = check(&q, &k, &v, 0.2, Masking::Array(&two), None, "bf16 scalar mask");
        assert_eq!(c.dtype(), DType::F32);
        // An int32 additive mask promotes to float32 too.
        let ints =
            Array::from_vec((0..256).map(|i| -(i % 3)).collect::<Vec<i32>>(), &[256]).unwrap();
        let ints = Input::new(&ints, dev);
        check(&q, &k, &v, 0.2, Masking::Array(&ints), None, "int32 mask");
    }

    /// `test_sdpa_noncontiguous_inputs`.
    fn mlx_noncontiguous_inputs(dev: &Device) {
        let swap = |a: &Array| a.swapaxes(1, 2).unwrap();
        let q = Input::view(&randn(&[4, 7, 32, 64], DType::F32, 31), dev, swap);
        let k = Input::view(&randn(&[4, 7, 8, 64], DType::F32, 32), dev, swap);
        let v = Input::view(&randn(&[4, 7, 8, 64], DType::F32, 33), dev, swap);
        let m = Input::new(&bool_mask(&[4, 1, 7, 7], 0.7, 34), dev);
        check(&q, &k, &v, 0.125, Masking::Array(&m), None, "noncontiguous");
    }

    /// `test_sdpa_nan_bug`: a windowed causal bool mask and its log (0 / -inf additive)
    /// agree, with no NaN.
    fn mlx_windowed_mask_no_nan(dev: &Device) {
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
        let keep = Input::new(&Array::from_vec(keep, &[n, n]).unwrap(), dev);
        let logs = Input::new(&Array::from_vec(logs, &[n, n]).unwrap(), dev);
        let q = Input::new(&randn(&[1, 2, n, 128], DType::F32, 41), dev);
        let k = Input::new(&randn(&[1, 2, n, 128], DType::F32, 42), dev);
        let v = Input::new(&randn(&[1, 2, n, 128], DType::F32, 43), dev);
        let a = check(&q, &k, &v, 0.1, Masking::Array(&keep), None, "window bool");
        let b = check(&q, &k, &v, 0.1, Masking::Array(&logs), None, "window log");
        assert!(a.to_f64_vec().unwrap().iter().all(|x| x.is_finite()), "on {dev}");
        check_close(&a, &b, 1e-6, 1e-6, &format!("bool and log masks agree on {dev}"));
    }

    /// `test_sdpa_attention_sinks` (B 2, N_q 8, D 64, sinks 10 * normal) for decode and
    /// prefill query lengths, both kv head counts, every dtype and mask kind; a fully masked
    /// row whose sink takes all the weight (output 0); sinks through a strided view; integer
    /// sinks promoted to float32.
    fn mlx_attention_sinks(dev: &Device) {
        let mut n = 0u64;
        for &(tq, tkv) in &[
            (1usize, 128usize),
            (1, 4096),
            (4, 4096),
            (8, 300),
            (33, 300),
            (128, 128),
        ] {
            for &nkv in &[2usize, 8] {
                for dtype in FLOATS {
                    for kind in KINDS {
                        n += 1;
                        let seed = 600 + n * 5;
                        let q = Input::new(&randn(&[2, 8, tq, 64], dtype, seed), dev);
                        let k = Input::new(&randn(&[2, nkv, tkv, 64], dtype, seed + 1), dev);
                        let v = Input::new(&randn(&[2, nkv, tkv, 64], dtype, seed + 2), dev);
                        let sinks: Vec<f32> = randn(&[8], DType::F32, seed + 3)
                            .to_vec::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| 10.0 * x)
                            .collect();
                        let sinks = Array::from_vec(sinks, &[8]).unwrap().astype(dtype).unwrap();
                        let sinks = Input::new(&sinks, dev);
                        let m = mask_array(kind, &q, tkv, seed + 4);
                        let what = format!("sinks tq {tq} tkv {tkv} nkv {nkv} {dtype} {kind:?}");
                        let mask = masking(kind, m.as_ref());
                        check(&q, &k, &v, 0.125, mask, Some(&sinks), &what);
                    }
                }
            }
        }
        for &tq in &[3usize, 12] {
            let q = Input::new(&randn(&[1, 2, tq, 16], DType::F32, 1), dev);
            let k = Input::new(&randn(&[1, 1, 5, 16], DType::F32, 2), dev);
            let v = Input::new(&randn(&[1, 1, 5, 16], DType::F32, 3), dev);
            // A fully masked row with a sink: the sink takes all the weight, the output is 0.
            let sinks = Input::new(&Array::from_vec(vec![1.0f32, -2.0], &[2]).unwrap(), dev);
            let none = Input::new(&Array::scalar(false), dev);
            let what = format!("masked with sink tq {tq}");
            let out = check(&q, &k, &v, 0.3, Masking::Array(&none), Some(&sinks), &what);
            assert_zeros(&out, &what);
            // Sinks through a strided view, and integer sinks promoted to float32.
            let wide = Array::from_vec(vec![0.5f32, 9.0, -1.5, 9.0], &[4]).unwrap();
            let strided = Input::view(&wide, dev, |a| a.slice(&[0], &[4], &[2]).unwrap());
            check(&q, &k, &v, 0.3, Masking::Causal, Some(&strided), "strided sinks");
            let isinks = Input::new(&Array::from_vec(vec![1i32, -1], &[2]).unwrap(), dev);
            check(&q, &k, &v, 0.3, Masking::None, Some(&isinks), "int sinks");
        }
    }

    // ----- head dims, odd sizes, dtypes, layouts ---------------------------------------------

    /// Head dims the CUDA decode kernel takes (multiples of 8 up to 256, (192, 128)) and those
    /// only the general kernel takes (33, 72, 512, (5, 3), (8, 264)), for decode and prefill
    /// query lengths, every dtype, rotating mask kinds; and in f32 a causal prefill and the
    /// decode of its first query through a sliced view.
    fn head_dims_and_value_dims(dev: &Device) {
        let dims = [
            (64usize, 64usize),
            (72, 72),
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
        for (i, &(d, dv)) in dims.iter().enumerate() {
            let scale = 1.0 / (d as f32).sqrt();
            for &tq in &[1usize, 2, 8, 9, 70] {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    n += 1;
                    let seed = 1000 + n * 3;
                    let q = Input::new(&randn(&[1, 4, tq, d], dtype, seed), dev);
                    let k = Input::new(&randn(&[1, 2, 75, d], dtype, seed + 1), dev);
                    let v = Input::new(&randn(&[1, 2, 75, dv], dtype, seed + 2), dev);
                    let kind = KINDS[(n % 4) as usize];
                    let what = format!("D {d} Dv {dv} tq {tq} {dtype} {kind:?}");
                    let out = run_kind(&q, &k, &v, scale, kind, seed + 3, tol, &what);
                    assert_eq!(out.shape(), &[1, 4, tq, dv], "{what}");
                }
            }
            let seed = 5000 + i as u64 * 3;
            let qb = randn(&[1, 4, 70, d], DType::F32, seed);
            let q = Input::new(&qb, dev);
            let k = Input::new(&randn(&[1, 2, 75, d], DType::F32, seed + 1), dev);
            let v = Input::new(&randn(&[1, 2, 75, dv], DType::F32, seed + 2), dev);
            let what = format!("D {d} Dv {dv}");
            let out = check(&q, &k, &v, scale, Masking::Causal, None, &what);
            assert_eq!(out.shape(), &[1, 4, 70, dv], "{what}");
            let q1 = Input::view(&qb, dev, |a| {
                a.slice(&[0, 0, 0], &[1, 4, 1], &[1, 1, 1]).unwrap()
            });
            check(&q1, &k, &v, scale, Masking::None, None, &format!("decode {what}"));
        }
    }

    /// Every pair of odd and small query and key lengths, every dtype, rotating mask kinds.
    fn odd_sequence_lengths(dev: &Device) {
        let lens = [1usize, 2, 8, 9, 31, 33, 65, 127, 129];
        let mut n = 0u64;
        for &tq in &lens {
            for &tkv in &lens {
                for dtype in FLOATS {
                    let seed = 2000 + n;
                    n += 1;
                    let q = Input::new(&randn(&[1, 2, tq, 32], dtype, seed), dev);
                    let k = Input::new(&randn(&[1, 1, tkv, 32], dtype, seed + 1), dev);
                    let v = Input::new(&randn(&[1, 1, tkv, 32], dtype, seed + 2), dev);
                    let kind = KINDS[(n % 4) as usize];
                    let what = format!("tq {tq} tkv {tkv} {kind:?} {dtype}");
                    run_kind(&q, &k, &v, 0.2, kind, seed + 3, tol, &what);
                }
            }
        }
    }

    /// Every dtype the device takes (f64 on the CPU) with every mask kind, decode and
    /// prefill; mixed dtypes promote as in MLX (bf16 q with f16 k and v compute and return
    /// float32; a bf16 additive mask with an f32 query gives f32).
    fn dtypes_including_f64_and_mixed(dev: &Device) {
        for dtype in float_dtypes(dev) {
            for &tq in &[1usize, 100] {
                let seed = 3000 + tq as u64;
                let q = Input::new(&randn(&[2, 6, tq, 48], dtype, seed), dev);
                let k = Input::new(&randn(&[2, 3, 90, 48], dtype, seed + 1), dev);
                let v = Input::new(&randn(&[2, 3, 90, 40], dtype, seed + 2), dev);
                for kind in KINDS {
                    let what = format!("{dtype} tq {tq} {kind:?}");
                    let out = run_kind(&q, &k, &v, 0.15, kind, seed + 3, tol, &what);
                    assert_eq!(out.dtype(), dtype, "{what}");
                }
            }
        }
        let qb = randn(&[1, 2, 5, 16], DType::BF16, 1);
        let q = Input::new(&qb, dev);
        let k = Input::new(&randn(&[1, 2, 7, 16], DType::F16, 2), dev);
        let v = Input::new(&randn(&[1, 2, 7, 16], DType::F16, 3), dev);
        let out = check(&q, &k, &v, 0.25, Masking::None, None, "bf16 q, f16 kv");
        assert_eq!(out.dtype(), DType::F32);
        let m = Input::new(&uniform(&[5, 7], -1.0, 1.0, DType::BF16, 4), dev);
        let q32 = Input::new(&qb.astype(DType::F32).unwrap(), dev);
        let what = "bf16 mask, f32 result";
        let out = check(&q32, &k, &v, 0.25, Masking::Array(&m), None, what);
        assert_eq!(out.dtype(), DType::F32);
    }

    /// Strided views, read in place or copied: transposed, stepped, reversed (negative
    /// strides), a last axis with stride != 1 (stepped, reversed), stride-0 (broadcast) keys,
    /// unaligned rows and mixes of them, for decode and prefill.
    fn strided_layouts(dev: &Device) {
        let q = layout(dev, (2, 4, 40, 32), BTHD, DType::F32, 51);
        let k_rev = Input::view(&randn(&[2, 2, 100, 32], DType::F32, 52), dev, |a| {
            a.slice(&[0, 0, 99], &[2, 2, -100], &[1, 1, -2]).unwrap()
        });
        let v = Input::view(&randn(&[2, 2, 50, 64], DType::F32, 53), dev, |a| {
            a.slice(&[0, 0, 0, 0], &[2, 2, 50, 64], &[1, 1, 1, 2])
                .unwrap()
        });
        assert_eq!(k_rev.host.shape(), &[2, 2, 50, 32]);
        assert_eq!(v.host.shape(), &[2, 2, 50, 32]);
        check(&q, &k_rev, &v, 0.2, Masking::Causal, None, "reversed k, strided v");
        // The last axis of q read with stride 2 and of k reversed.
        let q2 = Input::view(&randn(&[2, 4, 40, 64], DType::BF16, 54), dev, |a| {
            a.slice(&[0, 0, 0, 1], &[2, 4, 40, 64], &[1, 1, 1, 2])
                .unwrap()
        });
        let k2 = Input::view(&randn(&[2, 2, 50, 32], DType::BF16, 55), dev, |a| {
            a.slice(&[0, 0, 0, 31], &[2, 2, 50, -33], &[1, 1, 1, -1])
                .unwrap()
        });
        let v2 = Input::new(&randn(&[2, 2, 50, 32], DType::BF16, 56), dev);
        check(&q2, &k2, &v2, 0.2, Masking::None, None, "strided last axes");
        // Keys broadcast along the sequence (stride 0): every key is the same.
        let k_bcast = Input::view(&randn(&[2, 2, 1, 32], DType::F32, 57), dev, |a| {
            a.broadcast_to(&[2, 2, 50, 32]).unwrap()
        });
        check(&q, &k_bcast, &v, 0.2, Masking::None, None, "broadcast keys");

        let mut n = 0u64;
        for &tq in &[1usize, 4, 40] {
            for dtype in [DType::F32, DType::BF16] {
                for kinds in [[1u8, 1, 1], [2, 2, 2], [3, 3, 3], [0, 1, 2], [1, 3, 0]] {
                    n += 1;
                    let seed = 50 + n * 3;
                    let q = layout(dev, (2, 4, tq, 64), kinds[0], dtype, seed);
                    let k = layout(dev, (2, 2, 50, 64), kinds[1], dtype, seed + 1);
                    let v = layout(dev, (2, 2, 50, 64), kinds[2], dtype, seed + 2);
                    let kind = KINDS[(n % 4) as usize];
                    let m = mask_array(kind, &q, 50, seed + 3);
                    let what = format!("layouts {kinds:?} tq {tq} {dtype} {kind:?}");
                    check(&q, &k, &v, 0.2, masking(kind, m.as_ref()), None, &what);
                }
            }
            // Reversed keys (negative strides) and keys broadcast along the sequence.
            let q = Input::new(&randn(&[2, 4, tq, 32], DType::F32, 51), dev);
            let v = Input::new(&randn(&[2, 2, 50, 32], DType::F32, 53), dev);
            let what = format!("reversed k tq {tq}");
            check(&q, &k_rev, &v, 0.2, Masking::Causal, None, &what);
            let what = format!("broadcast k tq {tq}");
            check(&q, &k_bcast, &v, 0.2, Masking::None, None, &what);
        }
    }

    /// T_kv = 0 gives zeros (sinks or not, causal or not) as the oracle does; empty queries
    /// give an empty output; D = 0 makes every score 0.
    fn zero_length_keys_and_empty_shapes(dev: &Device) {
        let sinks = Input::new(&Array::from_vec(vec![0.5f32, 1.0], &[2]).unwrap(), dev);
        for &tq in &[1usize, 3, 20] {
            for &d in &[8usize, 64, 33] {
                for &dv in &[5usize, 16] {
                    let q = Input::new(&randn(&[1, 2, tq, d], DType::F32, 1), dev);
                    let k = Input::new(&randn(&[1, 1, 0, d], DType::F32, 2), dev);
                    let v = Input::new(&randn(&[1, 1, 0, dv], DType::F32, 3), dev);
                    for s in [None, Some(&sinks)] {
                        for mask in [Masking::None, Masking::Causal] {
                            let what = format!("T_kv 0 tq {tq} D {d} Dv {dv} sinks {}", s.is_some());
                            let out = check(&q, &k, &v, 1.0, mask, s, &what);
                            assert_eq!(out.shape(), &[1, 2, tq, dv], "{what}");
                            assert_zeros(&out, &what);
                        }
                    }
                }
            }
        }
        // Empty queries and a zero head dimension.
        let q0 = on(&randn(&[1, 2, 0, 8], DType::F32, 4), dev);
        let k1 = on(&randn(&[1, 1, 4, 8], DType::F32, 5), dev);
        let v1 = randn(&[1, 1, 4, 5], DType::F32, 6);
        let out = sdpa(&q0, &k1, &on(&v1, dev), 1.0, Mask::None, None).unwrap();
        assert_eq!(out.shape(), &[1, 2, 0, 5]);
        assert_eq!(out.device(), *dev);
        let qd = Input::new(&randn(&[1, 2, 3, 0], DType::F32, 7), dev);
        let kd = Input::new(&randn(&[1, 1, 4, 0], DType::F32, 8), dev);
        let v1 = Input::new(&v1, dev);
        check(&qd, &kd, &v1, 1.0, Masking::Causal, None, "D = 0");
    }

    // ----- sizes around the CUDA kernels' limits ---------------------------------------------

    /// Decode and prefill query lengths around the CUDA decode kernel's limit of 8, every
    /// mask kind and dtype, GQA 4, MQA and one query head per kv head.
    fn query_lengths_around_the_decode_limit(dev: &Device) {
        let mut n = 0u64;
        for &tq in &[1usize, 2, 3, 7, 8, 9, 16] {
            for &(nq, nkv) in &[(8usize, 2usize), (8, 1), (3, 3)] {
                for kind in KINDS {
                    for dtype in FLOATS {
                        n += 1;
                        let seed = 7000 + n * 5;
                        let q = Input::new(&randn(&[2, nq, tq, 64], dtype, seed), dev);
                        let k = Input::new(&randn(&[2, nkv, 300, 64], dtype, seed + 1), dev);
                        let v = Input::new(&randn(&[2, nkv, 300, 64], dtype, seed + 2), dev);
                        let what = format!("tq {tq} {nq}/{nkv} {kind:?} {dtype} seed {seed}");
                        run_kind(&q, &k, &v, 0.125, kind, seed + 3, tol, &what);
                    }
                }
            }
        }
    }

    /// A long cache: 32768 keys, GQA 4, D 128, in every dtype, with each mask kind and
    /// sinks; and 8 queries with a bool mask.
    fn long_cache_decode(dev: &Device) {
        let tkv = 32768usize;
        for (i, dtype) in [DType::BF16, DType::F16, DType::F32].into_iter().enumerate() {
            let seed = 11_000 + i as u64 * 10;
            let q = Input::new(&randn(&[1, 8, 1, 128], dtype, seed), dev);
            let k = Input::new(&randn(&[1, 2, tkv, 128], dtype, seed + 1), dev);
            let v = Input::new(&randn(&[1, 2, tkv, 128], dtype, seed + 2), dev);
            let sinks = Input::new(&randn(&[8], dtype, seed + 3), dev);
            let kind = KINDS[i % 4];
            let m = mask_array(kind, &q, tkv, seed + 4);
            let what = format!("T_kv {tkv} {dtype} {kind:?}");
            check(&q, &k, &v, 0.088, masking(kind, m.as_ref()), Some(&sinks), &what);
            let what = format!("T_kv {tkv} {dtype} T_q 8 bool");
            let q8 = Input::new(&randn(&[1, 8, 8, 128], dtype, seed + 5), dev);
            let m = mask_array(Kind::Bool, &q8, tkv, seed + 6);
            check(&q8, &k, &v, 0.088, masking(Kind::Bool, m.as_ref()), None, &what);
        }
    }

    /// Key lengths just below, at and above the split lengths the CUDA planner picks
    /// (multiples of 64 and 256) for one (batch, kv head), where the keys are cut into many
    /// ranges.
    fn split_kv_boundaries(dev: &Device) {
        let mut n = 0u64;
        for &tkv in &[
            63usize, 64, 65, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 4095, 4097, 16383,
            16385, 65537,
        ] {
            n += 1;
            let dtype = [DType::F32, DType::BF16, DType::F16][(n % 3) as usize];
            let seed = 12_000 + n * 7;
            let q = Input::new(&randn(&[1, 4, 2, 64], dtype, seed), dev);
            let k = Input::new(&randn(&[1, 1, tkv, 64], dtype, seed + 1), dev);
            let v = Input::new(&randn(&[1, 1, tkv, 64], dtype, seed + 2), dev);
            let sinks = Input::new(&randn(&[4], dtype, seed + 3), dev);
            let kind = KINDS[(n % 4) as usize];
            let m = mask_array(kind, &q, tkv, seed + 4);
            let what = format!("split T_kv {tkv} {dtype} {kind:?}");
            let sinks = n.is_multiple_of(2).then_some(&sinks);
            check(&q, &k, &v, 0.125, masking(kind, m.as_ref()), sinks, &what);
        }
    }

    /// The shapes of the CUDA tensor-core decode kernel (f16 / bf16, `(D, D_v)` in its
    /// table): GQA groups times query lengths from 1 to 24 rows (one 16-row block and two),
    /// causal with `T_q` up to 8, every mask kind, sinks, every head-dim pair it takes, key
    /// lengths that are not multiples of its 16-key tiles, and one (batch, kv head) so the
    /// keys are split into many ranges.
    fn tensor_core_decode_rows_masks_and_dims(dev: &Device) {
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
                let q = Input::new(&randn(&[1, nkv * group, tq, d], dtype, seed), dev);
                let k = Input::new(&randn(&[1, nkv, tkv, d], dtype, seed + 1), dev);
                let v = Input::new(&randn(&[1, nkv, tkv, dv], dtype, seed + 2), dev);
                let sinks = Input::new(&randn(&[nkv * group], dtype, seed + 3), dev);
                let sinks = n.is_multiple_of(3).then_some(&sinks);
                let m = mask_array(kind, &q, tkv, seed + 4);
                let what = format!(
                    "mma group {group} T_q {tq} ({d}, {dv}) T_kv {tkv} kv heads {nkv} {kind:?} \
                     {dtype} sinks {} seed {seed}",
                    sinks.is_some()
                );
                let scale = 1.0 / (d as f32).sqrt();
                let out = check(&q, &k, &v, scale, masking(kind, m.as_ref()), sinks, &what);
                assert_eq!(out.shape(), &[1, nkv * group, tq, dv], "{what}");
            }
        }
    }

    /// Broadcast masks (a `(T_kv,)` bool row, an `(N_q, 1, T_kv)` additive mask, a stride-0
    /// key axis), rows whose keys are all masked (0, or all weight on the sink), a causal
    /// mask hiding every key of the first query positions, a batch of 3, and key lengths
    /// around the CUDA tensor-core decode's split sizes.
    fn tensor_core_decode_broadcast_masks_and_empty_rows(dev: &Device) {
        let (b, nq, nkv, tq, d) = (3usize, 8usize, 2usize, 2usize, 128usize);
        for (i, &tkv) in [511usize, 512, 513, 1023, 1025, 3000].iter().enumerate() {
            let dtype = [DType::BF16, DType::F16][i % 2];
            let seed = 14_000 + i as u64 * 17;
            let q = Input::new(&randn(&[b, nq, tq, d], dtype, seed), dev);
            let k = Input::new(&randn(&[b, nkv, tkv, d], dtype, seed + 1), dev);
            let v = Input::new(&randn(&[b, nkv, tkv, d], dtype, seed + 2), dev);
            let scale = 1.0 / (d as f32).sqrt();
            let row = Input::new(&bool_mask(&[tkv], 0.3, seed + 3), dev);
            let heads = Input::new(&uniform(&[nq, 1, tkv], -2.0, 1.0, dtype, seed + 4), dev);
            let one_key = Array::from_vec(
                (0..tkv).map(|j| j == tkv / 2).collect::<Vec<bool>>(),
                &[1, 1, 1, tkv],
            )
            .unwrap();
            let one_key = Input::new(&one_key, dev);
            let key_bcast =
                Input::view(&uniform(&[b, nq, tq, 1], -1.0, 1.0, dtype, seed + 5), dev, |a| {
                    a.broadcast_to(&[b, nq, tq, tkv]).unwrap()
                });
            for (name, m) in [
                ("(T_kv,) bool", &row),
                ("(N_q, 1, T_kv) additive", &heads),
                ("one key", &one_key),
                ("stride-0 keys", &key_bcast),
            ] {
                let what = format!("mma T_kv {tkv} {dtype} mask {name}");
                check(&q, &k, &v, scale, Masking::Array(m), None, &what);
            }
            // Query head 1 sees no key: 0 without sinks; with sinks too (the sink takes all).
            let mut keep = vec![true; b * nq * tq * tkv];
            for bi in 0..b {
                for t in 0..tq {
                    let at = ((bi * nq + 1) * tq + t) * tkv;
                    keep[at..at + tkv].iter_mut().for_each(|x| *x = false);
                }
            }
            let m = Input::new(&Array::from_vec(keep, &[b, nq, tq, tkv]).unwrap(), dev);
            let sinks = Input::new(&randn(&[nq], dtype, seed + 6), dev);
            for sk in [None, Some(&sinks)] {
                let what = format!(
                    "mma T_kv {tkv} {dtype} head 1 masked sinks {}",
                    sk.is_some()
                );
                let out = check(&q, &k, &v, scale, Masking::Array(&m), sk, &what);
                let o = out.to_f64_vec().unwrap();
                for bi in 0..b {
                    let at = (bi * nq + 1) * tq * d;
                    assert!(o[at..at + tq * d].iter().all(|&x| x == 0.0), "{what} on {dev}");
                }
            }
        }
        // Causal with T_q 8 over 5 keys: positions 0..3 see no key and are 0.
        let q = Input::new(&randn(&[1, 8, 8, 64], DType::BF16, 14_500), dev);
        let k = Input::new(&randn(&[1, 2, 5, 64], DType::BF16, 14_501), dev);
        let v = Input::new(&randn(&[1, 2, 5, 64], DType::BF16, 14_502), dev);
        let out = check(&q, &k, &v, 0.125, Masking::Causal, None, "mma causal 8 x 5");
        let o = out.to_f64_vec().unwrap();
        for h in 0..8 {
            for t in 0..3 {
                let row = &o[(h * 8 + t) * 64..][..64];
                assert!(row.iter().all(|&x| x == 0.0), "row {t} of head {h} on {dev}");
            }
        }
    }

    /// Grids of more than 132 blocks in the CUDA kernels (300 kv heads, a 300 x 300 general
    /// prefill), and GQA groups larger than a decode block (MQA with 32 query heads and T_q
    /// 8: 256 rows per kv head).
    fn large_grids_and_groups(dev: &Device) {
        let q = Input::new(&randn(&[3, 100, 1, 64], DType::BF16, 1), dev);
        let k = Input::new(&randn(&[3, 50, 300, 64], DType::BF16, 2), dev);
        let v = Input::new(&randn(&[3, 50, 300, 64], DType::BF16, 3), dev);
        check(&q, &k, &v, 0.125, Masking::Causal, None, "300 kv heads");
        let q = Input::new(&randn(&[2, 32, 8, 128], DType::F16, 4), dev);
        let k = Input::new(&randn(&[2, 1, 3000, 128], DType::F16, 5), dev);
        let v = Input::new(&randn(&[2, 1, 3000, 128], DType::F16, 6), dev);
        let m = mask_array(Kind::Additive, &q, 3000, 7);
        let mask = masking(Kind::Additive, m.as_ref());
        check(&q, &k, &v, 0.09, mask, None, "MQA 32 T_q 8");
        let q = Input::new(&randn(&[2, 16, 300, 48], DType::F32, 8), dev);
        let k = Input::new(&randn(&[2, 4, 300, 48], DType::F32, 9), dev);
        let v = Input::new(&randn(&[2, 4, 300, 48], DType::F32, 10), dev);
        check(&q, &k, &v, 0.14, Masking::Causal, None, "general 300 x 300");
    }

    // ----- errors --------------------------------------------------------------------------

    /// Every validation error, with MLX's messages and in MLX's order; the oracle validates
    /// identically.
    fn every_error_message(dev: &Device) {
        let z = |shape: &[usize], dtype: DType| on(&randn(shape, dtype, 9), dev);
        let q = z(&[1, 4, 3, 8], DType::F32);
        let k = z(&[1, 1, 5, 8], DType::F32);
        let v = z(&[1, 1, 5, 8], DType::F32);
        let p = "[scaled_dot_product_attention]";
        let e = |r| err_text(r);
        let plain = |q: &Array, k: &Array, v: &Array| e(sdpa(q, k, v, 1.0, Mask::None, None));
        let with_sinks = |s: &Array| e(sdpa(&q, &k, &v, 1.0, Mask::None, Some(s)));

        assert_eq!(
            err_text(Mask::parse("foo").map(|_| q.clone())),
            format!("{p} invalid mask option 'foo'. Must be 'causal', or an array.")
        );
        assert!(matches!(Mask::parse("causal"), Ok(Mask::Causal)));
        assert_eq!(
            plain(&z(&[4, 3, 8], DType::F32), &k, &v),
            format!("{p} input with shape (4,3,8) expected to be rank 4")
        );
        assert_eq!(
            plain(&q, &k, &z(&[1, 1, 5, 8, 1], DType::F32)),
            format!("{p} input with shape (1,1,5,8,1) expected to be rank 4")
        );
        let m5 = z(&[1, 1, 1, 1, 1], DType::F32);
        assert_eq!(
            e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m5), None)),
            format!("{p} the mask with shape (1,1,1,1,1) expected to have at most rank 4.")
        );
        assert_eq!(
            plain(&q, &z(&[2, 1, 5, 8], DType::F32), &v),
            format!("{p} mismatching batch dimension for input with shape (2,1,5,8).")
        );
        assert_eq!(
            plain(&q, &k, &z(&[2, 1, 5, 8], DType::F32)),
            format!("{p} mismatching batch dimension for input with shape (2,1,5,8).")
        );
        assert_eq!(
            plain(&q, &z(&[1, 1, 5, 7], DType::F32), &v),
            format!(
                "{p} query, keys expected to have matching last dimension; found query shape \
                 (1,4,3,8) for keys shape (1,1,5,7)."
            )
        );
        assert_eq!(
            plain(&q, &k, &z(&[1, 2, 5, 8], DType::F32)),
            format!(
                "{p} keys, values expected to have matching n_kv_heads; found keys with n_heads 1 \
                 for values with n_heads 2. (inputs are [B, H, T, D] with the heads on axis 1: \
                 N_q = 4 from q (1,4,3,8), N_kv = 1 from keys (1,1,5,8) and 2 from values \
                 (1,2,5,8))"
            )
        );
        for nkv in [3, 0] {
            let kn = z(&[1, nkv, 5, 8], DType::F32);
            assert_eq!(
                plain(&q, &kn, &z(&[1, nkv, 5, 8], DType::F32)),
                format!(
                    "{p} n_heads must be a multiple of n_kv_heads, found n_heads 4 for n_kv_heads \
                     {nkv}. (inputs are [B, H, T, D] with the heads on axis 1: N_q = 4 from q \
                     (1,4,3,8), N_kv = {nkv} from keys (1,{nkv},5,8) and {nkv} from values \
                     (1,{nkv},5,8))"
                )
            );
        }
        let qi = on(&Array::zeros(&[1, 4, 3, 8], DType::I32, &Device::Cpu).unwrap(), dev);
        let ki = on(&Array::zeros(&[1, 1, 5, 8], DType::I32, &Device::Cpu).unwrap(), dev);
        assert_eq!(
            plain(&qi, &ki, &ki),
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
            format!(
                "{p} Mask type must promote to output type float16. (the mask is float32: cast \
                 it with astype(float16) first; a bool mask selects keys instead)"
            )
        );
        let m64 = z(&[4, 2, 5], DType::F64);
        assert_eq!(
            e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m64), None)),
            format!(
                "{p} Mask type must promote to output type float32. (the mask is float64: cast \
                 it with astype(float32) first; a bool mask selects keys instead)"
            )
        );
        let m_bad = on(&bool_mask(&[4, 2, 5], 0.5, 1), dev);
        assert_eq!(
            e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m_bad), None)),
            "[broadcast_shapes] Shapes (4,2,5) and (1,4,3,5) cannot be broadcast. \
             (scaled_dot_product_attention: the mask of shape (4,2,5) does not broadcast to the \
             attention scores' shape [B, N_q, T_q, T_kv] = (1,4,3,5))"
        );
        let m_big = z(&[2, 1, 1, 1], DType::F32);
        assert_eq!(
            e(sdpa(&q, &k, &v, 1.0, Mask::Array(&m_big), None)),
            "Cannot broadcast array of shape (2,1,1,1) into shape (1,4,3,5). \
             (scaled_dot_product_attention: the mask of shape (2,1,1,1) does not broadcast to \
             the attention scores' shape [B, N_q, T_q, T_kv] = (1,4,3,5))"
        );
        let s32 = z(&[4], DType::F32);
        assert_eq!(
            e(sdpa(&qh, &kh, &kh, 1.0, Mask::None, Some(&s32))),
            format!("{p} Type of sinks must promote to output type float16.")
        );
        assert_eq!(
            with_sinks(&z(&[5], DType::F32)),
            format!("{p} Received invalid shape for sinks (5).")
        );
        assert_eq!(
            with_sinks(&on(&Array::scalar(1.0f32), dev)),
            format!("{p} Received invalid shape for sinks ().")
        );
        assert_eq!(
            with_sinks(&z(&[4, 1], DType::F32)),
            format!("{p} Received invalid shape for sinks (4,1).")
        );
        assert_eq!(
            plain(&q, &k, &z(&[1, 1, 6, 8], DType::F32)),
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

    /// The hints after MLX's messages: a `[B, T, H, D]` decode call is told to swap axes, a
    /// mask made per key/value head is told masks are per query head, a float mask that does
    /// not promote is told which dtype to cast to. MLX's own text comes first, unchanged.
    fn error_hints_point_at_the_mistake(dev: &Device) {
        let z = |shape: &[usize], dtype: DType| on(&randn(shape, dtype, 11), dev);
        let p = "[scaled_dot_product_attention]";

        // A decode step in [B, T, H, D] memory: q (B 1, T 1, 8 heads), k / v (T 10, 2 heads).
        let (q, k, v) = (
            z(&[1, 1, 8, 16], DType::F32),
            z(&[1, 10, 2, 16], DType::F32),
            z(&[1, 10, 2, 16], DType::F32),
        );
        let m = err_text(sdpa(&q, &k, &v, 0.25, Mask::None, None));
        assert!(
            m.starts_with(&format!(
                "{p} n_heads must be a multiple of n_kv_heads, found n_heads 1 for n_kv_heads 10. \
                 (inputs are [B, H, T, D] with the heads on axis 1: N_q = 1 from q (1,1,8,16)"
            )),
            "{m}"
        );
        assert!(
            m.ends_with(
                "read as [B, T, H, D] the shapes fit (8 query heads over 2 key/value heads): \
                 view q, k and v with swapaxes(1, 2), which copies nothing)"
            ),
            "{m}"
        );
        // ... and the advice works.
        let sw = |a: &Array| a.swapaxes(1, 2).unwrap();
        let out = sdpa(&sw(&q), &sw(&k), &sw(&v), 0.25, Mask::None, None).unwrap();
        assert_eq!(out.shape(), &[1, 8, 1, 16]);
        // Shapes that no layout makes fit get no such advice.
        let m = err_text(sdpa(
            &z(&[1, 4, 3, 8], DType::F32),
            &z(&[1, 3, 5, 8], DType::F32),
            &z(&[1, 3, 5, 8], DType::F32),
            1.0,
            Mask::None,
            None,
        ));
        assert!(m.contains("heads on axis 1") && !m.contains("swapaxes"), "{m}");

        // A mask with one head per key/value head in a grouped-query call.
        let (q, k) = (z(&[1, 8, 3, 16], DType::F32), z(&[1, 2, 5, 16], DType::F32));
        for shape in [vec![2, 3, 5], vec![1, 2, 3, 5]] {
            let mask = on(&bool_mask(&shape, 0.5, 3), dev);
            let m = err_text(sdpa(&q, &k, &k, 0.25, Mask::Array(&mask), None));
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            let ms = format!("({})", dims.join(","));
            assert!(
                m.starts_with(&format!(
                    "[broadcast_shapes] Shapes {ms} and (1,8,3,5) cannot be broadcast. \
                     (scaled_dot_product_attention: the mask of shape {ms} does not broadcast \
                     to the attention scores' shape [B, N_q, T_q, T_kv] = (1,8,3,5); its head \
                     axis has 2 entries, one per key/value head, but masks are per query head: \
                     repeat each entry over its 4 query heads"
                )),
                "{m}"
            );
        }
        // A mask for another number of keys names both shapes too.
        let stale = on(&bool_mask(&[3, 4], 0.5, 4), dev);
        let m = err_text(sdpa(&q, &k, &k, 0.25, Mask::Array(&stale), None));
        assert!(
            m.contains("the mask of shape (3,4) does not broadcast to the attention scores' shape"),
            "{m}"
        );
        assert!(m.contains("(1,8,3,5)") && !m.contains("per query head"), "{m}");

        // A float mask that does not promote: MLX's text, then the cast to make.
        let qb = q.astype(DType::BF16).unwrap();
        let kb = k.astype(DType::BF16).unwrap();
        let mf = z(&[3, 5], DType::F32);
        let m = err_text(sdpa(&qb, &kb, &kb, 0.25, Mask::Array(&mf), None));
        assert_eq!(
            m,
            format!(
                "{p} Mask type must promote to output type bfloat16. (the mask is float32: cast \
                 it with astype(bfloat16) first; a bool mask selects keys instead)"
            )
        );
        // The advice works.
        let cast = mf.astype(DType::BF16).unwrap();
        assert!(sdpa(&qb, &kb, &kb, 0.25, Mask::Array(&cast), None).is_ok());
    }

    /// Integer masks are additive, as in MLX: a 0 / 1 int32 mask adds 0 or 1 to the scores
    /// (the same as a float mask of those values) and does not select keys as a bool mask
    /// does.
    fn integer_masks_are_additive(dev: &Device) {
        let q = on(&randn(&[1, 2, 3, 8], DType::F32, 31), dev);
        let k = on(&randn(&[1, 2, 6, 8], DType::F32, 32), dev);
        let v = on(&randn(&[1, 2, 6, 8], DType::F32, 33), dev);
        let bits: Vec<i32> = (0..18).map(|i| i32::from(i % 3 != 1)).collect();
        let ints = on(&Array::from_vec(bits.clone(), &[3, 6]).unwrap(), dev);
        let floats = on(&ints.astype(DType::F32).unwrap(), dev);
        let bools = on(&ints.astype(DType::Bool).unwrap(), dev);
        let a = sdpa(&q, &k, &v, 0.3, Mask::Array(&ints), None).unwrap();
        let f = sdpa(&q, &k, &v, 0.3, Mask::Array(&floats), None).unwrap();
        let b = sdpa(&q, &k, &v, 0.3, Mask::Array(&bools), None).unwrap();
        assert_eq!(a.to_vec::<f32>().unwrap(), f.to_vec::<f32>().unwrap());
        check_close(
            &a,
            &sdpa_ref(&q, &k, &v, 0.3, Mask::Array(&floats), None).unwrap(),
            1e-5,
            1e-5,
            "int32 mask as additive",
        );
        let diff = common::max_abs_diff(&a, &b);
        assert!(diff > 1e-3, "an int mask must not act as a bool mask (diff {diff})");
    }

    // ----- property test ---------------------------------------------------------------------

    /// Random [`cases`] against the oracle.
    fn matches_oracle(dev: &Device) {
        let config = ProptestConfig {
            source_file: Some(file!()),
            ..ProptestConfig::with_cases(64)
        };
        TestRunner::new(config)
            .run(&cases(), |c| {
                let dtype = FLOATS[c.dtype as usize];
                let nq = c.nkv * c.r;
                let q = layout(dev, (c.b, nq, c.tq, c.d), c.layouts[0], dtype, c.seed);
                let k = layout(dev, (c.b, c.nkv, c.tkv, c.d), c.layouts[1], dtype, c.seed ^ 1);
                let v = layout(dev, (c.b, c.nkv, c.tkv, c.dv), c.layouts[2], dtype, c.seed ^ 2);
                let seed = c.seed ^ 3;
                let mask_array = match c.mask {
                    2 => Some(bool_mask(&[c.b, nq, c.tq, c.tkv], 0.6, seed)),
                    3 => Some(bool_mask(&[nq, 1, c.tkv], 0.6, seed)),
                    4 => Some(randn(&[c.tq, c.tkv], dtype, seed)),
                    5 => Some(randn(&[c.b, 1, 1, c.tkv], dtype, seed)),
                    _ => None,
                }
                .map(|m| Input::new(&m, dev));
                let mask = match (c.mask, &mask_array) {
                    (1, _) => Masking::Causal,
                    (_, Some(m)) => Masking::Array(m),
                    _ => Masking::None,
                };
                let sinks = c.sinks.then(|| Input::new(&randn(&[nq], dtype, c.seed ^ 4), dev));
                let scale = 1.0 / (c.d as f32).sqrt();
                check(&q, &k, &v, scale, mask, sinks.as_ref(), &format!("{c:?}"));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Cases only the CPU has: key ranges split across the thread pool, and the benchmarks.
mod cpu_only {
    use super::*;

    /// The CPU.
    const CPU: Device = Device::Cpu;

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
                let q = Input::new(&randn(&[1, nq, tq, 64], DType::F32, seed), &CPU);
                let k = Input::new(&randn(&[1, nkv, tkv, 64], DType::F32, seed + 1), &CPU);
                let v = Input::new(&randn(&[1, nkv, tkv, 64], DType::F32, seed + 2), &CPU);
                let sinks = Input::new(&randn(&[nq], DType::F32, seed + 3), &CPU);
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
                    Masking::Causal,
                    Some(&sinks),
                    "split with sinks",
                );
                let none = Input::new(&Array::scalar(false), &CPU);
                check(
                    &q,
                    &k,
                    &v,
                    0.125,
                    Masking::Array(&none),
                    Some(&sinks),
                    "split all masked",
                );
            }
        });
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
                let q = Input::new(&randn(&[1, r, tq, 128], DType::F32, seed), &CPU);
                let k = layout(&CPU, (1, 1, tkv, 128), (seed % 3) as u8, DType::F32, seed ^ 1);
                let v = Input::new(&randn(&[1, 1, tkv, 128], DType::F32, seed ^ 2), &CPU);
                let m = Input::new(&bool_mask(&[r, tq, tkv], 0.8, seed ^ 3), &CPU);
                let mask = [Masking::None, Masking::Causal, Masking::Array(&m)][mask as usize];
                let s = sinks.then(|| Input::new(&randn(&[r], DType::F32, seed ^ 4), &CPU));
                check(&q, &k, &v, 0.125, mask, s.as_ref(), &format!("r {r} tq {tq} tkv {tkv} seed {seed}"));
            });
        }
    }

    // ----- benchmarks (run with --ignored --nocapture in release) -------------------------

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
                let kind = if transposed { BTHD } else { ROW_MAJOR };
                let q = layout(&CPU, (b, h, t, d), kind, dtype, 1).dev;
                let k = layout(&CPU, (b, h, t, d), kind, dtype, 2).dev;
                let v = layout(&CPU, (b, h, t, d), kind, dtype, 3).dev;
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

    /// The process's peak resident set size, in KiB.
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
}

/// Cases only CUDA has: streams, inputs on several devices, f64 (no CUDA kernel).
#[cfg(feature = "cuda")]
mod cuda_only {
    use super::*;
    use ferrofast::fast::scaled_dot_product_attention_on as sdpa_on;
    use ferrofast::Stream;

    /// Inputs produced on other streams of the device are waited for; the explicit-stream
    /// entry runs on the stream it is given; a mask, sinks or an input on the CPU or another
    /// device are clear errors, after the validation with MLX's messages.
    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn streams_and_devices() {
        let gpus = common::gpus();
        for &dev in &gpus {
            let q = randn(&[1, 8, 1, 64], DType::F32, 1);
            let k = randn(&[1, 2, 5000, 64], DType::F32, 2);
            let v = randn(&[1, 2, 5000, 64], DType::F32, 3);
            let r = sdpa_ref(&q, &k, &v, 0.125, Mask::None, None).unwrap();
            let s1 = Stream::new(&dev).unwrap();
            let s2 = Stream::new(&dev).unwrap();
            let (gq, gk, gv) = (
                on(&q, &dev).to_stream(&s1).unwrap(),
                on(&k, &dev).to_stream(&s2).unwrap(),
                on(&v, &dev).to_stream(&s2).unwrap(),
            );
            let out = sdpa(&gq, &gk, &gv, 0.125, Mask::None, None).unwrap();
            assert_eq!(out.stream().as_ref(), Some(&s1));
            check_close(&out, &r, 2e-5, 2e-5, "inputs from two streams");
            let s3 = Stream::new(&dev).unwrap();
            let out = sdpa_on(&s3, &gq, &gk, &gv, 0.125, Mask::None, None).unwrap();
            assert_eq!(out.stream().as_ref(), Some(&s3));
            check_close(&out, &r, 2e-5, 2e-5, "explicit stream");
            let out = sdpa(&gq, &gk, &gv, 0.125, Mask::Causal, None).unwrap();
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
            let e = sdpa(&gq, &k, &gv, 0.1, Mask::None, None).unwrap_err();
            assert!(matches!(e, Error::Device(_)), "{e}");
            // Validation comes first, with MLX's messages.
            let bad = on(&randn(&[1, 3, 5000, 64], DType::F32, 6), &dev);
            let e = sdpa(&gq, &bad, &bad, 0.1, Mask::None, None).unwrap_err();
            assert!(e.to_string().contains("n_heads must be a multiple"), "{e}");
            // Another device, where there is one.
            if let Some(other) = gpus.iter().copied().find(|&d| d != dev) {
                let e = sdpa(&gq, &on(&k, &other), &gv, 0.1, Mask::None, None).unwrap_err();
                assert!(matches!(e, Error::Device(_)), "{e}");
                let s = Stream::new(&other).unwrap();
                let e = sdpa_on(&s, &gq, &gk, &gv, 0.1, Mask::None, None).unwrap_err();
                assert!(matches!(e, Error::Device(_)), "{e}");
            }
        }
    }

    on_every_gpu! {
        /// A float64 result is not run on the GPU: `Error::Unsupported`.
        fn f64_is_unsupported(dev: Device) {
            let q64 = on(&randn(&[1, 2, 1, 16], DType::F64, 5), &dev);
            let k64 = on(&randn(&[1, 2, 7, 16], DType::F64, 6), &dev);
            let r = sdpa(&q64, &k64, &k64, 1.0, Mask::None, None);
            assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        }
    }
}
