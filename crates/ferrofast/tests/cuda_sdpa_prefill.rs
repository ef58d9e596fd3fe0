//! The CUDA prefill attention kernels (`fast::scaled_dot_product_attention` on GPU arrays
//! with many queries) against the float64 oracle, on every CUDA device.
//!
//! The tensor-core kernel (`kernels/attn_prefill.cu`): every head dim, f16 and bf16, grouped
//! and multi-query heads, every mask kind, sinks, ragged sequence lengths, strided views,
//! grids wider than the GPU, fully masked rows, and the cases it leaves to the general
//! kernel. The Hopper kernel (`kernels/attn_prefill_sm90.cu`, the default on compute
//! capability 9.0; `FERROFAST_PREFILL_KERNEL=mma` turns it off) on every shape it covers:
//! f16 and bf16, D = D_v in {64, 128}, causal and not, grouped and multi-query heads,
//! sequence lengths that are not multiples of the 128-row tiles, T_q != T_kv both ways,
//! strided (`[B, T, H, D]`) views and a negative scale; its first step compares one case with
//! and without the knob (the outputs must differ bitwise on an H100 / H200, proving the
//! Hopper kernel ran; on other GPUs the same cases run on the `mma.sync` kernel).
//!
//! The knob is an environment variable read at every call: the test that sets it holds
//! [`KNOB`] for writing, every other test holds it for reading, so no call runs while it is
//! flipped. Output buffers are poisoned, so unwritten elements fail. The tests are ignored
//! without the `gpu-tests` feature.
#![cfg(feature = "cuda")]

#[path = "common/sdpa.rs"]
mod attn;
#[macro_use]
mod common;

use attn::{bool_mask, check_with, layout, Masking, BTHD, ROW_MAJOR};
use common::{randn, uniform, Input};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::testing::{attention_kernel, poison_gpu_buffers};
use ferrofast::{Array, DType, Device, Error};
use std::sync::RwLock;

/// The environment variable that turns the Hopper prefill kernel off.
const KNOB_VAR: &str = "FERROFAST_PREFILL_KERNEL";

/// Held for writing by the test that sets [`KNOB_VAR`], for reading by every other test.
static KNOB: RwLock<()> = RwLock::new(());

/// Runs `case` on every CUDA device, holding [`KNOB`] for reading.
fn on_every_gpu(case: impl Fn(&Device)) {
    let _knob = KNOB.read().unwrap_or_else(|e| e.into_inner());
    for dev in common::gpus() {
        case(&dev);
    }
}

/// Declares tests `fn name(dev: &Device) { ... }` run by [`on_every_gpu`] (`gpu_only!`:
/// ignored without the `gpu-tests` feature).
macro_rules! on_every_gpu_test {
    ($($(#[$meta:meta])* fn $name:ident($dev:ident: &Device) $body:block)*) => {$(
        gpu_only! { $(#[$meta])* fn $name() { on_every_gpu(|$dev: &Device| $body) } }
    )*};
}

/// `(atol, rtol)` against the f64 oracle: those of `tests/sdpa.rs` for f16 and bf16; f32
/// (the fallback case only) gets bf16's.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (1e-3, 1e-3),
        _ => (8e-3, 8e-3),
    }
}

/// The dtypes of the tensor-core kernels.
const HALF: [DType; 2] = [DType::F16, DType::BF16];
/// The `(D, D_v)` pairs of the tensor-core prefill kernel.
const HEAD_DIMS: [(usize, usize); 6] = [
    (64, 64),
    (80, 80),
    (96, 96),
    (128, 128),
    (192, 128),
    (256, 256),
];

/// A normal `[B, H, T, D]` input on the CPU and on `dev`: row-major, or (`transposed`)
/// `[B, T, H, D]` memory seen through `swapaxes(1, 2)` on both (a strided view the kernels
/// read in place).
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
) -> Input {
    let kind = if transposed { BTHD } else { ROW_MAJOR };
    layout(dev, (b, h, t, d), kind, dtype, seed)
}

/// q `[B, N_q, T_q, D]`, k `[B, N_kv, T_kv, D]` and v `[B, N_kv, T_kv, D_v]` (`dims` in this
/// order: B, N_q, N_kv, T_q, T_kv, D, D_v) from seeds `seed` to `seed + 2`, each an [`input`]:
/// q transposed when `q_t`, k and v when `kv_t`.
fn qkv(
    dev: &Device,
    (b, nq, nkv, tq, tkv, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    (q_t, kv_t): (bool, bool),
    dtype: DType,
    seed: u64,
) -> (Input, Input, Input) {
    (
        input(dev, b, nq, tq, d, q_t, dtype, seed),
        input(dev, b, nkv, tkv, d, kv_t, dtype, seed + 1),
        input(dev, b, nkv, tkv, dv, kv_t, dtype, seed + 2),
    )
}

/// [`Masking::Causal`] when `causal`, else [`Masking::None`].
fn causal_if(causal: bool) -> Masking<'static> {
    if causal {
        Masking::Causal
    } else {
        Masking::None
    }
}

// ----- the tensor-core kernel ---------------------------------------------------------------

on_every_gpu_test! {
    /// Every head dim and dtype, causal and not.
    fn every_head_dim_and_dtype(dev: &Device) {
        let mut seed = 100;
        for dtype in HALF {
            for (d, dv) in HEAD_DIMS {
                for is_causal in [false, true] {
                    seed += 10;
                    let (q, k, v) =
                        qkv(dev, (1, 2, 2, 150, 141, d, dv), (false, false), dtype, seed);
                    let what = format!("{dtype} D {d}/{dv} causal {is_causal} seed {seed}");
                    let scale = 1.0 / (d as f32).sqrt();
                    check_with(&q, &k, &v, scale, causal_if(is_causal), None, tol, &what);
                }
            }
        }
    }

    /// Query and key lengths that are not multiples of the tiles, T_q != T_kv both ways.
    fn ragged_lengths_causal_and_not(dev: &Device) {
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
                        let (q, k, v) =
                            qkv(dev, (1, 2, 2, tq, tkv, d, dv), (false, false), dtype, seed);
                        let what = format!(
                            "{dtype} Tq {tq} Tkv {tkv} D {d} causal {is_causal} seed {seed}"
                        );
                        check_with(&q, &k, &v, 0.125, causal_if(is_causal), None, tol, &what);
                    }
                }
            }
        }
    }

    /// GQA groups of 4 and 6 (MQA), one query head per kv head, and 12 over 3.
    fn grouped_and_multi_query_heads(dev: &Device) {
        let mut seed = 3000;
        for dtype in HALF {
            for (nq, nkv) in [(8, 2), (6, 1), (4, 4), (12, 3)] {
                for is_causal in [false, true] {
                    seed += 10;
                    let (q, k, v) = qkv(
                        dev,
                        (2, nq, nkv, 97, 131, 128, 128),
                        (false, false),
                        dtype,
                        seed,
                    );
                    let what = format!("{dtype} heads {nq}/{nkv} causal {is_causal} seed {seed}");
                    check_with(&q, &k, &v, 0.09, causal_if(is_causal), None, tol, &what);
                }
            }
        }
    }

    /// Bool and additive masks, full and broadcast over batch, heads or queries, with strided
    /// keys and values.
    fn bool_and_additive_masks_broadcast_and_full(dev: &Device) {
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
                        let (q, k, v) = qkv(
                            dev,
                            (b, nq, nkv, tq, tkv, d, dv),
                            (false, true),
                            dtype,
                            seed,
                        );
                        let m = if additive {
                            uniform(shape, -4.0, 2.0, dtype, seed + 3)
                        } else {
                            bool_mask(shape, 0.7, seed + 3)
                        };
                        let m = Input::new(&m, dev);
                        let what = format!(
                            "{dtype} D {d}/{dv} mask {shape:?} additive {additive} seed {seed}"
                        );
                        check_with(&q, &k, &v, 0.1, Masking::Array(&m), None, tol, &what);
                    }
                }
            }
        }
    }

    /// Sinks with no mask, causal, an additive and a bool mask.
    fn sinks_with_every_mask_kind(dev: &Device) {
        let (b, nq, nkv, tq, tkv) = (1, 4, 2, 90, 70);
        let mut seed = 5000;
        for dtype in HALF {
            for (d, dv) in [(64, 64), (128, 128), (256, 256)] {
                for kind in 0..4 {
                    seed += 10;
                    let (q, k, v) = qkv(
                        dev,
                        (b, nq, nkv, tq, tkv, d, dv),
                        (false, false),
                        dtype,
                        seed,
                    );
                    let sinks = Input::new(&uniform(&[nq], -1.0, 3.0, dtype, seed + 3), dev);
                    let m = match kind {
                        2 => bool_mask(&[tq, tkv], 0.5, seed + 4),
                        _ => uniform(&[b, nq, tq, tkv], -3.0, 1.0, dtype, seed + 4),
                    };
                    let m = Input::new(&m, dev);
                    let mask = match kind {
                        0 => Masking::None,
                        1 => Masking::Causal,
                        _ => Masking::Array(&m),
                    };
                    let what = format!("{dtype} D {d} sinks, mask kind {kind}, seed {seed}");
                    check_with(&q, &k, &v, 0.125, mask, Some(&sinks), tol, &what);
                }
            }
        }
    }

    /// Rows whose keys are all masked (bool `false` or additive `-inf`) are 0, as are the first
    /// rows of a causal call with more queries than keys.
    fn fully_masked_rows_are_zero(dev: &Device) {
        let (b, nq, tq, tkv, d) = (1, 2, 40, 100, 64);
        for dtype in HALF {
            let (q, k, v) = qkv(dev, (b, nq, nq, tq, tkv, d, d), (false, false), dtype, 1);
            // Bool: rows 0, 7 and 39 see nothing; additive: the same rows are all -inf.
            let mut keep = bool_mask(&[tq, tkv], 0.6, 4).to_vec::<bool>().unwrap();
            let mut add = uniform(&[tq, tkv], -1.0, 1.0, DType::F32, 5)
                .to_vec::<f32>()
                .unwrap();
            for row in [0usize, 7, 39] {
                keep[row * tkv..(row + 1) * tkv].fill(false);
                add[row * tkv..(row + 1) * tkv].fill(f32::NEG_INFINITY);
            }
            let bool_m = Input::new(&Array::from_vec(keep, &[tq, tkv]).unwrap(), dev);
            let add_m = Array::from_vec(add, &[tq, tkv])
                .unwrap()
                .astype(dtype)
                .unwrap();
            let add_m = Input::new(&add_m, dev);
            for (m, name) in [(&bool_m, "bool"), (&add_m, "additive")] {
                let out = sdpa(&q.dev, &k.dev, &v.dev, 0.125, Mask::Array(&m.dev), None).unwrap();
                let vals = out.to_f64_vec().unwrap();
                for h in 0..nq {
                    for row in [0usize, 7, 39] {
                        let start = (h * tq + row) * d;
                        assert!(
                            vals[start..start + d].iter().all(|&x| x == 0.0),
                            "{dtype} {name} on {dev}: row {row} of head {h} is not 0"
                        );
                    }
                }
                let what = format!("{dtype} {name}");
                check_with(&q, &k, &v, 0.125, Masking::Array(m), None, tol, &what);
            }
            // Causal with more queries than keys: the first T_q - T_kv rows see no key.
            let k2 = input(dev, b, nq, 25, d, false, dtype, 6);
            let v2 = input(dev, b, nq, 25, d, false, dtype, 7);
            let what = format!("{dtype} causal Tq>Tkv");
            check_with(&q, &k2, &v2, 0.125, Masking::Causal, None, tol, &what);
            let out = sdpa(&q.dev, &k2.dev, &v2.dev, 0.125, Mask::Causal, None).unwrap();
            let vals = out.to_f64_vec().unwrap();
            assert!(
                vals[..(tq - 25) * d].iter().all(|&x| x == 0.0),
                "{dtype} causal zeros on {dev}"
            );
        }
    }

    /// `[B, T, H, D]` views read in place; rows not 16-byte aligned (copied first), a sliced
    /// sequence and a reversed head axis.
    fn strided_and_unaligned_views(dev: &Device) {
        let mut seed = 6000;
        for dtype in HALF {
            for is_causal in [false, true] {
                seed += 10;
                // [B, T, H, D] memory seen as [B, H, T, D]: read in place.
                let (q, k, v) = qkv(dev, (2, 4, 2, 70, 90, 128, 128), (true, true), dtype, seed);
                let what = format!("{dtype} transposed causal {is_causal} seed {seed}");
                check_with(&q, &k, &v, 0.1, causal_if(is_causal), None, tol, &what);

                // Rows 67 elements apart (not 16-byte aligned): copied first. A sliced
                // sequence (offset rows) and a reversed head axis.
                let q2 = Input::view(&randn(&[1, 3, 50, 67], dtype, seed + 3), dev, |a| {
                    a.slice(&[0, 0, 0, 0], &[1, 3, 50, 64], &[1, 1, 1, 1])
                        .unwrap()
                });
                let k2 = Input::view(&randn(&[1, 3, 80, 64], dtype, seed + 4), dev, |a| {
                    a.slice(&[0, -1, 8, 0], &[1, -4, 80, 64], &[1, -1, 1, 1])
                        .unwrap()
                });
                let v2 = input(dev, 1, 3, 72, 64, true, dtype, seed + 5);
                let what = format!("{dtype} sliced/reversed causal {is_causal} seed {seed}");
                check_with(&q2, &k2, &v2, 0.125, causal_if(is_causal), None, tol, &what);
            }
        }
    }

    /// 5 query tiles x 16 heads x 2 batches = 160 blocks of 128 rows (more than 132 SMs).
    fn more_blocks_than_multiprocessors(dev: &Device) {
        for (dtype, is_causal, seed) in [(DType::BF16, false, 7000), (DType::F16, true, 7010)] {
            let (q, k, v) = qkv(
                dev,
                (2, 16, 4, 600, 600, 128, 128),
                (true, true),
                dtype,
                seed,
            );
            let what = format!("{dtype} 160 blocks causal {is_causal} seed {seed}");
            check_with(&q, &k, &v, 0.0884, causal_if(is_causal), None, tol, &what);
        }
    }

    /// float32 and an unlisted head dim are not this kernel's: the dispatcher sends them to the
    /// general kernel, which must give the oracle's answer. Inputs on two devices are a clear
    /// error.
    fn uncovered_cases_fall_back_and_stay_right(dev: &Device) {
        for (dtype, d) in [(DType::F32, 64), (DType::BF16, 72)] {
            let (q, k, v) = qkv(dev, (1, 2, 2, 20, 20, d, d), (false, false), dtype, 1);
            let what = format!("fallback {dtype} D {d}");
            check_with(&q, &k, &v, 0.1, Masking::None, None, tol, &what);
        }
        let (q, k, v) = qkv(
            dev,
            (1, 2, 2, 20, 20, 64, 64),
            (false, false),
            DType::BF16,
            1,
        );
        match sdpa(&q.dev, &k.host, &v.dev, 0.1, Mask::None, None) {
            Err(Error::Device(msg)) => assert!(msg.contains("device"), "{msg}"),
            other => panic!("expected a device error, got {other:?}"),
        }
    }

    /// No keys gives zeros; no queries gives an empty output.
    fn empty_shapes_and_zero_keys(dev: &Device) {
        let (q, k, v) = qkv(dev, (1, 2, 2, 5, 0, 64, 64), (false, false), DType::BF16, 1);
        let out = sdpa(&q.dev, &k.dev, &v.dev, 0.1, Mask::None, None).unwrap();
        assert_eq!(out.shape(), &[1, 2, 5, 64]);
        assert!(out.to_f64_vec().unwrap().iter().all(|&x| x == 0.0));
        let q0 = input(dev, 1, 2, 0, 64, false, DType::BF16, 4);
        let k1 = input(dev, 1, 2, 9, 64, false, DType::BF16, 5);
        let out = sdpa(&q0.dev, &k1.dev, &k1.dev, 0.1, Mask::Causal, None).unwrap();
        assert_eq!(out.shape(), &[1, 2, 0, 64]);
    }
}

// ----- the Hopper kernel --------------------------------------------------------------------

/// One attention problem on the CPU (for the oracle) and a GPU.
struct Problem {
    q: Input,
    k: Input,
    v: Input,
}

/// Row-major or (`transposed`) `[B, T, H, D]` inputs of one problem: `heads` is
/// `(N_q, N_kv)`, `D = D_v = d`.
#[allow(clippy::too_many_arguments)]
fn problem(
    dev: &Device,
    dtype: DType,
    b: usize,
    heads: (usize, usize),
    tq: usize,
    tkv: usize,
    d: usize,
    transposed: bool,
    seed: u64,
) -> Problem {
    Problem {
        q: input(dev, b, heads.0, tq, d, transposed, dtype, seed),
        k: input(dev, b, heads.1, tkv, d, transposed, dtype, seed + 1),
        v: input(dev, b, heads.1, tkv, d, transposed, dtype, seed + 2),
    }
}

/// The op on the GPU inputs of `p`; the output must stay on the GPU.
fn run_gpu(p: &Problem, scale: f32, causal: bool, what: &str) -> Array {
    let mask = if causal { Mask::Causal } else { Mask::None };
    let out = sdpa(&p.q.dev, &p.k.dev, &p.v.dev, scale, mask, None)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.device().is_cuda(), "{what}: output left the GPU");
    out
}

/// `p` against the oracle at [`tol`].
fn check_problem(p: &Problem, scale: f32, causal: bool, what: &str) {
    check_with(&p.q, &p.k, &p.v, scale, causal_if(causal), None, tol, what);
}

/// The knob switches kernels (bitwise different outputs on sm_90, the same elsewhere), then
/// every shape the Hopper kernel covers against the oracle.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn hopper_kernel_through_the_knob_matches_the_oracle() {
    let _knob = KNOB.write().unwrap_or_else(|e| e.into_inner());
    for dev in common::gpus() {
        let dev = &dev;
        // 1. The knob switches kernels: same inputs, bitwise different outputs on sm_90.
        std::env::set_var(KNOB_VAR, "mma");
        let probe = problem(dev, DType::BF16, 1, (2, 2), 256, 256, 128, false, 7);
        let kernel =
            || attention_kernel(&probe.q.dev, &probe.k.dev, &probe.v.dev, Mask::None, None);
        assert_eq!(kernel().unwrap(), "prefill_mma");
        let before = run_gpu(&probe, 0.088, false, "probe, mma.sync kernel")
            .to_f64_vec()
            .unwrap();
        std::env::remove_var(KNOB_VAR);
        let active = kernel().unwrap() == "prefill_sm90";
        println!("Hopper prefill kernel selected on {dev}: {active}");
        let after = run_gpu(&probe, 0.088, false, "probe, default kernel")
            .to_f64_vec()
            .unwrap();
        if active {
            assert_ne!(before, after, "the knob did not change the kernel");
        } else {
            assert_eq!(
                before, after,
                "no Hopper GPU, yet the knob changed the result"
            );
        }

        // 2. Every covered shape against the oracle.
        let mut seed = 10_000;
        let lengths = [
            (128, 128),
            (256, 256),
            (200, 333),
            (333, 200),
            (129, 127),
            (17, 300),
            (300, 17),
            (640, 515),
        ];
        for dtype in [DType::BF16, DType::F16] {
            for d in [128, 64] {
                for &(tq, tkv) in &lengths {
                    for causal in [false, true] {
                        seed += 10;
                        let p = problem(dev, dtype, 1, (2, 2), tq, tkv, d, false, seed);
                        let what =
                            format!("{dtype} D {d} Tq {tq} Tkv {tkv} causal {causal} seed {seed}");
                        check_problem(&p, 1.0 / (d as f32).sqrt(), causal, &what);
                    }
                }
            }
        }
        for dtype in [DType::BF16, DType::F16] {
            for (nq, nkv) in [(8, 2), (6, 1), (4, 4)] {
                for transposed in [false, true] {
                    for causal in [false, true] {
                        seed += 10;
                        let p = problem(dev, dtype, 2, (nq, nkv), 211, 389, 128, transposed, seed);
                        let what = format!(
                            "{dtype} heads {nq}/{nkv} transposed {transposed} causal {causal} \
                             seed {seed}"
                        );
                        check_problem(&p, 0.09, causal, &what);
                    }
                }
            }
        }
        // A scale <= 0 sends every tile through the masking path.
        for causal in [false, true] {
            seed += 10;
            let p = problem(dev, DType::BF16, 1, (2, 1), 300, 300, 128, false, seed);
            let what = format!("negative scale causal {causal} seed {seed}");
            check_problem(&p, -0.05, causal, &what);
        }
        // Long sequences: many tiles through the two-stage ring (stage reuse, phase parity).
        for causal in [false, true] {
            seed += 10;
            let p = problem(dev, DType::BF16, 1, (2, 2), 1500, 1500, 128, false, seed);
            let what = format!("T 1500 causal {causal} seed {seed}");
            check_problem(&p, 0.088, causal, &what);
        }
    }
}

on_every_gpu_test! {
    /// A thread whose first CUDA work is the attention call itself (a fresh thread, with no
    /// context bound yet) gets the same kernel and result as one that has done other CUDA work.
    fn a_fresh_thread_runs_the_same_kernel(dev: &Device) {
        let p = problem(dev, DType::BF16, 1, (4, 2), 384, 384, 128, false, 41);
        let kernel = attention_kernel(&p.q.dev, &p.k.dev, &p.v.dev, Mask::Causal, None).unwrap();
        let here = run_gpu(&p, 0.088, true, "calling thread")
            .to_f64_vec()
            .unwrap();
        let there = std::thread::scope(|s| {
            s.spawn(|| {
                run_gpu(&p, 0.088, true, "fresh thread")
                    .to_f64_vec()
                    .unwrap()
            })
            .join()
            .unwrap()
        });
        assert_eq!(
            here, there,
            "{kernel}: a fresh thread computed something else"
        );
        check_problem(&p, 0.088, true, "fresh thread, against the oracle");
    }
}

// ----- benchmark (not a test) ---------------------------------------------------------------

/// Median time of the kernel on the shape; `cargo test --release -- --ignored`.
#[test]
#[ignore]
fn bench_prefill_b4_h32_t4096_d128() {
    on_every_gpu(|dev| {
        poison_gpu_buffers(false);
        let (b, h, t, d) = (4, 32, 4096, 128);
        for dtype in HALF {
            let q = Array::randn(&[b, h, t, d], dtype, 1, dev).unwrap();
            let k = Array::randn(&[b, h, t, d], dtype, 2, dev).unwrap();
            let v = Array::randn(&[b, h, t, d], dtype, 3, dev).unwrap();
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
                    "{dev} {dtype} B{b} H{h} T{t} D{d} causal {is_causal}: {:.3} ms, {:.1} TFLOP/s",
                    med * 1e3,
                    flops / med / 1e12
                );
            }
        }
    });
}
