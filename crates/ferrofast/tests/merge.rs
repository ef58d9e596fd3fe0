//! `fast::merge_attention_states`: against the float64 oracle, and against attention itself
//! (keys split into two parts, each part's attention with its log-sum-exp, merged, against
//! attention over all the keys) with causal masks by offset, bool and additive masks,
//! grouped-query heads and sinks given to one part; every dtype, `-inf` parts, NaN,
//! empty sizes, strided views and every error. Each case runs on every device.

#[macro_use]
mod common;

use common::{check_close, on, randn, uniform, Input};
use ferrofast::fast::{self, Mask};
use ferrofast::{reference, Array, DType, Device};

/// Tolerances of a merge against the oracle of the same inputs: one rounding of the result.
fn merge_tol(dtype: DType) -> (f64, f64) {
    common::by_dtype(
        dtype,
        [(2e-6, 2e-6), (1e-3, 1e-3), (8e-3, 8e-3), (1e-12, 1e-12)],
    )
}

/// Tolerances of merged attention parts against attention over all keys (the oracle): the
/// parts' roundings plus the merge's.
fn attn_tol(dtype: DType) -> (f64, f64) {
    common::by_dtype(
        dtype,
        [(2e-5, 2e-5), (3e-3, 3e-3), (2.5e-2, 2.5e-2), (1e-10, 1e-10)],
    )
}

/// Seeded parts `(out_a, lse_a, out_b, lse_b)` on the CPU: outputs normal, log-sum-exps
/// uniform in [-4, 4) (so the weights range over e^8).
fn parts(shape: [usize; 4], dtype: DType, seed: u64) -> (Array, Array, Array, Array) {
    let lse_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    (
        randn(&shape, dtype, seed),
        uniform(&shape[..3], -4.0, 4.0, lse_dtype, seed + 1),
        randn(&shape, dtype, seed + 2),
        uniform(&shape[..3], -4.0, 4.0, lse_dtype, seed + 3),
    )
}

/// Merges on `dev` and checks output and log-sum-exp against the oracle; returns both.
fn check_merge(p: (&Array, &Array, &Array, &Array), dev: &Device, what: &str) -> (Array, Array) {
    let (oa, la, ob, lb) = p;
    let dtype = oa.dtype();
    let (out, lse) =
        fast::merge_attention_states(&on(oa, dev), &on(la, dev), &on(ob, dev), &on(lb, dev))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.dtype(), dtype, "{what}");
    assert_eq!(lse.dtype(), la.dtype(), "{what}");
    assert_eq!(out.device(), *dev, "{what}");
    let (ro, rl) = reference::merge_attention_states(oa, la, ob, lb).expect("oracle");
    let (atol, rtol) = merge_tol(dtype);
    check_close(&out, &ro, atol, rtol, &format!("{what}: out"));
    let ltol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
    check_close(&lse, &rl, ltol, ltol, &format!("{what}: lse"));
    (out, lse)
}

/// A bool mask `[1, 1, T_q, cols]` from a predicate on (query, key).
fn bool_mask(tq: usize, cols: std::ops::Range<usize>, f: impl Fn(usize, usize) -> bool) -> Array {
    let n = cols.len();
    let mut v = Vec::with_capacity(tq * n);
    for i in 0..tq {
        for j in cols.clone() {
            v.push(f(i, j));
        }
    }
    Array::from_vec(v, &[1, 1, tq, n]).unwrap()
}

/// `x[..., lo..hi, :]` along axis 2.
fn keys(x: &Array, lo: usize, hi: usize) -> Array {
    let s = x.shape();
    x.slice(
        &[0, 0, lo as isize, 0],
        &[s[0] as isize, s[1] as isize, hi as isize, s[3] as isize],
        &[1; 4],
    )
    .unwrap()
}

/// The columns `lo..hi` of a 4-D mask.
fn mask_cols(m: &Array, lo: usize, hi: usize) -> Array {
    let s = m.shape();
    m.slice(
        &[0, 0, 0, lo as isize],
        &[s[0] as isize, s[1] as isize, s[2] as isize, hi as isize],
        &[1; 4],
    )
    .unwrap()
}

/// How a split attention problem masks its keys.
#[derive(Clone, Copy, Debug)]
enum Masking {
    None,
    /// Lower-right causal over all keys: the prefix part sees everything (`split <=
    /// T_kv - T_q`), the suffix part is causal by the offset.
    CausalOffset,
    /// Upper-left causal as a bool mask split by columns (part b has rows that see nothing).
    BoolCausal,
    /// An additive float mask with `-inf` entries, split by columns.
    Additive,
}

/// Attention over keys `0..split` and `split..T_kv` merged, against the oracle over all
/// keys. Sinks (when given) go to part `sink_part` only.
#[allow(clippy::too_many_arguments)]
fn check_split_attention(
    dev: &Device,
    dtype: DType,
    (b, nq, nkv, tq, tkv, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    split: usize,
    masking: Masking,
    sinks: Option<usize>,
    seed: u64,
) {
    let what = format!(
        "{dtype} {:?} b{b} nq{nq} nkv{nkv} tq{tq} tkv{tkv} split {split} {masking:?} sinks \
         {sinks:?} seed {seed}",
        dev
    );
    let q = randn(&[b, nq, tq, d], dtype, seed);
    let k = randn(&[b, nkv, tkv, d], dtype, seed + 1);
    let v = randn(&[b, nkv, tkv, dv], dtype, seed + 2);
    let s = uniform(&[nq], -1.0, 2.0, dtype, seed + 3);
    let scale = 1.0 / (d as f32).sqrt();
    let full_mask = match masking {
        Masking::BoolCausal => Some(bool_mask(tq, 0..tkv, |i, j| j <= i)),
        Masking::Additive => {
            let m = uniform(&[1, nq, tq, tkv], -2.0, 1.0, dtype, seed + 4);
            let vals: Vec<f64> = m
                .to_f64_vec()
                .unwrap()
                .into_iter()
                .enumerate()
                .map(|(i, x)| if i % 5 == 2 { f64::NEG_INFINITY } else { x })
                .collect();
            Some(
                Array::from_vec(vals, &[1, nq, tq, tkv])
                    .unwrap()
                    .astype(dtype)
                    .unwrap(),
            )
        }
        _ => None,
    };
    let full = match (&full_mask, masking) {
        (Some(m), _) => Mask::Array(m),
        (None, Masking::CausalOffset) => Mask::Causal,
        _ => Mask::None,
    };
    let (ref_out, ref_lse) = reference::scaled_dot_product_attention_with_lse(
        &q,
        &k,
        &v,
        scale,
        full,
        Some(&s).filter(|_| sinks.is_some()),
    )
    .unwrap();
    // Each part's mask columns, on the device under test.
    let masks = full_mask.as_ref().map(|m| {
        (
            on(&mask_cols(m, 0, split), dev),
            on(&mask_cols(m, split, tkv), dev),
        )
    });
    let (ma, mb) = match (&masks, masking) {
        (Some((a, b)), _) => (Mask::Array(a), Mask::Array(b)),
        (None, Masking::CausalOffset) => (Mask::None, Mask::Causal),
        _ => (Mask::None, Mask::None),
    };
    let (qd, sd) = (on(&q, dev), on(&s, dev));
    let part = |lo: usize, hi: usize, mask: Mask<'_>, with_sinks: bool| {
        let (kd, vd) = (on(&keys(&k, lo, hi), dev), on(&keys(&v, lo, hi), dev));
        fast::scaled_dot_product_attention_with_lse(
            &qd,
            &kd,
            &vd,
            scale,
            mask,
            with_sinks.then_some(&sd),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let (oa, la) = part(0, split, ma, sinks == Some(0));
    let (ob, lb) = part(split, tkv, mb, sinks == Some(1));
    let (out, lse) =
        fast::merge_attention_states(&oa, &la, &ob, &lb).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (atol, rtol) = attn_tol(dtype);
    check_close(&out, &ref_out, atol, rtol, &format!("{what}: out"));
    check_close(&lse, &ref_lse, 1e-4, 1e-5, &format!("{what}: lse"));
    // The same merge with the parts swapped.
    let (out2, _) = fast::merge_attention_states(&ob, &lb, &oa, &la).unwrap();
    check_close(&out2, &ref_out, atol, rtol, &format!("{what}: swapped"));
}

/// Row `r`'s values of a row-major array with `n` per row.
fn row(a: &Array, r: usize, n: usize) -> Vec<f64> {
    a.to_f64_vec().unwrap()[r * n..(r + 1) * n].to_vec()
}

on_every_device! {
    fn matches_the_oracle(dev: &Device) {
        for dtype in common::float_dtypes(dev) {
            for (i, shape) in [[2, 3, 5, 17], [1, 1, 1, 1], [2, 4, 7, 64], [1, 2, 3, 130]]
                .into_iter()
                .enumerate()
            {
                let (oa, la, ob, lb) = parts(shape, dtype, 10 + i as u64);
                check_merge((&oa, &la, &ob, &lb), dev, &format!("{dtype} {shape:?}"));
            }
        }
    }

    fn split_attention_equals_attention(dev: &Device) {
        let mut seed = 100;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for masking in [Masking::None, Masking::CausalOffset, Masking::BoolCausal, Masking::Additive] {
                for (dims, split) in [
                    ((1, 2, 2, 9, 9, 16, 16), 4),
                    ((2, 8, 2, 13, 29, 32, 24), 11),
                    ((1, 4, 1, 6, 40, 64, 64), 33),
                ] {
                    let (tq, tkv) = (dims.3, dims.4);
                    // Causal by offset needs the prefix visible to every query.
                    let split = match masking {
                        Masking::CausalOffset => split.min(tkv - tq),
                        _ => split,
                    };
                    for sinks in [None, Some(0), Some(1)] {
                        check_split_attention(dev, dtype, dims, split, masking, sinks, seed);
                        seed += 5;
                    }
                }
            }
        }
    }

    fn minus_infinity_parts_contribute_nothing(dev: &Device) {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let shape = [1, 2, 3, 8];
            let (oa, _, ob, lb) = parts(shape, dtype, 40);
            let ninf = f32::NEG_INFINITY;
            // Row 0: part a -inf with NaN output; row 1: both -inf; row 2: part b -inf.
            let la = Array::from_vec(vec![ninf, ninf, 0.5, ninf, ninf, 1.5], &[1, 2, 3]).unwrap();
            let lb_v = lb.to_vec::<f32>().unwrap();
            let lb = Array::from_vec(
                vec![lb_v[0], ninf, ninf, lb_v[3], ninf, ninf],
                &[1, 2, 3],
            )
            .unwrap();
            let mut oa_v = oa.to_f64_vec().unwrap();
            oa_v[..8].fill(f64::NAN);
            let oa = Array::from_vec(oa_v, &shape).unwrap().astype(dtype).unwrap();
            let mut ob_v = ob.to_f64_vec().unwrap();
            ob_v[16..24].fill(f64::NAN);
            let ob = Array::from_vec(ob_v, &shape).unwrap().astype(dtype).unwrap();
            let (out, lse) = check_merge((&oa, &la, &ob, &lb), dev, &format!("{dtype} -inf"));
            let l = lse.to_vec::<f32>().unwrap();
            assert_eq!(l[0], lb_v[0]);
            assert_eq!(l[1], ninf);
            assert_eq!(l[2], 0.5);
            // Exactly the other part where one part is -inf; zeros where both are.
            assert_eq!(row(&out, 0, 8), row(&ob, 0, 8), "{dtype}");
            assert_eq!(row(&out, 1, 8), vec![0.0; 8], "{dtype}");
            assert_eq!(row(&out, 2, 8), row(&oa, 2, 8), "{dtype}");
            assert_eq!(row(&out, 4, 8), vec![0.0; 8], "{dtype}");
        }
    }

    fn nan_propagates(dev: &Device) {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let shape = [1, 1, 5, 6];
            let (oa, la, ob, lb) = parts(shape, dtype, 50);
            let mut la_v = la.to_vec::<f32>().unwrap();
            let mut lb_v = lb.to_vec::<f32>().unwrap();
            la_v[0] = f32::NAN; // row 0: NaN lse in part a
            lb_v[1] = f32::NAN; // row 1: NaN lse in part b
            la_v[2] = f32::NAN; // row 2: NaN and -inf
            lb_v[2] = f32::NEG_INFINITY;
            la_v[3] = f32::INFINITY; // row 3: +inf
            let la = Array::from_vec(la_v, &[1, 1, 5]).unwrap();
            let lb = Array::from_vec(lb_v, &[1, 1, 5]).unwrap();
            // Row 4: a NaN in one output column of a part with non-zero weight.
            let mut oa_v = oa.to_f64_vec().unwrap();
            oa_v[4 * 6 + 2] = f64::NAN;
            let oa = Array::from_vec(oa_v, &shape).unwrap().astype(dtype).unwrap();
            let (out, lse) = check_merge((&oa, &la, &ob, &lb), dev, &format!("{dtype} NaN"));
            let l = lse.to_vec::<f32>().unwrap();
            assert_eq!(l[3], f32::INFINITY, "{dtype} row 3");
            for (r, lr) in l.iter().enumerate().take(4) {
                assert!(lr.is_nan() || r == 3, "{dtype} row {r} lse {lr}");
                assert!(row(&out, r, 6).iter().all(|x| x.is_nan()), "{dtype} row {r}");
            }
            assert!(l[4].is_finite());
            let r4 = row(&out, 4, 6);
            for (j, x) in r4.iter().enumerate() {
                assert_eq!(x.is_nan(), j == 2, "{dtype} row 4 column {j}: {x}");
            }
        }
    }

    fn empty_sizes(dev: &Device) {
        for shape in [[0, 2, 3, 4], [2, 0, 3, 4], [2, 3, 0, 4], [2, 3, 4, 0]] {
            let (oa, la, ob, lb) = parts(shape, DType::F32, 60);
            let (out, lse) = check_merge((&oa, &la, &ob, &lb), dev, &format!("{shape:?}"));
            assert_eq!(out.shape(), &shape);
            assert_eq!(lse.shape(), &shape[..3]);
        }
    }

    fn strided_views(dev: &Device) {
        for dtype in [DType::F32, DType::BF16] {
            // [B, T, H, D] memory seen as [B, H, T, D]; a reversed, stepped feature axis; a
            // log-sum-exp broadcast over heads and one sliced with a step.
            let base_a = randn(&[2, 5, 3, 24], dtype, 70);
            let base_b = randn(&[2, 3, 5, 48], dtype, 71);
            let oa = Input::view(&base_a, dev, |x| x.swapaxes(1, 2).unwrap());
            let ob = Input::view(&base_b, dev, |x| {
                x.slice(&[0, 0, 0, -1], &[2, 3, 5, -49], &[1, 1, 1, -2]).unwrap()
            });
            let lse_a_base = uniform(&[2, 1, 5], -3.0, 3.0, DType::F32, 72);
            let la = Input::view(&lse_a_base, dev, |x| x.broadcast_to(&[2, 3, 5]).unwrap());
            let lse_b_base = uniform(&[2, 3, 10], -3.0, 3.0, DType::F32, 73);
            let lb = Input::view(&lse_b_base, dev, |x| {
                x.slice(&[0, 0, 1], &[2, 3, 10], &[1, 1, 2]).unwrap()
            });
            assert_eq!(ob.host.shape(), &[2, 3, 5, 24]);
            let (out, lse) = fast::merge_attention_states(&oa.dev, &la.dev, &ob.dev, &lb.dev)
                .expect("strided merge");
            let (ro, rl) =
                reference::merge_attention_states(&oa.host, &la.host, &ob.host, &lb.host).unwrap();
            let (atol, rtol) = merge_tol(dtype);
            check_close(&out, &ro, atol, rtol, &format!("{dtype} strided out"));
            check_close(&lse, &rl, 2e-6, 2e-6, &format!("{dtype} strided lse"));
        }
    }

    fn merging_is_order_independent(dev: &Device) {
        // Three parts merged as (a + b) + c and a + (b + c) agree with the oracle's.
        let shape = [1, 2, 4, 16];
        let (oa, la, ob, lb) = parts(shape, DType::F32, 80);
        let (oc, lc, _, _) = parts(shape, DType::F32, 90);
        let d = |x: &Array| on(x, dev);
        let (ab, lab) = fast::merge_attention_states(&d(&oa), &d(&la), &d(&ob), &d(&lb)).unwrap();
        let (abc, labc) = fast::merge_attention_states(&ab, &lab, &d(&oc), &d(&lc)).unwrap();
        let (bc, lbc) = fast::merge_attention_states(&d(&ob), &d(&lb), &d(&oc), &d(&lc)).unwrap();
        let (abc2, labc2) = fast::merge_attention_states(&d(&oa), &d(&la), &bc, &lbc).unwrap();
        check_close(&abc, &abc2, 1e-6, 1e-6, "associativity: out");
        check_close(&labc, &labc2, 1e-6, 1e-6, "associativity: lse");
    }

    fn errors(dev: &Device) {
        let (oa, la, ob, lb) = parts([1, 2, 3, 4], DType::F32, 95);
        let d = |x: &Array| on(x, dev);
        let msg = |r: ferrofast::Result<(Array, Array)>| r.expect_err("should fail").to_string();
        let three = d(&randn(&[2, 3, 4], DType::F32, 1));
        assert!(msg(fast::merge_attention_states(&three, &d(&la), &d(&ob), &d(&lb)))
            .contains("[merge_attention_states] out_a must be 4-dimensional [B, H, T, D_v] but has shape (2,3,4) (3 dimensions)."));
        assert!(msg(fast::merge_attention_states(&d(&oa), &d(&la), &three, &d(&lb)))
            .contains("[merge_attention_states] out_b must be 4-dimensional"));
        let other = d(&randn(&[1, 2, 3, 5], DType::F32, 2));
        assert!(msg(fast::merge_attention_states(&d(&oa), &d(&la), &other, &d(&lb))).contains(
            "[merge_attention_states] out_a and out_b must have the same shape but have shapes (1,2,3,4) and (1,2,3,5)."
        ));
        let half = d(&ob.astype(DType::F16).unwrap());
        assert!(msg(fast::merge_attention_states(&d(&oa), &d(&la), &half, &d(&lb))).contains(
            "[merge_attention_states] out_a and out_b must have the same dtype but have types float32 and float16."
        ));
        let ints = d(&oa.astype(DType::I32).unwrap());
        assert!(msg(fast::merge_attention_states(&ints, &d(&la), &ints, &d(&lb)))
            .contains("[merge_attention_states] Received unsupported type int32."));
        let bad_lse = d(&randn(&[1, 2, 4], DType::F32, 3));
        assert!(msg(fast::merge_attention_states(&d(&oa), &bad_lse, &d(&ob), &d(&lb))).contains(
            "[merge_attention_states] lse_a must have the outputs' shape without its last axis, [B, H, T] = (1,2,3), but has shape (1,2,4)."
        ));
        assert!(msg(fast::merge_attention_states(&d(&oa), &d(&la), &d(&ob), &bad_lse))
            .contains("[merge_attention_states] lse_b must have the outputs' shape"));
        let bf_lse = d(&lb.astype(DType::BF16).unwrap());
        assert!(msg(fast::merge_attention_states(&d(&oa), &d(&la), &d(&ob), &bf_lse)).contains(
            "[merge_attention_states] lse_b must have type float32 for float32 outputs (as scaled_dot_product_attention_with_lse returns it) but has type bfloat16."
        ));
        if dev.is_cpu() {
            // float64 outputs take float64 log-sum-exps.
            let o64 = oa.astype(DType::F64).unwrap();
            assert!(msg(fast::merge_attention_states(&o64, &la, &o64, &lb))
                .contains("lse_a must have type float64 for float64 outputs"));
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_only {
    use super::*;

    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn inputs_on_two_devices_and_float64_are_errors() {
        let Some(gpu) = common::gpu() else { return };
        let (oa, la, ob, lb) = parts([1, 2, 3, 4], DType::F32, 96);
        let e = fast::merge_attention_states(&on(&oa, &gpu), &la, &on(&ob, &gpu), &on(&lb, &gpu))
            .unwrap_err();
        assert!(matches!(e, ferrofast::Error::Device(_)), "{e}");
        let o64 = on(&oa.astype(DType::F64).unwrap(), &gpu);
        let l64 = on(&la.astype(DType::F64).unwrap(), &gpu);
        let e = fast::merge_attention_states(&o64, &l64, &o64, &l64).unwrap_err();
        assert!(matches!(e, ferrofast::Error::Unsupported(_)), "{e}");
        // A stream of the inputs' device runs it; the CPU inputs with a stream do not.
        let stream = ferrofast::Stream::new(&gpu).unwrap();
        let d = |x: &Array| on(x, &gpu);
        let (out, _) =
            fast::merge_attention_states_on(&stream, &d(&oa), &d(&la), &d(&ob), &d(&lb)).unwrap();
        let (ro, _) = reference::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        check_close(&out, &ro, 2e-6, 2e-6, "explicit stream");
        let e = fast::merge_attention_states_on(&stream, &oa, &la, &ob, &lb).unwrap_err();
        assert!(matches!(e, ferrofast::Error::Device(_)), "{e}");
    }
}

mod cpu_only {
    use super::*;

    #[test]
    fn float64_merges_in_float64() {
        let (oa, la, ob, lb) = parts([2, 2, 3, 5], DType::F64, 97);
        let (out, lse) = fast::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        let (ro, rl) = reference::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        check_close(&out, &ro, 1e-14, 1e-14, "f64 out");
        check_close(&lse, &rl, 1e-14, 1e-14, "f64 lse");
    }

    #[test]
    fn huge_broadcast_parts_are_out_of_memory_errors() {
        // 2^44 rows of 64 features from one-element views: the output cannot be allocated,
        // which is an error, not an abort.
        let shape = [1usize << 14, 1 << 14, 1 << 16, 64];
        let o = randn(&[1, 1, 1, 1], DType::F32, 1)
            .broadcast_to(&shape)
            .unwrap();
        let l = uniform(&[1, 1, 1], -1.0, 1.0, DType::F32, 2)
            .broadcast_to(&shape[..3])
            .unwrap();
        let e = fast::merge_attention_states(&o, &l, &o, &l).unwrap_err();
        assert!(matches!(e, ferrofast::Error::OutOfMemory(_)), "{e}");
    }

    #[test]
    fn large_inputs_run_in_parallel_and_agree() {
        // Past the parallel threshold, with a strided part.
        let (oa, la, _, lb) = parts([2, 8, 64, 128], DType::BF16, 98);
        let ob = randn(&[2, 64, 8, 128], DType::BF16, 99)
            .swapaxes(1, 2)
            .unwrap();
        let (out, lse) = fast::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        let (ro, rl) = reference::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        check_close(&out, &ro, 8e-3, 8e-3, "large out");
        check_close(&lse, &rl, 2e-6, 2e-6, "large lse");
    }
}
