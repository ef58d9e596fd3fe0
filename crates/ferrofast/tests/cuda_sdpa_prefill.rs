//! The CUDA tensor-core attention kernel (`fast::scaled_dot_product_attention` on GPU arrays
//! with many queries) against the float64 oracle: every head dim, f16 and bf16, grouped and
//! multi-query heads, every mask kind, sinks, ragged sequence lengths, strided views, grids
//! wider than the GPU and fully masked rows. Output buffers are poisoned, so unwritten
//! elements fail. Without a CUDA device each test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{check_close, gpu, randn, uniform};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::{Array, DType, Device, Error};

/// `(atol, rtol)` against the f64 oracle: those of `tests/sdpa.rs` for f16 and bf16.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (1e-3, 1e-3),
        _ => (8e-3, 8e-3),
    }
}

const HALF: [DType; 2] = [DType::F16, DType::BF16];
const HEAD_DIMS: [(usize, usize); 6] = [
    (64, 64),
    (80, 80),
    (96, 96),
    (128, 128),
    (192, 128),
    (256, 256),
];

/// The same array on the CPU (for the oracle) and on `dev`.
struct Pair {
    cpu: Array,
    gpu: Array,
}

fn pair(cpu: Array, dev: &Device) -> Pair {
    let gpu = cpu.to_device(dev).unwrap();
    Pair { cpu, gpu }
}

/// `[B, H, T, D]` input; `transposed` builds `[B, T, H, D]` memory seen through
/// `swapaxes(1, 2)` on both devices (a strided view the kernel reads in place).
#[allow(clippy::too_many_arguments)]
fn input(
    dev: &Device,
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    transposed: bool,
    dtype: DType,
    seed: u64,
) -> Pair {
    if transposed {
        let p = pair(randn(&[b, t, h, d], dtype, seed), dev);
        Pair {
            cpu: p.cpu.swapaxes(1, 2).unwrap(),
            gpu: p.gpu.swapaxes(1, 2).unwrap(),
        }
    } else {
        pair(randn(&[b, h, t, d], dtype, seed), dev)
    }
}

/// Runs the GPU kernel and the oracle on the same values and compares them. `mask`:
/// `(_, true)` is causal (the pair is not read), `(m, false)` the array mask `m`.
fn check(
    q: &Pair,
    k: &Pair,
    v: &Pair,
    scale: f32,
    mask: Option<(&Pair, bool)>,
    sinks: Option<&Pair>,
    what: &str,
) {
    let (gm, cm) = match mask {
        None => (Mask::None, Mask::None),
        Some((_, true)) => (Mask::Causal, Mask::Causal),
        Some((m, false)) => (Mask::Array(&m.gpu), Mask::Array(&m.cpu)),
    };
    let out = sdpa(&q.gpu, &k.gpu, &v.gpu, scale, gm, sinks.map(|s| &s.gpu))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.device().is_cuda(), "{what}: output left the GPU");
    let reference = sdpa_ref(&q.cpu, &k.cpu, &v.cpu, scale, cm, sinks.map(|s| &s.cpu)).unwrap();
    let (atol, rtol) = tol(out.dtype());
    check_close(&out, &reference, atol, rtol, what);
}

/// A bool mask of `shape` keeping each entry with probability `p_true`.
fn bool_mask(shape: &[usize], p_true: f64, seed: u64) -> Array {
    let u = uniform(shape, 0.0, 1.0, DType::F32, seed)
        .to_f64_vec()
        .unwrap();
    let keep: Vec<bool> = u.iter().map(|&x| x < p_true).collect();
    Array::from_vec(keep, shape).unwrap()
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn every_head_dim_and_dtype() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    let mut seed = 100;
    for dtype in HALF {
        for (d, dv) in HEAD_DIMS {
            for is_causal in [false, true] {
                seed += 10;
                let q = input(&dev, 1, 2, 150, d, false, dtype, seed);
                let k = input(&dev, 1, 2, 141, d, false, dtype, seed + 1);
                let v = input(&dev, 1, 2, 141, dv, false, dtype, seed + 2);
                let what = format!("{dtype} D {d}/{dv} causal {is_causal} seed {seed}");
                let mask = is_causal.then_some((&c, true));
                check(&q, &k, &v, 1.0 / (d as f32).sqrt(), mask, None, &what);
            }
        }
    }
}

/// A placeholder pair to pass as `Some((&pair, true))` (causal) to [`check`].
fn causal(dev: &Device) -> Pair {
    pair(Array::zeros(&[1], DType::F32, &Device::Cpu).unwrap(), dev)
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn ragged_lengths_causal_and_not() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    let lengths = [
        (1, 1),
        (1, 299),
        (3, 17),
        (17, 3),
        (33, 65),
        (65, 33),
        (127, 129),
        (129, 127),
        (255, 1),
        (201, 299),
        (299, 201),
        (300, 300),
    ];
    let mut seed = 2000;
    for dtype in HALF {
        for &(tq, tkv) in &lengths {
            for (d, dv) in [(64, 64), (128, 128), (256, 256)] {
                for is_causal in [false, true] {
                    seed += 10;
                    let q = input(&dev, 1, 2, tq, d, false, dtype, seed);
                    let k = input(&dev, 1, 2, tkv, d, false, dtype, seed + 1);
                    let v = input(&dev, 1, 2, tkv, dv, false, dtype, seed + 2);
                    let what =
                        format!("{dtype} Tq {tq} Tkv {tkv} D {d} causal {is_causal} seed {seed}");
                    let mask = is_causal.then_some((&c, true));
                    check(&q, &k, &v, 0.125, mask, None, &what);
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn grouped_and_multi_query_heads() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    let mut seed = 3000;
    for dtype in HALF {
        for (nq, nkv) in [(8, 2), (6, 1), (4, 4), (12, 3)] {
            for is_causal in [false, true] {
                seed += 10;
                let q = input(&dev, 2, nq, 97, 128, false, dtype, seed);
                let k = input(&dev, 2, nkv, 131, 128, false, dtype, seed + 1);
                let v = input(&dev, 2, nkv, 131, 128, false, dtype, seed + 2);
                let what = format!("{dtype} heads {nq}/{nkv} causal {is_causal} seed {seed}");
                check(
                    &q,
                    &k,
                    &v,
                    0.09,
                    is_causal.then_some((&c, true)),
                    None,
                    &what,
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn bool_and_additive_masks_broadcast_and_full() {
    let Some(dev) = gpu() else { return };
    let (b, nq, nkv, tq, tkv) = (2, 4, 2, 77, 203);
    let mut seed = 4000;
    for dtype in HALF {
        for (d, dv) in [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)] {
            let mask_shapes: [&[usize]; 4] = [
                &[tq, tkv],
                &[b, 1, tq, tkv],
                &[b, nq, tq, tkv],
                &[1, nq, 1, tkv],
            ];
            for shape in mask_shapes {
                for additive in [false, true] {
                    seed += 10;
                    let q = input(&dev, b, nq, tq, d, false, dtype, seed);
                    let k = input(&dev, b, nkv, tkv, d, true, dtype, seed + 1);
                    let v = input(&dev, b, nkv, tkv, dv, true, dtype, seed + 2);
                    let m = if additive {
                        uniform(shape, -4.0, 2.0, dtype, seed + 3)
                    } else {
                        bool_mask(shape, 0.7, seed + 3)
                    };
                    let m = pair(m, &dev);
                    let what = format!(
                        "{dtype} D {d}/{dv} mask {shape:?} additive {additive} seed {seed}"
                    );
                    check(&q, &k, &v, 0.1, Some((&m, false)), None, &what);
                }
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn sinks_with_every_mask_kind() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    let (b, nq, nkv, tq, tkv) = (1, 4, 2, 90, 70);
    let mut seed = 5000;
    for dtype in HALF {
        for (d, dv) in [(64, 64), (128, 128), (256, 256)] {
            for kind in 0..4 {
                seed += 10;
                let q = input(&dev, b, nq, tq, d, false, dtype, seed);
                let k = input(&dev, b, nkv, tkv, d, false, dtype, seed + 1);
                let v = input(&dev, b, nkv, tkv, dv, false, dtype, seed + 2);
                let sinks = pair(uniform(&[nq], -1.0, 3.0, dtype, seed + 3), &dev);
                let m = match kind {
                    2 => pair(bool_mask(&[tq, tkv], 0.5, seed + 4), &dev),
                    _ => pair(uniform(&[b, nq, tq, tkv], -3.0, 1.0, dtype, seed + 4), &dev),
                };
                let mask = match kind {
                    0 => None,
                    1 => Some((&c, true)),
                    _ => Some((&m, false)),
                };
                let what = format!("{dtype} D {d} sinks, mask kind {kind}, seed {seed}");
                check(&q, &k, &v, 0.125, mask, Some(&sinks), &what);
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn fully_masked_rows_are_zero() {
    let Some(dev) = gpu() else { return };
    let (b, nq, tq, tkv, d) = (1, 2, 40, 100, 64);
    for dtype in HALF {
        let q = input(&dev, b, nq, tq, d, false, dtype, 1);
        let k = input(&dev, b, nq, tkv, d, false, dtype, 2);
        let v = input(&dev, b, nq, tkv, d, false, dtype, 3);
        // Bool: rows 0, 7 and 39 see nothing; additive: the same rows are all -inf.
        let mut keep = bool_mask(&[tq, tkv], 0.6, 4).to_vec::<bool>().unwrap();
        let mut add = uniform(&[tq, tkv], -1.0, 1.0, DType::F32, 5)
            .to_vec::<f32>()
            .unwrap();
        for row in [0usize, 7, 39] {
            keep[row * tkv..(row + 1) * tkv].fill(false);
            add[row * tkv..(row + 1) * tkv].fill(f32::NEG_INFINITY);
        }
        let bool_m = pair(Array::from_vec(keep, &[tq, tkv]).unwrap(), &dev);
        let add_m = pair(
            Array::from_vec(add, &[tq, tkv])
                .unwrap()
                .astype(dtype)
                .unwrap(),
            &dev,
        );
        for (m, name) in [(&bool_m, "bool"), (&add_m, "additive")] {
            let out = sdpa(&q.gpu, &k.gpu, &v.gpu, 0.125, Mask::Array(&m.gpu), None).unwrap();
            let vals = out.to_f64_vec().unwrap();
            for h in 0..nq {
                for row in [0usize, 7, 39] {
                    let start = (h * tq + row) * d;
                    assert!(
                        vals[start..start + d].iter().all(|&x| x == 0.0),
                        "{dtype} {name}: row {row} of head {h} is not 0"
                    );
                }
            }
            check(
                &q,
                &k,
                &v,
                0.125,
                Some((m, false)),
                None,
                &format!("{dtype} {name}"),
            );
        }
        // Causal with more queries than keys: the first T_q - T_kv rows see no key.
        let c = causal(&dev);
        let k2 = input(&dev, b, nq, 25, d, false, dtype, 6);
        let v2 = input(&dev, b, nq, 25, d, false, dtype, 7);
        check(
            &q,
            &k2,
            &v2,
            0.125,
            Some((&c, true)),
            None,
            &format!("{dtype} causal Tq>Tkv"),
        );
        let out = sdpa(&q.gpu, &k2.gpu, &v2.gpu, 0.125, Mask::Causal, None).unwrap();
        let vals = out.to_f64_vec().unwrap();
        assert!(
            vals[..(tq - 25) * d].iter().all(|&x| x == 0.0),
            "{dtype} causal zeros"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn strided_and_unaligned_views() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    let mut seed = 6000;
    for dtype in HALF {
        for is_causal in [false, true] {
            seed += 10;
            // [B, T, H, D] memory seen as [B, H, T, D]: read in place.
            let q = input(&dev, 2, 4, 70, 128, true, dtype, seed);
            let k = input(&dev, 2, 2, 90, 128, true, dtype, seed + 1);
            let v = input(&dev, 2, 2, 90, 128, true, dtype, seed + 2);
            let what = format!("{dtype} transposed causal {is_causal} seed {seed}");
            check(
                &q,
                &k,
                &v,
                0.1,
                is_causal.then_some((&c, true)),
                None,
                &what,
            );

            // Rows 67 elements apart (not 16-byte aligned): copied first. A sliced
            // sequence (offset rows) and a reversed head axis.
            let base = pair(randn(&[1, 3, 50, 67], dtype, seed + 3), &dev);
            let sl = |a: &Array| {
                a.slice(&[0, 0, 0, 0], &[1, 3, 50, 64], &[1, 1, 1, 1])
                    .unwrap()
            };
            let q2 = Pair {
                cpu: sl(&base.cpu),
                gpu: sl(&base.gpu),
            };
            let kb = pair(randn(&[1, 3, 80, 64], dtype, seed + 4), &dev);
            let rev = |a: &Array| {
                a.slice(&[0, -1, 8, 0], &[1, -4, 80, 64], &[1, -1, 1, 1])
                    .unwrap()
            };
            let k2 = Pair {
                cpu: rev(&kb.cpu),
                gpu: rev(&kb.gpu),
            };
            let v2 = input(&dev, 1, 3, 72, 64, true, dtype, seed + 5);
            let what = format!("{dtype} sliced/reversed causal {is_causal} seed {seed}");
            check(
                &q2,
                &k2,
                &v2,
                0.125,
                is_causal.then_some((&c, true)),
                None,
                &what,
            );
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn more_blocks_than_multiprocessors() {
    let Some(dev) = gpu() else { return };
    let c = causal(&dev);
    // 5 query tiles x 16 heads x 2 batches = 160 blocks of 128 rows (more than 132 SMs).
    for (dtype, is_causal, seed) in [(DType::BF16, false, 7000), (DType::F16, true, 7010)] {
        let q = input(&dev, 2, 16, 600, 128, true, dtype, seed);
        let k = input(&dev, 2, 4, 600, 128, true, dtype, seed + 1);
        let v = input(&dev, 2, 4, 600, 128, true, dtype, seed + 2);
        let what = format!("{dtype} 160 blocks causal {is_causal} seed {seed}");
        check(
            &q,
            &k,
            &v,
            0.0884,
            is_causal.then_some((&c, true)),
            None,
            &what,
        );
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn uncovered_cases_fall_back_and_stay_right() {
    let Some(dev) = gpu() else { return };
    // float32 and an unlisted head dim are not this kernel's: the dispatcher sends them to the
    // general kernel, which must give the oracle's answer.
    for (dtype, d) in [(DType::F32, 64), (DType::BF16, 72)] {
        let q = input(&dev, 1, 2, 20, d, false, dtype, 1);
        let k = input(&dev, 1, 2, 20, d, false, dtype, 2);
        let v = input(&dev, 1, 2, 20, d, false, dtype, 3);
        check(
            &q,
            &k,
            &v,
            0.1,
            None,
            None,
            &format!("fallback {dtype} D {d}"),
        );
    }
    // Inputs on two devices: a clear error.
    let q = input(&dev, 1, 2, 20, 64, false, DType::BF16, 1);
    let k = input(&dev, 1, 2, 20, 64, false, DType::BF16, 2);
    let v = input(&dev, 1, 2, 20, 64, false, DType::BF16, 3);
    match sdpa(&q.gpu, &k.cpu, &v.gpu, 0.1, Mask::None, None) {
        Err(Error::Device(msg)) => assert!(msg.contains("device"), "{msg}"),
        other => panic!("expected a device error, got {other:?}"),
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn empty_shapes_and_zero_keys() {
    let Some(dev) = gpu() else { return };
    let q = input(&dev, 1, 2, 5, 64, false, DType::BF16, 1);
    let k = input(&dev, 1, 2, 0, 64, false, DType::BF16, 2);
    let v = input(&dev, 1, 2, 0, 64, false, DType::BF16, 3);
    let out = sdpa(&q.gpu, &k.gpu, &v.gpu, 0.1, Mask::None, None).unwrap();
    assert_eq!(out.shape(), &[1, 2, 5, 64]);
    assert!(out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
    let q0 = input(&dev, 1, 2, 0, 64, false, DType::BF16, 4);
    let k1 = input(&dev, 1, 2, 9, 64, false, DType::BF16, 5);
    let out = sdpa(&q0.gpu, &k1.gpu, &k1.gpu, 0.1, Mask::Causal, None).unwrap();
    assert_eq!(out.shape(), &[1, 2, 0, 64]);
}

/// Median time of the kernel on the shape; `cargo test --release -- --ignored`.
#[test]
#[ignore]
fn bench_prefill_b4_h32_t4096_d128() {
    let Some(dev) = gpu() else { return };
    ferrofast::testing::poison_gpu_buffers(false);
    let (b, h, t, d) = (4, 32, 4096, 128);
    for dtype in HALF {
        let q = Array::randn(&[b, h, t, d], dtype, 1, &dev).unwrap();
        let k = Array::randn(&[b, h, t, d], dtype, 2, &dev).unwrap();
        let v = Array::randn(&[b, h, t, d], dtype, 3, &dev).unwrap();
        for is_causal in [false, true] {
            let mask = if is_causal { Mask::Causal } else { Mask::None };
            let run = || sdpa(&q, &k, &v, 0.0884, mask, None).unwrap();
            drop(run());
            dev.synchronize().unwrap();
            let mut times = Vec::new();
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                for _ in 0..5 {
                    drop(run());
                }
                dev.synchronize().unwrap();
                times.push(t0.elapsed().as_secs_f64() / 5.0);
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let mut flops = 4.0 * (b * h * t * t * d) as f64;
            if is_causal {
                flops /= 2.0;
            }
            println!(
                "{dtype} B{b} H{h} T{t} D{d} causal {is_causal}: {:.3} ms, {:.1} TFLOP/s",
                med * 1e3,
                flops / med / 1e12
            );
        }
    }
}
