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
