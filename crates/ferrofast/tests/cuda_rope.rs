//! The CUDA rope kernel against the float64 oracle (`reference::rope`): dtypes, both pair
//! layouts, partial rotation, base and `freqs`, scale, scalar / negative / per-batch offsets,
//! large positions, 3-D to 5-D inputs, in-place strided views and views that need a copy,
//! decode rows, explicit streams and bad arguments. Output buffers are poisoned, so unwritten
//! elements fail. Without a CUDA device each test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use ferrofast::fast::{rope, rope_on, RopeOffset};
use ferrofast::{reference, Array, DType, Device, Error, Stream};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The frequency source of a case, as host values.
#[derive(Clone, Debug)]
enum Freqs {
    Base(f32),
    Periods(Vec<f32>),
}

/// The offsets of a case.
#[derive(Clone, Debug)]
enum Offsets {
    Scalar(i64),
    PerBatch(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Case {
    dims: usize,
    traditional: bool,
    freqs: Freqs,
    scale: f32,
    offsets: Offsets,
}

impl Case {
    fn new(dims: usize) -> Case {
        Case {
            dims,
            traditional: false,
            freqs: Freqs::Base(10000.0),
            scale: 1.0,
            offsets: Offsets::Scalar(0),
        }
    }

    fn largest_position(&self, seq: usize) -> f64 {
        let max_off = match &self.offsets {
            Offsets::Scalar(v) => v.abs(),
            Offsets::PerBatch(v) => v.iter().map(|o| o.abs()).max().unwrap_or(0),
        };
        (seq + max_off as usize) as f64
    }

    fn largest_inv_freq(&self) -> f64 {
        match &self.freqs {
            Freqs::Base(_) => 1.0,
            Freqs::Periods(p) => p
                .iter()
                .map(|v| 1.0 / f64::from(v.abs()))
                .fold(0.0, f64::max),
        }
    }
}

/// `(atol, rtol)` against the exact oracle, as the CPU rope tests: the final rounding to the
/// dtype (rtol) plus the f32 angle's error, ~2 ulp(theta) times |x|, which grows with the
/// largest angle.
fn tol(dtype: DType, max_theta: f64, max_abs_x: f64) -> (f64, f64) {
    let angle = 4.0 * f64::from(f32::EPSILON) * max_theta.max(1.0) * max_abs_x;
    match dtype {
        DType::F32 => (2e-6 + angle, 0.0),
        DType::F16 => (1e-3 + angle, 2f64.powi(-11)),
        _ => (1e-2 + angle, 2f64.powi(-8)),
    }
}

/// Runs the kernel on `dx` (a GPU view built like the host view `x`) and compares with the
/// oracle on `x`; pass-through features must match bit for bit.
fn check_views(x: &Array, dx: &Array, case: &Case, stream: Option<&Stream>, what: &str) {
    let offset_values;
    let offset = match &case.offsets {
        Offsets::Scalar(v) => RopeOffset::Int(*v),
        Offsets::PerBatch(v) => {
            let v32: Vec<i32> = v.iter().map(|&o| o as i32).collect();
            offset_values = Array::from_slice(&v32, &[v32.len()]).unwrap();
            RopeOffset::Array(&offset_values)
        }
    };
    let freq_values;
    let (base, freqs) = match &case.freqs {
        Freqs::Base(b) => (Some(*b), None),
        Freqs::Periods(p) => {
            freq_values = Array::from_slice(p, &[p.len()]).unwrap();
            (None, Some(&freq_values))
        }
    };
    let dims = case.dims as i32;
    let out = match stream {
        None => rope(dx, dims, case.traditional, base, case.scale, offset, freqs),
        Some(s) => rope_on(
            s,
            dx,
            dims,
            case.traditional,
            base,
            case.scale,
            offset,
            freqs,
        ),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), dx.device(), "{what}");
    assert_eq!(out.shape(), x.shape(), "{what}");
    assert_eq!(out.dtype(), x.dtype(), "{what}");
    assert!(out.is_contiguous(), "{what}");
    if let Some(s) = stream {
        assert_eq!(out.stream().as_ref(), Some(s), "{what}");
    }

    let expect =
        reference::rope(x, dims, case.traditional, base, case.scale, offset, freqs).unwrap();

    let xs = x.to_f64_vec().unwrap();
    let max_abs_x = xs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let seq = x.shape()[x.ndim() - 2];
    let max_theta =
        f64::from(case.scale.abs()) * case.largest_position(seq) * case.largest_inv_freq();
    let (atol, rtol) = tol(x.dtype(), max_theta, max_abs_x);
    let host = out.to_device(&Device::Cpu).unwrap();
    common::check_close(&host, &expect, atol, rtol, what);

    let d = x.shape()[x.ndim() - 1];
    let got = host.to_f64_vec().unwrap();
    for (row, (g, w)) in got.chunks(d).zip(xs.chunks(d)).enumerate() {
        assert_eq!(
            &g[case.dims..],
            &w[case.dims..],
            "{what}: pass-through of row {row}"
        );
    }
}

/// Uploads `base`, applies `view` on both sides and checks.
fn check_with(gpu: &Device, base: &Array, view: impl Fn(&Array) -> Array, case: &Case, what: &str) {
    let dbase = base.to_device(gpu).unwrap();
    check_views(&view(base), &view(&dbase), case, None, what);
}

fn check(gpu: &Device, x: &Array, case: &Case, what: &str) {
    check_with(gpu, x, |a| a.clone(), case, what);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn sweep_over_dtypes_modes_bases_scales_and_offsets() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 100;
    for dtype in DTYPES {
        for traditional in [false, true] {
            for base in [10000.0f32, 1e6] {
                for scale in [1.0f32, 0.5, 2.0] {
                    for offset in [0i64, 3, -5] {
                        for (d, dims) in [(16usize, 16usize), (24, 16), (33, 8)] {
                            seed += 1;
                            let x = common::randn(&[2, 3, 7, d], dtype, seed);
                            let case = Case {
                                dims,
                                traditional,
                                freqs: Freqs::Base(base),
                                scale,
                                offsets: Offsets::Scalar(offset),
                            };
                            check(
                                &gpu,
                                &x,
                                &case,
                                &format!("{case:?} D={d} {dtype} seed {seed}"),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn freqs_give_the_periods() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 200;
    for dtype in DTYPES {
        for traditional in [false, true] {
            for (d, dims) in [(8usize, 8usize), (12, 8), (130, 128)] {
                seed += 1;
                let x = common::randn(&[3, 2, 9, d], dtype, seed);
                let periods: Vec<f32> = common::uniform(&[dims / 2], 0.5, 50.0, DType::F32, seed)
                    .to_vec::<f32>()
                    .unwrap();
                let case = Case {
                    traditional,
                    freqs: Freqs::Periods(periods),
                    scale: 1.5,
                    offsets: Offsets::Scalar(4),
                    ..Case::new(dims)
                };
                check(
                    &gpu,
                    &x,
                    &case,
                    &format!("{case:?} D={d} {dtype} seed {seed}"),
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn per_batch_offsets() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 300;
    for dtype in DTYPES {
        for b in [3usize, 8, 11] {
            for heads in [1usize, 3, 5] {
                for traditional in [false, true] {
                    seed += 1;
                    let x = common::randn(&[b, heads, 6, 32], dtype, seed);
                    // arange(B) as MLX's test, shifted to include negative offsets.
                    let offs: Vec<i64> = (0..b as i64).map(|i| 37 * i - 20).collect();
                    let case = Case {
                        traditional,
                        offsets: Offsets::PerBatch(offs),
                        ..Case::new(32)
                    };
                    check(
                        &gpu,
                        &x,
                        &case,
                        &format!("{case:?} H={heads} {dtype} seed {seed}"),
                    );
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn large_positions() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 400;
    for dtype in DTYPES {
        for traditional in [false, true] {
            seed += 1;
            // MLX's test_rope_with_large_offset shape.
            let x = common::randn(&[1, 1, 1024, 32], dtype, seed);
            let case = Case {
                traditional,
                offsets: Offsets::Scalar(4000),
                ..Case::new(32)
            };
            check(&gpu, &x, &case, &format!("{case:?} {dtype} seed {seed}"));
            seed += 1;
            let x = common::randn(&[2, 4, 300, 128], dtype, seed);
            let case = Case {
                traditional,
                offsets: Offsets::PerBatch(vec![1000, 30000]),
                ..Case::new(128)
            };
            check(&gpu, &x, &case, &format!("{case:?} {dtype} seed {seed}"));
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn ranks_three_to_five_and_odd_sizes() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 500;
    let shapes: [(&[usize], usize); 8] = [
        (&[3, 17, 64], 64),
        (&[1, 1, 2], 2),
        (&[2, 31, 34], 32),
        (&[2, 3, 2, 9, 32], 32),
        (&[1, 7, 1, 33, 80], 64),
        (&[2, 5, 33, 4099], 4098),
        (&[2, 8, 2049, 128], 128),
        (&[1, 33, 31, 128], 96),
    ];
    for dtype in DTYPES {
        for (shape, dims) in shapes {
            for traditional in [false, true] {
                seed += 1;
                let x = common::randn(shape, dtype, seed);
                let case = Case {
                    traditional,
                    offsets: Offsets::Scalar(11),
                    ..Case::new(dims)
                };
                check(
                    &gpu,
                    &x,
                    &case,
                    &format!("{case:?} {shape:?} {dtype} seed {seed}"),
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn decode_rows_with_several_batches() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 600;
    for dtype in DTYPES {
        for b in [2usize, 4, 8] {
            for heads in [1usize, 4, 7] {
                for d in [64usize, 128] {
                    for traditional in [false, true] {
                        seed += 1;
                        let x = common::randn(&[b, heads, 1, d], dtype, seed);
                        let case = Case {
                            traditional,
                            offsets: Offsets::Scalar(5),
                            ..Case::new(d)
                        };
                        let what = format!("{case:?} B={b} H={heads} D={d} {dtype} seed {seed}");
                        check(&gpu, &x, &case, &what);
                        let case = Case {
                            offsets: Offsets::PerBatch((0..b as i64).map(|i| 100 * i).collect()),
                            ..case
                        };
                        check(&gpu, &x, &case, &format!("per-batch {what}"));
                    }
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_views_in_place_and_copied() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 700;
    for dtype in DTYPES {
        for traditional in [false, true] {
            let case = Case {
                traditional,
                offsets: Offsets::Scalar(7),
                ..Case::new(64)
            };
            let mut run = |shape: &[usize], view: &dyn Fn(&Array) -> Array, name: &str| {
                seed += 1;
                let x = common::randn(shape, dtype, seed);
                let what = format!("{name} {case:?} {dtype} seed {seed}");
                check_with(&gpu, &x, view, &case, &what);
            };
            // [B, T, H, D] memory viewed as [B, H, T, D] (in place), odd head count.
            run(
                &[2, 9, 5, 64],
                &|a| a.transpose(&[0, 2, 1, 3]).unwrap(),
                "bthd",
            );
            // Same with T = 1 and B > 1.
            run(
                &[4, 1, 3, 64],
                &|a| a.transpose(&[0, 2, 1, 3]).unwrap(),
                "bthd decode",
            );
            // MLX's (2, 6, 8, 64).transpose(0, 2, 1, 3).
            run(
                &[2, 6, 8, 64],
                &|a| a.transpose(&[0, 2, 1, 3]).unwrap(),
                "mlx transpose",
            );
            // Every other position and a window of features (last stride 1, offset view).
            run(
                &[2, 3, 20, 80],
                &|a| {
                    a.slice(&[0, 0, 1, 8], &[2, 3, 20, 72], &[1, 1, 2, 1])
                        .unwrap()
                },
                "sliced",
            );
            // Windows starting one and two features in: narrower vectors, then scalars.
            for start in [1isize, 2] {
                run(
                    &[2, 3, 5, 67],
                    &|a| {
                        a.slice(&[0, 0, 0, start], &[2, 3, 5, start + 64], &[1, 1, 1, 1])
                            .unwrap()
                    },
                    "window at an odd offset",
                );
            }
            // Broadcast batch (batch stride 0).
            run(
                &[1, 3, 10, 64],
                &|a| a.broadcast_to(&[4, 3, 10, 64]).unwrap(),
                "broadcast batch",
            );
            // Reversed positions.
            run(
                &[2, 3, 10, 64],
                &|a| {
                    a.slice(&[0, 0, -1, 0], &[2, 3, -11, 64], &[1, 1, -1, 1])
                        .unwrap()
                },
                "reversed positions",
            );
            // Heads that cannot merge (5-D with swapped head axes): copied first.
            run(
                &[2, 3, 4, 6, 64],
                &|a| a.transpose(&[0, 2, 1, 3, 4]).unwrap(),
                "unmergeable heads",
            );
            // Strided last axis: copied first.
            run(
                &[2, 3, 64, 6],
                &|a| a.transpose(&[0, 1, 3, 2]).unwrap(),
                "strided features",
            );
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn explicit_streams() {
    let Some(gpu) = gpu() else { return };
    let s = Stream::new(&gpu).unwrap();
    for dtype in DTYPES {
        let x = common::randn(&[2, 4, 33, 64], dtype, 801);
        let case = Case {
            offsets: Offsets::PerBatch(vec![3, 9]),
            ..Case::new(64)
        };
        let dx = x.to_device(&gpu).unwrap();
        check_views(&x, &dx, &case, Some(&s), &format!("on a stream {dtype}"));
        // Input produced on one stream, consumed on another.
        let s2 = Stream::new(&gpu).unwrap();
        let dx = x.to_stream(&s2).unwrap();
        check_views(&x, &dx, &case, Some(&s), &format!("cross-stream {dtype}"));
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn empty_inputs() {
    let Some(gpu) = gpu() else { return };
    for shape in [[0usize, 2, 4, 8], [2, 0, 4, 8], [2, 3, 0, 8]] {
        let x = Array::zeros(&shape, DType::F32, &gpu).unwrap();
        let y = rope(&x, 8, false, Some(10000.0), 1.0, RopeOffset::Int(0), None).unwrap();
        assert_eq!(y.shape(), &shape);
        assert_eq!(y.device(), gpu);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let x = common::randn(&[2, 3, 4, 8], DType::F32, 901)
        .to_device(&gpu)
        .unwrap();
    let base = Some(10000.0);
    let zero = RopeOffset::Int(0);
    let x64 = x.astype(DType::F64).unwrap();
    assert!(matches!(
        rope(&x64, 8, false, base, 1.0, zero, None),
        Err(Error::Unsupported(_))
    ));
    let xi = x.astype(DType::I32).unwrap();
    assert!(matches!(
        rope(&xi, 8, false, base, 1.0, zero, None),
        Err(Error::InvalidArgument(_))
    ));
    let x2 = x.reshape(&[24, 8]).unwrap();
    assert!(matches!(
        rope(&x2, 8, false, base, 1.0, zero, None),
        Err(Error::InvalidArgument(_))
    ));
    for dims in [0, 3, 10] {
        assert!(
            matches!(
                rope(&x, dims, false, base, 1.0, zero, None),
                Err(Error::InvalidArgument(_))
            ),
            "dims {dims}"
        );
    }
    let periods = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]).unwrap();
    assert!(matches!(
        rope(&x, 8, false, None, 1.0, zero, Some(&periods)),
        Err(Error::InvalidArgument(_))
    ));
    let offs = Array::from_slice(&[1i32, 2, 3], &[3]).unwrap();
    assert!(matches!(
        rope(&x, 8, false, base, 1.0, RopeOffset::Array(&offs), None),
        Err(Error::InvalidArgument(_))
    ));
    // A CPU input with a GPU stream.
    let host = common::randn(&[2, 3, 4, 8], DType::F32, 902);
    let stream = gpu.default_stream().unwrap();
    assert!(matches!(
        rope_on(&stream, &host, 8, false, base, 1.0, zero, None),
        Err(Error::Device(_))
    ));
}
