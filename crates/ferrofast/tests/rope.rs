//! `fast::rope` against the float64 oracle on every device (the CPU, then each CUDA device;
//! the CUDA tests are ignored without the `gpu-tests` feature): MLX's test_fast.py rope cases
//! (spec §11.1), dtypes, both pair layouts, partial rotation, base and `freqs`, scale, scalar /
//! negative / per-batch offsets, large positions, 3-D to 5-D inputs, strided views (read in
//! place or copied first), decode rows, pass-through exactness, NaN, every error message and
//! a property test. CUDA alone: explicit streams and f64 (which has no CUDA kernel); the CPU
//! alone: f64 results and the benchmark. GPU output buffers are poisoned, so unwritten
//! elements fail.

#[macro_use]
mod common;

use common::{check_close, float_dtypes, max_abs_diff, on, randn, uniform, Input};
use ferrofast::fast::{self, RopeOffset, RopeOptions};
use ferrofast::{reference, Array, DType, Device, Error, Stream};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// The dtypes every device takes.
const LOW_PRECISION: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` against the exact oracle on `dev`.
///
/// MLX's own tolerances (absolute: f32 1e-6, f16 1e-3, bf16 1e-2) compare with a reference
/// computed in the same precision on inputs in [0, 1). Against exact f64 math on inputs of
/// any size, two terms are added: the final rounding to the output dtype (half an ulp,
/// relative: `rtol`), and the f32 angle, which is off by up to ~2 ulp(theta) (rounding of the
/// position product and of the f32 inverse frequency) and moves an output by that much times
/// `|x|`, so the bound grows with `max_theta * max|x|`. The f32 floor is 1e-6 on the CPU and
/// 2e-6 for the CUDA kernel.
fn tol(dtype: DType, dev: &Device, max_theta: f64, max_abs_x: f64) -> (f64, f64) {
    let angle = 4.0 * f64::from(f32::EPSILON) * max_theta.max(1.0) * max_abs_x;
    match dtype {
        DType::F64 => (1e-12 * (1.0 + max_theta) * max_abs_x, 0.0),
        DType::F32 if dev.is_cpu() => (1e-6 + angle, 0.0),
        DType::F32 => (2e-6 + angle, 0.0),
        DType::F16 => (1e-3 + angle, 2f64.powi(-11)),
        _ => (1e-2 + angle, 2f64.powi(-8)),
    }
}

/// The largest magnitude in `a`.
fn max_abs(a: &Array) -> f64 {
    a.to_f64_vec()
        .unwrap()
        .iter()
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// One rope call's arguments, with the angle bounds its check uses: `max_inv_freq` is the
/// largest inverse frequency, `max_pos` the largest `|position|`.
#[derive(Clone, Copy)]
struct Call<'a> {
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'a>,
    freqs: Option<&'a Array>,
    max_inv_freq: f64,
    max_pos: f64,
}

impl<'a> Call<'a> {
    /// Half-split pairs, base 10000, scale 1, no `freqs`.
    fn new(dims: i32, offset: RopeOffset<'a>, max_pos: f64) -> Call<'a> {
        Call {
            dims,
            traditional: false,
            base: Some(10000.0),
            scale: 1.0,
            offset,
            freqs: None,
            max_inv_freq: 1.0,
            max_pos,
        }
    }

    /// `fast::rope` on `x` with these arguments.
    fn run(&self, x: &Array) -> ferrofast::Result<Array> {
        let c = self;
        fast::rope(x, c.dims, c.traditional, c.base, c.scale, c.offset, c.freqs)
    }

    /// The oracle on `x` with these arguments.
    fn oracle(&self, x: &Array) -> ferrofast::Result<Array> {
        let c = self;
        reference::rope(x, c.dims, c.traditional, c.base, c.scale, c.offset, c.freqs)
    }
}

/// [`check_on`] on the default stream.
fn check(x: &Input, call: Call<'_>, what: &str) -> Array {
    check_on(None, x, call, what)
}

/// Runs `fast::rope` on `x.dev` (on `stream` when given) and the oracle on `x.host` with the
/// same arguments and checks the result: dtype, shape, device (and stream), a row-major
/// output, the features past `dims` bit for bit, the rotated ones within [`tol`].
/// Returns the output.
fn check_on(stream: Option<&Stream>, x: &Input, call: Call<'_>, what: &str) -> Array {
    let dev = x.dev.device();
    let what = format!("{what} on {dev}");
    let out = match stream {
        None => call.run(&x.dev),
        Some(s) => {
            let c = call;
            fast::rope_on(
                s,
                &x.dev,
                c.dims,
                c.traditional,
                c.base,
                c.scale,
                c.offset,
                c.freqs,
            )
        }
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let expect = call.oracle(&x.host).expect("oracle");
    assert_eq!(out.device(), dev, "{what}: device");
    if let Some(s) = stream {
        assert_eq!(out.stream().as_ref(), Some(s), "{what}: stream");
    }
    assert_eq!(out.dtype(), x.host.dtype(), "{what}: dtype");
    assert_eq!(out.shape(), x.host.shape(), "{what}: shape");
    assert!(out.is_contiguous(), "{what}: output is row-major");
    let host = on(&out, &Device::Cpu);
    let max_theta = f64::from(call.scale).abs() * call.max_pos * call.max_inv_freq;
    let (atol, rtol) = tol(x.host.dtype(), &dev, max_theta, max_abs(&x.host));
    check_close(&host, &expect, atol, rtol, &what);
    let d = x.host.shape()[x.host.ndim() - 1].max(1);
    let bits = |v: &[f64]| v.iter().map(|e| e.to_bits()).collect::<Vec<u64>>();
    let (got, want) = (host.to_f64_vec().unwrap(), x.host.to_f64_vec().unwrap());
    for (row, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let tail = (call.dims as usize).min(g.len());
        assert_eq!(
            bits(&g[tail..]),
            bits(&w[tail..]),
            "{what}: pass-through of row {row}"
        );
    }
    out
}

/// The message of an `Error::InvalidArgument`; panics on anything else.
fn err(r: ferrofast::Result<Array>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
        Ok(a) => panic!("expected an error, got an array of shape {:?}", a.shape()),
    }
}

/// A 1-D int32 array (offsets).
fn i32s(v: &[i32]) -> Array {
    Array::from_slice(v, &[v.len()]).unwrap()
}

/// The frequency source of a [`Case`], as host values.
#[derive(Clone, Debug)]
enum Freqs {
    Base(f32),
    Periods(Vec<f32>),
}

/// The offsets of a [`Case`].
#[derive(Clone, Debug)]
enum Offsets {
    Scalar(i64),
    PerBatch(Vec<i64>),
}

/// A rope call described by value, so that it prints in failure messages.
#[derive(Clone, Debug)]
struct Case {
    dims: usize,
    traditional: bool,
    freqs: Freqs,
    scale: f32,
    offsets: Offsets,
}

impl Case {
    /// Half-split pairs, base 10000, scale 1, offset 0.
    fn new(dims: usize) -> Case {
        Case {
            dims,
            traditional: false,
            freqs: Freqs::Base(10000.0),
            scale: 1.0,
            offsets: Offsets::Scalar(0),
        }
    }

    /// A bound on `|position|` for `seq` positions.
    fn largest_position(&self, seq: usize) -> f64 {
        let max_off = match &self.offsets {
            Offsets::Scalar(v) => v.abs(),
            Offsets::PerBatch(v) => v.iter().map(|o| o.abs()).max().unwrap_or(0),
        };
        (seq + max_off as usize) as f64
    }

    /// The largest inverse frequency.
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

/// [`check_on`] for `case` on `x`, with the angle bounds the case implies.
fn check_case(x: &Input, case: &Case, stream: Option<&Stream>, what: &str) {
    let offset_values;
    let offset = match &case.offsets {
        Offsets::Scalar(v) => RopeOffset::Int(*v),
        Offsets::PerBatch(v) => {
            let v32: Vec<i32> = v.iter().map(|&o| o as i32).collect();
            offset_values = i32s(&v32);
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
    let seq = x.host.shape()[x.host.ndim() - 2];
    check_on(
        stream,
        x,
        Call {
            traditional: case.traditional,
            base,
            scale: case.scale,
            freqs,
            max_inv_freq: case.largest_inv_freq(),
            ..Call::new(case.dims as i32, offset, case.largest_position(seq))
        },
        what,
    );
}

/// [`check_case`] on a fresh normal input of `shape` in `dtype` on `dev`, seeded with
/// `*seed + 1` (stored back); failures name the case, shape, dtype and seed.
fn check_fresh(dev: &Device, shape: &[usize], dtype: DType, seed: &mut u64, case: &Case) {
    *seed += 1;
    let x = Input::new(&randn(shape, dtype, *seed), dev);
    check_case(
        &x,
        case,
        None,
        &format!("{case:?} {shape:?} {dtype} seed {seed}"),
    );
}

/// A random strided view of a fresh array: permuted leading axes, sliced and stepped, on
/// `dev` (built there) and on the CPU.
fn random_view(
    dev: &Device,
    shape: &[usize],
    dtype: DType,
    seed: u64,
    perm_seed: u64,
    steps: &[isize],
) -> Input {
    let n = shape.len();
    // Allocate with the step factor so that stepping gives back `shape`.
    let alloc: Vec<usize> = shape
        .iter()
        .zip(steps)
        .map(|(&d, &s)| d * s.unsigned_abs())
        .collect();
    // Permute the allocation, then undo it with a transpose, so memory order differs from
    // logical order.
    let perm = common::seeded_permutation(n, perm_seed);
    let permuted: Vec<usize> = perm.iter().map(|&p| alloc[p]).collect();
    let base = randn(&permuted, dtype, seed);
    let mut inverse = vec![0isize; n];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i as isize;
    }
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
    let x = Input::view(&base, dev, |b| {
        b.transpose(&inverse)
            .unwrap()
            .slice(&starts, &stops, steps)
            .unwrap()
    });
    assert_eq!(x.host.shape(), shape);
    x
}

on_every_device! {
    // ----- MLX test_fast.py -----------------------------------------------------------------

    /// x (2, 4, 8), dims 8: base x dtype x offset x scale x traditional, uniform [0, 1) as
    /// MLX; low precision also against f32 on the same (rounded) input.
    fn test_rope_sweep(dev: &Device) {
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
                            let x = Input::new(&uniform(&[2, t, 8], 0.0, 1.0, dtype, seed), dev);
                            let max_pos = (t - 1 + if oi == 0 { 0 } else { 3 }) as f64;
                            let what = format!(
                                "base {base} {dtype} offset #{oi} scale {scale} \
                                 traditional {traditional} seed {seed}"
                            );
                            let out = check(&x, Call { traditional, base: Some(base), scale, ..Call::new(8, offset, max_pos) }, &what);
                            if dtype != DType::F32 {
                                let x32 = x.dev.astype(DType::F32).unwrap();
                                let out32 =
                                    fast::rope(&x32, 8, traditional, Some(base), scale, offset, None)
                                        .unwrap();
                                let tol = if dtype == DType::F16 { 1e-3 } else { 1e-2 };
                                let d = max_abs_diff(&out, &out32);
                                assert!(d <= tol, "{what} on {dev}: vs f32 differs by {d}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// (1, 1, 4, 8).swapaxes(1, 2): four heads of one position each, read in place.
    fn test_rope_transposed_input(dev: &Device) {
        for dtype in LOW_PRECISION {
            for traditional in [false, true] {
                for offset in [0i64, 3] {
                    let base = uniform(&[1, 1, 4, 8], 0.0, 1.0, dtype, 7);
                    let x = Input::view(&base, dev, |a| a.swapaxes(1, 2).unwrap());
                    assert!(!x.dev.is_contiguous() || x.dev.shape()[2] == 1);
                    check(&x, Call { traditional, ..Call::new(8, offset.into(), offset as f64) }, &format!("transposed {dtype} trad {traditional} offset {offset}"));
                }
            }
        }
    }

    /// An integer input is an error.
    fn test_rope_int_input_raises(dev: &Device) {
        let x = on(&Array::full(&[2, 4, 8], 1.0, DType::I32, &Device::Cpu).unwrap(), dev);
        assert_eq!(
            err(fast::rope(&x, 8, false, Some(10000.0), 1.0, 0.into(), None)),
            "[rope] Input must be a floating type but got int32."
        );
    }

    /// `dims` must be positive, even and at most D; D and D / 2 work.
    fn test_rope_dims_validation(dev: &Device) {
        let x = Input::new(&randn(&[1, 4, 64], DType::F32, 3), dev);
        let call = |dims| fast::rope(&x.dev, dims, false, Some(10000.0), 1.0, 0.into(), None);
        assert_eq!(err(call(0)), "[rope] dims must be positive but got 0.");
        assert_eq!(err(call(-2)), "[rope] dims must be positive but got -2.");
        assert_eq!(err(call(7)), "[rope] dims must be even but got 7.");
        assert_eq!(
            err(call(128)),
            "[rope] dims must not exceed the input's last dimension (64) but got 128."
        );
        for dims in [32, 64] {
            for traditional in [false, true] {
                check(&x, Call { traditional, ..Call::new(dims, 0.into(), 3.0) }, &format!("dims {dims}"));
            }
        }
    }

    /// `freqs` of the wrong shape are errors; periods in [0.5, 1.5) with offsets and scales,
    /// also on a single vector.
    fn test_rope_with_freqs(dev: &Device) {
        let dims = 8;
        let x = on(&uniform(&[2, 4, dims], 0.0, 1.0, DType::F32, 11), dev);
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
                    let x = Input::new(&uniform(&[2, 4, dims], 0.0, 1.0, dtype, 15), dev);
                    let what = format!("freqs {dtype} trad {traditional} offset {offset}");
                    check(&x, Call { traditional, base: None, scale, freqs: Some(&freqs), max_inv_freq: max_inv, ..Call::new(dims as i32, offset.into(), (3 + offset) as f64) }, &what);
                    // The single vector case (1, 1, dims).
                    let v = Input::new(&uniform(&[1, 1, dims], 0.0, 1.0, dtype, 16), dev);
                    check(&v, Call { traditional, base: None, scale, freqs: Some(&freqs), max_inv_freq: max_inv, ..Call::new(dims as i32, offset.into(), offset as f64) }, &format!("{what} single vector"));
                }
            }
        }
    }

    /// MLX casts freqs to float32: integer periods work, and f64 ones (with an f64 input on
    /// the CPU, the only device with f64 rope).
    fn test_rope_freqs_integer_and_f64_dtypes_are_read(dev: &Device) {
        let x = randn(&[1, 3, 5, 16], DType::F32, 17);
        let freqs = Array::from_slice(&[1i32, 2, 4, 8, 16, 32, 64, 128], &[8]).unwrap();
        check(&Input::new(&x, dev), Call { base: None, freqs: Some(&freqs), ..Call::new(16, 1.into(), 5.0) }, "int freqs");
        if dev.is_cpu() {
            let freqs = freqs.astype(DType::F64).unwrap();
            check(&Input::new(&x.astype(DType::F64).unwrap(), dev), Call { traditional: true, base: None, freqs: Some(&freqs), ..Call::new(16, 1.into(), 5.0) }, "f64 freqs, f64 input");
        }
    }

    /// Per-batch offsets (arange(B), as MLX) over batch and head counts, a wrong-sized
    /// offset, and [B, T, H, D] memory seen as [B, H, T, D].
    fn test_rope_batch(dev: &Device) {
        let x = on(&randn(&[8, 4, 4, 32], DType::F32, 18), dev);
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
                let x = Input::new(&randn(&[b, h, 4, 32], DType::F32, seed), dev);
                let offsets = i32s(&(0..b as i32).collect::<Vec<_>>());
                let max_pos = (b + 2) as f64;
                for traditional in [true, false] {
                    check(&x, Call { traditional, ..Call::new(32, (&offsets).into(), max_pos) }, &format!("batch {b} heads {h} trad {traditional} seed {seed}"));
                }
            }
        }
        // [B, T, H, D] memory seen as [B, H, T, D].
        let x = Input::view(&randn(&[2, 6, 8, 64], DType::F32, 19), dev, |a| {
            a.transpose(&[0, 2, 1, 3]).unwrap()
        });
        let offsets = i32s(&[0, 1]);
        for traditional in [true, false] {
            check(&x, Call { traditional, ..Call::new(64, (&offsets).into(), 6.0) }, &format!("(2,6,8,64).transpose(0,2,1,3) trad {traditional}"));
        }
    }

    /// Decode rows (B, H, 1, D) with several batches: every head of every example at
    /// position 5 (a scalar offset), then at per-batch offsets 0, 100, 200, ...
    fn test_rope_single_batch(dev: &Device) {
        let mut seed = 600;
        for dtype in LOW_PRECISION {
            for b in [2usize, 4, 8] {
                for heads in [1usize, 4, 7] {
                    for d in [64usize, 128] {
                        for traditional in [false, true] {
                            seed += 1;
                            let x = Input::new(&randn(&[b, heads, 1, d], dtype, seed), dev);
                            let case = Case {
                                traditional,
                                offsets: Offsets::Scalar(5),
                                ..Case::new(d)
                            };
                            let what =
                                format!("{case:?} B={b} H={heads} D={d} {dtype} seed {seed}");
                            check_case(&x, &case, None, &what);
                            let case = Case {
                                offsets: Offsets::PerBatch(
                                    (0..b as i64).map(|i| 100 * i).collect(),
                                ),
                                ..case
                            };
                            check_case(&x, &case, None, &format!("per-batch {what}"));
                        }
                    }
                }
            }
        }
    }

    /// Offset 4000 on 1024 positions in f32 and bf16, which agree to 0.1.
    fn test_rope_with_large_offset(dev: &Device) {
        let x = randn(&[1, 1, 1024, 32], DType::F32, 20);
        let xb = x.astype(DType::BF16).unwrap();
        let max_pos = 4000.0 + 1023.0;
        let out = check(&Input::new(&x, dev), Call::new(32, 4000.into(), max_pos), "offset 4000 f32");
        let outb = check(&Input::new(&xb, dev), Call::new(32, 4000.into(), max_pos), "offset 4000 bf16");
        let d = max_abs_diff(&out, &outb.astype(DType::F32).unwrap());
        assert!(d <= 1e-1, "bf16 vs f32 differ by {d} on {dev}");
    }

    // ----- sizes, dtypes, layouts ------------------------------------------------------------

    /// Odd sizes and `dims` below D in every dtype the device takes.
    fn odd_sizes_and_dims_below_d_in_all_dtypes(dev: &Device) {
        let mut seed = 400;
        for dtype in float_dtypes(dev) {
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
                    let x = Input::new(&randn(&shape, dtype, seed), dev);
                    let max_pos = (shape[shape.len() - 2] + 9) as f64;
                    check(&x, Call { traditional, scale: 0.5, ..Call::new(dims, 10.into(), max_pos) }, &format!("{dtype} {shape:?} dims {dims} trad {traditional} seed {seed}"));
                }
            }
        }
    }

    /// Over dtypes, pair layouts, bases, scales, offsets (negative too) and D > dims.
    fn sweep_over_dtypes_modes_bases_scales_and_offsets(dev: &Device) {
        let mut seed = 100;
        for dtype in LOW_PRECISION {
            for traditional in [false, true] {
                for base in [10000.0f32, 1e6] {
                    for scale in [1.0f32, 0.5, 2.0] {
                        for offset in [0i64, 3, -5] {
                            for (d, dims) in [(16usize, 16usize), (24, 16), (33, 8)] {
                                let case = Case {
                                    dims,
                                    traditional,
                                    freqs: Freqs::Base(base),
                                    scale,
                                    offsets: Offsets::Scalar(offset),
                                };
                                check_fresh(dev, &[2, 3, 7, d], dtype, &mut seed, &case);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `freqs` give the periods, with D > dims.
    fn freqs_give_the_periods(dev: &Device) {
        let mut seed = 200;
        for dtype in LOW_PRECISION {
            for traditional in [false, true] {
                for (d, dims) in [(8usize, 8usize), (12, 8), (130, 128)] {
                    let periods: Vec<f32> = uniform(&[dims / 2], 0.5, 50.0, DType::F32, seed + 1)
                        .to_vec::<f32>()
                        .unwrap();
                    let case = Case {
                        traditional,
                        freqs: Freqs::Periods(periods),
                        scale: 1.5,
                        offsets: Offsets::Scalar(4),
                        ..Case::new(dims)
                    };
                    check_fresh(dev, &[3, 2, 9, d], dtype, &mut seed, &case);
                }
            }
        }
    }

    /// Per-batch offsets, negative ones included, over batch and head counts.
    fn per_batch_offsets(dev: &Device) {
        let mut seed = 300;
        for dtype in LOW_PRECISION {
            for b in [3usize, 8, 11] {
                for heads in [1usize, 3, 5] {
                    for traditional in [false, true] {
                        // arange(B) as MLX's test, shifted to include negative offsets.
                        let offs: Vec<i64> = (0..b as i64).map(|i| 37 * i - 20).collect();
                        let case = Case {
                            traditional,
                            offsets: Offsets::PerBatch(offs),
                            ..Case::new(32)
                        };
                        check_fresh(dev, &[b, heads, 6, 32], dtype, &mut seed, &case);
                    }
                }
            }
        }
    }

    /// Positions in the thousands (MLX's test_rope_with_large_offset shape) and tens of
    /// thousands (per batch).
    fn large_positions(dev: &Device) {
        let mut seed = 400;
        for dtype in LOW_PRECISION {
            for traditional in [false, true] {
                let case = Case {
                    traditional,
                    offsets: Offsets::Scalar(4000),
                    ..Case::new(32)
                };
                check_fresh(dev, &[1, 1, 1024, 32], dtype, &mut seed, &case);
                let case = Case {
                    traditional,
                    offsets: Offsets::PerBatch(vec![1000, 30000]),
                    ..Case::new(128)
                };
                check_fresh(dev, &[2, 4, 300, 128], dtype, &mut seed, &case);
            }
        }
    }

    /// 3-D to 5-D inputs and odd sizes: one pair, odd D, D past 4096, many positions.
    fn ranks_three_to_five_and_odd_sizes(dev: &Device) {
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
        for dtype in LOW_PRECISION {
            for (shape, dims) in shapes {
                for traditional in [false, true] {
                    let case = Case {
                        traditional,
                        offsets: Offsets::Scalar(11),
                        ..Case::new(dims)
                    };
                    check_fresh(dev, shape, dtype, &mut seed, &case);
                }
            }
        }
    }

    /// The features `dims..D` are copied bit for bit, special values included.
    fn pass_through_tail_is_bit_identical(dev: &Device) {
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
        for dtype in float_dtypes(dev) {
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
                let call = Call {
                    traditional,
                    base: Some(500.0),
                    ..Call::new(dims as i32, 3.into(), 3.0)
                };
                let out = call.run(&on(&x, dev)).unwrap();
                assert_eq!(out.device(), *dev);
                let out = on(&out, &Device::Cpu);
                // Each element's bits in the array's own dtype.
                macro_rules! bits_as {
                    ($a:expr, $t:ty) => {
                        $a.to_vec::<$t>().unwrap().iter().map(|v| u64::from(v.to_bits())).collect()
                    };
                }
                let bits = |a: &Array| -> Vec<u64> {
                    match dtype {
                        DType::F32 => bits_as!(a, f32),
                        DType::F16 => bits_as!(a, ferrofast::f16),
                        DType::BF16 => bits_as!(a, ferrofast::bf16),
                        _ => bits_as!(a, f64),
                    }
                };
                let (xb, ob) = (bits(&x), bits(&out));
                for i in (0..xb.len()).filter(|i| i % d >= dims) {
                    assert_eq!(
                        xb[i], ob[i],
                        "{dtype} trad {traditional} on {dev}: tail element {i}"
                    );
                }
                // The rotated part is still checked against the oracle (tail excluded: NaN
                // there).
                let rot = |a: &Array| {
                    a.slice(&[0, 0, 0, 0], &[2, 3, 5, dims as isize], &[1, 1, 1, 1])
                        .unwrap()
                };
                let expect = call.oracle(&x).unwrap();
                let (atol, rtol) = tol(dtype, dev, 8.0, max_abs(&rot(&x)));
                check_close(
                    &rot(&out),
                    &rot(&expect),
                    atol,
                    rtol,
                    &format!("{dtype} rotated part on {dev}"),
                );
            }
        }
    }

    /// NaNs of either sign in rotated features make their pair NaN and nothing else.
    fn nans_propagate_through_their_pair(dev: &Device) {
        for dtype in float_dtypes(dev) {
            let mut vals = randn(&[2, 2, 3, 16], DType::F64, 36).to_f64_vec().unwrap();
            vals[5] = f64::NAN;
            vals[40] = -f64::NAN;
            let x = Array::from_vec(vals, &[2, 2, 3, 16])
                .unwrap()
                .astype(dtype)
                .unwrap();
            for traditional in [false, true] {
                let out = check(&Input::new(&x, dev), Call { traditional, ..Call::new(16, 1.into(), 3.0) }, &format!("NaN {dtype} trad {traditional}"));
                let nans = out
                    .to_f64_vec()
                    .unwrap()
                    .iter()
                    .filter(|v| v.is_nan())
                    .count();
                assert_eq!(nans, 4, "{dtype} trad {traditional} on {dev}: two pairs are NaN");
            }
        }
    }

    /// Stepped, sliced, swapped, reversed and broadcast views, with scalar and per-batch
    /// offsets (the CPU reads every one in place).
    fn non_contiguous_inputs_are_read_in_place(dev: &Device) {
        let base = randn(&[3, 4, 10, 40], DType::F32, 22);
        type View = fn(&Array) -> Array;
        let views: [(&str, View); 7] = [
            ("every other position, reversed heads", |b| {
                b.slice(&[0, 3, 0, 0], &[3, -5, 10, 40], &[1, -1, 2, 1])
                    .unwrap()
            }),
            ("feature slice (row stride 40, D 32)", |b| {
                b.slice(&[0, 0, 0, 4], &[3, 4, 10, 36], &[1, 1, 1, 1])
                    .unwrap()
            }),
            ("strided features (stride 2)", |b| {
                b.slice(&[0, 0, 0, 0], &[3, 4, 10, 40], &[1, 1, 1, 2])
                    .unwrap()
            }),
            ("positions and features swapped (feature stride 40)", |b| {
                b.swapaxes(2, 3).unwrap()
            }),
            ("batch and heads swapped", |b| b.swapaxes(0, 1).unwrap()),
            ("reversed positions", |b| {
                b.slice(&[0, 0, -1, 0], &[3, 4, -11, 40], &[1, 1, -1, 1])
                    .unwrap()
            }),
            ("broadcast over heads", |b| {
                b.slice(&[0, 0, 0, 0], &[3, 1, 10, 40], &[1, 1, 1, 1])
                    .unwrap()
                    .broadcast_to(&[3, 6, 10, 40])
                    .unwrap()
            }),
        ];
        for (what, view) in views {
            let x = Input::view(&base, dev, view);
            let dims = (x.host.shape()[3] / 2 * 2).min(32) as i32;
            let offsets = i32s(&vec![5; x.host.shape()[0]][..]);
            for traditional in [false, true] {
                for offset in [RopeOffset::Int(-2), RopeOffset::Array(&offsets)] {
                    check(&x, Call { traditional, ..Call::new(dims, offset, 45.0) }, &format!("{what} trad {traditional}"));
                }
            }
        }
    }

    /// Views the kernels read in place ([B, T, H, D] as [B, H, T, D], sliced positions and
    /// features, windows at odd feature offsets, a broadcast batch, reversed positions) and
    /// views copied first on CUDA (heads that do not merge, a strided last axis).
    fn strided_views_in_place_and_copied(dev: &Device) {
        let mut seed = 700;
        for dtype in LOW_PRECISION {
            for traditional in [false, true] {
                let case = Case {
                    traditional,
                    offsets: Offsets::Scalar(7),
                    ..Case::new(64)
                };
                let mut run = |shape: &[usize], view: &dyn Fn(&Array) -> Array, name: &str| {
                    seed += 1;
                    let x = Input::view(&randn(shape, dtype, seed), dev, view);
                    check_case(&x, &case, None, &format!("{name} {case:?} {dtype} seed {seed}"));
                };
                let transpose = |axes: &'static [isize]| move |a: &Array| a.transpose(axes).unwrap();
                let slice = |start: [isize; 4], stop: [isize; 4], step: [isize; 4]| {
                    move |a: &Array| a.slice(&start, &stop, &step).unwrap()
                };
                // [B, T, H, D] memory viewed as [B, H, T, D] (in place), odd head count.
                run(&[2, 9, 5, 64], &transpose(&[0, 2, 1, 3]), "bthd");
                // Same with T = 1 and B > 1.
                run(&[4, 1, 3, 64], &transpose(&[0, 2, 1, 3]), "bthd decode");
                // MLX's (2, 6, 8, 64).transpose(0, 2, 1, 3).
                run(&[2, 6, 8, 64], &transpose(&[0, 2, 1, 3]), "mlx transpose");
                // Every other position and a window of features (last stride 1, offset view).
                run(&[2, 3, 20, 80], &slice([0, 0, 1, 8], [2, 3, 20, 72], [1, 1, 2, 1]), "sliced");
                // Windows starting one and two features in: narrower vectors, then scalars.
                for start in [1isize, 2] {
                    let window = slice([0, 0, 0, start], [2, 3, 5, start + 64], [1, 1, 1, 1]);
                    run(&[2, 3, 5, 67], &window, "window at an odd offset");
                }
                // Broadcast batch (batch stride 0).
                run(&[1, 3, 10, 64], &|a| a.broadcast_to(&[4, 3, 10, 64]).unwrap(), "broadcast batch");
                // Reversed positions.
                let reversed = slice([0, 0, -1, 0], [2, 3, -11, 64], [1, 1, -1, 1]);
                run(&[2, 3, 10, 64], &reversed, "reversed positions");
                // Heads that cannot merge (5-D with swapped head axes): copied first on CUDA.
                run(&[2, 3, 4, 6, 64], &transpose(&[0, 2, 1, 3, 4]), "unmergeable heads");
                // Strided last axis: copied first on CUDA.
                run(&[2, 3, 64, 6], &transpose(&[0, 1, 3, 2]), "strided features");
            }
        }
    }

    /// 3-D inputs with per-batch offsets; 5-D with head axes whose strides do not merge.
    fn three_and_five_dimensional_inputs(dev: &Device) {
        let x3 = Input::new(&randn(&[4, 19, 48], DType::F32, 23), dev);
        let offsets = i32s(&[0, 7, 100, -3]);
        for traditional in [false, true] {
            check(&x3, Call { traditional, ..Call::new(48, (&offsets).into(), 118.0) }, "3-D per batch");
        }
        // 5-D with head axes whose strides do not merge into one.
        let x5 = Input::view(&randn(&[2, 5, 3, 9, 32], DType::BF16, 24), dev, |a| {
            a.transpose(&[0, 2, 1, 3, 4]).unwrap()
        });
        let offsets = i32s(&[4, 9]);
        for traditional in [false, true] {
            for offset in [RopeOffset::Int(6), RopeOffset::Array(&offsets)] {
                check(&x5, Call { traditional, scale: 1.5, ..Call::new(16, offset, 20.0) }, "5-D transposed heads");
            }
        }
    }

    /// Inputs big enough to run on the CPU's pool, with per-batch and scalar offsets, also
    /// in the [B, T, H, D] layout.
    fn large_parallel_inputs_match(dev: &Device) {
        let x = Input::new(&randn(&[3, 8, 300, 64], DType::BF16, 25), dev);
        let offsets = i32s(&[0, 1000, 17]);
        for traditional in [false, true] {
            for offset in [RopeOffset::Int(12), RopeOffset::Array(&offsets)] {
                check(&x, Call { traditional, ..Call::new(64, offset, 1300.0) }, "parallel bf16");
            }
        }
        let xt = Input::view(&randn(&[2, 512, 4, 128], DType::F32, 26), dev, |a| {
            a.swapaxes(1, 2).unwrap()
        });
        check(&xt, Call { base: Some(500000.0), ..Call::new(128, 7.into(), 519.0) }, "parallel [B,T,H,D] layout");
    }

    /// Exactly representable angles (inverse frequencies 1, 2, 4, 8 and integer positions)
    /// let the f32 path be checked tightly even at very large angles.
    fn large_angles_are_accurate(dev: &Device) {
        let periods = Array::from_slice(&[1.0f32, 0.5, 0.25, 0.125], &[4]).unwrap();
        let x = uniform(&[6, 1, 1, 8], -1.0, 1.0, DType::F32, 27);
        let offsets = i32s(&[0, 1, 123_457, 1 << 20, 3 << 22, 16_000_000]);
        for traditional in [false, true] {
            let call = Call {
                traditional,
                base: None,
                freqs: Some(&periods),
                ..Call::new(8, (&offsets).into(), 16e6)
            };
            let out = call.run(&on(&x, dev)).unwrap();
            let expect = call.oracle(&x).unwrap();
            check_close(&out, &expect, 1e-6, 0.0, &format!("exact large angles on {dev}"));
        }
    }

    /// Negative scalar and per-batch offsets; rotating back with the negated scale restores
    /// the input.
    fn negative_offsets(dev: &Device) {
        let x = Input::new(&randn(&[2, 3, 7, 16], DType::F32, 28), dev);
        let offsets = i32s(&[-3, 7]);
        for traditional in [false, true] {
            for offset in [RopeOffset::Int(-5), RopeOffset::Array(&offsets)] {
                check(&x, Call { traditional, ..Call::new(16, offset, 13.0) }, "negative offsets");
            }
        }
        // Rotating back with the negated scale (same negative offset) restores the input.
        for traditional in [false, true] {
            let a = fast::rope(&x.dev, 16, traditional, Some(10000.0), 1.0, (-5).into(), None)
                .unwrap();
            let b =
                fast::rope(&a, 16, traditional, Some(10000.0), -1.0, (-5).into(), None).unwrap();
            let d = max_abs_diff(&b, &x.host);
            assert!(d <= 1e-5, "round trip differs by {d} on {dev}");
        }
    }

    // ----- offsets ---------------------------------------------------------------------------

    /// Offsets of every integer dtype, as scalars, 0-d and 1-element arrays and per batch,
    /// give the int offset's result bit for bit (int64 wraps as a C cast to int32, uint32 is
    /// kept).
    fn offset_dtypes_follow_mlx(dev: &Device) {
        let host = randn(&[2, 2, 5, 16], DType::F32, 30);
        let x = on(&host, dev);
        let run =
            |o: RopeOffset<'_>| fast::rope(&x, 16, false, Some(10000.0), 1.0, o, None).unwrap();
        let same = |a: &Array, b: &Array, what: &str| {
            assert_eq!(
                a.to_vec::<f32>().unwrap(),
                b.to_vec::<f32>().unwrap(),
                "{what} on {dev}"
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
        let want =
            reference::rope(&host, 16, false, Some(10000.0), 1.0, (&big).into(), None).unwrap();
        // At position 3e9 the f32 angle is only known to ~256 radians: check the first example
        // exactly and the second for being finite and of the same norm.
        let (o, w) = (out.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
        let half = o.len() / 2;
        for i in 0..half {
            assert!(
                (o[i] - w[i]).abs() <= 2e-6,
                "uint32 offset element {i} on {dev}"
            );
        }
        assert!(o[half..].iter().all(|v| v.is_finite()));
    }

    /// Offsets that are not integers, of rank above one, or of a size other than 1 or B.
    fn offset_errors(dev: &Device) {
        let x = on(&randn(&[2, 2, 5, 16], DType::F32, 31), dev);
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

    // ----- remaining validation --------------------------------------------------------------

    /// Rank, base / freqs presence, and the order of the checks; the oracle validates the
    /// same way.
    fn input_and_frequency_errors(dev: &Device) {
        let x2 = on(&randn(&[2, 8], DType::F32, 32), dev);
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
        let x = on(&randn(&[1, 2, 8], DType::F32, 33), dev);
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
        // Order (MLX's): base / freqs presence first, then rank, dtype, offset, dims, freqs.
        let xi = on(&Array::full(&[2, 8], 1.0, DType::I32, &Device::Cpu).unwrap(), dev);
        assert!(err(fast::rope(&xi, 7, false, None, 1.0, 0.into(), None)).contains("Neither"));
        assert!(err(fast::rope(&xi, 7, false, Some(1e4), 1.0, 0.into(), Some(&freqs)))
            .contains("Only one"));
        assert!(err(fast::rope(&xi, 7, false, Some(1e4), 1.0, 0.into(), None)).contains("at least 3"));
        let xi3 = on(&Array::full(&[2, 2, 8], 1.0, DType::I32, &Device::Cpu).unwrap(), dev);
        assert!(err(fast::rope(&xi3, 7, false, Some(1e4), 1.0, 0.into(), None)).contains("floating"));
        let fo = Array::scalar(1.0f32);
        assert!(err(fast::rope(&x, 7, false, Some(1e4), 1.0, (&fo).into(), None)).contains("offset"));
        assert!(err(fast::rope(&x, 7, false, None, 1.0, 0.into(), Some(&x))).contains("even"));
        assert!(
            err(fast::rope(&x, 8, false, None, 1.0, 0.into(), Some(&x))).contains("freqs must")
        );
        // The oracle validates the same way.
        assert_eq!(
            reference::rope(&x2, 8, false, Some(10000.0), 1.0, 0.into(), None).unwrap_err(),
            Error::InvalidArgument(
                "[rope] Input must have at least 3 dimensions but got input with 2 dimensions."
                    .into()
            )
        );
    }

    /// Empty batches, heads or positions give empty outputs on the input's device.
    fn empty_inputs_give_empty_outputs(dev: &Device) {
        for shape in [
            [0usize, 2, 3, 8],
            [2, 0, 3, 8],
            [2, 2, 0, 8],
            [0, 2, 4, 8],
            [2, 0, 4, 8],
            [2, 3, 0, 8],
        ] {
            let x = Array::zeros(&shape, DType::F32, dev).unwrap();
            let out = fast::rope(&x, 8, false, Some(10000.0), 1.0, 0.into(), None).unwrap();
            assert_eq!(out.shape(), &shape);
            assert_eq!(out.device(), *dev);
        }
    }

    /// `fast::rope_with` and `RopeOptions::default()` give the positional call's result.
    fn options_struct_matches_positional_call(dev: &Device) {
        let x = on(&randn(&[2, 3, 9, 32], DType::F32, 35), dev);
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

    /// The op runs where its input lives, in the three dtypes: [B, T, H, D] memory seen as
    /// [B, H, T, D], per-batch offsets, dims < D; the input both as uploaded (contiguous on a
    /// GPU) and viewed on the device.
    fn rope_dispatches_to_the_inputs_device(dev: &Device) {
        for (seed, dtype) in LOW_PRECISION.into_iter().enumerate() {
            let seed = 300 + seed as u64;
            let base = randn(&[3, 17, 4, 64], dtype, seed);
            let view = |a: &Array| a.swapaxes(1, 2).unwrap();
            let x = view(&base);
            let offs = Array::from_slice(&[0i32, 5, -3], &[3]).unwrap();
            for g in [on(&x, dev), view(&on(&base, dev))] {
                for traditional in [false, true] {
                    let call = Call {
                        traditional,
                        ..Call::new(48, RopeOffset::Array(&offs), 5.0)
                    };
                    let y = call.run(&g).unwrap();
                    assert_eq!(y.device(), *dev);
                    let r = call.oracle(&x).unwrap();
                    let (atol, rtol) = match dtype {
                        DType::F32 => (1e-5, 1e-5),
                        DType::F16 => (5e-3, 5e-3),
                        _ => (5e-2, 5e-2),
                    };
                    check_close(
                        &y,
                        &r,
                        atol,
                        rtol,
                        &format!("rope {dtype} traditional {traditional} seed {seed} on {dev}"),
                    );
                }
            }
        }
    }

    // ----- property test ---------------------------------------------------------------------

    /// Random ranks, sizes, strided layouts, offsets (scalar or per batch), scales and dtypes
    /// against the oracle.
    fn prop_matches_oracle(dev: &Device) {
        let strategy = (
            3usize..=5,
            prop::collection::vec(1usize..=5, 5),
            1usize..=40,
            1usize..=20,
            0usize..=5,
            prop::collection::vec(prop::sample::select(vec![1isize, 1, 2, -1]), 5),
            any::<bool>(),
            any::<bool>(),
            -50i64..2000,
            prop::sample::select(vec![1.0f32, 0.5, 2.0, -1.0]),
            prop::sample::select(float_dtypes(dev)),
            any::<u64>(),
        );
        let config = ProptestConfig {
            source_file: Some(file!()),
            ..ProptestConfig::with_cases(48)
        };
        TestRunner::new(config)
            .run(
                &strategy,
                |(
                    ndim,
                    dims_raw,
                    t,
                    half,
                    extra,
                    steps_raw,
                    traditional,
                    per_batch,
                    offset,
                    scale,
                    dtype,
                    seed,
                )| {
                    let dims = 2 * half;
                    let d = dims + extra;
                    let mut shape: Vec<usize> = dims_raw[..ndim - 2].to_vec();
                    shape.push(t);
                    shape.push(d);
                    let x = random_view(dev, &shape, dtype, seed, seed ^ 0x5eed, &steps_raw[..ndim]);
                    let b = shape[0];
                    let offs: Vec<i32> = (0..b as i32).map(|i| offset as i32 + 37 * i).collect();
                    let offsets = i32s(&offs);
                    let off = if per_batch {
                        RopeOffset::Array(&offsets)
                    } else {
                        RopeOffset::Int(offset)
                    };
                    let max_pos = (offset.abs() + 37 * b as i64 + t as i64) as f64;
                    check(&x, Call { traditional, scale, ..Call::new(dims as i32, off, max_pos) }, &format!(
                            "shape {shape:?} strides {:?} dims {dims} seed {seed}",
                            x.host.strides()
                        ));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Cases only the CPU has: f64 results (CUDA has no f64 rope), MLX's large input and the
/// benchmark (both ignored unless asked for).
mod cpu_only {
    use super::*;

    /// f64 inputs are computed in f64, also at large positions.
    #[test]
    fn f64_inputs_compute_in_f64() {
        let x = randn(&[2, 3, 50, 64], DType::F64, 29);
        let offsets = i32s(&[3, 90000]);
        for traditional in [false, true] {
            for offset in [RopeOffset::Int(1_000_000), RopeOffset::Array(&offsets)] {
                let out =
                    fast::rope(&x, 64, traditional, Some(10000.0), 1.0, offset, None).unwrap();
                let expect =
                    reference::rope(&x, 64, traditional, Some(10000.0), 1.0, offset, None).unwrap();
                assert_eq!(out.dtype(), DType::F64);
                check_close(&out, &expect, 1e-9, 0.0, "f64");
            }
        }
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

    // ----- benchmark (not a test) --------------------------------------------------------------

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
}

/// Cases only CUDA has: explicit streams, f64 (no kernel) and a CPU input with a GPU stream.
#[cfg(feature = "cuda")]
mod cuda_only {
    use super::*;

    on_every_gpu! {
        /// `rope_on` with a stream of its own, also for an input produced on another stream.
        fn explicit_streams(gpu: Device) {
            let s = Stream::new(&gpu).unwrap();
            for dtype in LOW_PRECISION {
                let x = randn(&[2, 4, 33, 64], dtype, 801);
                let case = Case {
                    offsets: Offsets::PerBatch(vec![3, 9]),
                    ..Case::new(64)
                };
                let input = Input::new(&x, &gpu);
                check_case(&input, &case, Some(&s), &format!("on a stream {dtype}"));
                // Input produced on one stream, consumed on another.
                let s2 = Stream::new(&gpu).unwrap();
                let input = Input {
                    host: x.clone(),
                    dev: x.to_stream(&s2).unwrap(),
                };
                check_case(&input, &case, Some(&s), &format!("cross-stream {dtype}"));
            }
        }

        /// Offset arrays that live on the GPU are converted and read there (MLX's int32 rule,
        /// size 1 broadcast), giving bit for bit the result of the same offsets from the host,
        /// also when produced on another stream; the backward pass takes them too.
        fn offset_arrays_on_the_gpu(gpu: Device) {
            let other = Stream::new(&gpu).unwrap();
            let x = on(&randn(&[3, 4, 17, 64], DType::BF16, 903), &gpu);
            let i64s = |v: &[i64]| Array::from_slice(v, &[v.len()]).unwrap();
            let offsets = [
                i64s(&[5, -7, 1000]),
                i64s(&[(1 << 32) + 9, -(1 << 33) - 3, 12]),
                i64s(&[41]),
                i32s(&[3, 99, -4]),
                i32s(&[-17]),
                Array::from_slice(&[7u32, 3_000_000_000, 1], &[3]).unwrap(),
                Array::from_slice(&[250u8, 0, 9], &[3]).unwrap(),
                Array::from_slice(&[6u8], &[]).unwrap(),
            ];
            let bits = |a: Array| a.to_vec::<ferrofast::bf16>().unwrap();
            let fwd = |o: &Array| {
                let offset = RopeOffset::Array(o);
                bits(fast::rope(&x, 48, false, Some(10000.0), 1.0, offset, None).unwrap())
            };
            let bwd = |o: &Array| {
                let offset = RopeOffset::Array(o);
                bits(fast::rope_vjp(&x, 64, true, Some(500.0), 0.5, offset, None).unwrap())
            };
            for host in &offsets {
                let what = format!("{} offsets {:?}", host.dtype(), host.shape());
                let dev = host.to_stream(&other).unwrap();
                assert_eq!(fwd(&dev), fwd(host), "{what}: forward");
                assert_eq!(bwd(&dev), bwd(host), "{what}: backward");
            }
            // freqs on the GPU (any float dtype, strided): the same bits as from the host.
            let periods: Vec<f32> = (0..48).map(|i| 1.0 + 37.0 * i as f32).collect();
            let wide = Array::from_vec(periods, &[48]).unwrap();
            let wide_dev = wide.to_stream(&other).unwrap();
            let strided = |w: &Array| w.slice(&[0], &[48], &[2]).unwrap();
            let narrow = |w: &Array| {
                w.slice(&[0], &[24], &[1])
                    .unwrap()
                    .astype(DType::BF16)
                    .unwrap()
            };
            for (f, dev) in [
                (strided(&wide), strided(&wide_dev)),
                (narrow(&wide), narrow(&wide_dev)),
            ] {
                let with_freqs = |f: &Array| {
                    let offset = RopeOffset::Int(3);
                    bits(fast::rope(&x, 48, true, None, 1.0, offset, Some(f)).unwrap())
                };
                assert_eq!(with_freqs(&dev), with_freqs(&f), "{} freqs", f.dtype());
            }
            // Checked as before: size and dtype errors with MLX's texts.
            for bad in [
                Array::from_slice(&[1i32, 2], &[2]).unwrap(),
                Array::from_slice(&[1.0f32], &[1]).unwrap(),
            ] {
                let bad = bad.to_device(&gpu).unwrap();
                let offset = RopeOffset::Array(&bad);
                let r = fast::rope(&x, 64, false, Some(10000.0), 1.0, offset, None);
                assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
            }
        }

        /// f64 has no CUDA kernel: `Error::Unsupported`.
        fn f64_is_unsupported(gpu: Device) {
            let x = on(&randn(&[2, 3, 4, 8], DType::F64, 901), &gpu);
            let r = fast::rope(&x, 8, false, Some(10000.0), 1.0, 0.into(), None);
            assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        }

        /// A CPU input with a GPU stream is an `Error::Device`.
        fn cpu_input_with_a_gpu_stream_is_an_error(gpu: Device) {
            let host = randn(&[2, 3, 4, 8], DType::F32, 902);
            let stream = gpu.default_stream().unwrap();
            let r = fast::rope_on(&stream, &host, 8, false, Some(10000.0), 1.0, 0.into(), None);
            assert!(matches!(r, Err(Error::Device(_))), "{r:?}");
        }
    }
}
