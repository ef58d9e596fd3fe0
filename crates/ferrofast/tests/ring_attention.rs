//! Context-parallel attention (`ferrofast::parallel`) on the CPU with threads as ranks
//! (`ThreadRing`): forward and backward against single-device attention over the whole
//! sequence for 1 to 8 ranks, causal (load-balanced layout) and not (contiguous, uneven
//! shards), grouped-query heads, sinks, float32 and bfloat16; the layout helpers; errors,
//! including a failing rank that must not leave the others waiting.

mod common;

use common::{AttnGrads as Grads, AttnProblem as Problem};
use ferrofast::fast::{self, Mask};
use ferrofast::parallel::{
    gather_sequence, ring_attention, ring_attention_vjp, shard_ranges, shard_sequence,
    Communicator, ThreadRing,
};
use ferrofast::{Array, DType, Device, Result};

/// Runs `f(comm)` on `world` threads, one per rank, and returns the results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(ThreadRing) -> Result<T> + Sync) -> Vec<Result<T>> {
    let ranks = ThreadRing::new(world).expect("ring");
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || f(comm))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

/// Asserts `|a - b| <= atol * max|b| + rtol * |b|` elementwise (the absolute part scaled
/// by the reference's magnitude: gradients have no fixed scale).
fn close(a: &Array, b: &Array, atol: f64, rtol: f64, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes");
    let (x, y) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
    let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(
            (p - q).abs() <= atol * scale + rtol * q.abs(),
            "{what}: element {i} = {p}, single-device {q} (max |ref| {scale})"
        );
    }
}

/// An attention's output, log-sum-exp and gradients `(dq, dk, dv, dsinks)`.
type Run = (Array, Array, Grads);

/// [`close`] of the ring's output, log-sum-exp, dq, dk, dv and dsinks against the
/// single-device ones: the log-sum-exp at `lse_tol`, the others at `tol`; dsinks on both
/// sides or on neither.
fn close_all(got: &Run, want: &Run, tol: (f64, f64), lse_tol: (f64, f64), what: &str) {
    let ((out, lse, (dq, dk, dv, ds)), (rout, rlse, (rdq, rdk, rdv, rds))) = (got, want);
    for (name, a, b) in [
        ("out", out, rout),
        ("lse", lse, rlse),
        ("dq", dq, rdq),
        ("dk", dk, rdk),
        ("dv", dv, rdv),
    ] {
        let (atol, rtol) = if name == "lse" { lse_tol } else { tol };
        close(a, b, atol, rtol, &format!("{what}: {name}"));
    }
    match (ds, rds) {
        (Some(a), Some(b)) => close(a, b, tol.0, tol.1, &format!("{what}: dsinks")),
        (None, None) => {}
        _ => panic!("{what}: dsinks present on one side only"),
    }
}

/// One problem over the full sequence: D 16, D_v 24, sinks (when `sinks`) in [-1, 1.5),
/// scale 0.3.
fn problem(
    b: usize,
    nq: usize,
    nkv: usize,
    t: usize,
    dtype: DType,
    sinks: bool,
    seed: u64,
) -> Problem {
    let dims = (b, nq, nkv, t, t, 16, 24);
    Problem::new(dims, dtype, sinks.then_some((-1.0, 1.5)), 0.3, seed)
}

/// The ring forward and backward on `world` threads: gathered `(out, lse)` and gradients,
/// and every rank's dsinks (which must agree).
fn ring(p: &Problem, world: usize, causal: bool) -> (Run, Vec<Option<Array>>) {
    let results = on_ranks(world, |comm| {
        let r = comm.rank();
        let shard = |x: &Array| shard_sequence(x, world, r, causal);
        let (q, k, v, g) = (shard(&p.q)?, shard(&p.k)?, shard(&p.v)?, shard(&p.d_out)?);
        let s = p.sinks.as_ref();
        let (out, lse) = ring_attention(&comm, &q, &k, &v, p.scale, causal, s)?;
        let grads = ring_attention_vjp(&comm, &q, &k, &v, p.scale, causal, s, &out, &lse, &g)?;
        Ok((out, lse, grads))
    });
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let (mut dqs, mut dks, mut dvs, mut dss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, res) in results.into_iter().enumerate() {
        let (o, l, (dq, dk, dv, ds)) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        outs.push(o);
        lses.push(l);
        dqs.push(dq);
        dks.push(dk);
        dvs.push(dv);
        dss.push(ds);
    }
    let g = |x: &[Array]| gather_sequence(x, causal).expect("gather");
    let grads = (g(&dqs), g(&dks), g(&dvs), dss[0].clone());
    ((g(&outs), g(&lses), grads), dss)
}

/// Single-device attention, its log-sum-exp and its gradients over the whole sequence.
fn single(p: &Problem, causal: bool) -> Run {
    let mask = if causal { Mask::Causal } else { Mask::None };
    let s = p.sinks.as_ref();
    let (out, lse) =
        fast::scaled_dot_product_attention_with_lse(&p.q, &p.k, &p.v, p.scale, mask, s).unwrap();
    let plain = fast::scaled_dot_product_attention(&p.q, &p.k, &p.v, p.scale, mask, s).unwrap();
    assert_eq!(
        plain.to_f64_vec().unwrap(),
        out.to_f64_vec().unwrap(),
        "the plain forward and the one with lse agree"
    );
    let grads = fast::scaled_dot_product_attention_vjp(
        &p.q, &p.k, &p.v, p.scale, mask, s, &out, &lse, &p.d_out,
    )
    .unwrap();
    (out, lse, grads)
}

/// The sequence length of a case: `2R` chunks of an odd length with a causal mask; an odd
/// length giving uneven shards without.
fn seq_len(world: usize, causal: bool, chunk: usize) -> usize {
    if causal {
        2 * world * chunk
    } else {
        world * chunk + 3
    }
}

fn check_case(world: usize, causal: bool, group: usize, dtype: DType, sinks: bool, seed: u64) {
    let nkv = 2;
    let t = seq_len(world, causal, 3);
    let p = problem(2, nkv * group, nkv, t, dtype, sinks, seed);
    let what = format!(
        "{dtype} world {world} causal {causal} group {group} T {t} sinks {sinks} seed {seed}"
    );
    let (got, all_ds) = ring(&p, world, causal);
    let tol = match dtype {
        DType::F32 => (2e-6, 2e-5),
        _ => (1.5e-2, 2e-2),
    };
    close_all(&got, &single(&p, causal), tol, (1e-6, 1e-5), &what);
    match &got.2 .3 {
        Some(a) => {
            let bits = a.to_f64_vec().unwrap();
            for (r, other) in all_ds.iter().enumerate() {
                let o = other.as_ref().expect("every rank returns dsinks");
                assert_eq!(o.to_f64_vec().unwrap(), bits, "{what}: rank {r}'s dsinks");
            }
        }
        None => assert!(all_ds.iter().all(Option::is_none), "{what}"),
    }
}

#[test]
fn float32_matches_single_device_for_1_to_8_ranks() {
    let mut seed = 1;
    for world in 1..=8 {
        for causal in [false, true] {
            for group in [1, 2, 4] {
                let sinks = (world + group) % 2 == 0;
                check_case(world, causal, group, DType::F32, sinks, seed);
                seed += 10;
            }
        }
    }
}

#[test]
fn bfloat16_matches_single_device_within_its_tolerance() {
    let mut seed = 500;
    for world in [1, 2, 3, 5, 8] {
        for causal in [false, true] {
            for (group, sinks) in [(1, true), (4, false)] {
                check_case(world, causal, group, DType::BF16, sinks, seed);
                seed += 10;
            }
        }
    }
}

#[test]
fn float16_and_float64_run_too() {
    check_case(3, true, 2, DType::F16, true, 900);
    // float64 accumulates in float64: tight agreement.
    let p = problem(1, 4, 2, 24, DType::F64, true, 910);
    let (got, _) = ring(&p, 4, true);
    assert!(got.2 .3.is_some(), "f64: dsinks");
    close_all(
        &got,
        &single(&p, true),
        (1e-12, 1e-12),
        (1e-12, 1e-12),
        "f64",
    );
}

#[test]
fn longer_sequences_and_wider_heads() {
    // Chunks long enough for attention's tiled CPU paths (and unequal head dims).
    let p = Problem {
        q: common::randn(&[1, 8, 256, 64], DType::F32, 950),
        k: common::randn(&[1, 2, 256, 64], DType::F32, 951),
        v: common::randn(&[1, 2, 256, 32], DType::F32, 952),
        d_out: common::randn(&[1, 8, 256, 32], DType::F32, 953),
        sinks: Some(common::uniform(&[8], -1.0, 1.0, DType::F32, 954)),
        scale: 0.125,
    };
    for (world, causal) in [(4, true), (3, false), (8, true)] {
        let (got, _) = ring(&p, world, causal);
        let what = format!("T 256 world {world} causal {causal}");
        assert!(got.2 .3.is_some(), "{what}: dsinks");
        close_all(&got, &single(&p, causal), (2e-6, 2e-5), (1e-6, 1e-5), &what);
    }
}

#[test]
fn ranks_with_devices_on_the_cpu() {
    // `with_devices` moves what a rank receives to its device: here the CPU for all.
    let p = problem(1, 4, 2, 24, DType::F32, false, 1200);
    let ranks = ThreadRing::with_devices(&[Device::Cpu; 3]).unwrap();
    let outs: Vec<Array> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|comm| {
                let p = &p;
                s.spawn(move || {
                    let r = comm.rank();
                    let shard = |x: &Array| shard_sequence(x, 3, r, true).unwrap();
                    ring_attention(
                        &comm,
                        &shard(&p.q),
                        &shard(&p.k),
                        &shard(&p.v),
                        p.scale,
                        true,
                        None,
                    )
                    .unwrap()
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (rout, _, _) = single(&p, true);
    close(
        &gather_sequence(&outs, true).unwrap(),
        &rout,
        2e-6,
        2e-5,
        "with_devices",
    );
}

#[test]
fn layouts_shard_and_gather() {
    // Load-balanced: rank r holds chunks r and 2R-1-r.
    assert_eq!(shard_ranges(12, 3, 0, true).unwrap(), vec![0..2, 10..12]);
    assert_eq!(shard_ranges(12, 3, 1, true).unwrap(), vec![2..4, 8..10]);
    assert_eq!(shard_ranges(12, 3, 2, true).unwrap(), vec![4..6, 6..8]);
    // Contiguous: the first T % R ranks hold one more.
    assert_eq!(shard_ranges(11, 3, 0, false).unwrap(), vec![0..4]);
    assert_eq!(shard_ranges(11, 3, 1, false).unwrap(), vec![4..8]);
    assert_eq!(shard_ranges(11, 3, 2, false).unwrap(), vec![8..11]);
    assert_eq!(shard_ranges(2, 4, 3, false).unwrap(), vec![2..2]);
    // Round trips, for [B, H, T, D] arrays and [B, H, T] ones.
    for (causal, t) in [(true, 24), (false, 23)] {
        for shape in [vec![2, 3, t, 5], vec![2, 3, t]] {
            let x = common::randn(&shape, DType::F32, 7);
            for world in [1, 2, 3] {
                let shards: Vec<Array> = (0..world)
                    .map(|r| shard_sequence(&x, world, r, causal).unwrap())
                    .collect();
                let ranges = shard_ranges(t, world, 1 % world, causal).unwrap();
                let expect: usize = ranges.iter().map(|r| r.len()).sum();
                assert_eq!(shards[1 % world].shape()[2], expect);
                let back = gather_sequence(&shards, causal).unwrap();
                assert_eq!(back.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
            }
        }
    }
    // Rank 1's shard holds positions 2..4 and 8..10 of a 12-long sequence.
    let pos: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let x = Array::from_vec(pos, &[1, 1, 12]).unwrap();
    let s = shard_sequence(&x, 3, 1, true).unwrap();
    assert_eq!(s.to_vec::<f32>().unwrap(), vec![2.0, 3.0, 8.0, 9.0]);
}

#[test]
fn layout_errors() {
    let msg = |e: ferrofast::Error| e.to_string();
    let e = msg(shard_ranges(10, 3, 0, true).unwrap_err());
    assert!(
        e.contains(
            "[ring_attention] the causal layout cuts the sequence into 2 * world_size = 6 chunks \
             of equal length, but the sequence length 10 is not a multiple of 6; pad the \
             sequence at the end to 12 positions"
        ),
        "{e}"
    );
    assert!(msg(shard_ranges(10, 3, 3, false).unwrap_err())
        .contains("rank 3 is not in a ring of 3 ranks"));
    assert!(msg(shard_ranges(10, 0, 0, false).unwrap_err()).contains("ring of 0 ranks"));
    let x2 = common::randn(&[4, 6], DType::F32, 1);
    assert!(msg(shard_sequence(&x2, 2, 0, false).unwrap_err())
        .contains("[shard_sequence] the sequence is axis 2 of [B, H, T, D] or [B, H, T] arrays, but the array has shape (4,6)."));
    assert!(msg(gather_sequence(&[], true).unwrap_err())
        .contains("[gather_sequence] there are no shards"));
    let a = common::randn(&[1, 2, 4, 3], DType::F32, 2);
    let b = common::randn(&[1, 2, 6, 3], DType::F32, 3);
    assert!(msg(gather_sequence(&[a.clone(), b.clone()], true).unwrap_err())
        .contains("[gather_sequence] the shards must have one dtype and one shape but have float32 (1,2,4,3) and float32 (1,2,6,3)."));
    // Without a mask shards may differ in length.
    assert_eq!(
        gather_sequence(&[a.clone(), b], false).unwrap().shape(),
        &[1, 2, 10, 3]
    );
    let odd = common::randn(&[1, 2, 5, 3], DType::F32, 4);
    assert!(msg(gather_sequence(&[odd], true).unwrap_err())
        .contains("holds two chunks of equal length"));
    assert!(msg(ThreadRing::new(0).unwrap_err())
        .contains("[ThreadRing] a ring needs at least one rank"));
    assert!(msg(ThreadRing::with_devices(&[]).unwrap_err())
        .contains("[ThreadRing] a ring needs at least one rank"));
}

#[test]
fn bad_shards_are_errors_on_every_rank_without_hanging() {
    let p = problem(1, 4, 2, 24, DType::F32, false, 990);
    // Rank 1 of 4 passes a 3-D q: it fails at once, and its neighbours' exchanges fail in
    // turn instead of waiting forever.
    let results = on_ranks(4, |comm| {
        let r = comm.rank();
        let shard = |x: &Array| shard_sequence(x, 4, r, true);
        let q = if r == 1 {
            common::randn(&[4, 6, 16], DType::F32, 1)
        } else {
            shard(&p.q)?
        };
        ring_attention(&comm, &q, &shard(&p.k)?, &shard(&p.v)?, p.scale, true, None)
    });
    let errors: Vec<String> = results
        .into_iter()
        .map(|r| r.expect_err("every rank fails").to_string())
        .collect();
    assert!(errors[1].contains("[ring_attention] q must be this rank's 4-dimensional [B, H, T, D] shard but has shape (4,6,16)."), "{}", errors[1]);
    assert!(
        errors.iter().any(|e| e.contains("[ThreadRing]")),
        "{errors:?}"
    );

    // Causal shards of one odd length, and of different lengths on different ranks.
    let odd = on_ranks(1, |comm| {
        let q = common::randn(&[1, 2, 5, 16], DType::F32, 2);
        ring_attention(&comm, &q, &q, &q, 0.3, true, None)
    });
    let e = odd.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(e.contains("so q and k must have one even length along T, but q has shape (1,2,5,16) and k (1,2,5,16)."), "{e}");
    let uneven = on_ranks(2, |comm| {
        let t = if comm.rank() == 0 { 4 } else { 6 };
        let q = common::randn(&[1, 2, t, 16], DType::F32, 3);
        ring_attention(&comm, &q, &q, &q, 0.3, true, None)
    });
    let errors: Vec<String> = uneven
        .into_iter()
        .map(|r| r.unwrap_err().to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("'s keys have shape (1,2,")
            && e.contains("every rank holds two chunks of one length")),
        "{errors:?}"
    );
    // Sinks on some ranks only: the gradient's partials do not add up.
    let p = problem(1, 4, 2, 8, DType::F32, true, 995);
    let mixed = on_ranks(2, |comm| {
        let r = comm.rank();
        let shard = |x: &Array| shard_sequence(x, 2, r, false);
        let (q, k, v, g) = (shard(&p.q)?, shard(&p.k)?, shard(&p.v)?, shard(&p.d_out)?);
        let s = p.sinks.as_ref().filter(|_| r == 0);
        let (out, lse) = ring_attention(&comm, &q, &k, &v, p.scale, false, s)?;
        ring_attention_vjp(&comm, &q, &k, &v, p.scale, false, s, &out, &lse, &g)
    });
    let e = mixed.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(e.contains("every rank must pass sinks"), "{e}");
}

#[test]
fn a_custom_communicator_plugs_in() {
    // A transport that counts what it moves, over a ThreadRing: the ring only needs the
    // trait.
    struct Counting {
        inner: ThreadRing,
        sent: std::sync::atomic::AtomicUsize,
    }
    impl Communicator for Counting {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn send_next(&self, arrays: Vec<Array>) -> Result<()> {
            self.sent
                .fetch_add(arrays.len(), std::sync::atomic::Ordering::Relaxed);
            self.inner.send_next(arrays)
        }
        fn recv_prev(&self) -> Result<Vec<Array>> {
            self.inner.recv_prev()
        }
    }
    let p = problem(1, 2, 2, 12, DType::F32, false, 997);
    let counts = on_ranks(3, |comm| {
        let c = Counting {
            inner: comm,
            sent: 0.into(),
        };
        let r = c.rank();
        let shard = |x: &Array| shard_sequence(x, 3, r, true);
        ring_attention(
            &c,
            &shard(&p.q)?,
            &shard(&p.k)?,
            &shard(&p.v)?,
            p.scale,
            true,
            None,
        )?;
        Ok(c.sent.into_inner())
    });
    // Two sends of (k, v) per rank for three ranks.
    for c in counts {
        assert_eq!(c.unwrap(), 4);
    }
    let _ = Device::Cpu;
}

#[cfg(feature = "cuda")]
mod cuda_only {
    use super::*;

    /// `p` with every array on `dev`.
    fn moved(p: &Problem, dev: &Device) -> Problem {
        Problem {
            q: common::on(&p.q, dev),
            k: common::on(&p.k, dev),
            v: common::on(&p.v, dev),
            d_out: common::on(&p.d_out, dev),
            sinks: p.sinks.as_ref().map(|s| common::on(s, dev)),
            scale: p.scale,
        }
    }

    /// Ranks on different GPUs (round robin over every GPU found; needs two), the blocks
    /// moved between them by `ThreadRing::with_devices`: each rank's results against
    /// single-device attention on the CPU. Ignored everywhere (reported as such): run it
    /// with `--ignored` on a machine with two or more GPUs, where fewer is a failure.
    #[test]
    #[ignore = "needs two or more CUDA devices: run with --ignored on a multi-GPU machine"]
    fn ranks_on_several_gpus_match_single_device_attention() {
        let gpus = common::gpus();
        assert!(
            gpus.len() >= 2,
            "{} CUDA device(s) found, this test needs two",
            gpus.len()
        );
        for (world, causal) in [(2, true), (4, true), (3, false)] {
            let devices: Vec<Device> = (0..world).map(|r| gpus[r % gpus.len()]).collect();
            let p = problem(1, 4, 2, seq_len(world, causal, 8), DType::F32, true, 3000);
            let ranks = ThreadRing::with_devices(&devices).unwrap();
            let results: Vec<Result<Vec<Array>>> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .into_iter()
                    .map(|comm| {
                        let p = &p;
                        let dev = devices[comm.rank()];
                        s.spawn(move || -> Result<Vec<Array>> {
                            let r = comm.rank();
                            let shard =
                                |x: &Array| shard_sequence(&common::on(x, &dev), world, r, causal);
                            let (q, k, v, g) =
                                (shard(&p.q)?, shard(&p.k)?, shard(&p.v)?, shard(&p.d_out)?);
                            let sinks = p.sinks.as_ref().map(|x| common::on(x, &dev));
                            let (out, lse) =
                                ring_attention(&comm, &q, &k, &v, p.scale, causal, sinks.as_ref())?;
                            let (dq, dk, dv, ds) = ring_attention_vjp(
                                &comm,
                                &q,
                                &k,
                                &v,
                                p.scale,
                                causal,
                                sinks.as_ref(),
                                &out,
                                &lse,
                                &g,
                            )?;
                            assert_eq!(out.device(), dev);
                            [out, lse, dq, dk, dv, ds.expect("dsinks")]
                                .iter()
                                .map(|a| a.to_device(&Device::Cpu))
                                .collect()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank"))
                    .collect()
            });
            let per_rank: Vec<Vec<Array>> = results.into_iter().map(|r| r.unwrap()).collect();
            let gathered = |i: usize| {
                let shards: Vec<Array> = per_rank.iter().map(|r| r[i].clone()).collect();
                gather_sequence(&shards, causal).unwrap()
            };
            let (rout, rlse, (rdq, rdk, rdv, rds)) = single(&p, causal);
            let what = format!("{world} ranks on {devices:?} causal {causal}");
            close(&gathered(0), &rout, 1e-5, 1e-4, &format!("{what}: out"));
            close(&gathered(1), &rlse, 1e-5, 1e-4, &format!("{what}: lse"));
            close(&gathered(2), &rdq, 1e-5, 1e-4, &format!("{what}: dq"));
            close(&gathered(3), &rdk, 1e-5, 1e-4, &format!("{what}: dk"));
            close(&gathered(4), &rdv, 1e-5, 1e-4, &format!("{what}: dv"));
            for r in &per_rank {
                close(
                    &r[5],
                    rds.as_ref().unwrap(),
                    1e-5,
                    1e-4,
                    &format!("{what}: dsinks"),
                );
            }
        }
    }

    /// Ranks as threads sharing one GPU: the merge, the accumulation kernel, the sharding
    /// and gathering copies and attention's kernels on the device, against single-device
    /// attention on the CPU.
    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn ranks_sharing_a_gpu_match_single_device_attention() {
        let Some(gpu) = common::gpu() else { return };
        let mut seed = 2000;
        for (world, causal, dtype, group) in [
            (2, true, DType::F32, 2),
            (3, false, DType::F32, 1),
            (4, true, DType::BF16, 4),
            (3, true, DType::F16, 1),
        ] {
            let t = seq_len(world, causal, 8);
            let p = problem(2, 2 * group, 2, t, dtype, true, seed);
            seed += 10;
            let what = format!("{gpu} {dtype} world {world} causal {causal} group {group}");
            let (got, _) = ring(&moved(&p, &gpu), world, causal);
            assert_eq!(got.0.device(), gpu, "{what}");
            assert!(got.2 .3.is_some(), "{what}: dsinks");
            let tol = match dtype {
                DType::F32 => (1e-5, 1e-4),
                _ => (2e-2, 3e-2),
            };
            close_all(&got, &single(&p, causal), tol, (1e-5, 1e-4), &what);
        }
    }
}
