//! `fast::rope` against the float64 oracle: MLX's test_fast.py rope cases (spec §11.1), layouts,
//! offsets, pass-through exactness, every error message, and a property test.

mod common;

use common::{check_close, max_abs_diff, randn, uniform};
use ferrofast::fast::{self, RopeOffset, RopeOptions};
use ferrofast::{reference, Array, DType, Error};
use proptest::prelude::*;

const LOW_PRECISION: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` against the exact oracle.
///
/// MLX's own tolerances (absolute: f32 1e-6, f16 1e-3, bf16 1e-2) compare with a reference
/// computed in the same precision on inputs in [0, 1). Against exact f64 math on inputs of
/// any size, two terms are added: the final rounding to the output dtype (half an ulp,
/// relative: `rtol`), and the f32 angle, which is off by up to ~2 ulp(theta) (rounding of the
/// position product and of the f32 inverse frequency) and moves an output by that much times
/// `|x|`, so the bound grows with `max_theta * max|x|`.
fn tol(dtype: DType, max_theta: f64, max_abs_x: f64) -> (f64, f64) {
    let angle = 4.0 * f64::from(f32::EPSILON) * max_theta.max(1.0) * max_abs_x;
    match dtype {
        DType::F64 => (1e-12 * (1.0 + max_theta) * max_abs_x, 0.0),
        DType::F32 => (1e-6 + angle, 0.0),
        DType::F16 => (1e-3 + angle, 2f64.powi(-11)),
        _ => (1e-2 + angle, 2f64.powi(-8)),
    }
}

fn max_abs(a: &Array) -> f64 {
    a.to_f64_vec()
        .unwrap()
        .iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// Runs `fast::rope` and the oracle with the same arguments and checks them against each
/// other; returns the fast result. `max_pos` is the largest `|position|` used.
#[allow(clippy::too_many_arguments)]
fn check(
    x: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
    max_inv_freq: f64,
    max_pos: f64,
    what: &str,
) -> Array {
    let out = fast::rope(x, dims, traditional, base, scale, offset, freqs)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let expect = reference::rope(x, dims, traditional, base, scale, offset, freqs).unwrap();
    assert_eq!(out.dtype(), x.dtype(), "{what}: dtype");
    assert_eq!(out.shape(), x.shape(), "{what}: shape");
    assert!(out.is_contiguous(), "{what}: output is row-major");
    let max_theta = f64::from(scale).abs() * max_pos * max_inv_freq;
    let (atol, rtol) = tol(x.dtype(), max_theta, max_abs(x));
    check_close(&out, &expect, atol, rtol, what);
    out
}

fn err(r: ferrofast::Result<Array>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
        Ok(a) => panic!("expected an error, got an array of shape {:?}", a.shape()),
    }
}

fn i32s(v: &[i32]) -> Array {
    Array::from_slice(v, &[v.len()]).unwrap()
}

// ----- MLX test_fast.py -------------------------------------------------------------------

#[test]
fn test_rope_sweep() {
    // x (2, 4, 8), dims 8: base x dtype x offset x scale x traditional, uniform [0, 1) as MLX.
    let t = 4usize;
    let scalar_three = Array::scalar(3i32);
    let mut seed = 100;
    for base in [10000.0f32, 1e6] {
        for dtype in LOW_PRECISION {
            for (oi, offset) in [
                RopeOffset::Int(0),
                RopeOffset::Int(3),
                RopeOffset::Array(&scalar_three),
            ]
            .into_iter()
            .enumerate()
            {
                for scale in [1.0f32, 2.0] {
                    for traditional in [false, true] {
                        seed += 1;
                        let x = uniform(&[2, t, 8], 0.0, 1.0, dtype, seed);
                        let max_pos = (t - 1 + if oi == 0 { 0 } else { 3 }) as f64;
                        let what = format!(
                            "base {base} {dtype} offset #{oi} scale {scale} \
                             traditional {traditional} seed {seed}"
                        );
                        let out = check(
                            &x,
                            8,
                            traditional,
                            Some(base),
                            scale,
                            offset,
                            None,
                            1.0,
                            max_pos,
                            &what,
                        );
                        if dtype != DType::F32 {
                            // Low precision also against f32 on the same (rounded) input.
                            let x32 = x.astype(DType::F32).unwrap();
                            let out32 =
                                fast::rope(&x32, 8, traditional, Some(base), scale, offset, None)
                                    .unwrap();
                            let tol = if dtype == DType::F16 { 1e-3 } else { 1e-2 };
                            let d = max_abs_diff(&out, &out32);
                            assert!(d <= tol, "{what}: vs f32 differs by {d}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn test_rope_transposed_input() {
    // (1, 1, 4, 8).swapaxes(1, 2): four heads of one position each, read in place.
    for dtype in LOW_PRECISION {
        for traditional in [false, true] {
            for offset in [0i64, 3] {
                let x = uniform(&[1, 1, 4, 8], 0.0, 1.0, dtype, 7)
                    .swapaxes(1, 2)
                    .unwrap();
                assert!(!x.is_contiguous() || x.shape()[2] == 1);
                check(
                    &x,
                    8,
                    traditional,
                    Some(10000.0),
                    1.0,
                    offset.into(),
                    None,
                    1.0,
                    offset as f64,
                    &format!("transposed {dtype} trad {traditional} offset {offset}"),
                );
            }
        }
    }
}

#[test]
fn test_rope_int_input_raises() {
    let x = Array::full(&[2, 4, 8], 1.0, DType::I32, &ferrofast::Device::Cpu).unwrap();
    assert_eq!(
        err(fast::rope(&x, 8, false, Some(10000.0), 1.0, 0.into(), None)),
        "[rope] Input must be a floating type but got int32."
    );
}

#[test]
fn test_rope_dims_validation() {
    let x = randn(&[1, 4, 64], DType::F32, 3);
    let call = |dims| fast::rope(&x, dims, false, Some(10000.0), 1.0, 0.into(), None);
    assert_eq!(err(call(0)), "[rope] dims must be positive but got 0.");
    assert_eq!(err(call(-2)), "[rope] dims must be positive but got -2.");
    assert_eq!(err(call(7)), "[rope] dims must be even but got 7.");
    assert_eq!(
        err(call(128)),
        "[rope] dims must not exceed the input's last dimension (64) but got 128."
    );
    for dims in [32, 64] {
        for traditional in [false, true] {
            check(
                &x,
                dims,
                traditional,
                Some(10000.0),
                1.0,
                0.into(),
                None,
                1.0,
                3.0,
                &format!("dims {dims}"),
            );
        }
    }
}

#[test]
fn test_rope_with_freqs() {
    let dims = 8;
    let x = uniform(&[2, 4, dims], 0.0, 1.0, DType::F32, 11);
    let bad = [
        uniform(&[dims - 1], 0.0, 1.0, DType::F32, 12),
        uniform(&[1, dims], 0.0, 1.0, DType::F32, 13),
    ];
    let expected = [
        "[rope] freqs must be one dimensional with size 4 but got shape (7).",
        "[rope] freqs must be one dimensional with size 4 but got shape (1,8).",
    ];
    for (f, msg) in bad.iter().zip(expected) {
        assert_eq!(
            err(fast::rope(
                &x,
                dims as i32,
                false,
                None,
                1.0,
                0.into(),
                Some(f)
            )),
            msg
        );
    }
    // Periods in [0.5, 1.5): inverse frequencies up to 2.
    let freqs = uniform(&[dims / 2], 0.5, 1.5, DType::F32, 14);
    let max_inv = 2.0;
    for dtype in LOW_PRECISION {
        for traditional in [false, true] {
            for (offset, scale) in [(0i64, 1.0f32), (2, 1.0), (2, 2.0)] {
                let x = uniform(&[2, 4, dims], 0.0, 1.0, dtype, 15);
                let what = format!("freqs {dtype} trad {traditional} offset {offset}");
                check(
                    &x,
                    dims as i32,
                    traditional,
                    None,
                    scale,
                    offset.into(),
                    Some(&freqs),
                    max_inv,
                    (3 + offset) as f64,
                    &what,
                );
                // The single vector case (1, 1, dims).
                let v = uniform(&[1, 1, dims], 0.0, 1.0, dtype, 16);
                check(
                    &v,
                    dims as i32,
                    traditional,
                    None,
                    scale,
                    offset.into(),
                    Some(&freqs),
                    max_inv,
                    offset as f64,
                    &format!("{what} single vector"),
                );
            }
        }
    }
}

#[test]
fn test_rope_freqs_integer_and_f64_dtypes_are_read() {
    // MLX casts freqs to float32: integer periods work.
    let x = randn(&[1, 3, 5, 16], DType::F32, 17);
    let freqs = Array::from_slice(&[1i32, 2, 4, 8, 16, 32, 64, 128], &[8]).unwrap();
    check(
        &x,
        16,
        false,
        None,
        1.0,
        1.into(),
        Some(&freqs),
        1.0,
        5.0,
        "int freqs",
    );
    let freqs = freqs.astype(DType::F64).unwrap();
    check(
        &x.astype(DType::F64).unwrap(),
        16,
        true,
        None,
        1.0,
        1.into(),
        Some(&freqs),
        1.0,
        5.0,
        "f64 freqs, f64 input",
    );
}

#[test]
fn test_rope_batch() {
    let x = randn(&[8, 4, 4, 32], DType::F32, 18);
    let offsets = i32s(&[0, 1, 2]);
    assert_eq!(
        err(fast::rope(
            &x,
            32,
            true,
            Some(10000.0),
            1.0,
            (&offsets).into(),
            None
        )),
        "[rope] offset must be a scalar or vector with 8 elements but has shape (3)."
    );
    let mut seed = 200;
    for b in [3usize, 8, 11] {
        for h in [1usize, 3, 5] {
            seed += 1;
            let x = randn(&[b, h, 4, 32], DType::F32, seed);
            let offsets = i32s(&(0..b as i32).collect::<Vec<_>>());
            let max_pos = (b + 2) as f64;
            for traditional in [true, false] {
                check(
                    &x,
                    32,
                    traditional,
                    Some(10000.0),
                    1.0,
                    (&offsets).into(),
                    None,
                    1.0,
                    max_pos,
                    &format!("batch {b} heads {h} trad {traditional} seed {seed}"),
                );
            }
        }
    }
    // [B, T, H, D] memory seen as [B, H, T, D].
    let x = randn(&[2, 6, 8, 64], DType::F32, 19)
        .transpose(&[0, 2, 1, 3])
        .unwrap();
    let offsets = i32s(&[0, 1]);
    for traditional in [true, false] {
        check(
            &x,
            64,
            traditional,
            Some(10000.0),
            1.0,
            (&offsets).into(),
            None,
            1.0,
            6.0,
            &format!("(2,6,8,64).transpose(0,2,1,3) trad {traditional}"),
        );
    }
}

#[test]
fn test_rope_single_batch() {
    // (B, H, 1, D) with a scalar offset: every head of every example at position 5.
    let mut seed = 300;
    for b in [2usize, 4, 8] {
        for h in [1usize, 4, 7] {
            for d in [64usize, 128] {
                for traditional in [false, true] {
                    seed += 1;
                    let x = randn(&[b, h, 1, d], DType::F32, seed);
                    check(
                        &x,
                        d as i32,
                        traditional,
                        Some(10000.0),
                        1.0,
                        5.into(),
                        None,
                        1.0,
                        5.0,
                        &format!("single ({b},{h},1,{d}) trad {traditional} seed {seed}"),
                    );
                }
            }
        }
    }
}

#[test]
fn test_rope_with_large_offset() {
    let x = randn(&[1, 1, 1024, 32], DType::F32, 20);
    let xb = x.astype(DType::BF16).unwrap();
    let max_pos = 4000.0 + 1023.0;
    let out = check(
        &x,
        32,
        false,
        Some(10000.0),
        1.0,
        4000.into(),
        None,
        1.0,
        max_pos,
        "offset 4000 f32",
    );
    let outb = check(
        &xb,
        32,
        false,
        Some(10000.0),
        1.0,
        4000.into(),
        None,
        1.0,
        max_pos,
        "offset 4000 bf16",
    );
    let d = max_abs_diff(&out, &outb.astype(DType::F32).unwrap());
    assert!(d <= 1e-1, "bf16 vs f32 differ by {d}");
}

/// MLX skips this one in CI (256 MiB of input); run with `--ignored`.
#[test]
#[ignore]
fn test_rope_large_input() {
    let x = randn(&[8, 8192, 32, 32], DType::F32, 37)
        .swapaxes(1, 2)
        .unwrap();
    for traditional in [false, true] {
        let out = fast::rope(&x, 32, traditional, Some(10000.0), 1.0, 0.into(), None).unwrap();
        let expect =
            reference::rope(&x, 32, traditional, Some(10000.0), 1.0, 0.into(), None).unwrap();
        let d = max_abs_diff(&out, &expect);
        assert!(d <= 5e-3, "large input trad {traditional}: {d}");
    }
}

// ----- sizes, dtypes, layouts ----------------------------------------------------------------

#[test]
fn odd_sizes_and_dims_below_d_in_all_dtypes() {
    let mut seed = 400;
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        for (shape, dims) in [
            (vec![1usize, 1, 1, 2], 2),
            (vec![2, 3, 31, 34], 32),
            (vec![1, 2, 33, 66], 2),
            (vec![3, 5, 7, 128], 96),
            (vec![1, 1, 4099, 8], 8),
            (vec![2, 17, 64], 16),
        ] {
            for traditional in [false, true] {
                seed += 1;
                let x = randn(&shape, dtype, seed);
                let max_pos = (shape[shape.len() - 2] + 9) as f64;
                check(
                    &x,
                    dims,
                    traditional,
                    Some(10000.0),
                    0.5,
                    10.into(),
                    None,
                    1.0,
                    max_pos,
                    &format!("{dtype} {shape:?} dims {dims} trad {traditional} seed {seed}"),
                );
            }
        }
    }
}

/// The features `dims..D` are copied bit for bit, special values included.
#[test]
fn pass_through_tail_is_bit_identical() {
    let specials = [
        f64::NAN,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e-40,
        -3.0e38,
        65504.0,
        1.0 / 3.0,
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let (b, h, t, d, dims) = (2usize, 3usize, 5usize, 24usize, 16usize);
        let mut vals = randn(&[b, h, t, d], DType::F64, 21).to_f64_vec().unwrap();
        for (i, v) in vals.iter_mut().enumerate() {
            if i % d >= dims {
                *v = specials[i % specials.len()];
            }
        }
        let x = Array::from_vec(vals, &[b, h, t, d])
            .unwrap()
            .astype(dtype)
            .unwrap();
        for traditional in [false, true] {
            let out = fast::rope(
                &x,
                dims as i32,
                traditional,
                Some(500.0),
                1.0,
                3.into(),
                None,
            )
            .unwrap();
            let bits = |a: &Array| -> Vec<u64> {
                match dtype {
                    DType::F32 => a
                        .to_vec::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits() as u64)
                        .collect(),
                    DType::F16 => a
                        .to_vec::<ferrofast::f16>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits() as u64)
                        .collect(),
                    DType::BF16 => a
                        .to_vec::<ferrofast::bf16>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits() as u64)
                        .collect(),
                    _ => a
                        .to_vec::<f64>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                }
            };
            let (xb, ob) = (bits(&x), bits(&out));
            for i in (0..xb.len()).filter(|i| i % d >= dims) {
                assert_eq!(xb[i], ob[i], "{dtype} trad {traditional}: tail element {i}");
            }
            // The rotated part is still checked against the oracle (tail excluded: NaN there).
            let rot = |a: &Array| {
                a.slice(&[0, 0, 0, 0], &[2, 3, 5, dims as isize], &[1, 1, 1, 1])
                    .unwrap()
            };
            let expect = reference::rope(
                &x,
                dims as i32,
                traditional,
                Some(500.0),
                1.0,
                3.into(),
                None,
            )
            .unwrap();
            let (atol, rtol) = tol(dtype, 8.0, max_abs(&rot(&x)));
            check_close(
                &rot(&out),
                &rot(&expect),
                atol,
                rtol,
                &format!("{dtype} rotated part"),
            );
        }
    }
}

/// NaNs of either sign in rotated features make their pair NaN and nothing else.
#[test]
fn nans_propagate_through_their_pair() {
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let mut vals = randn(&[2, 2, 3, 16], DType::F64, 36).to_f64_vec().unwrap();
        vals[5] = f64::NAN;
        vals[40] = -f64::NAN;
        let x = Array::from_vec(vals, &[2, 2, 3, 16])
            .unwrap()
            .astype(dtype)
            .unwrap();
        for traditional in [false, true] {
            let out = check(
                &x,
                16,
                traditional,
                Some(10000.0),
                1.0,
                1.into(),
                None,
                1.0,
                3.0,
                &format!("NaN {dtype} trad {traditional}"),
            );
            let nans = out
                .to_f64_vec()
                .unwrap()
                .iter()
                .filter(|v| v.is_nan())
                .count();
            assert_eq!(nans, 4, "{dtype} trad {traditional}: two pairs are NaN");
        }
    }
}

#[test]
fn non_contiguous_inputs_are_read_in_place() {
    let base = randn(&[3, 4, 10, 40], DType::F32, 22);
    let views: Vec<(&str, Array)> = vec![
        (
            "every other position, reversed heads",
            base.slice(&[0, 3, 0, 0], &[3, -5, 10, 40], &[1, -1, 2, 1])
                .unwrap(),
        ),
        (
            "feature slice (row stride 40, D 32)",
            base.slice(&[0, 0, 0, 4], &[3, 4, 10, 36], &[1, 1, 1, 1])
                .unwrap(),
        ),
        (
            "strided features (stride 2)",
            base.slice(&[0, 0, 0, 0], &[3, 4, 10, 40], &[1, 1, 1, 2])
                .unwrap(),
        ),
        (
            "positions and features swapped (feature stride 40)",
            base.swapaxes(2, 3).unwrap(),
        ),
        ("batch and heads swapped", base.swapaxes(0, 1).unwrap()),
        (
            "reversed positions",
            base.slice(&[0, 0, -1, 0], &[3, 4, -11, 40], &[1, 1, -1, 1])
                .unwrap(),
        ),
        (
            "broadcast over heads",
            base.slice(&[0, 0, 0, 0], &[3, 1, 10, 40], &[1, 1, 1, 1])
                .unwrap()
                .broadcast_to(&[3, 6, 10, 40])
                .unwrap(),
        ),
    ];
    for (what, x) in &views {
        let dims = (x.shape()[3] / 2 * 2).min(32) as i32;
        let offsets = i32s(&vec![5; x.shape()[0]][..]);
        for traditional in [false, true] {
            for offset in [RopeOffset::Int(-2), RopeOffset::Array(&offsets)] {
                check(
                    x,
                    dims,
                    traditional,
                    Some(10000.0),
                    1.0,
                    offset,
                    None,
                    1.0,
                    45.0,
                    &format!("{what} trad {traditional}"),
                );
            }
        }
    }
}

#[test]
fn three_and_five_dimensional_inputs() {
    let x3 = randn(&[4, 19, 48], DType::F32, 23);
    let offsets = i32s(&[0, 7, 100, -3]);
    for traditional in [false, true] {
        check(
            &x3,
            48,
            traditional,
            Some(10000.0),
            1.0,
            (&offsets).into(),
            None,
            1.0,
            118.0,
            "3-D per batch",
        );
    }
    // 5-D with head axes whose strides do not merge into one.
    let x5 = randn(&[2, 5, 3, 9, 32], DType::BF16, 24)
        .transpose(&[0, 2, 1, 3, 4])
        .unwrap();
    let offsets = i32s(&[4, 9]);
    for traditional in [false, true] {
        for offset in [RopeOffset::Int(6), RopeOffset::Array(&offsets)] {
            check(
                &x5,
                16,
                traditional,
                Some(10000.0),
                1.5,
                offset,
                None,
                1.0,
                20.0,
                "5-D transposed heads",
            );
        }
    }
}

#[test]
fn large_parallel_inputs_match() {
    // Big enough to run on the pool, with per-batch and scalar offsets.
    let x = randn(&[3, 8, 300, 64], DType::BF16, 25);
    let offsets = i32s(&[0, 1000, 17]);
    for traditional in [false, true] {
        for offset in [RopeOffset::Int(12), RopeOffset::Array(&offsets)] {
            check(
                &x,
                64,
                traditional,
                Some(10000.0),
                1.0,
                offset,
                None,
                1.0,
                1300.0,
                "parallel bf16",
            );
        }
    }
    let xt = randn(&[2, 512, 4, 128], DType::F32, 26)
        .swapaxes(1, 2)
        .unwrap();
    check(
        &xt,
        128,
        false,
        Some(500000.0),
        1.0,
        7.into(),
        None,
        1.0,
        519.0,
        "parallel [B,T,H,D] layout",
    );
}

/// Exactly representable angles (inverse frequencies 1, 2, 4, 8 and integer positions) let
/// the f32 path be checked tightly even at very large angles.
#[test]
fn large_angles_are_accurate() {
    let periods = Array::from_slice(&[1.0f32, 0.5, 0.25, 0.125], &[4]).unwrap();
    let x = uniform(&[6, 1, 1, 8], -1.0, 1.0, DType::F32, 27);
    let offsets = i32s(&[0, 1, 123_457, 1 << 20, 3 << 22, 16_000_000]);
    for traditional in [false, true] {
        let out = fast::rope(
            &x,
            8,
            traditional,
            None,
            1.0,
            (&offsets).into(),
            Some(&periods),
        )
        .unwrap();
        let expect = reference::rope(
            &x,
            8,
            traditional,
            None,
            1.0,
            (&offsets).into(),
            Some(&periods),
        )
        .unwrap();
        check_close(&out, &expect, 1e-6, 0.0, "exact large angles");
    }
}

#[test]
fn negative_offsets() {
    let x = randn(&[2, 3, 7, 16], DType::F32, 28);
    let offsets = i32s(&[-3, 7]);
    for traditional in [false, true] {
        for offset in [RopeOffset::Int(-5), RopeOffset::Array(&offsets)] {
            check(
                &x,
                16,
                traditional,
                Some(10000.0),
                1.0,
                offset,
                None,
                1.0,
                13.0,
                "negative offsets",
            );
        }
    }
    // Rotating back with the negated scale (same negative offset) restores the input.
    for traditional in [false, true] {
        let a = fast::rope(&x, 16, traditional, Some(10000.0), 1.0, (-5).into(), None).unwrap();
        let b = fast::rope(&a, 16, traditional, Some(10000.0), -1.0, (-5).into(), None).unwrap();
        let d = max_abs_diff(&b, &x);
        assert!(d <= 1e-5, "round trip differs by {d}");
    }
}

#[test]
fn f64_inputs_compute_in_f64() {
    let x = randn(&[2, 3, 50, 64], DType::F64, 29);
    let offsets = i32s(&[3, 90000]);
    for traditional in [false, true] {
        for offset in [RopeOffset::Int(1_000_000), RopeOffset::Array(&offsets)] {
            let out = fast::rope(&x, 64, traditional, Some(10000.0), 1.0, offset, None).unwrap();
            let expect =
                reference::rope(&x, 64, traditional, Some(10000.0), 1.0, offset, None).unwrap();
            assert_eq!(out.dtype(), DType::F64);
            check_close(&out, &expect, 1e-9, 0.0, "f64");
        }
    }
}

// ----- offsets ----------------------------------------------------------------------------

#[test]
fn offset_dtypes_follow_mlx() {
    let x = randn(&[2, 2, 5, 16], DType::F32, 30);
    let run = |o: RopeOffset<'_>| fast::rope(&x, 16, false, Some(10000.0), 1.0, o, None).unwrap();
    let same = |a: &Array, b: &Array, what: &str| {
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "{what}"
        )
    };
    // Scalars: int, 0-d and 1-element arrays of every integer dtype.
    let by_int = run(RopeOffset::Int(200));
    for a in [
        Array::scalar(200i32),
        Array::from_slice(&[200i32], &[1]).unwrap(),
        Array::scalar(200u8),
        Array::scalar(200u32),
        Array::scalar(200i64),
    ] {
        same(&run((&a).into()), &by_int, &format!("{} offset", a.dtype()));
    }
    same(&run(200i32.into()), &by_int, "From<i32>");
    // int64 values are cast to int32 as a C cast: 2^32 + 200 wraps to 200.
    let wide = Array::scalar((1i64 << 32) + 200);
    same(&run((&wide).into()), &by_int, "int64 wraps");
    // Per batch, each dtype.
    let expect = run((&i32s(&[3, 250])).into());
    for a in [
        Array::from_slice(&[3u8, 250], &[2]).unwrap(),
        Array::from_slice(&[3u32, 250], &[2]).unwrap(),
        Array::from_slice(&[3i64, 250], &[2]).unwrap(),
    ] {
        same(
            &run((&a).into()),
            &expect,
            &format!("{} per-batch", a.dtype()),
        );
    }
    // uint32 is kept as is (not reinterpreted as a negative int32).
    let big = Array::from_slice(&[3u32, 3_000_000_000], &[2]).unwrap();
    let out = run((&big).into());
    let want = reference::rope(&x, 16, false, Some(10000.0), 1.0, (&big).into(), None).unwrap();
    // At position 3e9 the f32 angle is only known to ~256 radians: check the first example
    // exactly and the second for being finite and of the same norm.
    let (o, w) = (out.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
    let half = o.len() / 2;
    for i in 0..half {
        assert!((o[i] - w[i]).abs() <= 2e-6, "uint32 offset element {i}");
    }
    assert!(o[half..].iter().all(|v| v.is_finite()));
}

#[test]
fn offset_errors() {
    let x = randn(&[2, 2, 5, 16], DType::F32, 31);
    let call = |o: &Array| fast::rope(&x, 16, false, Some(10000.0), 1.0, o.into(), None);
    let f = Array::scalar(3.0f32);
    assert_eq!(
        err(call(&f)),
        "[rope] offset must be an integer but got type float32."
    );
    assert_eq!(
        err(call(&Array::scalar(true))),
        "[rope] offset must be an integer but got type bool."
    );
    assert_eq!(
        err(call(&i32s(&[1, 2, 3]))),
        "[rope] offset must be a scalar or vector with 2 elements but has shape (3)."
    );
    assert_eq!(
        err(call(&Array::from_slice(&[1i32, 2], &[1, 2]).unwrap())),
        "[rope] offset must have at most one dimension but has shape (1,2)."
    );
    assert_eq!(
        err(call(&Array::from_slice(&[1i32], &[1, 1]).unwrap())),
        "[rope] offset must have at most one dimension but has shape (1,1)."
    );
    assert_eq!(
        err(call(&Array::from_slice::<i32>(&[], &[0]).unwrap())),
        "[rope] offset must be a scalar or vector with 2 elements but has shape (0)."
    );
    // Size is checked before dtype, as in MLX.
    assert_eq!(
        err(call(&Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]).unwrap())),
        "[rope] offset must be a scalar or vector with 2 elements but has shape (3)."
    );
}

// ----- remaining validation -------------------------------------------------------------------

#[test]
fn input_and_frequency_errors() {
    let x2 = randn(&[2, 8], DType::F32, 32);
    assert_eq!(
        err(fast::rope(
            &x2,
            8,
            false,
            Some(10000.0),
            1.0,
            0.into(),
            None
        )),
        "[rope] Input must have at least 3 dimensions but got input with 2 dimensions."
    );
    let x = randn(&[1, 2, 8], DType::F32, 33);
    let freqs = uniform(&[4], 1.0, 2.0, DType::F32, 34);
    assert_eq!(
        err(fast::rope(
            &x,
            8,
            false,
            Some(10000.0),
            1.0,
            0.into(),
            Some(&freqs)
        )),
        "[rope] Only one of base or freqs can have a value."
    );
    assert_eq!(
        err(fast::rope(&x, 8, false, None, 1.0, 0.into(), None)),
        "[rope] Neither base nor freqs has a value."
    );
    // Order: rank before dtype before offset before dims before freqs.
    let xi = Array::full(&[2, 8], 1.0, DType::I32, &ferrofast::Device::Cpu).unwrap();
    assert!(err(fast::rope(&xi, 7, false, None, 1.0, 0.into(), None)).contains("at least 3"));
    let xi3 = Array::full(&[2, 2, 8], 1.0, DType::I32, &ferrofast::Device::Cpu).unwrap();
    assert!(err(fast::rope(&xi3, 7, false, None, 1.0, 0.into(), None)).contains("floating"));
    let fo = Array::scalar(1.0f32);
    assert!(err(fast::rope(&x, 7, false, None, 1.0, (&fo).into(), None)).contains("offset"));
    assert!(err(fast::rope(&x, 7, false, None, 1.0, 0.into(), Some(&x))).contains("even"));
    assert!(err(fast::rope(&x, 8, false, None, 1.0, 0.into(), Some(&x))).contains("freqs must"));
    // The oracle validates the same way.
    assert_eq!(
        reference::rope(&x2, 8, false, Some(10000.0), 1.0, 0.into(), None).unwrap_err(),
        Error::InvalidArgument(
            "[rope] Input must have at least 3 dimensions but got input with 2 dimensions.".into()
        )
    );
}

#[test]
fn empty_inputs_give_empty_outputs() {
    for shape in [[0usize, 2, 3, 8], [2, 0, 3, 8], [2, 2, 0, 8]] {
        let x = Array::zeros(&shape, DType::F32, &ferrofast::Device::Cpu).unwrap();
        let out = fast::rope(&x, 8, false, Some(10000.0), 1.0, 0.into(), None).unwrap();
        assert_eq!(out.shape(), &shape);
    }
}

#[test]
fn options_struct_matches_positional_call() {
    let x = randn(&[2, 3, 9, 32], DType::F32, 35);
    let offsets = i32s(&[1, 4]);
    let opts = RopeOptions {
        traditional: true,
        scale: 0.25,
        offset: (&offsets).into(),
        ..Default::default()
    };
    let a = fast::rope_with(&x, 32, &opts).unwrap();
    let b = fast::rope(&x, 32, true, Some(10000.0), 0.25, (&offsets).into(), None).unwrap();
    assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let d = RopeOptions::default();
    assert!(!d.traditional && d.base == Some(10000.0) && d.scale == 1.0 && d.freqs.is_none());
}

// ----- property test ----------------------------------------------------------------------

/// A random strided view of a fresh array: permuted leading axes, sliced and stepped.
fn random_view(shape: &[usize], dtype: DType, seed: u64, perm_seed: u64, steps: &[isize]) -> Array {
    let n = shape.len();
    // Allocate with the step factor so that stepping gives back `shape`.
    let alloc: Vec<usize> = shape
        .iter()
        .zip(steps)
        .map(|(&d, &s)| d * s.unsigned_abs())
        .collect();
    let mut perm: Vec<usize> = (0..n).collect();
    // Permute the allocation, then undo it with a transpose, so memory order differs from
    // logical order.
    let mut r = perm_seed;
    for i in (1..n).rev() {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        perm.swap(i, (r >> 33) as usize % (i + 1));
    }
    let permuted: Vec<usize> = perm.iter().map(|&p| alloc[p]).collect();
    let base = randn(&permuted, dtype, seed);
    let mut inverse = vec![0isize; n];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i as isize;
    }
    let logical = base.transpose(&inverse).unwrap();
    let (starts, stops): (Vec<isize>, Vec<isize>) = steps
        .iter()
        .map(|&s| {
            if s > 0 {
                (0, isize::MAX)
            } else {
                (-1, isize::MIN)
            }
        })
        .unzip();
    let v = logical.slice(&starts, &stops, steps).unwrap();
    assert_eq!(v.shape(), shape);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prop_matches_oracle(
        ndim in 3usize..=5,
        dims_raw in prop::collection::vec(1usize..=5, 5),
        t in 1usize..=40,
        half in 1usize..=20,
        extra in 0usize..=5,
        steps_raw in prop::collection::vec(prop::sample::select(vec![1isize, 1, 2, -1]), 5),
        traditional in any::<bool>(),
        per_batch in any::<bool>(),
        offset in -50i64..2000,
        scale in prop::sample::select(vec![1.0f32, 0.5, 2.0, -1.0]),
        dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16, DType::F64]),
        seed in any::<u64>(),
    ) {
        let dims = 2 * half;
        let d = dims + extra;
        let mut shape: Vec<usize> = dims_raw[..ndim - 2].to_vec();
        shape.push(t);
        shape.push(d);
        let x = random_view(&shape, dtype, seed, seed ^ 0x5eed, &steps_raw[..ndim]);
        let b = shape[0];
        let offs: Vec<i32> = (0..b as i32).map(|i| offset as i32 + 37 * i).collect();
        let offsets = i32s(&offs);
        let off = if per_batch { RopeOffset::Array(&offsets) } else { RopeOffset::Int(offset) };
        let max_pos = (offset.abs() + 37 * b as i64 + t as i64) as f64;
        check(&x, dims as i32, traditional, Some(10000.0), scale, off, None, 1.0, max_pos,
              &format!("shape {shape:?} strides {:?} dims {dims} seed {seed}", x.strides()));
    }
}

// ----- benchmark (not a test) -------------------------------------------------------------------

/// End-to-end `fast::rope` bandwidth (output allocation included) next to the copy bandwidth
/// measured in the same run, into an existing buffer and into a fresh allocation. Fresh
/// pages fault on first touch; outputs above glibc's largest dynamic mmap threshold (32 MiB)
/// get fresh pages on every call, smaller ones are recycled by the allocator after the first
/// call. Run with `cargo test --release -p ferrofast --test rope bench_rope -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn bench_rope_end_to_end() {
    use std::hint::black_box;
    use std::time::Instant;
    fn best(iters: usize, mut f: impl FnMut()) -> f64 {
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }
    let gbs = |bytes: f64, s: f64| bytes / s / 1e9;
    let n = 64usize << 20;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let copy = best(10, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let alloc_copy = best(5, || {
        black_box(black_box(&src).clone());
    });
    let copy_gbs = gbs(8.0 * n as f64, copy);
    println!(
        "copy 256 MiB f32 (read+write): into an existing buffer {copy_gbs:.1} GB/s, \
         into a fresh allocation {:.1} GB/s",
        gbs(8.0 * n as f64, alloc_copy)
    );
    drop((src, dst));
    for (shape, dtype) in [
        ([1usize, 32, 2048, 128], DType::F32),
        ([1, 32, 2048, 128], DType::BF16),
        ([1, 16, 2048, 128], DType::F32),
    ] {
        let x = randn(&shape, dtype, 1);
        let bytes = 2.0 * x.nbytes() as f64;
        let t = best(20, || {
            black_box(fast::rope(&x, 128, false, Some(10000.0), 1.0, 7.into(), None).unwrap());
        });
        println!(
            "fast::rope {dtype} {shape:?} ({} MiB out): {:.3} ms, {:.1} GB/s, {:.0}% of copy",
            x.nbytes() >> 20,
            t * 1e3,
            gbs(bytes, t),
            100.0 * gbs(bytes, t) / copy_gbs
        );
    }
}
