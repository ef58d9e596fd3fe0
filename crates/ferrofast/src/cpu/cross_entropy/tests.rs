use super::{exp_f32, exp_nonpositive, row_grad, row_grad_in_place, scan, Isa};
use super::{RowElem, Scratch};
use crate::ops::cross_entropy::RowParams;
use half::{bf16, f16};
use std::mem::MaybeUninit;

#[test]
fn exp_matches_std_and_handles_the_edges() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (a, b) = (exp_f32(x), x.exp());
        // The argument x log2(e) is rounded: relative error up to about |x| * 6e-8.
        let bound = 3e-7 + f64::from(x.abs()) * 1e-7;
        assert!(
            f64::from(((a - b) / b).abs()) < bound,
            "exp({x}) = {a}, std {b}"
        );
        x += 0.0137;
    }
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-1000.0), 0.0);
    assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_nonpositive(-88.0), 0.0);
    assert!(exp_nonpositive(-87.5) < 1.2e-38);
    assert!(exp_nonpositive(f32::NAN).is_nan());
}

/// Seeded values normal-ish * scale + offset (a sum of uniforms), deterministic.
fn values(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let mut u = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 2.0) * 1.7 * scale + offset
        })
        .collect()
}

fn params(v: usize, eps: f32, z: f32) -> RowParams {
    RowParams {
        ignore: Some(-100),
        vocab: v,
        one_minus_eps: 1.0 - eps,
        eps,
        eps_over_v: eps / v as f32,
        z,
    }
}

/// The gradient of one row through [row_grad], into a buffer whose row starts shift
/// elements past an allocation's start (so the kernels' aligned head varies).
fn grad<T: RowElem>(
    p: &RowParams,
    x: &[T],
    t: i64,
    g: f32,
    isa: Isa,
    shift: usize,
) -> (f32, Vec<T>) {
    let v = x.len();
    let mut buf: Vec<MaybeUninit<T>> = (0..v + shift).map(|_| MaybeUninit::uninit()).collect();
    let mut sc = Scratch::default();
    let loss = row_grad(p, x, t, g, &mut buf[shift..], isa, &mut sc);
    let out = buf[shift..]
        .iter()
        // SAFETY: row_grad wrote every element of the row.
        .map(|o| unsafe { o.assume_init() })
        .collect();
    (loss, out)
}

/// The loss and gradient of one row in f64 from the widened logits.
fn oracle(p: &RowParams, x: &[f64], t: usize, g: f64) -> (f64, Vec<f64>) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = x.iter().map(|&a| (a - m).exp()).sum();
    let lse = m + s.ln();
    let (eps, z) = (f64::from(p.eps), f64::from(p.z));
    let v = x.len() as f64;
    let loss = (1.0 - eps) * (lse - x[t]) + eps * (lse - x.iter().sum::<f64>() / v) + z * lse * lse;
    let a = g * (1.0 + 2.0 * z * lse);
    let mut d: Vec<f64> = x
        .iter()
        .map(|&a_| a * (a_ - lse).exp() - g * eps / v)
        .collect();
    d[t] -= g * (1.0 - eps);
    (loss, d)
}

/// Every available implementation against the f64 oracle, and the AVX2 and AVX-512 kernels
/// against the portable ones (which must agree to a few f32 roundings), over row lengths
/// around the vector steps (16 and 32 logits; loops of 32 and 64) and blocks, output offsets
/// (16-byte phases that take the streaming stores or not), label smoothing and z-loss.
fn implementations_agree<T: RowElem>(ulp: f64) {
    let isas = Isa::available();
    for (case, &v) in [
        1usize, 5, 16, 17, 31, 32, 33, 47, 63, 64, 65, 95, 96, 100, 127, 128, 129, 4095, 4096,
        4097, 4159, 9000, 20011,
    ]
    .iter()
    .enumerate()
    {
        for (eps, z) in [(0.0f32, 0.0f32), (0.1, 1e-4)] {
            let seed = case as u64 * 7 + 1;
            let offset = if case % 3 == 0 { 300.0 } else { 0.0 };
            let xs: Vec<T> = values(v, seed, 6.0, offset)
                .into_iter()
                .map(T::narrow)
                .collect();
            let wide: Vec<f64> = xs.iter().map(|&a| f64::from(a.widen())).collect();
            let t = (seed as usize * 31) % v;
            let p = params(v, eps, z);
            let (want_loss, want) = oracle(&p, &wide, t, 0.75);
            let mut got = Vec::new();
            for &isa in &isas {
                for shift in [0usize, 1, 3, 8, 24] {
                    let (loss, out) = grad(&p, &xs, t as i64, 0.75, isa, shift);
                    let what = format!("v {v} eps {eps} z {z} {isa:?} shift {shift}");
                    let tol = 2e-6 * want_loss.abs().max(1.0) + 1e-5;
                    assert!(
                        (f64::from(loss) - want_loss).abs() < tol,
                        "{what}: loss {loss} want {want_loss}"
                    );
                    for (j, (&o, &w)) in out.iter().zip(&want).enumerate() {
                        let o = f64::from(o.widen());
                        assert!(
                            (o - w).abs() <= ulp * w.abs() + 1e-7,
                            "{what}: grad[{j}] {o} want {w}"
                        );
                    }
                    // The forward's loss and the in-place pass match the fresh one.
                    let stats = scan(&xs, eps != 0.0, None, isa);
                    assert!(!stats.nan && stats.max.is_finite(), "{what}");
                    let mut inplace = xs.clone();
                    let mut sc = Scratch::default();
                    let l2 = row_grad_in_place(&p, &mut inplace, t as i64, 0.75, isa, &mut sc);
                    assert!((l2 - loss).abs() <= 1e-6 * loss.abs().max(1.0), "{what}");
                    for (j, (a, b)) in inplace.iter().zip(&out).enumerate() {
                        let (a, b) = (f64::from(a.widen()), f64::from(b.widen()));
                        assert!(
                            (a - b).abs() <= ulp * b.abs() + 1e-7,
                            "{what}: [{j}] {a} {b}"
                        );
                    }
                    got.push((loss, out));
                }
            }
            // Portable, AVX2 and AVX-512 within an ulp or two of the element type.
            let (first_loss, first) = &got[0];
            for (loss, out) in &got[1..] {
                assert!((loss - first_loss).abs() <= 2e-6 * first_loss.abs().max(1.0));
                for (a, b) in out.iter().zip(first) {
                    let (a, b) = (f64::from(a.widen()), f64::from(b.widen()));
                    assert!(
                        (a - b).abs() <= ulp * b.abs() + 1e-7,
                        "v {v}: {a} against {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn f32_kernels_agree_with_each_other_and_f64() {
    implementations_agree::<f32>(2e-6);
}

#[test]
fn bf16_kernels_agree_with_each_other_and_f64() {
    // An ulp of bf16 (two values rounded apart can differ by one).
    implementations_agree::<bf16>(1.0 / 128.0);
}

#[test]
fn f16_kernels_agree_with_each_other_and_f64() {
    implementations_agree::<f16>(1.0 / 1024.0);
}

/// Rows with a NaN at every position class (vector step, block tail, row tail), rows of
/// -inf with one finite value, and +inf maxima: the same answer from every implementation.
#[test]
fn special_values_agree() {
    let v = 4096 + 37;
    let p = params(v, 0.0, 0.0);
    let positions = [
        0usize,
        15,
        16,
        31,
        32,
        63,
        64,
        4095,
        4096,
        4100,
        4127,
        v - 1,
    ];
    for isa in Isa::available() {
        for pos in positions {
            let mut x = values(v, 5, 6.0, 0.0);
            x[pos] = f32::NAN;
            let (loss, out) = grad(&p, &x, 3, 1.0, isa, 1);
            assert!(
                loss.is_nan() && out.iter().all(|o| o.is_nan()),
                "{isa:?} NaN at {pos}"
            );
            let stats = scan(&x, false, None, isa);
            assert!(stats.nan, "{isa:?} NaN at {pos}");

            let mut x = vec![f32::NEG_INFINITY; v];
            x[pos] = 2.0;
            let t = (pos + 1) % v;
            let (loss, out) = grad(&p, &x, t as i64, 1.0, isa, 3);
            assert_eq!(loss, f32::INFINITY, "{isa:?} -inf row, finite at {pos}");
            for (j, &o) in out.iter().enumerate() {
                let want = if j == pos {
                    1.0
                } else if j == t {
                    -1.0
                } else {
                    0.0
                };
                assert_eq!(o, want, "{isa:?} -inf row, finite at {pos}: [{j}]");
            }

            // +inf: the logits' path, the same for every implementation.
            let mut x = values(v, 6, 6.0, 0.0);
            x[pos] = f32::INFINITY;
            let (loss, out) = grad(&p, &x, 3, 1.0, isa, 0);
            let (want_loss, want) = grad(&p, &x, 3, 1.0, Isa::Portable, 0);
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same(loss, want_loss), "{isa:?} +inf at {pos}");
            assert!(
                out.iter().zip(&want).all(|(&a, &b)| same(a, b)),
                "{isa:?} +inf at {pos}"
            );
        }
    }
}

/// The run-time choice: every implementation the CPU has is tested above, and the best of
/// them runs (AVX-512 ahead of AVX2 ahead of the portable loops).
#[test]
fn detection_picks_the_widest_available_kernels() {
    let isas = Isa::available();
    assert_eq!(isas[0], Isa::Portable);
    assert_eq!(isas.last().copied(), Some(Isa::detect()));
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        assert_eq!(isas.contains(&Isa::Avx2), avx2, "{isas:?}");
        assert_eq!(isas.contains(&Isa::Avx512), avx512, "{isas:?}");
    }
}

/// The AVX-512 kernels compute each exponential with the AVX2 kernels' operations, so the
/// stored exponentials (in each kernel's order within a block) hold the same values.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_exponentials_match_avx2_bits() {
    let isas = Isa::available();
    if !isas.contains(&Isa::Avx512) {
        return;
    }
    for v in [33usize, 100, 4097, 9000] {
        let xs: Vec<bf16> = values(v, 11, 6.0, 2.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut stored = Vec::new();
        for isa in [Isa::Avx2, Isa::Avx512] {
            let mut sc = Scratch::default();
            let stats = scan(&xs, false, Some(&mut sc), isa);
            let mut e: Vec<u32> = sc.e[..v].iter().map(|y| y.to_bits()).collect();
            e.sort_unstable();
            stored.push((stats.max, sc.block_max.clone(), e));
        }
        assert_eq!(stored[0], stored[1], "v {v}");
    }
}

/// The AVX-512 forward's `2^t` against f64: relative error under 1.7e-7 where the result is
/// normal, gradual underflow (within two ulps of the subnormal result, then exactly 0), and
/// the edges: `-inf` and huge negatives give 0, 0 gives 1, NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_forward_pow2_is_accurate() {
    if !Isa::available().contains(&Isa::Avx512) {
        return;
    }
    let mut t: Vec<f32> = (0..=1_600_000).map(|k| -160.0 + k as f32 * 1e-4).collect();
    // Every f32 in [-1/2, 1/2] at a stride, and the points where the rounding of `t` ties.
    t.extend((0..200_000).map(|k| -0.5 + k as f32 * 5e-6));
    t.extend((-200..=1).map(|k| k as f32 + 0.5));
    let special = [
        f32::NEG_INFINITY,
        -1e30,
        -3.0e38,
        -1000.0,
        -151.0,
        -150.0,
        -149.0,
        -126.0,
        -0.0,
        0.0,
        1e-30,
        f32::NAN,
    ];
    t.extend(special);
    while !t.len().is_multiple_of(16) {
        t.push(0.0);
    }
    // SAFETY: the CPU has the AVX-512 kernels' features (`Isa::available`).
    let got = unsafe { super::avx512::pow2_all(&t) };
    let mut worst = 0.0f64;
    for (&t, &y) in t.iter().zip(&got) {
        if t.is_nan() {
            assert!(y.is_nan(), "2^NaN = {y}");
            continue;
        }
        let want = 2f64.powf(f64::from(t));
        if want >= f64::from(f32::MIN_POSITIVE) {
            let rel = (f64::from(y) / want - 1.0).abs();
            worst = worst.max(rel);
            assert!(rel < 1.7e-7, "2^{t} = {y}, want {want}: {rel:e}");
        } else {
            // Subnormal or 0: the polynomial's error and one rounding, within two ulps of
            // the subnormals (2^-149).
            assert!(
                (f64::from(y) - want).abs() <= 2f64.powi(-148),
                "2^{t} = {y:e}, want {want:e}"
            );
        }
    }
    eprintln!("avx512 forward 2^t: worst relative error {worst:e}");
    let at = |v: f32| {
        let k = t.iter().position(|&u| u.to_bits() == v.to_bits());
        got[k.expect("a special value")]
    };
    for v in [f32::NEG_INFINITY, -1e30, -3.0e38, -1000.0, -151.0] {
        assert_eq!(at(v).to_bits(), 0, "2^{v}");
    }
    assert_eq!(at(0.0), 1.0);
    assert_eq!(at(-0.0), 1.0);
}

/// The forward (no stored exponential: the AVX-512 kernel's own exponential) of every
/// implementation against the f64 oracle, on every row length up to 70 and around the
/// 32 / 64 steps and the 4096 blocks, with the maximum near 0, large, negative and above
/// 65536 (the AVX-512 kernel's two forms of `t`), label smoothing and z-loss; and rows
/// with `-inf` logits among finite ones.
fn forward_matches_oracle<T: RowElem>(offsets: &[f32]) {
    let lengths = (1usize..=70).chain([
        95, 96, 97, 127, 128, 129, 4063, 4095, 4096, 4097, 4127, 4159, 8193, 9000,
    ]);
    for (case, v) in lengths.enumerate() {
        for &offset in offsets {
            for (eps, z) in [(0.0f32, 0.0f32), (0.1, 1e-4)] {
                let seed = case as u64 * 13 + 5;
                let mut xs: Vec<T> = values(v, seed, 6.0, offset)
                    .into_iter()
                    .map(T::narrow)
                    .collect();
                if case % 4 == 1 && v > 2 {
                    // A few -inf logits (never the target's): exp gives exactly 0.
                    for j in (1..v).step_by(7) {
                        xs[j] = T::narrow(f32::NEG_INFINITY);
                    }
                }
                let t = if case % 4 == 1 {
                    0
                } else {
                    (seed as usize * 31) % v
                };
                let wide: Vec<f64> = xs.iter().map(|&a| f64::from(a.widen())).collect();
                let p = params(v, eps, z);
                if eps != 0.0 && wide.iter().any(|a| a.is_infinite()) {
                    // Label smoothing over a -inf logit: an infinite loss.
                    continue;
                }
                let m = wide.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + wide.iter().map(|&a| (a - m).exp()).sum::<f64>().ln();
                let (eps64, z64) = (f64::from(eps), f64::from(z));
                let mut want = (1.0 - eps64) * (lse - wide[t]) + z64 * lse * lse;
                if eps != 0.0 {
                    want += eps64 * (lse - wide.iter().sum::<f64>() / v as f64);
                }
                for isa in Isa::available() {
                    let got = f64::from(super::row_forward(&p, &xs, t as i64, isa));
                    // Half an ulp of the loss and of the maximum (the loss is `m - x_t +
                    // log s` in f32), and 4e-7 of log s (the terms' and the sum's errors).
                    let tol = (want.abs() + (1.0 + 2.0 * f64::from(z) * m.abs()) * m.abs())
                        * 2f64.powi(-23)
                        + 4e-7;
                    assert!(
                        (got - want).abs() <= tol,
                        "v {v} offset {offset} eps {eps} z {z} {isa:?}: loss {got} want {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn forward_f32_matches_oracle() {
    forward_matches_oracle::<f32>(&[0.0, 300.0, -50.0, 70_000.0, -1.0e6]);
}

#[test]
fn forward_bf16_matches_oracle() {
    forward_matches_oracle::<bf16>(&[0.0, 300.0, -50.0, 70_000.0, -1.0e6]);
}

#[test]
fn forward_f16_matches_oracle() {
    forward_matches_oracle::<f16>(&[0.0, 300.0, -50.0, 20_000.0]);
}

/// The forward on rows of `-inf` (all, or all but one logit), NaN at every position class,
/// out-of-range and ignored targets: MLX's answers from every implementation.
#[test]
fn forward_special_rows() {
    let v = 4096 + 37;
    let p = params(v, 0.0, 0.0);
    for isa in Isa::available() {
        let all = vec![f32::NEG_INFINITY; v];
        assert!(
            super::row_forward(&p, &all, 3, isa).is_nan(),
            "{isa:?} all -inf"
        );
        for pos in [0usize, 15, 16, 31, 32, 63, 64, 4095, 4096, 4100, v - 1] {
            let mut x = vec![f32::NEG_INFINITY; v];
            x[pos] = 2.0;
            let at_max = super::row_forward(&p, &x, pos as i64, isa);
            assert!(at_max.abs() < 3e-7, "{isa:?} {pos}: {at_max}");
            let other = ((pos + 1) % v) as i64;
            assert_eq!(
                super::row_forward(&p, &x, other, isa),
                f32::INFINITY,
                "{isa:?} {pos}"
            );
            let mut x = values(v, 9, 6.0, 0.0);
            x[pos] = f32::NAN;
            assert!(
                super::row_forward(&p, &x, 3, isa).is_nan(),
                "{isa:?} NaN at {pos}"
            );
        }
        let x = values(v, 9, 6.0, 0.0);
        assert!(
            super::row_forward(&p, &x, v as i64, isa).is_nan(),
            "{isa:?}"
        );
        assert!(
            super::row_forward(&p, &x, -(v as i64) - 1, isa).is_nan(),
            "{isa:?}"
        );
        assert!(super::row_forward(&p, &x, -1, isa).is_finite(), "{isa:?}");
        assert_eq!(super::row_forward(&p, &x, -100, isa), 0.0, "{isa:?}");
    }
}

/// The forward on rows whose maximum rises across blocks or within the first block by more
/// than the AVX-512 one-pass block keeps (a block taken again against its own maximum), by
/// less (kept, the sum rescaled), with `-inf` or NaN in the first elements or a `+inf` in
/// a later block: every implementation against the f64 oracle.
#[test]
fn forward_rising_maxima() {
    let v = 3 * 4096 + 100;
    let p = params(v, 0.0, 0.0);
    let cases: Vec<(&str, Vec<(usize, f32)>)> = vec![
        ("no rise", vec![]),
        ("first block, +2.5 late", vec![(4000, 2.5 + 8.0)]),
        ("first block, +30 late", vec![(3000, 40.0)]),
        ("second block, +3", vec![(5000, 11.0)]),
        ("third block, +60", vec![(9000, 70.0)]),
        ("third block tail, +50", vec![(v - 3, 60.0)]),
        ("row tail, +200", vec![(v - 1, 210.0)]),
        ("two rises", vec![(4500, 15.0), (8500, 30.0)]),
        (
            "head of -inf",
            (0..32).map(|j| (j, f32::NEG_INFINITY)).collect(),
        ),
        ("first element -inf", vec![(0, f32::NEG_INFINITY)]),
    ];
    for (what, edits) in cases {
        for offset in [0.0f32, -400.0, 1000.0] {
            // Values in about [-8, 8] + offset: each block's maximum is near offset + 8.
            let mut x = values(v, 21, 2.0, offset);
            for &(j, y) in &edits {
                x[j] = if y.is_finite() { y + offset } else { y };
            }
            let wide: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
            for t in [40usize, 5000] {
                let m = wide.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + wide.iter().map(|&a| (a - m).exp()).sum::<f64>().ln();
                let want = lse - wide[t];
                for isa in Isa::available() {
                    let got = f64::from(super::row_forward(&p, &x, t as i64, isa));
                    let tol = (want.abs() + m.abs()) * 2f64.powi(-23) + 4e-7;
                    assert!(
                        (got - want).abs() <= tol,
                        "{what}, offset {offset}, target {t}, {isa:?}: {got} want {want}"
                    );
                }
            }
        }
    }
    // NaN in the first elements, +inf in a later block: NaN, and the +inf maximum's loss.
    for isa in Isa::available() {
        let mut x = values(v, 22, 2.0, 0.0);
        x[1] = f32::NAN;
        assert!(super::row_forward(&p, &x, 40, isa).is_nan(), "{isa:?}");
        let mut x = values(v, 22, 2.0, 0.0);
        x[9000] = f32::INFINITY;
        assert_eq!(
            super::row_forward(&p, &x, 40, isa),
            f32::INFINITY,
            "{isa:?}"
        );
        assert!(super::row_forward(&p, &x, 9000, isa).is_nan(), "{isa:?}");
    }
}
