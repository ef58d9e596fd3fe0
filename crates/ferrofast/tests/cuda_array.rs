//! GPU arrays: uploads and downloads, strided copies, casts, reshapes, streams. Every test
//! compares against the same operation on the CPU, which is the definition. Without a CUDA
//! device each test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use ferrofast::{bf16, f16, Array, DType, Device, Error, Stream};

/// The first GPU, with output poisoning on (unwritten elements read as NaN / 0xFF), or
/// `None` (after printing why) when there is none.
/// Bitwise-meaningful comparison: equal values, NaN where the reference has NaN.
fn assert_same(got: &Array, want: &Array, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let g = got.to_f64_vec().expect("read GPU result");
    let w = want.to_f64_vec().expect("read CPU result");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let same = (a.is_nan() && b.is_nan()) || a == b;
        assert!(
            same,
            "{what}: element {i} is {a} on the GPU, {b} on the CPU"
        );
    }
}

/// `host.astype(dst)` as MLX defines it. Values become f16 or bf16 through f32 (MLX casts
/// with `static_cast<float16_t>(float)`); the CPU `astype` instead rounds f64 -> f16/bf16
/// with the `half` crate, whose bf16 path ignores the low 32 mantissa bits of the f64 when
/// breaking ties, so f32 -> bf16 can differ by one unit in the last place there.
fn expected_cast(host: &Array, dst: DType) -> Array {
    if host.dtype() == dst || !matches!(dst, DType::F16 | DType::BF16) {
        return host.astype(dst).unwrap();
    }
    let rounded: Vec<f64> = host
        .to_f64_vec()
        .unwrap()
        .into_iter()
        .map(|v| match dst {
            DType::F16 => f16::from_f32(v as f32).to_f64(),
            _ => bf16::from_f32(v as f32).to_f64(),
        })
        .collect();
    // Every value is now representable in `dst`, so this last cast is exact.
    Array::from_vec(rounded, host.shape())
        .unwrap()
        .astype(dst)
        .unwrap()
}

/// A seeded array of `dtype` with varied values (uniform in [-300, 300) so integer casts
/// wrap and saturate).
fn sample(shape: &[usize], dtype: DType, seed: u64) -> Array {
    if dtype.is_floating() {
        common::randn(shape, dtype, seed)
    } else {
        common::uniform(shape, -300.0, 300.0, dtype, seed)
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn device_queries() {
    let Some(gpu) = gpu() else { return };
    assert!(Device::cuda_device_count() >= 1);
    assert!(gpu.is_cuda() && !gpu.is_cpu());
    let n = Device::cuda_device_count();
    match Device::cuda(n) {
        Err(Error::Device(msg)) => assert!(msg.contains("does not exist"), "{msg}"),
        other => panic!("expected a device error for cuda:{n}, got {other:?}"),
    }
    gpu.synchronize().expect("synchronize");
    let s = gpu.default_stream().expect("default stream");
    assert_eq!(s.device(), gpu);
    assert!(Stream::new(&Device::Cpu).is_err());
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn round_trips_every_dtype_exactly() {
    let Some(gpu) = gpu() else { return };
    for (k, dtype) in DType::ALL.into_iter().enumerate() {
        for shape in [
            vec![],
            vec![0, 3],
            vec![1],
            vec![7],
            vec![33, 5],
            vec![2, 3, 4099],
        ] {
            let host = sample(&shape, dtype, 100 + k as u64);
            let dev = host.to_device(&gpu).expect("upload");
            assert_eq!(dev.device(), gpu);
            assert_eq!(dev.shape(), host.shape());
            assert!(dev.stream().is_some());
            let back = dev.to_device(&Device::Cpu).expect("download");
            assert_eq!(back.device(), Device::Cpu);
            assert_same(&back, &host, &format!("{dtype} {shape:?} round trip"));
            assert_same(&dev, &host, &format!("{dtype} {shape:?} to_f64_vec"));
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn constructors_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let shape = [5, 17];
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let a = Array::randn(&shape, dtype, 7, &gpu).unwrap();
        assert_eq!(a.device(), gpu);
        assert_same(
            &a,
            &Array::randn(&shape, dtype, 7, &Device::Cpu).unwrap(),
            "randn",
        );
        let u = Array::uniform(&shape, -2.0, 3.0, dtype, 8, &gpu).unwrap();
        assert_same(
            &u,
            &Array::uniform(&shape, -2.0, 3.0, dtype, 8, &Device::Cpu).unwrap(),
            "uniform",
        );
        let f = Array::full(&shape, 2.5, dtype, &gpu).unwrap();
        assert_same(
            &f,
            &Array::full(&shape, 2.5, dtype, &Device::Cpu).unwrap(),
            "full",
        );
        assert_same(
            &Array::zeros(&shape, dtype, &gpu).unwrap(),
            &Array::zeros(&shape, dtype, &Device::Cpu).unwrap(),
            "zeros",
        );
        assert_same(
            &Array::ones(&shape, dtype, &gpu).unwrap(),
            &Array::ones(&shape, dtype, &Device::Cpu).unwrap(),
            "ones",
        );
    }
}

/// Views of a [4, 6, 10] array: each is built the same way on both devices.
fn views(a: &Array) -> Vec<(&'static str, Array)> {
    vec![
        ("identity", a.clone()),
        ("transpose", a.transpose(&[2, 0, 1]).unwrap()),
        ("swapaxes", a.swapaxes(0, 1).unwrap()),
        ("rows 1..", a.slice(&[0, 1], &[4, 6], &[1, 1]).unwrap()),
        ("reversed", a.slice(&[-1], &[-5], &[-1]).unwrap()),
        (
            "stepped",
            a.slice(&[0, 5, 9], &[4, -7, -11], &[2, -2, -3]).unwrap(),
        ),
        (
            "broadcast",
            a.slice(&[0, 0], &[1, 6], &[1, 1])
                .unwrap()
                .broadcast_to(&[3, 4, 6, 10])
                .unwrap(),
        ),
        ("empty", a.slice(&[2], &[2], &[1]).unwrap()),
        (
            "transposed slice",
            a.slice(&[1, 2, 3], &[3, 6, 9], &[1, 1, 1])
                .unwrap()
                .transpose(&[1, 2, 0])
                .unwrap(),
        ),
    ]
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_views_copy_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::U8,
        DType::Bool,
    ] {
        let host = sample(&[4, 6, 10], dtype, 11);
        let dev = host.to_device(&gpu).unwrap();
        for ((name, hv), (_, dv)) in views(&host).into_iter().zip(views(&dev)) {
            let what = format!("{dtype} {name}");
            // Reading a strided GPU view.
            assert_same(&dv, &hv, &what);
            // contiguous() stays on the GPU.
            let dc = dv.contiguous().unwrap();
            assert_eq!(dc.device(), gpu, "{what}");
            assert!(dc.is_contiguous());
            assert_same(
                &dc,
                &hv.contiguous().unwrap(),
                &format!("{what} contiguous"),
            );
            // reshape of a non-contiguous view copies on the GPU.
            let n = hv.size();
            let dr = dv.reshape(&[n]).unwrap();
            assert_eq!(dr.device(), gpu);
            assert_same(&dr, &hv.reshape(&[n]).unwrap(), &format!("{what} reshape"));
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn views_with_more_than_eight_dimensions() {
    let Some(gpu) = gpu() else { return };
    let shape = [2usize; 10];
    let host = sample(&shape, DType::F32, 12);
    let axes: Vec<isize> = (0..10).rev().collect();
    let hv = host.transpose(&axes).unwrap();
    let dv = host.to_device(&gpu).unwrap().transpose(&axes).unwrap();
    let dc = dv.contiguous().unwrap();
    assert_eq!(dc.device(), gpu);
    assert_same(&dc, &hv.contiguous().unwrap(), "10-D transpose");
    assert_same(
        &dv.astype(DType::F16).unwrap(),
        &hv.astype(DType::F16).unwrap(),
        "10-D cast",
    );
}

/// f64 values that exercise every conversion rule: rounding ties, overflow, saturation,
/// wrapping, NaN and infinities, subnormals, negative zero.
fn special_values() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        0.5,
        -0.5,
        1.5,
        2.5,
        -2.5,
        0.9999,
        1.0,
        -1.0,
        3.7,
        -3.7,
        127.5,
        255.0,
        255.9,
        256.0,
        300.0,
        -129.0,
        65504.0,
        65520.0,
        70000.0,
        -70000.0,
        1.0 + 2f64.powi(-11),
        1.0 + 3.0 * 2f64.powi(-11),
        1.0 + 2f64.powi(-8),
        1.0 + 2f64.powi(-8) + 2f64.powi(-30),
        1.0 + 2f64.powi(-24),
        1.0 + 2f64.powi(-24) + 2f64.powi(-40),
        6e-8,
        3e-8,
        1e-40,
        -1e-45,
        2147483647.0,
        2147483648.0,
        -2147483649.0,
        4294967295.5,
        4294967296.0,
        9.3e18,
        -9.3e18,
        3.4e38,
        3.5e38,
        1e300,
        -1e300,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        f64::MAX,
        f64::MIN_POSITIVE,
    ];
    // Values on both sides of bf16 and f16 rounding boundaries.
    for i in 0..64 {
        v.push(1.0 + i as f64 * 2f64.powi(-12) + 2f64.powi(-35));
    }
    v
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn casts_match_the_cpu_for_every_dtype_pair() {
    let Some(gpu) = gpu() else { return };
    let specials = Array::from_vec(special_values(), &[special_values().len()]).unwrap();
    let mixed = sample(&[3, 41], DType::F64, 13);
    // One thread per source dtype: each pair is a separate kernel to compile.
    std::thread::scope(|scope| {
        for src in DType::ALL {
            let (specials, mixed, gpu) = (&specials, &mixed, &gpu);
            scope.spawn(move || {
                // The same source on both devices; contiguous, then a strided view of it.
                let inputs = [
                    specials.astype(src).unwrap(),
                    mixed.astype(src).unwrap(),
                    sample(&[3, 41], src, 14)
                        .transpose(&[1, 0])
                        .unwrap()
                        .slice(&[40], &[0], &[-3])
                        .unwrap(),
                ];
                for (k, host) in inputs.iter().enumerate() {
                    let dev = host.to_device(gpu).unwrap();
                    for dst in DType::ALL {
                        let got = dev.astype(dst).unwrap();
                        assert_eq!(got.device(), *gpu);
                        let want = expected_cast(host, dst);
                        assert_same(&got, &want, &format!("input {k}: {src} -> {dst}"));
                    }
                }
            });
        }
    });
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn streams_order_work_and_carry_arrays() {
    let Some(gpu) = gpu() else { return };
    let s1 = Stream::new(&gpu).unwrap();
    let s2 = Stream::new(&gpu).unwrap();
    assert_ne!(s1, s2);
    assert_eq!(s1.clone(), s1);
    let host = sample(&[512, 1024], DType::F32, 15);
    // Produced on s1, then converted on s2 (waits for s1), then read on the default stream.
    let a1 = host.to_stream(&s1).unwrap();
    assert_eq!(a1.stream(), Some(s1.clone()));
    let a2 = a1.to_stream(&s2).unwrap();
    assert_eq!(a2.stream(), Some(s2.clone()));
    let b = a2.astype(DType::BF16).unwrap();
    assert_eq!(b.stream(), Some(s2.clone()));
    let c = b.transpose(&[1, 0]).unwrap().contiguous().unwrap();
    s1.synchronize().unwrap();
    assert_same(
        &c,
        &expected_cast(&host, DType::BF16)
            .transpose(&[1, 0])
            .unwrap(),
        "cross-stream chain",
    );
    // A CPU array straight onto a stream.
    let d = sample(&[9], DType::I32, 16).to_stream(&s2).unwrap();
    assert_eq!(d.stream(), Some(s2));
    assert_same(&d, &sample(&[9], DType::I32, 16), "to_stream from the host");
    gpu.synchronize().unwrap();
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn cpu_kernels_refuse_gpu_arrays_politely() {
    let Some(gpu) = gpu() else { return };
    let a = sample(&[4], DType::F32, 17).to_device(&gpu).unwrap();
    // Host-side operations still work on GPU arrays through explicit transfers.
    let v: Vec<f32> = a.to_vec().unwrap();
    assert_eq!(v.len(), 4);
    match a.to_vec::<f64>() {
        Err(Error::DTypeMismatch { .. }) => {}
        other => panic!("expected a dtype mismatch, got {other:?}"),
    }
}

/// Keeps a GPU array alive (as a PyTorch tensor keeps its memory alive behind a DLPack
/// capsule) and counts its drops.
struct DeviceOwner {
    _keep: Array,
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for DeviceOwner {
    fn drop(&mut self) {
        self.drops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn external_device_memory_is_read_in_place_and_never_written() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(gpu) = gpu() else { return };
    let s = Stream::new(&gpu).unwrap();
    let host = sample(&[64, 256], DType::F32, 31);
    let src = host.to_stream(&s).unwrap();
    let addr = src.cuda_ptr().expect("a GPU array has a device address");
    assert_eq!(host.cuda_ptr(), None);
    // The owner's stream as another library would hand it over: a raw CUstream.
    // SAFETY: `s` outlives every use of `raw` in this test.
    let raw = unsafe { Stream::from_raw(&gpu, s.as_raw()) }.unwrap();
    assert_eq!(raw, s);
    let drops = Arc::new(AtomicUsize::new(0));
    let owner = DeviceOwner {
        _keep: src.clone(),
        drops: Arc::clone(&drops),
    };
    // SAFETY: `owner` keeps `src`'s 64 x 256 f32 alive; nothing writes them.
    let ext = unsafe {
        Array::from_cuda_external(
            addr,
            &[64, 256],
            &[256, 1],
            DType::F32,
            &raw,
            Box::new(owner),
        )
    }
    .unwrap();
    assert_eq!(ext.cuda_ptr(), Some(addr));
    assert_eq!(ext.stream(), Some(s.clone()));
    assert_same(&ext, &host, "external memory read back");
    let mut unique = ext.copy().unwrap();
    assert!(unique.cuda_ptr_mut().is_some(), "a copy owns its buffer");
    let mut borrowed = ext.clone();
    drop(unique);
    assert_eq!(
        borrowed.cuda_ptr_mut(),
        None,
        "borrowed memory is never handed out for writing"
    );
    drop(borrowed);

    // An op over the external array equals the op over the owner's array, bit for bit.
    let w = sample(&[256], DType::F32, 32).to_stream(&s).unwrap();
    let got = ferrofast::fast::rms_norm_on(&raw, &ext, Some(&w), 1e-5).unwrap();
    let want = ferrofast::fast::rms_norm(&src, Some(&w), 1e-5).unwrap();
    assert_same(&got, &want, "rms_norm over external memory");

    // Strided views straight over the external memory: transposed, rows reversed.
    // SAFETY: as above; each owner is a clone of `src`.
    let t = unsafe {
        Array::from_cuda_external(
            addr,
            &[256, 64],
            &[1, 256],
            DType::F32,
            &s,
            Box::new(src.clone()),
        )
    }
    .unwrap();
    assert_same(
        &t.contiguous().unwrap(),
        &host.transpose(&[1, 0]).unwrap().contiguous().unwrap(),
        "transposed external view",
    );
    let last_row = addr + 63 * 256 * 4;
    // SAFETY: as above.
    let r = unsafe {
        Array::from_cuda_external(
            last_row,
            &[64, 256],
            &[-256, 1],
            DType::F32,
            &s,
            Box::new(src.clone()),
        )
    }
    .unwrap();
    let rows: Vec<f32> = host
        .to_vec::<f32>()
        .unwrap()
        .chunks(256)
        .rev()
        .flatten()
        .copied()
        .collect();
    assert_same(
        &r,
        &Array::from_vec(rows, &[64, 256]).unwrap(),
        "reversed-rows external view",
    );

    // The in-place fused cross-entropy writes its gradient over logits it owns; over
    // borrowed logits it must allocate instead and leave the owner's memory untouched.
    let logits_host = sample(&[8, 256], DType::F32, 33);
    let logits = logits_host.to_stream(&s).unwrap();
    let targets = Array::from_vec(vec![3i32, 7, 0, 255, 128, 1, 9, 200], &[8])
        .unwrap()
        .to_stream(&s)
        .unwrap();
    // SAFETY: the owner keeps `logits` alive; nothing else writes them.
    let ext_logits = unsafe {
        Array::from_cuda_external(
            logits.cuda_ptr().unwrap(),
            &[8, 256],
            &[256, 1],
            DType::F32,
            &s,
            Box::new(logits.clone()),
        )
    }
    .unwrap();
    let (loss, dx) = ferrofast::fast::cross_entropy_fused_in_place(
        ext_logits,
        &targets,
        &ferrofast::fast::CrossEntropyOptions::default(),
    )
    .unwrap();
    assert_ne!(
        dx.cuda_ptr(),
        logits.cuda_ptr(),
        "the gradient got its own buffer"
    );
    let (want_loss, want_dx) = ferrofast::fast::cross_entropy_fused(
        &logits,
        &targets,
        &ferrofast::fast::CrossEntropyOptions::default(),
    )
    .unwrap();
    assert_same(&loss, &want_loss, "loss over borrowed logits");
    assert_same(&dx, &want_dx, "gradient over borrowed logits");
    assert_same(&logits, &logits_host, "the owner's logits are unchanged");

    // Bad addresses are errors, and the owner is dropped at once.
    let before = drops.load(Ordering::SeqCst);
    let bad = DeviceOwner {
        _keep: src.clone(),
        drops: Arc::clone(&drops),
    };
    // SAFETY: the call fails before touching memory.
    let e =
        unsafe { Array::from_cuda_external(addr + 2, &[4], &[1], DType::F32, &s, Box::new(bad)) };
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
    assert_eq!(drops.load(Ordering::SeqCst), before + 1);
    // SAFETY: as above.
    let e = unsafe { Array::from_cuda_external(0, &[4], &[1], DType::F32, &s, Box::new(())) };
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");

    // Dropping the last view drops the owner (after which its memory goes back to the pool).
    drop(got);
    drop(ext);
    s.synchronize().unwrap();
    assert_eq!(drops.load(Ordering::SeqCst), before + 1 + 1);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn a_stream_waits_for_another() {
    let Some(gpu) = gpu() else { return };
    let s1 = Stream::new(&gpu).unwrap();
    let s2 = Stream::new(&gpu).unwrap();
    let host = sample(&[1 << 22], DType::F32, 34);
    // Produced on s1; its memory is then taken as external memory on s2, which knows
    // nothing of s1 until told to wait for it (as a library handing over a tensor does).
    let a = host
        .to_stream(&s1)
        .unwrap()
        .astype(DType::BF16)
        .unwrap()
        .astype(DType::F32)
        .unwrap();
    s2.wait_for(&s1).unwrap();
    s2.wait_for(&s2).unwrap();
    // SAFETY: `a` (the owner) stays alive and unwritten.
    let ext = unsafe {
        Array::from_cuda_external(
            a.cuda_ptr().unwrap(),
            &[1 << 22],
            &[1],
            DType::F32,
            &s2,
            Box::new(a.clone()),
        )
    }
    .unwrap();
    let b = ext.astype(DType::BF16).unwrap();
    assert_eq!(b.stream(), Some(s2));
    assert_same(&b, &expected_cast(&host, DType::BF16), "after wait_for");
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn gpu_arrays_print_like_host_arrays() {
    let Some(gpu) = gpu() else { return };
    for shape in [&[2usize, 3][..], &[40, 70], &[3, 4, 50, 60]] {
        let host = sample(shape, DType::BF16, 35);
        let dev = host.to_device(&gpu).unwrap();
        let (h, d) = (host.to_string(), dev.to_string());
        assert_eq!(
            d.replace(&format!("device={gpu}"), "device=cpu"),
            h,
            "{shape:?}"
        );
        // A strided GPU view prints its own elements.
        let t = dev
            .transpose(&(0..shape.len() as isize).rev().collect::<Vec<_>>())
            .unwrap();
        let th = host
            .transpose(&(0..shape.len() as isize).rev().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            t.to_string()
                .replace(&format!("device={gpu}"), "device=cpu"),
            th.to_string()
        );
    }
}
