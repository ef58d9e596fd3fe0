//! GPU stress: 8 threads, each driving 2 streams of its own, run a mixed sequence of ops
//! (norms, rope, attention decode and prefill, their backward passes) and every result must
//! be bit-identical to the same op run alone on the default stream; the device memory in use
//! (as `nvidia-smi` reports it) must not grow after the first round. Ignored without the
//! `gpu-tests` feature; `FERROFAST_STRESS_ROUNDS` (default 2,000 rounds of 5 ops per stream,
//! 10,000 ops per stream) sets the length.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;
use ferrofast::fast::{self, Mask, RopeOffset};
use ferrofast::{bf16, Array, DType, Device, Stream};
use std::sync::Arc;

const THREADS: usize = 8;
const STREAMS_PER_THREAD: usize = 2;
/// Ops per round.
const OPS: usize = 5;

/// The inputs of every op, on the CPU.
struct Inputs {
    x: Array,
    w: Array,
    b: Array,
    rope_x: Array,
    q_decode: Array,
    q_prefill: Array,
    k: Array,
    v: Array,
    cot: Array,
}

fn inputs() -> Inputs {
    let r = |shape: &[usize], seed| Array::randn(shape, DType::BF16, seed, &Device::Cpu).unwrap();
    Inputs {
        x: r(&[64, 4096], 1),
        w: r(&[4096], 2),
        b: r(&[4096], 3),
        rope_x: r(&[2, 8, 128, 128], 4),
        q_decode: r(&[2, 8, 1, 128], 5),
        q_prefill: r(&[2, 8, 256, 128], 6),
        k: r(&[2, 2, 512, 128], 7),
        v: r(&[2, 2, 512, 128], 8),
        cot: r(&[64, 4096], 9),
    }
}

/// Op `i` of a round on `stream` (inputs already there), read back to the host as raw bits.
fn run_op(i: usize, s: &Stream, a: &Inputs) -> Vec<u16> {
    let out = match i {
        0 => fast::rms_norm_on(s, &a.x, Some(&a.w), 1e-5).unwrap(),
        1 => fast::layer_norm_on(s, &a.x, Some(&a.w), Some(&a.b), 1e-5).unwrap(),
        2 => fast::rope_on(
            s,
            &a.rope_x,
            128,
            false,
            Some(10000.0),
            1.0,
            RopeOffset::Int(17),
            None,
        )
        .unwrap(),
        3 => fast::scaled_dot_product_attention_on(
            s,
            &a.q_decode,
            &a.k,
            &a.v,
            0.088,
            Mask::None,
            None,
        )
        .unwrap(),
        _ => {
            let o = fast::scaled_dot_product_attention_on(
                s,
                &a.q_prefill,
                &a.k,
                &a.v,
                0.088,
                Mask::Causal,
                None,
            )
            .unwrap();
            let (dx, _) = fast::rms_norm_vjp_on(s, &a.x, Some(&a.w), 1e-5, &a.cot).unwrap();
            // Both results in one vector: the attention output, then dx.
            let mut all = bits(&o);
            all.extend(bits(&dx));
            return all;
        }
    };
    bits(&out)
}

/// The raw bits of a bf16 array.
fn bits(a: &Array) -> Vec<u16> {
    a.to_vec::<bf16>()
        .unwrap()
        .into_iter()
        .map(bf16::to_bits)
        .collect()
}

/// The inputs moved onto `stream`.
fn on_stream(a: &Inputs, s: &Stream) -> Inputs {
    let m = |x: &Array| x.to_stream(s).unwrap();
    Inputs {
        x: m(&a.x),
        w: m(&a.w),
        b: m(&a.b),
        rope_x: m(&a.rope_x),
        q_decode: m(&a.q_decode),
        q_prefill: m(&a.q_prefill),
        k: m(&a.k),
        v: m(&a.v),
        cot: m(&a.cot),
    }
}

/// Device memory in use on GPU `ordinal`, in MiB, from `nvidia-smi`; `None` without it.
fn memory_used_mib(ordinal: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            &ordinal.to_string(),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn threads_and_streams_give_the_single_threaded_results() {
    let Some(dev) = gpu() else { return };
    let Device::Cuda(ordinal) = dev else { return };
    let rounds: usize = std::env::var("FERROFAST_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let host = inputs();
    // The expected results: each op alone on the default stream.
    let default = dev.default_stream().unwrap();
    let on_default = on_stream(&host, &default);
    let expected: Arc<Vec<Vec<u16>>> =
        Arc::new((0..OPS).map(|i| run_op(i, &default, &on_default)).collect());
    drop(on_default);
    let host = Arc::new(host);

    let run_all = |rounds: usize| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (host, expected) = (Arc::clone(&host), Arc::clone(&expected));
                std::thread::spawn(move || {
                    let streams: Vec<Stream> = (0..STREAMS_PER_THREAD)
                        .map(|_| Stream::new(&dev).unwrap())
                        .collect();
                    let ins: Vec<Inputs> = streams.iter().map(|s| on_stream(&host, s)).collect();
                    for round in 0..rounds {
                        for (si, (s, a)) in streams.iter().zip(&ins).enumerate() {
                            // Threads and streams start at different ops, so every pair of
                            // ops runs concurrently somewhere.
                            let i = (round + t + si) % OPS;
                            let got = run_op(i, s, a);
                            assert!(
                                got == expected[i],
                                "thread {t} stream {si} round {round}: op {i} differs from \
                                 its single-threaded result"
                            );
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a stress thread failed");
        }
    };

    // One round to fill the memory pool, then the long run.
    run_all(1);
    dev.synchronize().unwrap();
    let before = memory_used_mib(ordinal);
    run_all(rounds);
    dev.synchronize().unwrap();
    let after = memory_used_mib(ordinal);
    match (before, after) {
        (Some(b), Some(a)) => assert!(
            a <= b + 512,
            "device memory grew from {b} MiB to {a} MiB over {rounds} rounds"
        ),
        _ => println!("nvidia-smi unavailable: device memory not checked"),
    }
}
