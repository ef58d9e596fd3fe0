//! The Hopper prefill kernel (`kernels/attn_prefill_sm90.cu`, the default on compute
//! capability 9.0; `FERROFAST_PREFILL_KERNEL=mma` turns it off) against the float64 oracle on
//! every shape it covers: f16 and bf16, D = D_v in {64, 128}, causal and not, grouped and
//! multi-query heads, sequence lengths that are not multiples of the 128-row tiles,
//! T_q != T_kv both ways, strided (`[B, T, H, D]`) views and a negative scale. Output buffers
//! are poisoned, so unwritten elements fail.
//!
//! Everything runs in one test function: the knob is an environment variable, and the first
//! step compares one case with and without it (the outputs must differ bitwise on an H100 /
//! H200, proving the Hopper kernel ran), so no other test may toggle it concurrently. On a
//! GPU that is not compute capability 9.0 the same cases run on the `mma.sync` kernel. Without
//! a CUDA device the test prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{check_close, gpu, randn};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::testing::{attention_kernel, poison_gpu_buffers};
use ferrofast::{Array, DType, Device};

const KNOB: &str = "FERROFAST_PREFILL_KERNEL";

/// Held by every test here: one of them switches the kernel through the environment.
static KNOB_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `(atol, rtol)` against the f64 oracle: those of `tests/cuda_sdpa_prefill.rs`.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (1e-3, 1e-3),
        _ => (8e-3, 8e-3),
    }
}

/// One attention problem on the CPU (for the oracle) and the GPU.
struct Case {
    q: (Array, Array),
    k: (Array, Array),
    v: (Array, Array),
}

/// `[B, H, T, D]` input as (cpu, gpu); `transposed` builds `[B, T, H, D]` memory seen through
/// `swapaxes(1, 2)`.
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
) -> (Array, Array) {
    if transposed {
        let cpu = randn(&[b, t, h, d], dtype, seed);
        let gpu = cpu.to_device(dev).unwrap();
        (cpu.swapaxes(1, 2).unwrap(), gpu.swapaxes(1, 2).unwrap())
    } else {
        let cpu = randn(&[b, h, t, d], dtype, seed);
        let gpu = cpu.to_device(dev).unwrap();
        (cpu, gpu)
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    dev: &Device,
    dtype: DType,
    b: usize,
    heads: (usize, usize),
    tq: usize,
    tkv: usize,
    d: usize,
    transposed: bool,
    seed: u64,
) -> Case {
    Case {
        q: input(dev, b, heads.0, tq, d, transposed, dtype, seed),
        k: input(dev, b, heads.1, tkv, d, transposed, dtype, seed + 1),
        v: input(dev, b, heads.1, tkv, d, transposed, dtype, seed + 2),
    }
}

fn run_gpu(c: &Case, scale: f32, causal: bool, what: &str) -> Array {
    let mask = if causal { Mask::Causal } else { Mask::None };
    let out =
        sdpa(&c.q.1, &c.k.1, &c.v.1, scale, mask, None).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.device().is_cuda(), "{what}: output left the GPU");
    out
}

fn check(c: &Case, scale: f32, causal: bool, what: &str) {
    let out = run_gpu(c, scale, causal, what);
    let mask = if causal { Mask::Causal } else { Mask::None };
    let reference = sdpa_ref(&c.q.0, &c.k.0, &c.v.0, scale, mask, None).unwrap();
    let (atol, rtol) = tol(out.dtype());
    check_close(&out, &reference, atol, rtol, what);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn hopper_kernel_through_the_knob_matches_the_oracle() {
    let Some(dev) = gpu() else { return };
    let _knob = KNOB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    poison_gpu_buffers(true);

    // 1. The knob switches kernels: same inputs, bitwise different outputs on sm_90.
    std::env::set_var(KNOB, "mma");
    let probe = case(&dev, DType::BF16, 1, (2, 2), 256, 256, 128, false, 7);
    let kernel = || attention_kernel(&probe.q.1, &probe.k.1, &probe.v.1, Mask::None, None);
    assert_eq!(kernel().unwrap(), "prefill_mma");
    let before = run_gpu(&probe, 0.088, false, "probe, mma.sync kernel")
        .to_f64_vec()
        .unwrap();
    std::env::remove_var(KNOB);
    let active = kernel().unwrap() == "prefill_sm90";
    println!("Hopper prefill kernel selected: {active}");
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
                    let c = case(&dev, dtype, 1, (2, 2), tq, tkv, d, false, seed);
                    let what =
                        format!("{dtype} D {d} Tq {tq} Tkv {tkv} causal {causal} seed {seed}");
                    check(&c, 1.0 / (d as f32).sqrt(), causal, &what);
                }
            }
        }
    }
    for dtype in [DType::BF16, DType::F16] {
        for (nq, nkv) in [(8, 2), (6, 1), (4, 4)] {
            for transposed in [false, true] {
                for causal in [false, true] {
                    seed += 10;
                    let c = case(&dev, dtype, 2, (nq, nkv), 211, 389, 128, transposed, seed);
                    let what = format!(
                        "{dtype} heads {nq}/{nkv} transposed {transposed} causal {causal} \
                         seed {seed}"
                    );
                    check(&c, 0.09, causal, &what);
                }
            }
        }
    }
    // A scale <= 0 sends every tile through the masking path.
    for causal in [false, true] {
        seed += 10;
        let c = case(&dev, DType::BF16, 1, (2, 1), 300, 300, 128, false, seed);
        check(
            &c,
            -0.05,
            causal,
            &format!("negative scale causal {causal} seed {seed}"),
        );
    }
    // Long sequences: many tiles through the two-stage ring (stage reuse, phase parity).
    for causal in [false, true] {
        seed += 10;
        let c = case(&dev, DType::BF16, 1, (2, 2), 1500, 1500, 128, false, seed);
        check(
            &c,
            0.088,
            causal,
            &format!("T 1500 causal {causal} seed {seed}"),
        );
    }
    poison_gpu_buffers(false);
}

/// A thread whose first CUDA work is the attention call itself (a fresh thread, with no
/// context bound yet) gets the same kernel and result as one that has done other CUDA work.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn a_fresh_thread_runs_the_same_kernel() {
    let Some(dev) = gpu() else { return };
    let _knob = KNOB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = case(&dev, DType::BF16, 1, (4, 2), 384, 384, 128, false, 41);
    let kernel = attention_kernel(&c.q.1, &c.k.1, &c.v.1, Mask::Causal, None).unwrap();
    let here = run_gpu(&c, 0.088, true, "calling thread")
        .to_f64_vec()
        .unwrap();
    let there = std::thread::scope(|s| {
        s.spawn(|| {
            run_gpu(&c, 0.088, true, "fresh thread")
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
    check(&c, 0.088, true, "fresh thread, against the oracle");
}
