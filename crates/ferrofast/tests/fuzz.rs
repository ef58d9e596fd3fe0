//! Randomized calls of every public op on the CPU: no panic, no abort, and results equal to
//! the float64 oracle on valid finite input.
//!
//! A test binary without the standard harness (`harness = false` in `Cargo.toml`). Run
//! normally it is the parent: it starts itself again as a child process under an
//! address-space limit (`ulimit -v`, so an allocation beyond it fails as it would on a small
//! machine instead of being overcommitted), with a fixed seed, and fails if the child dies
//! of a signal (an abort), panics, or reports a mismatch. The child prints the call it is
//! about to make on stderr, so a crash names its call.
//!
//! Inputs: ranks 0 to 5 with sizes including 0, 1, odd sizes and huge broadcast sizes
//! (2^40, free through `broadcast_to`); every dtype (bool and integers included, for the
//! argument errors); strided views (transposes, reversed slices, broadcasts); bad
//! arguments (mismatched weights, wrong ranks, bad rope dims, offsets and frequencies,
//! attention masks and sinks of the wrong shape or dtype, gated-delta shapes, head ratios,
//! decays and masks, attention-merge parts of different shapes, ranks or dtypes and
//! log-sum-exps of the wrong shape or dtype); special values (NaN, infinities, huge and
//! zero scales, `-inf` log-sum-exps of merge parts that saw no key). Every result must be
//! `Ok` or an `Err`; an `Ok` on finite input is compared with the oracle, NaN where the
//! oracle is NaN (`merge_attention_states`, whose special values the oracle defines, is
//! compared on every input). Calls whose work alone (not their
//! memory) would be huge are not made: attention over 2^40 keys with a small output is
//! valid and would take days.
//!
//! `FERROFAST_FUZZ_CALLS` (default 100,000) and `FERROFAST_FUZZ_SEED` (default 19) change
//! the run.

use ferrofast::fast::{self, Mask, RopeOffset};
use ferrofast::{reference, Array, DType, Device, Error};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, ExitCode};

/// The address-space limit of the child, in KiB (`ulimit -v`): 8 GiB.
const CHILD_ADDRESS_SPACE_KIB: u64 = 8 << 20;
/// The environment variable that makes the binary the child.
const CHILD_ENV: &str = "FERROFAST_FUZZ_CHILD";
/// A huge size reached through `broadcast_to`.
const HUGE: usize = 1 << 40;

fn main() -> ExitCode {
    let calls: u64 = env_num("FERROFAST_FUZZ_CALLS", 100_000);
    let seed: u64 = env_num("FERROFAST_FUZZ_SEED", 19);
    if std::env::var_os(CHILD_ENV).is_some() {
        return child(seed, calls);
    }
    parent(seed, calls)
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Runs the child and judges how it ended.
fn parent(seed: u64, calls: u64) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("fuzz: cannot find the test binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cmd = if cfg!(unix) {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "ulimit -v {CHILD_ADDRESS_SPACE_KIB} && exec \"$0\""
            ))
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    // Few threads and malloc arenas: each reserves address space, and the limit is the
    // child's whole address space.
    cmd.env(CHILD_ENV, "1")
        .env("RAYON_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .env("FERROFAST_FUZZ_CALLS", calls.to_string())
        .env("FERROFAST_FUZZ_SEED", seed.to_string());
    let started = std::time::Instant::now();
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fuzz: cannot start the child: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    print!("{stdout}");
    if out.status.success() && stdout.contains("fuzz: done") {
        println!(
            "fuzz: seed {seed}, {calls} calls, no panic, no abort, oracle agrees ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        println!("test fuzz_public_api ... ok");
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "fuzz: the child (seed {seed}) ended with {}; last lines of its stderr:\n{}",
        out.status,
        tail.join("\n")
    );
    ExitCode::FAILURE
}

/// The fuzz loop: every failure is printed and counted; the exit code says whether any.
fn child(seed: u64, calls: u64) -> ExitCode {
    // Panics are caught per call and reported below; the default hook's message would only
    // repeat them.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed);
    let mut failures = 0u64;
    let mut stats = Stats::default();
    for i in 0..calls {
        let call = Call::random(&mut rng);
        eprintln!("call {i}: {}", call.describe());
        match catch_unwind(AssertUnwindSafe(|| call.run())) {
            Ok(Ok(outcome)) => stats.count(outcome),
            Ok(Err(mismatch)) => {
                failures += 1;
                println!("fuzz: call {i} ({}): {mismatch}", call.describe());
            }
            Err(panic) => {
                failures += 1;
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                println!("fuzz: call {i} ({}) panicked: {msg}", call.describe());
            }
        }
        if failures >= 20 {
            break;
        }
    }
    println!(
        "fuzz: {} ok checked against the oracle, {} ok unchecked, {} argument errors, {} \
         out-of-memory or shape errors, {} other errors",
        stats.checked, stats.unchecked, stats.invalid, stats.too_large, stats.other
    );
    if failures == 0 {
        println!("fuzz: done");
        ExitCode::SUCCESS
    } else {
        println!("fuzz: {failures} failures");
        ExitCode::FAILURE
    }
}

#[derive(Default)]
struct Stats {
    checked: u64,
    unchecked: u64,
    invalid: u64,
    too_large: u64,
    other: u64,
}

/// How one call ended (when it did not fail the run).
enum Outcome {
    Checked,
    Unchecked,
    Failed(Error),
}

impl Stats {
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Checked => self.checked += 1,
            Outcome::Unchecked => self.unchecked += 1,
            Outcome::Failed(Error::InvalidArgument(_)) => self.invalid += 1,
            Outcome::Failed(Error::OutOfMemory(_) | Error::Shape(_)) => self.too_large += 1,
            Outcome::Failed(_) => self.other += 1,
        }
    }
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// A size: mostly small, sometimes 0 or odd.
fn size(rng: &mut Rng) -> usize {
    rng.pick(&[1, 1, 2, 2, 3, 4, 5, 8, 8, 16, 0, 7, 33])
}

fn float_dtype(rng: &mut Rng) -> DType {
    rng.pick(&[DType::F32, DType::F32, DType::F16, DType::BF16, DType::F64])
}

/// Mostly a float dtype, sometimes one the ops refuse.
fn any_dtype(rng: &mut Rng) -> DType {
    if rng.chance(92) {
        float_dtype(rng)
    } else {
        rng.pick(&[DType::I32, DType::U8, DType::Bool, DType::I64, DType::U32])
    }
}

/// A special value, when one is asked for.
fn special(rng: &mut Rng) -> f64 {
    rng.pick(&[
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        1e30,
        -1e30,
        1e-30,
    ])
}

/// One input tensor: its shape and how it is made.
#[derive(Clone, Debug)]
struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    seed: u64,
    /// Made smaller and broadcast up (a stride-0 view).
    broadcast: bool,
    /// Seen through a transpose of its last two axes (made with them swapped).
    transposed: bool,
    /// Seen through a reversed slice of its first axis.
    reversed: bool,
    /// Element index and value of one special value, if any.
    special: Option<(usize, f64)>,
    /// Values uniform in `[1, 10)` instead of normal (rope frequencies: periods near 0
    /// give angles whose f32 rounding the f64 oracle does not share).
    positive: bool,
}

impl Tensor {
    fn random(rng: &mut Rng, shape: Vec<usize>, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product::<usize>().max(1);
        Tensor {
            broadcast: rng.chance(10) || shape.contains(&HUGE),
            transposed: shape.len() >= 2 && rng.chance(15),
            reversed: !shape.is_empty() && rng.chance(10),
            special: rng.chance(6).then(|| (rng.below(n), special(rng))),
            seed: rng.next(),
            shape,
            dtype,
            positive: false,
        }
    }

    /// Whether every element is finite and of a size the f32 kernels handle without
    /// overflow (1e30 squared is not an f32): the calls the oracle must agree with.
    fn finite(&self) -> bool {
        self.special.is_none_or(|(_, v)| v.abs() < 1e4)
    }

    /// The array, built on the CPU: `Err` only for shapes the library refuses.
    fn build(&self) -> ferrofast::Result<Array> {
        let shape = &self.shape;
        if self.broadcast {
            // Every axis but the last broadcast from 1.
            let mut small = vec![1; shape.len()];
            if let Some(last) = shape.last() {
                *small.last_mut().unwrap() = if *last == HUGE { 1 } else { *last };
            }
            let base = self.values(&small)?;
            return base.broadcast_to(shape);
        }
        let mut made = shape.clone();
        let n = made.len();
        if self.transposed {
            made.swap(n - 1, n - 2);
        }
        let mut a = self.values(&made)?;
        if self.transposed {
            a = a.swapaxes(-1, -2)?;
        }
        if self.reversed {
            a = a.slice(&[-1], &[-(shape[0] as isize) - 1], &[-1])?;
        }
        Ok(a)
    }

    /// Values of `shape`: normal, integers in a small range, or booleans, with the special
    /// value placed.
    fn values(&self, shape: &[usize]) -> ferrofast::Result<Array> {
        let base = match self.dtype {
            DType::Bool => Array::uniform(shape, 0.0, 2.0, DType::U8, self.seed, &Device::Cpu)?
                .astype(DType::Bool)?,
            d if d.is_floating() && self.positive => {
                Array::uniform(shape, 1.0, 10.0, DType::F64, self.seed, &Device::Cpu)?
            }
            d if d.is_floating() => Array::randn(shape, DType::F64, self.seed, &Device::Cpu)?,
            _ => Array::uniform(shape, -5.0, 5.0, DType::F64, self.seed, &Device::Cpu)?,
        };
        let base = match (self.special, self.dtype.is_floating()) {
            (Some((i, v)), true) if base.size() > 0 => {
                let mut vals = base.to_vec::<f64>()?;
                let i = i % vals.len();
                vals[i] = v;
                Array::from_vec(vals, shape)?
            }
            _ => base,
        };
        base.astype(self.dtype)
    }
}

/// One randomized call.
#[derive(Debug)]
enum Call {
    RmsNorm {
        x: Tensor,
        w: Option<Tensor>,
        eps: f32,
        vjp: Option<Tensor>,
    },
    LayerNorm {
        x: Tensor,
        w: Option<Tensor>,
        b: Option<Tensor>,
        eps: f32,
        vjp: Option<Tensor>,
    },
    Rope {
        x: Tensor,
        dims: i32,
        traditional: bool,
        base: Option<f32>,
        scale: f32,
        offset: OffsetArg,
        freqs: Option<Tensor>,
        vjp: bool,
    },
    Sdpa {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: f32,
        mask: MaskArg,
        sinks: Option<Tensor>,
        with_lse: bool,
        vjp: bool,
    },
    GatedDelta {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gamma: Tensor,
        beta: Tensor,
        state: Option<Tensor>,
        mask: Option<Tensor>,
        vjp: bool,
    },
    Merge {
        out_a: Tensor,
        lse_a: Tensor,
        out_b: Tensor,
        lse_b: Tensor,
    },
}

#[derive(Debug)]
enum OffsetArg {
    Int(i64),
    Array(Tensor),
}

#[derive(Debug)]
enum MaskArg {
    None,
    Causal,
    Array(Tensor),
}

/// A shape of `rank` with the last axis `last`; sometimes one axis huge.
fn shape_ending(rng: &mut Rng, rank: usize, last: usize) -> Vec<usize> {
    let mut s: Vec<usize> = (0..rank).map(|_| size(rng)).collect();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    if rank > 0 && rng.chance(3) {
        let ax = rng.below(rank);
        s[ax] = HUGE;
    }
    s
}

impl Call {
    fn random(rng: &mut Rng) -> Call {
        let vjp_chance = 20;
        match rng.below(6) {
            5 => {
                // [B, H, T, D_v], sometimes one axis huge (free through a broadcast; the
                // output then cannot be allocated).
                let mut shape: Vec<usize> = (0..4).map(|_| size(rng)).collect();
                if rng.chance(4) {
                    shape[rng.below(4)] = HUGE;
                }
                let dtype = any_dtype(rng);
                let dtype_b = if rng.chance(95) {
                    dtype
                } else {
                    any_dtype(rng)
                };
                let lse_dtype = |rng: &mut Rng| {
                    if rng.chance(95) {
                        if dtype == DType::F64 {
                            DType::F64
                        } else {
                            DType::F32
                        }
                    } else {
                        any_dtype(rng)
                    }
                };
                let (la_dt, lb_dt) = (lse_dtype(rng), lse_dtype(rng));
                let mut shapes = [
                    shape.clone(),
                    shape[..3].to_vec(),
                    shape.clone(),
                    shape[..3].to_vec(),
                ];
                // Sometimes a wrong size or rank.
                if rng.chance(8) {
                    let i = rng.below(4);
                    let ax = rng.below(shapes[i].len());
                    shapes[i][ax] += 1;
                }
                if rng.chance(4) {
                    shapes[rng.below(4)].pop();
                }
                let [oas, las, obs, lbs] = shapes;
                let out_a = Tensor::random(rng, oas, dtype);
                let out_b = Tensor::random(rng, obs, dtype_b);
                // Log-sum-exps: sometimes a row that saw no key.
                let lse = |rng: &mut Rng, shape: Vec<usize>, dt: DType| {
                    let mut t = Tensor::random(rng, shape, dt);
                    if rng.chance(15) {
                        t.special = Some((rng.below(64), f64::NEG_INFINITY));
                    }
                    t
                };
                let lse_a = lse(rng, las, la_dt);
                let lse_b = lse(rng, lbs, lb_dt);
                Call::Merge {
                    out_a,
                    lse_a,
                    out_b,
                    lse_b,
                }
            }
            4 => {
                let (b, t, hk) = (size(rng), size(rng), rng.pick(&[1, 2, 0]));
                let hv = hk * rng.pick(&[1, 2, 3]);
                let (dk, dv) = (rng.pick(&[1, 4, 8, 16, 3, 0]), rng.pick(&[1, 4, 8, 3]));
                let per_key = rng.chance(30);
                let mut shapes = [
                    vec![b, t, hk, dk],
                    vec![b, t, hk, dk],
                    vec![b, t, hv, dv],
                    if per_key {
                        vec![b, t, hv, dk]
                    } else {
                        vec![b, t, hv]
                    },
                    vec![b, t, hv],
                    vec![b, hv, dv, dk],
                    vec![b, t],
                ];
                // Sometimes a wrong size or rank, or a huge batch or step count.
                if rng.chance(10) {
                    let i = rng.below(shapes.len());
                    let ax = rng.below(shapes[i].len());
                    shapes[i][ax] += 1;
                }
                if rng.chance(4) {
                    shapes[rng.below(shapes.len())].pop();
                }
                if rng.chance(3) {
                    let ax = rng.pick(&[0, 1]);
                    for s in shapes.iter_mut() {
                        if ax == 0 || s.len() > 1 && s != &vec![b, hv, dv, dk] {
                            s[ax] = HUGE;
                        }
                    }
                }
                let [qs, ks, vs, gs, bs, ss, ms] = shapes;
                let dtype = any_dtype(rng);
                let mdt = if rng.chance(70) {
                    DType::Bool
                } else {
                    any_dtype(rng)
                };
                let (vdt, gdt, bdt, sdt) = (
                    any_dtype(rng),
                    float_dtype(rng),
                    float_dtype(rng),
                    float_dtype(rng),
                );
                let q = Tensor::random(rng, qs, dtype);
                let k = Tensor::random(rng, ks, dtype);
                let v = Tensor::random(rng, vs, vdt);
                let gamma = Tensor::random(rng, gs, gdt);
                let beta = Tensor::random(rng, bs, bdt);
                let state = rng.chance(50).then(|| Tensor::random(rng, ss, sdt));
                let mask = rng.chance(30).then(|| Tensor::random(rng, ms, mdt));
                Call::GatedDelta {
                    q,
                    k,
                    v,
                    gamma,
                    beta,
                    state,
                    mask,
                    vjp: rng.chance(vjp_chance),
                }
            }
            0 | 1 => {
                let rank = rng.pick(&[0, 1, 2, 2, 3, 3, 4, 5]);
                let d = size(rng);
                let (shape, dtype) = (shape_ending(rng, rank, d), any_dtype(rng));
                let x = Tensor::random(rng, shape, dtype);
                // Mostly a matching weight, sometimes a wrong length or rank.
                let param = |rng: &mut Rng| -> Option<Tensor> {
                    if rng.chance(30) {
                        return None;
                    }
                    let shape = if rng.chance(90) {
                        vec![d]
                    } else if rng.chance(50) {
                        vec![d + 1]
                    } else {
                        vec![1, d]
                    };
                    let dtype = any_dtype(rng);
                    Some(Tensor::random(rng, shape, dtype))
                };
                let eps = rng.pick(&[1e-5, 1e-6, 0.1, 0.0, -1e-3]);
                let w = param(rng);
                let vjp = rng.chance(vjp_chance).then(|| {
                    let dtype = float_dtype(rng);
                    Tensor::random(rng, x.shape.clone(), dtype)
                });
                if rng.chance(50) {
                    Call::RmsNorm { x, w, eps, vjp }
                } else {
                    let b = param(rng);
                    Call::LayerNorm { x, w, b, eps, vjp }
                }
            }
            2 => {
                let rank = rng.pick(&[2, 3, 3, 4, 4, 5]);
                let d = rng.pick(&[2, 4, 6, 8, 16, 3, 0]);
                let (shape, dtype) = (shape_ending(rng, rank, d), any_dtype(rng));
                let x = Tensor::random(rng, shape, dtype);
                let dims = if rng.chance(85) {
                    let half = (d / 2).max(1);
                    2 * (1 + rng.below(half)) as i32
                } else {
                    rng.pick(&[0, -2, 3, 64])
                };
                let use_freqs = rng.chance(25);
                let base = if !use_freqs || rng.chance(5) {
                    Some(rng.pick(&[10000.0, 500.0, 1.5]))
                } else {
                    None
                };
                let freqs = use_freqs.then(|| {
                    let n = if rng.chance(90) {
                        (dims.max(0) / 2) as usize
                    } else {
                        3
                    };
                    let dtype = float_dtype(rng);
                    let mut t = Tensor::random(rng, vec![n], dtype);
                    t.special = t.special.map(|(i, _)| (i, 0.0));
                    t.positive = true;
                    t
                });
                let batch = x.shape.first().copied().unwrap_or(1);
                let offset = if rng.chance(70) {
                    OffsetArg::Int(rng.below(64) as i64 - 8)
                } else {
                    let shape = rng.pick(&[0, 1, 1, 2]);
                    let shape = match shape {
                        0 => vec![],
                        1 => vec![batch],
                        _ => vec![1, batch],
                    };
                    let dtype = rng.pick(&[DType::I32, DType::I64, DType::U32, DType::F32]);
                    let mut t = Tensor::random(rng, shape, dtype);
                    t.special = None;
                    OffsetArg::Array(t)
                };
                Call::Rope {
                    x,
                    dims,
                    traditional: rng.chance(50),
                    base,
                    scale: rng.pick(&[1.0, 0.5, 2.0, f32::NAN]),
                    offset,
                    freqs,
                    vjp: rng.chance(vjp_chance),
                }
            }
            _ => {
                let (b, nkv) = (size(rng).max(1), rng.pick(&[1, 2]));
                let nq = nkv * rng.pick(&[1, 1, 2, 4]);
                let (tq, tkv) = (size(rng), size(rng));
                let (d, dv) = (rng.pick(&[1, 4, 8, 16, 3]), rng.pick(&[1, 4, 8, 16, 3]));
                let dtype = any_dtype(rng);
                let mut shapes = [
                    vec![b, nq, tq, d],
                    vec![b, nkv, tkv, d],
                    vec![b, nkv, tkv, dv],
                ];
                // Sometimes a wrong rank or size, or a huge size that costs memory (not
                // a huge key count with a small output: that is only slow).
                if rng.chance(8) {
                    let (i, ax) = (rng.below(3), rng.below(4));
                    shapes[i][ax] += 1;
                }
                if rng.chance(5) {
                    shapes[rng.below(3)].pop();
                }
                if rng.chance(4) {
                    let ax = rng.pick(&[0, 1, 2]);
                    if ax != 2 || rng.chance(50) {
                        shapes[0][ax] = HUGE;
                        if ax == 0 {
                            shapes[1][0] = HUGE;
                            shapes[2][0] = HUGE;
                        }
                    }
                }
                let [qs, ks, vs] = shapes;
                let q = Tensor::random(rng, qs, dtype);
                let k = Tensor::random(rng, ks, dtype);
                let v = Tensor::random(rng, vs, dtype);
                let mask = match rng.below(4) {
                    0 => MaskArg::None,
                    1 => MaskArg::Causal,
                    _ => {
                        let shape = rng.pick(&[0, 1, 2, 3]);
                        let shape = match shape {
                            0 => vec![tq, tkv],
                            1 => vec![1, nq, tq, tkv],
                            2 => vec![tkv],
                            _ => vec![tq + 1, tkv],
                        };
                        let mdt = if rng.chance(50) {
                            DType::Bool
                        } else {
                            any_dtype(rng)
                        };
                        MaskArg::Array(Tensor::random(rng, shape, mdt))
                    }
                };
                let sinks = rng.chance(25).then(|| {
                    let n = if rng.chance(90) { nq } else { nq + 1 };
                    let dtype = any_dtype(rng);
                    Tensor::random(rng, vec![n], dtype)
                });
                Call::Sdpa {
                    q,
                    k,
                    v,
                    scale: rng.pick(&[0.5, 0.125, 1.0, 0.0, f32::NAN, f32::INFINITY]),
                    mask,
                    sinks,
                    with_lse: rng.chance(25),
                    vjp: rng.chance(vjp_chance),
                }
            }
        }
    }

    fn describe(&self) -> String {
        format!("{self:?}").replace('\n', " ")
    }

    /// Makes the call: `Ok` if it behaved (an error, or a result the oracle agrees with),
    /// `Err` with what was wrong otherwise.
    fn run(&self) -> Result<Outcome, String> {
        match self.try_run() {
            Ok(checked) => Ok(if checked {
                Outcome::Checked
            } else {
                Outcome::Unchecked
            }),
            Err(Failure::Api(e)) => Ok(Outcome::Failed(e)),
            Err(Failure::Mismatch(m)) => Err(m),
        }
    }

    /// `Ok(true)` when compared with the oracle, `Ok(false)` when the input was not finite.
    fn try_run(&self) -> Result<bool, Failure> {
        match self {
            Call::GatedDelta {
                q,
                k,
                v,
                gamma,
                beta,
                state,
                mask,
                vjp,
            } => gated_delta(q, k, v, gamma, beta, state, mask, *vjp),
            Call::Merge {
                out_a,
                lse_a,
                out_b,
                lse_b,
            } => {
                let (oa, la, ob, lb) = (
                    out_a.build()?,
                    lse_a.build()?,
                    out_b.build()?,
                    lse_b.build()?,
                );
                let (out, lse) = fast::merge_attention_states(&oa, &la, &ob, &lb)?;
                // The oracle defines the special values (`-inf` parts, NaN, infinities), so
                // every result is compared.
                let (ro, rl) = reference::merge_attention_states(&oa, &la, &ob, &lb)?;
                compare(&out, &ro, "merge_attention_states out")?;
                compare(&lse, &rl, "merge_attention_states lse")?;
                Ok(true)
            }
            Call::RmsNorm { x, w, eps, vjp } => {
                let (xa, wa) = (x.build()?, opt(w)?);
                let got = fast::rms_norm(&xa, wa.as_ref(), *eps)?;
                // eps <= 0 divides by a variance that can round to 0: not conditioned for the oracle.
                let finite = x.finite() && all_finite(w) && *eps > 0.0 && got.size() > 0;
                if finite {
                    compare(
                        &got,
                        &reference::rms_norm(&xa, wa.as_ref(), *eps)?,
                        "rms_norm",
                    )?;
                }
                if let Some(g) = vjp {
                    let ga = g.build()?;
                    let (dx, dw) = fast::rms_norm_vjp(&xa, wa.as_ref(), *eps, &ga)?;
                    if finite && g.finite() {
                        let (rx, rw) = reference::rms_norm_vjp(&xa, wa.as_ref(), *eps, &ga)?;
                        compare_grad(&dx, &rx, "rms_norm_vjp dx")?;
                        if let (Some(dw), Some(rw)) = (dw, rw) {
                            compare_grad(&dw, &rw, "rms_norm_vjp dw")?;
                        }
                    }
                }
                Ok(finite)
            }
            Call::LayerNorm { x, w, b, eps, vjp } => {
                let (xa, wa, ba) = (x.build()?, opt(w)?, opt(b)?);
                let got = fast::layer_norm(&xa, wa.as_ref(), ba.as_ref(), *eps)?;
                let finite =
                    x.finite() && all_finite(w) && all_finite(b) && *eps > 0.0 && got.size() > 0;
                if finite {
                    let want = reference::layer_norm(&xa, wa.as_ref(), ba.as_ref(), *eps)?;
                    compare(&got, &want, "layer_norm")?;
                }
                if let Some(g) = vjp {
                    let ga = g.build()?;
                    let (dx, _, _) =
                        fast::layer_norm_vjp(&xa, wa.as_ref(), ba.as_ref(), *eps, &ga)?;
                    if finite && g.finite() {
                        let (rx, _, _) =
                            reference::layer_norm_vjp(&xa, wa.as_ref(), ba.as_ref(), *eps, &ga)?;
                        compare_grad(&dx, &rx, "layer_norm_vjp dx")?;
                    }
                }
                Ok(finite)
            }
            Call::Rope {
                x,
                dims,
                traditional,
                base,
                scale,
                offset,
                freqs,
                vjp,
            } => {
                let xa = x.build()?;
                let fa = opt(freqs)?;
                let oa = match offset {
                    OffsetArg::Int(_) => None,
                    OffsetArg::Array(t) => Some(t.build()?),
                };
                let off = match (offset, &oa) {
                    (OffsetArg::Array(_), Some(a)) => RopeOffset::Array(a),
                    (OffsetArg::Int(v), _) => RopeOffset::Int(*v),
                    (OffsetArg::Array(_), None) => RopeOffset::Int(0),
                };
                let run = if *vjp { fast::rope_vjp } else { fast::rope };
                let got = run(&xa, *dims, *traditional, *base, *scale, off, fa.as_ref())?;
                let finite = x.finite() && scale.is_finite() && got.size() > 0;
                if finite {
                    let oracle = if *vjp {
                        reference::rope_vjp
                    } else {
                        reference::rope
                    };
                    let want = oracle(&xa, *dims, *traditional, *base, *scale, off, fa.as_ref())?;
                    compare(&got, &want, "rope")?;
                }
                Ok(finite)
            }
            Call::Sdpa {
                q,
                k,
                v,
                scale,
                mask,
                sinks,
                with_lse,
                vjp,
            } => {
                let (qa, ka, va, sa) = (q.build()?, k.build()?, v.build()?, opt(sinks)?);
                let ma = match mask {
                    MaskArg::Array(t) => Some(t.build()?),
                    _ => None,
                };
                let m = match (mask, &ma) {
                    (MaskArg::Causal, _) => Mask::Causal,
                    (_, Some(a)) => Mask::Array(a),
                    _ => Mask::None,
                };
                let finite = q.finite()
                    && k.finite()
                    && v.finite()
                    && all_finite(sinks)
                    && scale.is_finite()
                    && !matches!(mask, MaskArg::Array(t) if !t.finite());
                let (got, lse) = if *with_lse || *vjp {
                    let (o, l) = fast::scaled_dot_product_attention_with_lse(
                        &qa,
                        &ka,
                        &va,
                        *scale,
                        m,
                        sa.as_ref(),
                    )?;
                    (o, Some(l))
                } else {
                    let o =
                        fast::scaled_dot_product_attention(&qa, &ka, &va, *scale, m, sa.as_ref())?;
                    (o, None)
                };
                // The oracle loops over every (batch, head) pair even when the output is empty.
                if finite && got.size() > 0 {
                    let (want, want_lse) = reference::scaled_dot_product_attention_with_lse(
                        &qa,
                        &ka,
                        &va,
                        *scale,
                        m,
                        sa.as_ref(),
                    )?;
                    compare(&got, &want, "attention")?;
                    if let Some(l) = &lse {
                        compare(l, &want_lse, "attention lse")?;
                    }
                }
                if let (true, Some(l)) = (*vjp, &lse) {
                    let d_out = Array::randn(got.shape(), got.dtype(), 5, &Device::Cpu)?;
                    let (dq, _, _, _) = fast::scaled_dot_product_attention_vjp(
                        &qa,
                        &ka,
                        &va,
                        *scale,
                        m,
                        sa.as_ref(),
                        &got,
                        l,
                        &d_out,
                    )?;
                    same_shape(&dq, &qa, "attention vjp: dq", "q")?;
                }
                Ok(finite)
            }
        }
    }
}

/// `gated_delta_update` (and its backward): compared with the oracle on finite input of at
/// most two steps (longer random recurrences, not contractive, amplify rounding beyond any
/// fixed tolerance).
#[allow(clippy::too_many_arguments)]
fn gated_delta(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    state: &Option<Tensor>,
    mask: &Option<Tensor>,
    vjp: bool,
) -> Result<bool, Failure> {
    let (qa, ka, va, ga, ba) = (
        q.build()?,
        k.build()?,
        v.build()?,
        gamma.build()?,
        beta.build()?,
    );
    let (sa, ma) = (opt(state)?, opt(mask)?);
    let (out, st) = fast::gated_delta_update(&qa, &ka, &va, &ga, &ba, sa.as_ref(), ma.as_ref())?;
    let finite = [q, k, v, gamma, beta].iter().all(|t| t.finite())
        && all_finite(state)
        && qa.shape().get(1).is_some_and(|&t| t <= 2);
    if finite {
        let (ro, rs) =
            reference::gated_delta_update(&qa, &ka, &va, &ga, &ba, sa.as_ref(), ma.as_ref())?;
        // The recurrence runs in f32 for every dtype (MLX's definition), f64 outputs too.
        let f32_tol = |a: &Array| {
            let (at, rt) = tol(if a.dtype() == DType::F64 {
                DType::F32
            } else {
                a.dtype()
            });
            (at * 20.0, rt * 20.0)
        };
        compare_with(&out, &ro, "gated_delta out", f32_tol(&out))?;
        compare_with(&st, &rs, "gated_delta state", f32_tol(&st))?;
    }
    if vjp {
        let d_out = Array::randn(out.shape(), DType::F32, 7, &Device::Cpu)?;
        let g = fast::gated_delta_update_vjp(
            &qa,
            &ka,
            &va,
            &ga,
            &ba,
            sa.as_ref(),
            ma.as_ref(),
            &d_out,
            None,
        )?;
        for (name, grad, primal) in [
            ("dq", &g.dq, &qa),
            ("dk", &g.dk, &ka),
            ("dv", &g.dv, &va),
            ("dgamma", &g.dgamma, &ga),
            ("dbeta", &g.dbeta, &ba),
        ] {
            same_shape(
                grad,
                primal,
                &format!("gated_delta vjp: {name}"),
                "its primal",
            )?;
        }
    }
    Ok(finite)
}

/// Why a call stopped: the API returned an error (fine), or the result was wrong.
enum Failure {
    Api(Error),
    Mismatch(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Api(e)
    }
}

/// A mismatch unless the gradient `grad` (named `what`) has the shape of its primal
/// (`primal`, named `of`).
fn same_shape(grad: &Array, primal: &Array, what: &str, of: &str) -> Result<(), Failure> {
    if grad.shape() != primal.shape() {
        return Err(Failure::Mismatch(format!(
            "{what} has shape {:?}, {of} {:?}",
            grad.shape(),
            primal.shape()
        )));
    }
    Ok(())
}

fn opt(t: &Option<Tensor>) -> ferrofast::Result<Option<Array>> {
    t.as_ref().map(Tensor::build).transpose()
}

fn all_finite(t: &Option<Tensor>) -> bool {
    t.as_ref().is_none_or(Tensor::finite)
}

/// Tolerances by the result's dtype: the oracle works on the values as given, without the
/// roundings to the output dtype the kernels make.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-9, 1e-9),
        DType::F32 => (1e-4, 1e-4),
        DType::F16 => (1e-2, 1e-2),
        _ => (6e-2, 6e-2),
    }
}

/// NaN where the oracle is NaN, infinities equal, close elsewhere.
fn compare(got: &Array, want: &Array, what: &str) -> Result<(), Failure> {
    compare_with(got, want, what, tol(got.dtype()))
}

/// As [`compare`], looser: a gradient sums many rounded products.
fn compare_grad(got: &Array, want: &Array, what: &str) -> Result<(), Failure> {
    let (a, r) = tol(got.dtype());
    compare_with(got, want, what, (a * 20.0, r * 20.0))
}

fn compare_with(
    got: &Array,
    want: &Array,
    what: &str,
    (atol, rtol): (f64, f64),
) -> Result<(), Failure> {
    if got.shape() != want.shape() {
        return Err(Failure::Mismatch(format!(
            "{what}: shape {:?}, oracle {:?}",
            got.shape(),
            want.shape()
        )));
    }
    let (g, w) = (got.to_f64_vec()?, want.to_f64_vec()?);
    // Outputs too large for a value of their dtype are infinite there, and the oracle's
    // finite value is then not a mismatch.
    let max = match got.dtype() {
        DType::F16 => 65504.0,
        DType::BF16 | DType::F32 => f64::from(f32::MAX),
        _ => f64::MAX,
    };
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = if b.is_nan() {
            a.is_nan()
        } else if b.is_infinite() || b.abs() > max * 0.99 {
            a == b || a.is_infinite()
        } else {
            (a - b).abs() <= atol + rtol * b.abs()
        };
        if !ok {
            return Err(Failure::Mismatch(format!(
                "{what}: element {i} is {a}, oracle {b} (dtype {})",
                got.dtype()
            )));
        }
    }
    Ok(())
}
