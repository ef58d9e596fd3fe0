//! The CUDA RMS norm and layer norm kernels against a float64 reference that follows MLX's
//! definition (normalise, round to the output dtype, multiply by the weight and add the bias
//! in the output dtype). Output buffers are poisoned, so unwritten elements fail. Without a
//! CUDA device each test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use ferrofast::fast::{layer_norm, layer_norm_on, rms_norm, rms_norm_on};
use ferrofast::{bf16, f16, Array, DType, Device, Error, Stream};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Rounds to `dtype` the way the kernel (and MLX) does: through f32.
fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => f16::from_f32(v as f32).to_f64(),
        DType::BF16 => bf16::from_f32(v as f32).to_f64(),
        _ => v,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Rms,
    Layer,
}

/// Reference values and, per element, the magnitude its rounding errors scale with
/// (|normalised * weight| + |bias|).
fn reference(
    kind: Kind,
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    eps: f32,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>) {
    let d = *x.shape().last().unwrap();
    let xs = x.to_f64_vec().unwrap();
    let ws = w.map(|w| w.to_f64_vec().unwrap());
    let bs = b.map(|b| b.to_f64_vec().unwrap());
    let eps = eps as f64;
    let mut out = Vec::with_capacity(xs.len());
    let mut scale = Vec::with_capacity(xs.len());
    if d == 0 {
        return (out, scale);
    }
    for row in xs.chunks(d) {
        let (mean, inv) = match kind {
            Kind::Rms => {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
                (0.0, 1.0 / (ms + eps).sqrt())
            }
            Kind::Layer => {
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                (mean, 1.0 / (var + eps).sqrt())
            }
        };
        for (i, &v) in row.iter().enumerate() {
            let mut y = round_to(dtype, (v - mean) * inv);
            let mut s = y.abs();
            if let Some(ws) = &ws {
                y = round_to(dtype, y * ws[i]);
                s = y.abs();
            }
            if let Some(bs) = &bs {
                s += bs[i].abs();
                y = round_to(dtype, y + bs[i]);
            }
            out.push(y);
            scale.push(s.max(y.abs()));
        }
    }
    (out, scale)
}

/// `(atol, rtol)`, rtol relative to the element's scale. For f16/bf16 three units in the last
/// place: the reference (f64 statistics) and the kernel (f32) may round the normalised value
/// to neighbouring values, and that difference carries through the weight multiply and the
/// bias add, each rounded again.
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (1e-4, 3.0 * 2f64.powi(-10)),
        _ => (1e-3, 3.0 * 2f64.powi(-7)),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    kind: Kind,
    gpu: &Device,
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    eps: f32,
    what: &str,
    expect_stream: Option<&Stream>,
) {
    let dx = x.to_device(gpu).unwrap();
    let dw = w.map(|w| w.to_device(gpu).unwrap());
    let db = b.map(|b| b.to_device(gpu).unwrap());
    check_on_gpu(
        kind,
        x,
        w,
        b,
        &dx,
        dw.as_ref(),
        db.as_ref(),
        eps,
        what,
        expect_stream,
    );
}

/// Runs the kernel on GPU arrays `dx`, `dw`, `db` (views built like the host `x`, `w`, `b`)
/// and compares with the reference computed from the host arrays.
#[allow(clippy::too_many_arguments)]
fn check_on_gpu(
    kind: Kind,
    x: &Array,
    w: Option<&Array>,
    b: Option<&Array>,
    dx: &Array,
    dw: Option<&Array>,
    db: Option<&Array>,
    eps: f32,
    what: &str,
    stream: Option<&Stream>,
) {
    let dtype = x.dtype();
    let out = match (kind, stream) {
        (Kind::Rms, None) => rms_norm(dx, dw, eps),
        (Kind::Rms, Some(s)) => rms_norm_on(s, dx, dw, eps),
        (Kind::Layer, None) => layer_norm(dx, dw, db, eps),
        (Kind::Layer, Some(s)) => layer_norm_on(s, dx, dw, db, eps),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), dx.device(), "{what}");
    assert_eq!(out.shape(), x.shape(), "{what}");
    assert_eq!(out.dtype(), dtype, "{what}");
    assert!(out.is_contiguous());
    if let Some(s) = stream {
        assert_eq!(out.stream().as_ref(), Some(s), "{what}");
    }
    let got = out.to_f64_vec().unwrap();
    let (want, scale) = reference(kind, x, w, b, eps, dtype);
    let (atol, rtol) = tolerance(dtype);
    for i in 0..want.len() {
        let (g, r) = (got[i], want[i]);
        assert!(
            !g.is_nan(),
            "{what}: element {i} is NaN (unwritten?), reference {r}"
        );
        assert!(
            (g - r).abs() <= atol + rtol * scale[i],
            "{what}: element {i} = {g}, reference {r} (atol {atol}, rtol {rtol}, scale {})",
            scale[i]
        );
    }
}

/// Rows for a row length: enough blocks to fill 132 SMs for short rows, fewer for long ones.
fn rows_for(d: usize) -> usize {
    (1usize << 20).div_ceil(d).clamp(3, 300)
}

/// Runs `body` for each dtype on its own thread: every dtype needs its own kernels compiled.
fn per_dtype(body: impl Fn(DType) + Sync) {
    std::thread::scope(|scope| {
        for dtype in DTYPES {
            let body = &body;
            scope.spawn(move || body(dtype));
        }
    });
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn rms_norm_over_dtypes_sizes_and_weights() {
    let Some(gpu) = gpu() else { return };
    per_dtype(|dtype| {
        let mut seed = 1000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
        for d in [
            1usize, 8, 31, 32, 33, 127, 128, 256, 1000, 1024, 2048, 2049, 3000, 4096, 4099, 8192,
            8200, 16384, 16385, 40000, 65537,
        ] {
            for with_w in [true, false] {
                seed += 1;
                let rows = rows_for(d);
                let x = common::randn(&[rows, d], dtype, seed);
                let w = common::randn(&[d], dtype, seed + 50_000);
                let what = format!("rms_norm {dtype} D={d} rows={rows} w={with_w} seed={seed}");
                let w = with_w.then_some(&w);
                check(Kind::Rms, &gpu, &x, w, None, 1e-5, &what, None);
            }
        }
    });
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn layer_norm_over_dtypes_sizes_weights_and_biases() {
    let Some(gpu) = gpu() else { return };
    per_dtype(|dtype| {
        let mut seed = 2000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
        for d in [
            1usize, 8, 31, 33, 128, 1024, 2048, 3000, 4096, 4099, 8192, 16385, 40000,
        ] {
            for (with_w, with_b) in [(true, true), (true, false), (false, true), (false, false)] {
                seed += 1;
                let rows = rows_for(d);
                // A nonzero mean so the centring matters.
                let x = common::uniform(&[rows, d], -1.0, 3.0, dtype, seed);
                let w = common::randn(&[d], dtype, seed + 50_000);
                let b = common::randn(&[d], dtype, seed + 60_000);
                let what = format!(
                    "layer_norm {dtype} D={d} rows={rows} w={with_w} b={with_b} seed={seed}"
                );
                let w = with_w.then_some(&w);
                let b = with_b.then_some(&b);
                check(Kind::Layer, &gpu, &x, w, b, 1e-5, &what, None);
            }
        }
    });
}

/// Rows that steer the one-reduction moments (sums about the row's first element) to both of
/// its outcomes: a large mean with a small spread (trusted), the first element an outlier of
/// its row (the exact two-pass fallback), constant rows, and a constant row but its first
/// element.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn layer_norm_rows_with_offsets_outliers_and_constants() {
    let Some(gpu) = gpu() else { return };
    per_dtype(|dtype| {
        let mut seed = 7000 + 100 * dtype.size() as u64 + (dtype == DType::BF16) as u64 * 50;
        // Offsets the 16-bit types still resolve into distinct values around the mean.
        let (offset, outlier) = match dtype {
            DType::F32 => (1000.0f32, 5000.0f32),
            DType::F16 => (100.0, 2000.0),
            _ => (30.0, 2000.0),
        };
        for d in [8usize, 100, 1024, 2048, 3000, 4096, 4099, 16385, 40000] {
            seed += 1;
            let rows = 8;
            let noise = common::randn(&[rows, d], DType::F32, seed)
                .to_vec::<f32>()
                .unwrap();
            let mut data = Vec::with_capacity(rows * d);
            for r in 0..rows {
                let z = &noise[r * d..(r + 1) * d];
                for (i, &n) in z.iter().enumerate() {
                    data.push(match r % 4 {
                        0 => offset + n,
                        1 if i == 0 => outlier,
                        1 => n,
                        2 => offset,
                        _ if i == 0 => -outlier,
                        _ => 1.5,
                    });
                }
            }
            let x = Array::from_vec(data, &[rows, d])
                .unwrap()
                .astype(dtype)
                .unwrap();
            let w = common::randn(&[d], dtype, seed + 50_000);
            let b = common::randn(&[d], dtype, seed + 60_000);
            let what = format!("layer_norm {dtype} D={d} offsets/outliers seed={seed}");
            check(Kind::Layer, &gpu, &x, Some(&w), Some(&b), 1e-5, &what, None);
            check(Kind::Layer, &gpu, &x, None, None, 1e-5, &what, None);
        }
    });
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn three_dimensional_inputs_and_other_eps() {
    let Some(gpu) = gpu() else { return };
    for dtype in DTYPES {
        let x = common::randn(&[4, 50, 96], dtype, 3001);
        let w = common::randn(&[96], dtype, 3002);
        let b = common::randn(&[96], dtype, 3003);
        for eps in [1e-3f32, 1e-6] {
            let what = format!("{dtype} [4,50,96] eps={eps}");
            check(Kind::Rms, &gpu, &x, Some(&w), None, eps, &what, None);
            check(Kind::Layer, &gpu, &x, Some(&w), Some(&b), eps, &what, None);
        }
        // 1-D input: a single row.
        let x1 = common::randn(&[4099], dtype, 3004);
        let w1 = common::randn(&[4099], dtype, 3005);
        check(Kind::Rms, &gpu, &x1, Some(&w1), None, 1e-5, "1-D rms", None);
        check(
            Kind::Layer,
            &gpu,
            &x1,
            Some(&w1),
            None,
            1e-5,
            "1-D layer",
            None,
        );
    }
}

/// Builds the same view on the host array and on its GPU copy, then checks both norms.
fn check_view(
    gpu: &Device,
    base: &Array,
    view: impl Fn(&Array) -> Array,
    w: &Array,
    b: &Array,
    what: &str,
) {
    let x = view(base);
    let dx = view(&base.to_device(gpu).unwrap());
    let dw = w.to_device(gpu).unwrap();
    let db = b.to_device(gpu).unwrap();
    for kind in [Kind::Rms, Kind::Layer] {
        let bias = (kind == Kind::Layer).then_some(b);
        let dbias = (kind == Kind::Layer).then_some(&db);
        check_on_gpu(
            kind,
            &x,
            Some(w),
            bias,
            &dx,
            Some(&dw),
            dbias,
            1e-5,
            what,
            None,
        );
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_and_offset_inputs() {
    let Some(gpu) = gpu() else { return };
    for dtype in DTYPES {
        for d in [64usize, 33, 4096] {
            let w = common::randn(&[d], dtype, 4001);
            let b = common::randn(&[d], dtype, 4002);
            let what = |s: &str| format!("{dtype} D={d} {s}");
            // Rows with a gap after each (row stride D + 3), starting at an odd offset.
            let base = common::randn(&[200, d + 3], dtype, 4003);
            let slice = |a: &Array| a.slice(&[0, 1], &[200, d as isize + 1], &[1, 1]).unwrap();
            check_view(&gpu, &base, slice, &w, &b, &what("gapped rows"));
            // Every other row, and rows in reverse order (negative row stride).
            let base = common::randn(&[301, d], dtype, 4004);
            let every_other = |a: &Array| a.slice(&[0], &[301], &[2]).unwrap();
            check_view(&gpu, &base, every_other, &w, &b, &what("every other row"));
            let reversed = |a: &Array| a.slice(&[-1], &[-302], &[-1]).unwrap();
            check_view(&gpu, &base, reversed, &w, &b, &what("reversed rows"));
            // Aligned (offset of 16 bytes) and misaligned (one element) starts.
            let flat = common::randn(&[150 * d + 8], dtype, 4005);
            let shift = |k: usize| {
                move |a: &Array| {
                    a.slice(&[k as isize], &[(k + 150 * d) as isize], &[1])
                        .unwrap()
                        .reshape(&[150, d])
                        .unwrap()
                }
            };
            check_view(
                &gpu,
                &flat,
                shift(16 / dtype.size()),
                &w,
                &b,
                &what("offset 16B"),
            );
            check_view(&gpu, &flat, shift(1), &w, &b, &what("offset 1"));
            // Leading axes that do not merge: a contiguous copy first.
            let base = common::randn(&[3, 60, d], dtype, 4006);
            let unmergeable = |a: &Array| a.slice(&[0, 7], &[3, 60], &[1, 1]).unwrap();
            check_view(
                &gpu,
                &base,
                unmergeable,
                &w,
                &b,
                &what("[3,53,D] of [3,60,D]"),
            );
            // Last axis not contiguous: a copy first.
            let base = common::randn(&[d, 140], dtype, 4007);
            let transposed = |a: &Array| a.transpose(&[1, 0]).unwrap();
            check_view(&gpu, &base, transposed, &w, &b, &what("transposed"));
            // One row broadcast to many (row stride 0).
            let base = common::randn(&[1, d], dtype, 4008);
            let broadcast = |a: &Array| a.broadcast_to(&[140, d]).unwrap();
            check_view(&gpu, &base, broadcast, &w, &b, &what("broadcast rows"));
        }
    }
}

/// Takes a length-`d` view of a length-`2d` parameter.
type ParamView = fn(&Array, usize) -> Array;

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_weights_and_biases() {
    let Some(gpu) = gpu() else { return };
    for dtype in DTYPES {
        let d = 4096;
        let x = common::randn(&[150, d], dtype, 5001);
        let w2 = common::randn(&[2 * d], dtype, 5002);
        let b2 = common::randn(&[2 * d], dtype, 5003);
        let dx = x.to_device(&gpu).unwrap();
        let views: [(&str, ParamView); 3] = [
            ("stride 2", |a, d| {
                a.slice(&[0], &[2 * d as isize], &[2]).unwrap()
            }),
            ("reversed", |a, d| {
                a.slice(&[-1], &[-(d as isize) - 1], &[-1]).unwrap()
            }),
            ("offset 1", |a, d| {
                a.slice(&[1], &[d as isize + 1], &[1]).unwrap()
            }),
        ];
        for (name, view) in views {
            let (w, b) = (view(&w2, d), view(&b2, d));
            let dw = view(&w2.to_device(&gpu).unwrap(), d);
            let db = view(&b2.to_device(&gpu).unwrap(), d);
            let what = format!("{dtype} weight {name}");
            check_on_gpu(
                Kind::Rms,
                &x,
                Some(&w),
                None,
                &dx,
                Some(&dw),
                None,
                1e-5,
                &what,
                None,
            );
            check_on_gpu(
                Kind::Layer,
                &x,
                Some(&w),
                Some(&b),
                &dx,
                Some(&dw),
                Some(&db),
                1e-5,
                &what,
                None,
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
        let x = common::randn(&[300, 1000], dtype, 6001);
        let w = common::randn(&[1000], dtype, 6002);
        let b = common::randn(&[1000], dtype, 6003);
        check(
            Kind::Rms,
            &gpu,
            &x,
            Some(&w),
            None,
            1e-5,
            "rms on a stream",
            Some(&s),
        );
        check(
            Kind::Layer,
            &gpu,
            &x,
            Some(&w),
            Some(&b),
            1e-5,
            "layer on a stream",
            Some(&s),
        );
        // Input produced on one stream, consumed on another.
        let s2 = Stream::new(&gpu).unwrap();
        let dx = x.to_stream(&s2).unwrap();
        let dw = w.to_device(&gpu).unwrap();
        check_on_gpu(
            Kind::Rms,
            &x,
            Some(&w),
            None,
            &dx,
            Some(&dw),
            None,
            1e-5,
            "cross-stream input",
            Some(&s),
        );
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn empty_inputs() {
    let Some(gpu) = gpu() else { return };
    for shape in [[0usize, 16], [4, 0]] {
        let x = Array::zeros(&shape, DType::F32, &gpu).unwrap();
        let w = Array::ones(&[shape[1]], DType::F32, &gpu).unwrap();
        let y = rms_norm(&x, Some(&w), 1e-5).unwrap();
        assert_eq!(y.shape(), &shape);
        assert_eq!(y.device(), gpu);
        let y = layer_norm(&x, None, None, 1e-5).unwrap();
        assert_eq!(y.shape(), &shape);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn bad_arguments_are_errors() {
    let Some(gpu) = gpu() else { return };
    let x = common::randn(&[4, 8], DType::F32, 7001)
        .to_device(&gpu)
        .unwrap();
    let w = common::randn(&[8], DType::F32, 7002)
        .to_device(&gpu)
        .unwrap();
    // f64 stays on the CPU.
    let x64 = x.astype(DType::F64).unwrap();
    assert!(matches!(
        rms_norm(&x64, None, 1e-5),
        Err(Error::Unsupported(_))
    ));
    // Inputs of another dtype than the output are cast on the GPU first.
    let w16 = w.astype(DType::F16).unwrap();
    let y = layer_norm(&x, Some(&w16), None, 1e-5).unwrap();
    assert_eq!((y.dtype(), y.device()), (DType::F32, gpu));
    // Weight of the wrong size or rank.
    let w9 = common::randn(&[9], DType::F32, 7003)
        .to_device(&gpu)
        .unwrap();
    assert!(matches!(
        rms_norm(&x, Some(&w9), 1e-5),
        Err(Error::InvalidArgument(_))
    ));
    let w2d = w.reshape(&[2, 4]).unwrap();
    assert!(matches!(
        layer_norm(&x, None, Some(&w2d), 1e-5),
        Err(Error::InvalidArgument(_))
    ));
    // 0-d input.
    let s = Array::scalar(1.0f32).to_device(&gpu).unwrap();
    match rms_norm(&s, None, 1e-5) {
        Err(Error::InvalidArgument(m)) => assert_eq!(
            m,
            "[rms_norm] Input must have at least 1 dimension but got input with 0 dimensions."
        ),
        other => panic!("expected the rank error, got {other:?}"),
    }
    // A weight on the CPU, and CPU input with a GPU stream.
    let host_w = common::randn(&[8], DType::F32, 7004);
    assert!(matches!(
        rms_norm(&x, Some(&host_w), 1e-5),
        Err(Error::Device(_))
    ));
    let host_x = common::randn(&[4, 8], DType::F32, 7005);
    let stream = gpu.default_stream().unwrap();
    assert!(matches!(
        rms_norm_on(&stream, &host_x, None, 1e-5),
        Err(Error::Device(_))
    ));
}
