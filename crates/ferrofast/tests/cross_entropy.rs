//! `fast::cross_entropy`, `cross_entropy_with`, `cross_entropy_vjp` and
//! `cross_entropy_fused` against the float64 oracle on every device (the CPU, then each CUDA
//! device; the CUDA tests are ignored without the `gpu-tests` feature).
//!
//! MLX's own cases (spec §11.1: V from 7 to 8192, logits `normal * 6`, f32 / f16 / bf16),
//! every target dtype, negative and out-of-range targets, ignored rows, label smoothing,
//! z-loss, every reduction, NaN and infinite logits, strided, offset and broadcast inputs,
//! row lengths over every GPU kernel plan (registers and looped, aligned and not), empty
//! inputs and every error message. The CPU alone: f64 logits and the oracle's gradient
//! against finite differences of its loss. GPU output buffers are poisoned, so unwritten
//! elements fail.

#[macro_use]
mod common;

use common::{by_dtype, check_close, float_dtypes, on, Input};
use ferrofast::fast::{self, CrossEntropyOptions, Reduction};
use ferrofast::{reference, Array, DType, Device, Error};

/// `Error::InvalidArgument(msg)`.
fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

/// Seeded logits `normal * 6` (MLX's test data) in `dtype`, on the CPU.
fn logits(shape: &[usize], dtype: DType, seed: u64) -> Array {
    let base = Array::randn(shape, DType::F64, seed, &Device::Cpu).expect("randn");
    let scaled: Vec<f64> = base
        .to_vec::<f64>()
        .expect("read")
        .into_iter()
        .map(|v| v * 6.0)
        .collect();
    Array::from_vec(scaled, shape)
        .and_then(|a| a.astype(dtype))
        .expect("logits")
}

/// Seeded targets in `[0, v)` of `shape` in `dtype`, on the CPU.
fn targets(shape: &[usize], v: usize, dtype: DType, seed: u64) -> Array {
    let n: usize = shape.iter().product();
    let t: Vec<i64> = common::seeded_below(n, v.max(1) as u64, seed)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    Array::from_vec(t, shape)
        .and_then(|a| a.astype(dtype))
        .expect("targets")
}

/// Seeded positive cotangent of `shape` (f32), on the CPU.
fn cotangent(shape: &[usize], seed: u64) -> Array {
    Array::uniform(shape, 0.5, 1.5, DType::F32, seed, &Device::Cpu).expect("cotangent")
}

/// `(atol, rtol)` of a loss computed in f32 from exact inputs.
const LOSS_TOL: (f64, f64) = (1e-4, 2e-5);

/// `(atol, rtol)` of a gradient rounded to `dtype` after f32 arithmetic.
fn grad_tol(dtype: DType) -> (f64, f64) {
    by_dtype(
        dtype,
        [(1e-6, 5e-5), (1e-6, 1e-3), (1e-6, 8e-3), (1e-12, 1e-10)],
    )
}

/// Runs the forward, backward and fused passes on the device inputs and checks each
/// against the oracle on the host inputs.
fn check_all(x: &Input, t: &Input, opts: &CrossEntropyOptions, seed: u64, what: &str) {
    let dev = x.dev.device();
    let what = format!("{what} {opts:?} seed {seed} on {dev}");
    let loss = fast::cross_entropy_with(&x.dev, &t.dev, opts)
        .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let want = reference::cross_entropy_with(&x.host, &t.host, opts).expect("oracle");
    assert_eq!(loss.dtype(), DType::F32, "{what}: loss dtype");
    assert_eq!(loss.device(), dev, "{what}: loss device");
    check_close(
        &loss,
        &want,
        LOSS_TOL.0,
        LOSS_TOL.1,
        &format!("{what}: loss"),
    );

    let (atol, rtol) = grad_tol(x.host.dtype());
    let (fl, fd) = fast::cross_entropy_fused(&x.dev, &t.dev, opts)
        .unwrap_or_else(|e| panic!("{what}: fused: {e}"));
    let (wl, wd) = reference::cross_entropy_fused(&x.host, &t.host, opts).expect("oracle");
    assert_eq!(fd.dtype(), x.host.dtype(), "{what}: dlogits dtype");
    assert_eq!(fd.shape(), x.host.shape(), "{what}: dlogits shape");
    check_close(
        &fl,
        &wl,
        LOSS_TOL.0,
        LOSS_TOL.1,
        &format!("{what}: fused loss"),
    );
    check_close(&fd, &wd, atol, rtol, &format!("{what}: fused dlogits"));

    // The in-place pass on a fresh copy (the only handle on its buffer): the same bits.
    let owned = x.dev.copy().expect("copy");
    let (il, id) = fast::cross_entropy_fused_in_place(owned, &t.dev, opts)
        .unwrap_or_else(|e| panic!("{what}: fused in place: {e}"));
    assert_eq!(id.device(), dev, "{what}: in-place device");
    assert_eq!(id.shape(), x.host.shape(), "{what}: in-place shape");
    check_close(&il, &fl, 0.0, 0.0, &format!("{what}: in-place loss"));
    check_close(&id, &fd, 0.0, 0.0, &format!("{what}: in-place dlogits"));

    let g_shape: Vec<usize> = match opts.reduction {
        Reduction::None => x.host.shape()[..x.host.ndim() - 1].to_vec(),
        _ => Vec::new(),
    };
    let g = cotangent(&g_shape, seed + 99);
    let dx = fast::cross_entropy_vjp(&x.dev, &t.dev, opts, &on(&g, &dev))
        .unwrap_or_else(|e| panic!("{what}: vjp: {e}"));
    let want = reference::cross_entropy_vjp(&x.host, &t.host, opts, &g).expect("oracle");
    assert_eq!(dx.dtype(), x.host.dtype(), "{what}: vjp dtype");
    check_close(&dx, &want, atol, rtol, &format!("{what}: vjp"));
}

fn contiguous(x: &Array, t: &Array, dev: &Device) -> (Input, Input) {
    (Input::new(x, dev), Input::new(t, dev))
}

const REDUCTIONS: [Reduction; 3] = [Reduction::None, Reduction::Sum, Reduction::Mean];

on_every_device! {
    /// The in-place training pass reuses the logits' buffer when they are its only handle,
    /// and never writes into a buffer another array still reads (a clone, a view).
    fn fused_in_place_reuses_only_unshared_buffers(dev: &Device) {
        let opts = CrossEntropyOptions {
            reduction: Reduction::Mean,
            ..Default::default()
        };
        for dt in float_dtypes(dev) {
            let host = logits(&[6, 5, 300], dt, 17);
            let t = on(&targets(&[6, 5], 300, DType::I32, 18), dev);
            let (wl, wd) = fast::cross_entropy_fused(&on(&host, dev), &t, &opts).expect("fused");
            // The only handle: on the CPU the gradient is the same buffer.
            let x = on(&host, dev).copy().expect("copy");
            let before = x.host_ptr().map(|p| p as usize);
            let (l, d) = fast::cross_entropy_fused_in_place(x, &t, &opts).expect("in place");
            if dev.is_cpu() && dt != DType::F64 {
                assert_eq!(d.host_ptr().map(|p| p as usize), before, "{dt}: buffer reused");
            }
            check_close(&l, &wl, 0.0, 0.0, &format!("{dt}: loss"));
            check_close(&d, &wd, 0.0, 0.0, &format!("{dt}: dlogits"));
            // A clone alive: its buffer is left alone.
            let x = on(&host, dev).copy().expect("copy");
            let keep = x.clone();
            let (_, d) = fast::cross_entropy_fused_in_place(x, &t, &opts).expect("shared");
            assert!(!d.shares_buffer_with(&keep), "{dt}: wrote into a shared buffer");
            check_close(&keep, &host, 0.0, 0.0, &format!("{dt}: the clone is unchanged"));
            check_close(&d, &wd, 0.0, 0.0, &format!("{dt}: shared dlogits"));
            // A view (every other row) of a buffer: a new buffer, the base unchanged.
            let base = on(&logits(&[12, 300], dt, 19), dev);
            let view = base.slice(&[0, 0], &[12, 300], &[2, 1]).expect("view");
            let t6 = on(&targets(&[6], 300, DType::I32, 20), dev);
            let (_, want) = fast::cross_entropy_fused(&view, &t6, &opts).expect("fused view");
            let (_, d) = fast::cross_entropy_fused_in_place(view, &t6, &opts).expect("view");
            assert!(!d.shares_buffer_with(&base));
            check_close(&d, &want, 0.0, 0.0, &format!("{dt}: view dlogits"));
        }
    }
}

on_every_device! {
    /// MLX's `test_cross_entropy`: V over {7, 32, 128, 255, 256, 1000, 4096, 8192}, logits
    /// `(4, 7, V)`, int32 targets, every float dtype.
    fn mlx_cases(dev: &Device) {
        for (i, v) in [7usize, 32, 128, 255, 256, 1000, 4096, 8192].into_iter().enumerate() {
            for dt in float_dtypes(dev) {
                let seed = 10 + i as u64;
                let (x, t) = contiguous(
                    &logits(&[4, 7, v], dt, seed),
                    &targets(&[4, 7], v, DType::I32, seed + 1),
                    dev,
                );
                let loss = fast::cross_entropy(&x.dev, &t.dev).unwrap();
                assert_eq!(loss.shape(), &[4, 7]);
                let want = reference::cross_entropy(&x.host, &t.host).unwrap();
                check_close(&loss, &want, LOSS_TOL.0, LOSS_TOL.1, &format!("V {v} {dt} on {dev}"));
                check_all(&x, &t, &CrossEntropyOptions::default(), seed, &format!("V {v} {dt}"));
            }
        }
    }

    /// Row lengths over every GPU plan: short rows, rows held in the registers of one block
    /// or of a cluster of 2, 4 or 8 (up to 262144 16-bit / 131072 f32 logits), the looped
    /// kernel beyond, and lengths that are not a multiple of the vector width (scalar
    /// accesses); every other length with label smoothing and the z-loss (the sum of the
    /// logits over a cluster).
    fn row_lengths(dev: &Device) {
        let lengths = [
            1usize, 2, 9, 33, 4099, 16384, 16385, 32768, 40000, 128256, 130001, 140000, 300000,
        ];
        for (i, v) in lengths.into_iter().enumerate() {
            let opts = if i % 2 == 1 {
                CrossEntropyOptions {
                    label_smoothing: 0.1,
                    z_loss: 1e-4,
                    ..Default::default()
                }
            } else {
                CrossEntropyOptions::default()
            };
            for dt in [DType::F32, DType::BF16] {
                let seed = 40 + i as u64;
                let (x, t) = contiguous(
                    &logits(&[3, v], dt, seed),
                    &targets(&[3], v, DType::I64, seed + 1),
                    dev,
                );
                check_all(&x, &t, &opts, seed, &format!("V {v} {dt}"));
            }
        }
    }

    /// Every integer target dtype, including targets from the top of u8 and beyond int32.
    fn target_dtypes(dev: &Device) {
        let v = 300;
        for (i, tdt) in [DType::U8, DType::U32, DType::I32, DType::I64].into_iter().enumerate() {
            let seed = 60 + i as u64;
            let (x, t) = contiguous(
                &logits(&[5, v], DType::F32, seed),
                &targets(&[5], 256, tdt, seed + 1),
                dev,
            );
            check_all(&x, &t, &CrossEntropyOptions::default(), seed, &format!("targets {tdt}"));
        }
        // 255 is a class of a 300-class row; 2^32 + 1 is out of range (no cast to int32).
        let t = Array::from_vec(vec![255i64, 1 << 32, (1 << 32) + 1, -(1 << 40), 0], &[5]).unwrap();
        let x = logits(&[5, v], DType::F32, 64);
        let loss = fast::cross_entropy(&on(&x, dev), &on(&t, dev)).unwrap().to_vec::<f32>().unwrap();
        assert!(loss[0].is_finite() && loss[4].is_finite(), "{loss:?}");
        assert!(loss[1].is_nan() && loss[2].is_nan() && loss[3].is_nan(), "{loss:?}");
    }

    /// Negative targets wrap once (`t + V`), as in MLX's CPU and Metal paths; targets still
    /// outside `[0, V)` give NaN loss and gradient rows, and the other rows are unaffected.
    fn negative_and_out_of_range_targets(dev: &Device) {
        let v = 50i64;
        let raw = vec![-1i64, -50, 3, -51, 50, 1000, i64::MIN, i64::MAX];
        let wrapped = vec![49i64, 0, 3, 0, 0, 0, 0, 0];
        let x = logits(&[8, 50], DType::F32, 70);
        let t = Array::from_vec(raw.clone(), &[8]).unwrap();
        let tw = Array::from_vec(wrapped, &[8]).unwrap();
        let (xi, ti) = contiguous(&x, &t, dev);
        let opts = CrossEntropyOptions::default();
        check_all(&xi, &ti, &opts, 70, "out of range");
        let loss = fast::cross_entropy(&xi.dev, &ti.dev).unwrap().to_vec::<f32>().unwrap();
        let plain = fast::cross_entropy(&xi.dev, &on(&tw, dev)).unwrap().to_vec::<f32>().unwrap();
        for (r, &target) in raw.iter().enumerate() {
            if (-v..v).contains(&target) {
                assert_eq!(loss[r], plain[r], "row {r}");
            } else {
                assert!(loss[r].is_nan(), "row {r}: {}", loss[r]);
            }
        }
        let (_, d) = fast::cross_entropy_fused(&xi.dev, &ti.dev, &opts).unwrap();
        let d = d.to_vec::<f32>().unwrap();
        assert!(d[3 * 50..4 * 50].iter().all(|g| g.is_nan()));
        assert!(d[..50].iter().all(|g| g.is_finite()));
    }

    /// `ignore_index`: loss 0 and gradient 0 on those rows (compared before wrapping), left
    /// out of the mean; a mean over no rows is NaN.
    fn ignore_index(dev: &Device) {
        let mut raw: Vec<i64> = targets(&[12], 40, DType::I64, 81).to_vec().unwrap();
        for r in [0usize, 5, 6, 11] {
            raw[r] = -100;
        }
        let t = Array::from_vec(raw, &[12]).unwrap();
        let (x, t) = contiguous(&logits(&[12, 40], DType::BF16, 80), &t, dev);
        for reduction in REDUCTIONS {
            let opts = CrossEntropyOptions { ignore_index: Some(-100), reduction, ..Default::default() };
            check_all(&x, &t, &opts, 80, "ignore -100");
        }
        let opts = CrossEntropyOptions { ignore_index: Some(-100), ..Default::default() };
        let (l, d) = fast::cross_entropy_fused(&x.dev, &t.dev, &opts).unwrap();
        let (l, d) = (l.to_vec::<f32>().unwrap(), d.astype(DType::F32).unwrap().to_vec::<f32>().unwrap());
        assert_eq!(l[5], 0.0);
        assert!(d[5 * 40..6 * 40].iter().all(|&g| g == 0.0));
        // Without the option, -100 wraps... out of range for V = 40: NaN.
        let plain = fast::cross_entropy(&x.dev, &t.dev).unwrap().to_vec::<f32>().unwrap();
        assert!(plain[5].is_nan());
        // Every row ignored: the mean is 0 / 0.
        let all = on(&Array::from_vec(vec![7i32; 3], &[3]).unwrap(), dev);
        let xs = on(&logits(&[3, 40], DType::F32, 82), dev);
        let mean = CrossEntropyOptions { ignore_index: Some(7), reduction: Reduction::Mean, ..Default::default() };
        let m = fast::cross_entropy_with(&xs, &all, &mean).unwrap().to_vec::<f32>().unwrap();
        assert!(m[0].is_nan());
        let (_, d) = fast::cross_entropy_fused(&xs, &all, &mean).unwrap();
        assert!(d.to_vec::<f32>().unwrap().iter().all(|&g| g == 0.0));
    }

    /// More rows than the streamed loss has blocks (up to two a multiprocessor), each of at
    /// least 256 KiB (several ring slots a row, several rows a block), mixed with ignored
    /// rows, out-of-range targets, a NaN row and an infinite row; with and without label
    /// smoothing.
    fn many_long_rows_with_skipped_rows(dev: &Device) {
        let r = 270;
        for (dt, v) in [(DType::BF16, 131100usize), (DType::F32, 65600)] {
            let mut raw: Vec<i64> = targets(&[r], v, DType::I64, 90).to_vec().unwrap();
            for i in (0..r).step_by(7) {
                raw[i] = -100;
            }
            for i in (3..r).step_by(29) {
                raw[i] = v as i64 + 5;
            }
            let mut xv: Vec<f32> = logits(&[r, v], DType::F32, 91).to_vec().unwrap();
            xv[10 * v + v / 2] = f32::NAN;
            xv[11 * v + v - 1] = f32::INFINITY;
            let x = Array::from_vec(xv, &[r, v]).unwrap().astype(dt).unwrap();
            let t = Array::from_vec(raw, &[r]).unwrap();
            let (x, t) = contiguous(&x, &t, dev);
            for eps in [0.0f32, 0.2] {
                let opts = CrossEntropyOptions {
                    ignore_index: Some(-100),
                    label_smoothing: eps,
                    ..Default::default()
                };
                check_all(&x, &t, &opts, 90, &format!("{r} rows of {v} {dt}"));
            }
        }
    }

    /// Label smoothing and z-loss, alone and together, with every reduction and dtype.
    fn smoothing_z_loss_and_reductions(dev: &Device) {
        let mut seed = 90;
        for dt in float_dtypes(dev) {
            for (eps, z) in [(0.1f32, 0.0f32), (0.0, 1e-4), (0.25, 1e-3), (1.0, 0.0)] {
                for reduction in REDUCTIONS {
                    seed += 2;
                    let (x, t) = contiguous(
                        &logits(&[6, 5, 257], dt, seed),
                        &targets(&[6, 5], 257, DType::I32, seed + 1),
                        dev,
                    );
                    let opts = CrossEntropyOptions {
                        ignore_index: Some(3),
                        label_smoothing: eps,
                        z_loss: z,
                        reduction,
                    };
                    check_all(&x, &t, &opts, seed, &format!("{dt}"));
                }
            }
        }
    }

    /// NaN and infinite logits: a NaN makes its row NaN; `-inf` logits (a masked
    /// vocabulary) get probability and gradient 0; a row of `-inf` and a row holding `+inf`
    /// follow the oracle (`max - x[t]`, MLX's fused kernels).
    fn nan_and_infinite_logits(dev: &Device) {
        let v = 64;
        let mut x: Vec<f32> = logits(&[5, v], DType::F32, 100).to_vec().unwrap();
        x[3] = f32::NAN; // row 0
        for j in 0..v / 2 {
            x[v + 2 * j] = f32::NEG_INFINITY; // row 1: every other class masked
        }
        for j in 0..v {
            x[2 * v + j] = f32::NEG_INFINITY; // row 2: all masked
        }
        x[3 * v + 10] = f32::INFINITY; // row 3: +inf, target elsewhere
        x[4 * v + 5] = f32::INFINITY; // row 4: +inf at the target
        let t = Array::from_vec(vec![1i32, 1, 0, 2, 5], &[5]).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let xa = Array::from_vec(x.clone(), &[5, v]).unwrap().astype(dt).unwrap();
            let (xi, ti) = contiguous(&xa, &t, dev);
            let loss = fast::cross_entropy(&xi.dev, &ti.dev).unwrap();
            let want = reference::cross_entropy(&xi.host, &ti.host).unwrap();
            check_close(&loss, &want, LOSS_TOL.0, LOSS_TOL.1, &format!("{dt} on {dev}"));
            let l = loss.to_vec::<f32>().unwrap();
            assert!(l[0].is_nan() && l[1].is_finite() && l[2].is_nan(), "{l:?}");
            assert_eq!(l[3], f32::INFINITY);
            assert!(l[4].is_nan(), "{l:?}");
            let (_, d) = fast::cross_entropy_fused(&xi.dev, &ti.dev, &CrossEntropyOptions::default()).unwrap();
            let d = d.astype(DType::F32).unwrap().to_vec::<f32>().unwrap();
            assert!(d[..v].iter().all(|g| g.is_nan()));
            assert!((0..v / 2).all(|j| d[v + 2 * j] == 0.0));
            // Row 1 alone, the finite rows' gradient against the oracle.
            let (x1, t1) = contiguous(
                &xa.slice(&[1, 0], &[2, v as isize], &[1, 1]).unwrap().contiguous().unwrap(),
                &t.slice(&[1], &[2], &[1]).unwrap().contiguous().unwrap(),
                dev,
            );
            check_all(&x1, &t1, &CrossEntropyOptions::default(), 100, &format!("masked {dt}"));
        }
    }

    /// Strided inputs: transposed logits (the class axis not innermost), stepped and
    /// reversed rows, logits starting off a vector boundary, broadcast logits (every row the
    /// same memory) and strided targets.
    fn strided_inputs(dev: &Device) {
        let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
        for dt in [DType::F32, DType::F16, DType::BF16] {
            // [V, R] memory seen as [R, V].
            let base = logits(&[100, 6], dt, 110);
            let x = Input::view(&base, dev, |a| a.transpose(&[1, 0]).unwrap());
            let t = Input::new(&targets(&[6], 100, DType::I32, 111), dev);
            check_all(&x, &t, &opts, 110, &format!("transposed {dt}"));
            // Every other row, reversed, and the columns from 1 (rows off 16-byte alignment).
            let base = logits(&[10, 129], dt, 112);
            let x = Input::view(&base, dev, |a| a.slice(&[-1, 1], &[-11, 129], &[-2, 1]).unwrap());
            let tb = targets(&[15], 128, DType::I64, 113);
            let t = Input::view(&tb, dev, |a| a.slice(&[0], &[15], &[3]).unwrap());
            assert_eq!(x.host.shape(), &[5, 128]);
            check_all(&x, &t, &opts, 112, &format!("stepped {dt}"));
            // One row broadcast to four (row stride 0), with [2, 2] leading axes.
            let base = logits(&[1, 1, 96], dt, 114);
            let x = Input::view(&base, dev, |a| a.broadcast_to(&[2, 2, 96]).unwrap());
            let t = Input::new(&targets(&[2, 2], 96, DType::U8, 115), dev);
            check_all(&x, &t, &opts, 114, &format!("broadcast {dt}"));
        }
    }

    /// Shapes at the edges: 1-D logits give a 0-d loss; no rows give an empty loss (sum 0,
    /// mean NaN) and an empty gradient.
    fn edge_shapes(dev: &Device) {
        let (x, t) = contiguous(
            &logits(&[33], DType::F32, 120),
            &Array::from_vec(vec![7i32], &[]).unwrap(),
            dev,
        );
        let loss = fast::cross_entropy(&x.dev, &t.dev).unwrap();
        assert_eq!(loss.shape(), &[] as &[usize]);
        check_all(&x, &t, &CrossEntropyOptions::default(), 120, "1-D");
        let (x, t) = contiguous(
            &Array::zeros(&[0, 16], DType::BF16, &Device::Cpu).unwrap(),
            &Array::zeros(&[0], DType::I32, &Device::Cpu).unwrap(),
            dev,
        );
        assert_eq!(fast::cross_entropy(&x.dev, &t.dev).unwrap().shape(), &[0]);
        let sum = CrossEntropyOptions { reduction: Reduction::Sum, ..Default::default() };
        assert_eq!(fast::cross_entropy_with(&x.dev, &t.dev, &sum).unwrap().to_vec::<f32>().unwrap(), vec![0.0]);
        let mean = CrossEntropyOptions { reduction: Reduction::Mean, ..Default::default() };
        assert!(fast::cross_entropy_with(&x.dev, &t.dev, &mean).unwrap().to_vec::<f32>().unwrap()[0].is_nan());
        let (_, d) = fast::cross_entropy_fused(&x.dev, &t.dev, &mean).unwrap();
        assert_eq!(d.shape(), &[0, 16]);
    }

    /// MLX's validation messages, in MLX's order, and the options' checks.
    fn errors(dev: &Device) {
        let x = on(&logits(&[4, 16], DType::F32, 130), dev);
        let t = on(&targets(&[4], 16, DType::I32, 131), dev);
        let scalar = on(&Array::scalar(1.0f32), dev);
        assert_eq!(
            fast::cross_entropy(&scalar, &t).unwrap_err(),
            invalid("[cross_entropy] logits must have at least 1 dimension but got input with 0 dimensions.")
        );
        for bad in [&[5usize][..], &[4, 16]] {
            let tb = on(&targets(bad, 16, DType::I32, 132), dev);
            assert_eq!(
                fast::cross_entropy(&x, &tb).unwrap_err(),
                invalid(&format!(
                    "[cross_entropy] targets shape ({}) does not match logits shape (4,16) with the last axis removed.",
                    bad.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
                ))
            );
        }
        let xi = on(&targets(&[4, 16], 16, DType::I32, 133), dev);
        assert_eq!(
            fast::cross_entropy(&xi, &t).unwrap_err(),
            invalid("[cross_entropy] Received unsupported logits type int32.")
        );
        for (tdt, name) in [(DType::F32, "float32"), (DType::Bool, "bool")] {
            let tf = on(&targets(&[4], 2, DType::I32, 134).astype(tdt).unwrap(), dev);
            assert_eq!(
                fast::cross_entropy(&x, &tf).unwrap_err(),
                invalid(&format!("[cross_entropy] targets must be integer class indices but got {name}."))
            );
        }
        let eps = CrossEntropyOptions { label_smoothing: 1.5, ..Default::default() };
        assert_eq!(
            fast::cross_entropy_with(&x, &t, &eps).unwrap_err(),
            invalid("[cross_entropy] label_smoothing must be in [0, 1] but got 1.5.")
        );
        let z = CrossEntropyOptions { z_loss: -1.0, ..Default::default() };
        assert_eq!(
            fast::cross_entropy_fused(&x, &t, &z).unwrap_err(),
            invalid("[cross_entropy] z_loss must be finite and non-negative but got -1.")
        );
        let g = on(&cotangent(&[5], 135), dev);
        assert_eq!(
            fast::cross_entropy_vjp(&x, &t, &CrossEntropyOptions::default(), &g).unwrap_err(),
            invalid("[cross_entropy_vjp] Output shape (4) does not match cotangent shape (5).")
        );
        let mean = CrossEntropyOptions { reduction: Reduction::Mean, ..Default::default() };
        let g4 = on(&cotangent(&[4], 136), dev);
        assert_eq!(
            fast::cross_entropy_vjp(&x, &t, &mean, &g4).unwrap_err(),
            invalid("[cross_entropy_vjp] Output shape () does not match cotangent shape (4).")
        );
        assert_eq!(
            fast::cross_entropy_vjp_check_targets(true).unwrap_err(),
            invalid("[cross_entropy] Cannot differentiate with respect to the targets.")
        );
        assert!(fast::cross_entropy_vjp_check_targets(false).is_ok());
    }
}

mod cpu_only {
    use super::*;

    /// f64 logits compute in f64; the loss is still f32 and the gradient f64.
    #[test]
    fn f64_logits() {
        let dev = Device::Cpu;
        let opts = CrossEntropyOptions {
            label_smoothing: 0.2,
            z_loss: 1e-3,
            ignore_index: Some(0),
            reduction: Reduction::Mean,
        };
        let (x, t) = contiguous(
            &logits(&[7, 301], DType::F64, 140),
            &targets(&[7], 301, DType::I64, 141),
            &dev,
        );
        check_all(&x, &t, &opts, 140, "f64");
    }

    /// The oracle's gradient against central differences of its own loss, with smoothing,
    /// z-loss, an ignored row and each reduction (the cotangent of a sum is 1 per row).
    #[test]
    fn oracle_gradient_matches_finite_differences() {
        let (r, v) = (3usize, 11usize);
        let x0: Vec<f64> = logits(&[r, v], DType::F64, 150).to_vec().unwrap();
        let t = Array::from_vec(vec![4i64, -1, 2], &[r]).unwrap();
        for reduction in REDUCTIONS {
            let opts = CrossEntropyOptions {
                ignore_index: Some(2),
                label_smoothing: 0.3,
                z_loss: 0.01,
                reduction,
            };
            let total = |x: &[f64]| -> f64 {
                let a = Array::from_vec(x.to_vec(), &[r, v]).unwrap();
                reference::cross_entropy_with(&a, &t, &opts)
                    .unwrap()
                    .to_vec::<f64>()
                    .unwrap()
                    .iter()
                    .sum()
            };
            let (_, d) = reference::cross_entropy_fused(
                &Array::from_vec(x0.clone(), &[r, v]).unwrap(),
                &t,
                &opts,
            )
            .unwrap();
            let d = d.to_vec::<f64>().unwrap();
            let h = 1e-6;
            for i in 0..r * v {
                let (mut up, mut down) = (x0.clone(), x0.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (total(&up) - total(&down)) / (2.0 * h);
                assert!(
                    (fd - d[i]).abs() < 1e-6,
                    "{reduction:?} element {i}: {fd} vs {}",
                    d[i]
                );
            }
        }
    }
}

/// `fast::cross_entropy_fused_in_place_external` over host memory the test owns (as a NumPy
/// array's would be), wrapped with `Array::from_external`.
mod external_in_place {
    use super::*;

    /// Host memory outside ferrofast: 8-byte words, so every dtype is aligned.
    struct Lent {
        words: Vec<u64>,
    }

    impl Lent {
        /// `x`'s row-major bytes, `pad` elements of zeros before and after.
        fn new(x: &Array, pad: usize) -> Lent {
            let item = x.dtype().size();
            let bytes = (x.size() + 2 * pad) * item;
            let mut words = vec![0u64; bytes.div_ceil(8) + 1];
            let src = x.contiguous().expect("row-major");
            let from = src.host_ptr().expect("host");
            // SAFETY: `from` addresses `src.nbytes()` bytes of `src`, alive here; the words
            // hold `bytes >= pad * item + src.nbytes()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    from,
                    words.as_mut_ptr().cast::<u8>().add(pad * item),
                    src.nbytes(),
                );
            }
            Lent { words }
        }

        fn ptr(&self, dtype: DType, elem: usize) -> *const u8 {
            self.words
                .as_ptr()
                .cast::<u8>()
                .wrapping_add(elem * dtype.size())
        }

        /// A ferrofast array over the memory (row-major from element `elem` unless `strides`).
        fn array(
            &self,
            dtype: DType,
            elem: usize,
            shape: &[usize],
            strides: Option<&[isize]>,
        ) -> Array {
            let rm: Vec<isize> = {
                let mut s = vec![1isize; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    s[i] = s[i + 1] * shape[i + 1] as isize;
                }
                s
            };
            // SAFETY: the words outlive every array made here (each test drops its arrays
            // before reading or dropping `self`), and the shapes used stay inside them;
            // nothing writes them but the in-place call under test, which the test lends
            // them to.
            unsafe {
                Array::from_external(
                    self.ptr(dtype, elem),
                    shape,
                    strides.unwrap_or(&rm),
                    dtype,
                    Box::new(()),
                )
            }
            .expect("from_external")
        }

        /// A ferrofast-owned copy of the elements (row-major from `elem`).
        fn read(&self, dtype: DType, elem: usize, shape: &[usize]) -> Array {
            self.array(dtype, elem, shape, None).copy().expect("copy")
        }
    }

    fn all_options() -> Vec<CrossEntropyOptions> {
        let mut v = Vec::new();
        for reduction in REDUCTIONS {
            v.push(CrossEntropyOptions {
                reduction,
                ..Default::default()
            });
            v.push(CrossEntropyOptions {
                ignore_index: Some(3),
                label_smoothing: 0.1,
                z_loss: 1e-3,
                reduction,
            });
        }
        v
    }

    /// The gradient lands in the lender's memory, the same bits as `cross_entropy_fused`,
    /// for every float dtype the pass writes and every option; the returned `dlogits` views
    /// that memory.
    #[test]
    fn writes_the_fused_gradient_into_borrowed_memory() {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for (i, opts) in all_options().iter().enumerate() {
                let shape = [5usize, 3, 257];
                let host = logits(&shape, dt, 200 + i as u64);
                let mut t = targets(&[5, 3], 257, DType::I64, 201)
                    .to_vec::<i64>()
                    .unwrap();
                t[4] = 3; // an ignored row when ignore_index is 3
                let t = Array::from_vec(t, &[5, 3]).unwrap();
                let (wl, wd) = fast::cross_entropy_fused(&host, &t, opts).expect("fused");
                let lent = Lent::new(&host, 0);
                let x = lent.array(dt, 0, &shape, None);
                let at = x.host_ptr().map(|p| p as usize);
                // SAFETY: the test lends `lent`'s memory for the call; nothing else reads it.
                let (l, d) = unsafe { fast::cross_entropy_fused_in_place_external(x, &t, opts) }
                    .expect("in place");
                assert_eq!(
                    d.host_ptr().map(|p| p as usize),
                    at,
                    "{dt} {opts:?}: same memory"
                );
                check_close(&l, &wl, 0.0, 0.0, &format!("{dt} {opts:?}: loss"));
                check_close(&d, &wd, 0.0, 0.0, &format!("{dt} {opts:?}: dlogits"));
                drop(d);
                let written = lent.read(dt, 0, &shape);
                check_close(&written, &wd, 0.0, 0.0, &format!("{dt} {opts:?}: memory"));
            }
        }
    }

    /// A row-major view at an offset inside a bigger borrowed block: only its elements are
    /// written; enough rows to take the parallel kernel path.
    #[test]
    fn offset_view_writes_only_its_elements() {
        let (rows, v, pad) = (40usize, 1000usize, 7usize);
        let host = logits(&[rows, v], DType::F32, 210);
        let t = targets(&[rows], v, DType::I32, 211);
        let opts = CrossEntropyOptions {
            reduction: Reduction::Mean,
            ..Default::default()
        };
        let (_, wd) = fast::cross_entropy_fused(&host, &t, &opts).expect("fused");
        let lent = Lent::new(&host, pad);
        let x = lent.array(DType::F32, pad, &[rows, v], None);
        // SAFETY: as above.
        let (_, d) = unsafe { fast::cross_entropy_fused_in_place_external(x, &t, &opts) }.unwrap();
        drop(d);
        check_close(
            &lent.read(DType::F32, pad, &[rows, v]),
            &wd,
            0.0,
            0.0,
            "view",
        );
        let zeros = Array::zeros(&[pad], DType::F32, &Device::Cpu).unwrap();
        check_close(
            &lent.read(DType::F32, 0, &[pad]),
            &zeros,
            0.0,
            0.0,
            "before untouched",
        );
        check_close(
            &lent.read(DType::F32, pad + rows * v, &[pad]),
            &zeros,
            0.0,
            0.0,
            "after untouched",
        );
    }

    /// Logits ferrofast owns alone take the in-place pass over their own buffer.
    #[test]
    fn owned_logits_are_written_in_their_buffer() {
        let host = logits(&[4, 300], DType::BF16, 220);
        let t = targets(&[4], 300, DType::I32, 221);
        written_where_it_lies(host.copy().unwrap(), &t, "owned");
    }

    /// A row-major view into ferrofast's own buffer, the only handle left on it, is written
    /// where it lies too (the in-place pass over its rows, not a new buffer).
    #[test]
    fn owned_view_is_written_where_it_lies() {
        let host = logits(&[6, 300], DType::F16, 225);
        let t = targets(&[4], 300, DType::I32, 226);
        let whole = host.copy().unwrap();
        let x = whole.slice(&[1, 0], &[5, 300], &[1, 1]).unwrap();
        drop(whole);
        assert!(x.is_contiguous() && x.offset() == 300);
        written_where_it_lies(x, &t, "owned view");
    }

    /// Runs the in-place pass (default options) on `x`, ferrofast's own row-major buffer and
    /// its only handle, and checks that it writes `x`'s memory with the dlogits of
    /// `fast::cross_entropy_fused`, bit for bit.
    fn written_where_it_lies(x: Array, t: &Array, what: &str) {
        let opts = CrossEntropyOptions::default();
        let (_, wd) = fast::cross_entropy_fused(&x, t, &opts).unwrap();
        let at = x.host_ptr().map(|p| p as usize);
        // SAFETY: ferrofast's own buffer, this the only handle: nothing is borrowed.
        let (_, d) = unsafe { fast::cross_entropy_fused_in_place_external(x, t, &opts) }.unwrap();
        assert_eq!(d.host_ptr().map(|p| p as usize), at, "{what}: same memory");
        check_close(&d, &wd, 0.0, 0.0, what);
    }

    /// Refused: MLX's checks first, then f64, layouts that are not row-major contiguous and
    /// a buffer another handle shares; the memory is left unchanged.
    #[test]
    fn refusals_leave_the_memory_unchanged() {
        let opts = CrossEntropyOptions::default();
        let host = logits(&[4, 16], DType::F32, 230);
        let t = targets(&[4], 16, DType::I32, 231);
        let lent = Lent::new(&host, 0);
        let unchanged =
            |what: &str| check_close(&lent.read(DType::F32, 0, &[4, 16]), &host, 0.0, 0.0, what);

        let t5 = targets(&[5], 16, DType::I32, 232);
        // SAFETY (each call below): the test lends `lent`'s memory; nothing else reads it.
        let e = unsafe {
            fast::cross_entropy_fused_in_place_external(
                lent.array(DType::F32, 0, &[4, 16], None),
                &t5,
                &opts,
            )
        };
        assert_eq!(
            e.unwrap_err(),
            invalid("[cross_entropy] targets shape (5) does not match logits shape (4,16) with the last axis removed.")
        );
        unchanged("shape error");

        let tt = lent.array(DType::F32, 0, &[16, 4], Some(&[1, 16]));
        let t16 = targets(&[16], 4, DType::I32, 233);
        let e = unsafe { fast::cross_entropy_fused_in_place_external(tt, &t16, &opts) };
        assert_eq!(
            e.unwrap_err(),
            invalid("[cross_entropy] The in-place pass needs row-major contiguous logits, got shape (16,4) with strides [1, 16].")
        );
        unchanged("transposed");

        let x = lent.array(DType::F32, 0, &[4, 16], None);
        let keep = x.clone();
        let e = unsafe { fast::cross_entropy_fused_in_place_external(x, &t, &opts) };
        assert_eq!(
            e.unwrap_err(),
            invalid("[cross_entropy] The in-place pass needs the only handle on the logits' buffer; another array shares it.")
        );
        drop(keep);
        unchanged("shared");

        let h64 = logits(&[4, 16], DType::F64, 234);
        let lent64 = Lent::new(&h64, 0);
        let e = unsafe {
            fast::cross_entropy_fused_in_place_external(
                lent64.array(DType::F64, 0, &[4, 16], None),
                &t,
                &opts,
            )
        };
        assert_eq!(
            e.unwrap_err(),
            invalid("[cross_entropy] The in-place pass writes float32, float16 or bfloat16 logits, not float64.")
        );
        check_close(&lent64.read(DType::F64, 0, &[4, 16]), &h64, 0.0, 0.0, "f64");
    }

    /// Empty logits: nothing to write.
    #[test]
    fn empty_logits() {
        let x = Array::zeros(&[0, 8], DType::F16, &Device::Cpu).unwrap();
        let lent = Lent::new(&x, 0);
        let t = Array::zeros(&[0], DType::I32, &Device::Cpu).unwrap();
        // SAFETY: as above.
        let (l, d) = unsafe {
            fast::cross_entropy_fused_in_place_external(
                lent.array(DType::F16, 0, &[0, 8], None),
                &t,
                &CrossEntropyOptions::default(),
            )
        }
        .unwrap();
        assert_eq!((l.shape(), d.shape()), (&[0usize][..], &[0usize, 8][..]));
    }
}
