//! `ferrofast demo` runs every op once on random data and checks it against the float64
//! oracle; `ferrofast bench` sweeps sizes and reports median times against ceilings it
//! measures in the same run.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

mod cases;
mod decode_loop;
mod measure;

use cases::{Bound, Case, Gdn};
use ferrofast::{fast, Array, DType, Device, Error};
use measure::{Ceilings, Timing};
use std::process::ExitCode;

const USAGE: &str = "usage:
  ferrofast demo  [--device cpu|cuda[:N]]
  ferrofast bench [--device cpu|cuda[:N]] [--json FILE] [--quick] [--big] [--only TEXT]
  ferrofast first-call [--device cpu|cuda[:N]]

demo   runs every op (forward and backward) once on random data
       and prints time, throughput and the max error against the float64 oracle.
bench  measures this machine's copy bandwidth and f32 GEMM rate, then times each op over a
       sweep of shapes (median of repeated runs) and prints the fraction of the ceiling.
       --quick runs fewer shapes; --big adds the T=16384 attention memory check;
       --only TEXT keeps the cases whose op, shape or dtype contains TEXT (repeatable: a
       case is kept if any matches; op names: rms_norm, layer_norm, rope, sdpa, sdpa_causal,
       sdpa_decode, cross_entropy, cross_entropy_vjp, cross_entropy_fused,
       cross_entropy_fused_in_place, gated_delta,
       gated_delta_vjp, merge_attention_states, ring_attention, ring_attention_causal,
       decode_loop); --json FILE
       writes every result.
       decode_loop (not with --quick): a KvCache decode loop, B1 H32/8 D128, f32 on the CPU
       and bf16 on a GPU, from 256 to 4096 cached tokens, one token appended and attended
       per step; prints the step, attention-only and append-only times at 256, 1024 and 4096
       tokens and the process's resident memory against the cache's filled part.
first-call  times the first call of each op a Llama layer needs (bf16 rms_norm, rope,
       causal GQA prefill attention, decode attention), kernel compilation or cache loading
       included; run it twice with one FERROFAST_CACHE_DIR to see a cold and a warm cache.";

struct Options {
    command: String,
    device: Device,
    json: Option<String>,
    quick: bool,
    big: bool,
    only: Vec<String>,
}

fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
    }
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or_else(|| USAGE.to_string())?;
    if command != "demo" && command != "bench" && command != "first-call" {
        return Err(USAGE.to_string());
    }
    let mut opts = Options {
        command,
        device: Device::Cpu,
        json: None,
        quick: false,
        big: false,
        only: Vec::new(),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => {
                let v = args.next().ok_or("--device needs a value")?;
                opts.device = parse_device(&v)?;
            }
            "--json" => opts.json = Some(args.next().ok_or("--json needs a file name")?),
            "--quick" => opts.quick = true,
            "--big" => opts.big = true,
            "--only" => opts.only.push(args.next().ok_or("--only needs a value")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let result = match opts.command.as_str() {
        "demo" => demo(&opts),
        "first-call" => first_call(&opts),
        _ => bench(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Attention over one batch: `(q_heads, kv_heads)` heads, `(q_len, kv_len)` lengths.
fn sdpa_case(
    (q_heads, kv_heads): (usize, usize),
    (q_len, kv_len): (usize, usize),
    head_dim: usize,
    dtype: DType,
    causal: bool,
) -> Case {
    Case::Sdpa {
        batch: 1,
        q_heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        dtype,
        causal,
    }
}

/// The ops of one Llama layer (bf16, 32 query heads over 8 kv heads, head dim 128), each
/// timed from the call to its completion on the device, first call only: on a GPU this is
/// the kernels' compilation (or disk-cache load) plus one run.
fn first_call(opts: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let dtype = DType::BF16;
    let cases = [
        Case::RmsNorm {
            rows: 128,
            dim: 4096,
            dtype,
        },
        Case::Rope {
            shape: [1, 32, 128, 128],
            dtype,
        },
        Case::Rope {
            shape: [1, 8, 128, 128],
            dtype,
        },
        sdpa_case((32, 8), (128, 128), 128, dtype, true),
        sdpa_case((32, 8), (1, 4096), 128, dtype, false),
    ];
    // Inputs first (this also starts the device), so only the ops are timed.
    let mut prepared = Vec::new();
    for case in cases {
        let inputs = case.inputs(&opts.device, 3)?;
        prepared.push((case, inputs));
    }
    opts.device.synchronize()?;
    println!("first calls on {}", opts.device);
    let mut total = 0.0;
    for (case, inputs) in &prepared {
        let start = std::time::Instant::now();
        case.run(inputs)?;
        opts.device.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        total += secs;
        println!(
            "{:<28} {:<28} {:<9} {:>10}",
            case.op(),
            case.shape(),
            case.dtype().name(),
            measure::fmt_time(secs)
        );
    }
    println!("total {}", measure::fmt_time(total));
    Ok(())
}

fn demo_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        v.push(Case::RmsNorm {
            rows: 1024,
            dim: 4096,
            dtype,
        });
        v.push(Case::LayerNorm {
            rows: 1024,
            dim: 4096,
            dtype,
        });
        v.push(Case::Rope {
            shape: [1, 32, 512, 128],
            dtype,
        });
        v.push(sdpa_case((8, 2), (256, 256), 64, dtype, true));
        v.push(sdpa_case((8, 2), (1, 2048), 128, dtype, false));
        let g = Gdn {
            batch: 1,
            len: 64,
            k_heads: 4,
            v_heads: 8,
            k_dim: 64,
            v_dim: 64,
            dtype,
        };
        v.push(Case::GatedDelta(g));
        v.push(Case::GatedDeltaVjp(g));
    }
    v
}

fn demo(opts: &Options) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "ferrofast demo on {} ({} threads)\n",
        opts.device,
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:<28} {:<9} {:>10} {:>14} {:>11}",
        "op", "shape", "dtype", "time", "throughput", "max error"
    );
    for case in demo_cases() {
        let inputs = case.inputs(&opts.device, 42)?;
        let t = match measure::time_case(&case, &inputs, &opts.device, 3, 0.2) {
            Err(Error::Unsupported(why)) => {
                print_not_run(&case, &why);
                continue;
            }
            other => other?,
        };
        let out = case.run(&inputs)?;
        let reference = case.reference(&inputs)?;
        let mut err = 0.0f64;
        for (o, r) in out.iter().zip(&reference) {
            err = err.max(measure::max_abs_error(o, r)?);
        }
        println!(
            "{:<28} {:<28} {:<9} {:>10} {:>14} {:>11.3e}",
            case.op(),
            case.shape(),
            case.dtype().name(),
            measure::fmt_time(t.median),
            throughput(&case, &t),
            err
        );
    }
    Ok(())
}

fn throughput(case: &Case, t: &Timing) -> String {
    match case.bound() {
        Bound::Memory => format!("{:.1} GB/s", case.bytes() / t.median / 1e9),
        Bound::Compute => format!("{:.1} GFLOP/s", case.flops() / t.median / 1e9),
    }
}

/// The GPU speed targets' own shapes (bf16 norms over `[16384, 4096]` and rows of 1024,
/// rope over `[4, 32, 4096, 128]`): too large to be worth timing on a CPU.
fn gpu_target_cases() -> Vec<Case> {
    let dtype = DType::BF16;
    let mut v = Vec::new();
    for (rows, dim) in [(16384, 4096), (65536, 1024)] {
        v.push(Case::RmsNorm { rows, dim, dtype });
        v.push(Case::LayerNorm { rows, dim, dtype });
        v.push(Case::RmsNormVjp { rows, dim, dtype });
        v.push(Case::LayerNormVjp { rows, dim, dtype });
    }
    let shape = [4, 32, 4096, 128];
    v.push(Case::Rope { shape, dtype });
    v.push(Case::RopeVjp { shape, dtype });
    v.extend(cross_entropy_cases(8192, &[128256, 32768], dtype));
    v
}

/// Cross-entropy forward, backward and fused training pass over `[rows, vocab]` logits.
fn cross_entropy_cases(rows: usize, vocabs: &[usize], dtype: DType) -> Vec<Case> {
    let mut v = Vec::new();
    for &vocab in vocabs {
        v.push(Case::CrossEntropy { rows, vocab, dtype });
        v.push(Case::CrossEntropyVjp { rows, vocab, dtype });
        v.push(Case::CrossEntropyFused {
            rows,
            vocab,
            dtype,
            in_place: false,
        });
        v.push(Case::CrossEntropyFused {
            rows,
            vocab,
            dtype,
            in_place: true,
        });
    }
    v
}

/// `gated_delta_update` in Qwen3-Next's shape (Hk 16, Hv 32, Dk = Dv = 128): a decode step
/// of 32 sequences (the state read and written once), and a 512-step prefill and its
/// backward; on a GPU also the prefill target, B4 T8192 in bf16, and its backward.
fn gated_delta_cases(quick: bool, gpu: bool, dtype: DType) -> Vec<Case> {
    let decode = Gdn {
        batch: 32,
        len: 1,
        k_heads: 16,
        v_heads: 32,
        k_dim: 128,
        v_dim: 128,
        dtype,
    };
    let prefill = Gdn {
        batch: 1,
        len: if quick { 128 } else { 512 },
        ..decode
    };
    let mut v = vec![
        Case::GatedDelta(decode),
        Case::GatedDelta(prefill),
        Case::GatedDeltaVjp(prefill),
    ];
    if gpu && !quick && dtype == DType::BF16 {
        // Short prefills, where the sequential and chunked forms trade places.
        for len in [16, 64] {
            v.push(Case::GatedDelta(Gdn { len, ..prefill }));
        }
        let target = Gdn {
            batch: 4,
            len: 8192,
            ..decode
        };
        v.push(Case::GatedDelta(target));
        v.push(Case::GatedDeltaVjp(target));
    }
    v
}

fn bench_cases(quick: bool, gpu: bool) -> Vec<Case> {
    let mut v = Vec::new();
    let norm_shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096)]
    } else {
        &[(4096, 4096), (16384, 1024), (1024, 16384), (65536, 128)]
    };
    for &dtype in &[DType::F32, DType::BF16] {
        for &(rows, dim) in norm_shapes {
            v.push(Case::RmsNorm { rows, dim, dtype });
        }
        for &(rows, dim) in norm_shapes {
            v.push(Case::LayerNorm { rows, dim, dtype });
        }
        // Backward passes on the first norm shape.
        let (rows, dim) = norm_shapes[0];
        v.push(Case::RmsNormVjp { rows, dim, dtype });
        v.push(Case::LayerNormVjp { rows, dim, dtype });
        v.push(Case::Rope {
            shape: [1, 32, 2048, 128],
            dtype,
        });
        v.push(Case::RopeVjp {
            shape: [1, 32, 2048, 128],
            dtype,
        });
        if !quick {
            v.push(Case::Rope {
                shape: [4, 8, 1024, 64],
                dtype,
            });
        }
        v.extend(cross_entropy_cases(1024, &[32768], dtype));
        v.extend(gated_delta_cases(quick, gpu, dtype));
    }
    if !quick {
        let dtype = DType::F16;
        let (rows, dim) = (4096, 4096);
        v.push(Case::RmsNorm { rows, dim, dtype });
        v.push(Case::LayerNorm { rows, dim, dtype });
    }
    for &dtype in &[DType::F32, DType::BF16] {
        for causal in [false, true] {
            v.push(sdpa_case((16, 16), (1024, 1024), 128, dtype, causal));
        }
    }
    if !quick {
        v.push(sdpa_case((16, 16), (1024, 1024), 64, DType::F32, false));
    }
    // Attention backward on the first attention shape.
    for &dtype in &[DType::F32, DType::BF16] {
        for causal in [false, true] {
            v.push(Case::SdpaVjp {
                batch: 1,
                heads: 16,
                len: 1024,
                head_dim: 128,
                dtype,
                causal,
            });
        }
    }
    if gpu {
        // The backward's target shape (bf16 B4 H32 T4096 D128), and the smallest and largest
        // head dims of the tensor-core backward.
        for (head_dim, causal) in [(128, false), (128, true), (64, false), (256, false)] {
            v.push(Case::SdpaVjp {
                batch: 4,
                heads: 32,
                len: 4096,
                head_dim,
                dtype: DType::BF16,
                causal,
            });
        }
    }
    for &dtype in &[DType::F32, DType::BF16] {
        v.push(sdpa_case((32, 8), (1, 8192), 128, dtype, false));
    }
    if gpu {
        // The decode target: a 1 GiB bf16 KV cache, counted as K + V bytes against
        // the copy bandwidth.
        v.push(Case::Sdpa {
            batch: 8,
            q_heads: 32,
            kv_heads: 8,
            q_len: 1,
            kv_len: 32768,
            head_dim: 128,
            dtype: DType::BF16,
            causal: false,
        });
    }
    v.extend(cases::context_parallel_cases(quick, gpu));
    v
}

/// Prints how long bf16 attention takes next to f32 on the same shapes, measured pair by
/// pair (one f32 call, one bf16 call, alternately), which a drifting machine load affects
/// far less than two separate medians.
fn sdpa_bf16_vs_f32(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    println!("\nsdpa bf16 vs f32, alternating calls, B1 H16 T1024 D128 (median of 7 pairs):");
    let dev = Device::Cpu;
    let shape = [1, 16, 1024, 128];
    let make = |dt: DType| -> ferrofast::Result<[Array; 3]> {
        Ok([
            Array::randn(&shape, dt, 21, &dev)?,
            Array::randn(&shape, dt, 22, &dev)?,
            Array::randn(&shape, dt, 23, &dev)?,
        ])
    };
    let (f, b) = (make(DType::F32)?, make(DType::BF16)?);
    let scale = 1.0 / (128f32).sqrt();
    for causal in [false, true] {
        let mut counts = vec![1];
        if threads > 1 {
            counts.push(threads);
        }
        for n in counts {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
            let time = |x: &[Array; 3]| -> ferrofast::Result<f64> {
                let mask = if causal {
                    fast::Mask::Causal
                } else {
                    fast::Mask::None
                };
                let t0 = std::time::Instant::now();
                drop(fast::scaled_dot_product_attention(
                    &x[0], &x[1], &x[2], scale, mask, None,
                )?);
                Ok(t0.elapsed().as_secs_f64())
            };
            let ratio = pool.install(|| measure::paired_time_ratio(7, || time(&f), || time(&b)))?;
            println!(
                "  {:<8} {n} thread{}: bf16 time / f32 time = {ratio:.3}",
                if causal { "causal" } else { "no mask" },
                if n == 1 { " " } else { "s" }
            );
        }
    }
    Ok(())
}

fn bench(opts: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let threads = rayon::current_num_threads();
    println!("ferrofast bench on {} ({threads} threads)", opts.device);
    let mut cases = bench_cases(opts.quick, !opts.device.is_cpu());
    if !opts.device.is_cpu() {
        cases.extend(cases::gpu_prefill_cases());
        if !opts.quick {
            cases.extend(gpu_target_cases());
        }
    }
    let run_decode_loop = if opts.only.is_empty() {
        !opts.quick
    } else {
        opts.only.iter().any(|t| "decode_loop".contains(t.as_str()))
    };
    if !opts.only.is_empty() {
        cases.retain(|c| {
            let label = format!("{} {} {}", c.op(), c.shape(), c.dtype().name());
            opts.only.iter().any(|t| label.contains(t.as_str()))
        });
        if cases.is_empty() && !run_decode_loop {
            return Err(format!("--only {:?}: no bench case matches", opts.only).into());
        }
    }
    // The decode loop runs first, on a heap that no earlier case has grown (its memory
    // column is the process's), and prints after the other cases.
    let decode = if run_decode_loop {
        Some(decode_loop::run(&opts.device)?)
    } else {
        None
    };
    let ceilings = Ceilings::measure(&opts.device, threads)?;
    println!(
        "ceilings measured now: copy {:.1} GB/s (read+write, {} threads); f32 GEMM {:.1} GFLOP/s ({} threads), {:.1} GFLOP/s (1 thread)\n",
        ceilings.copy_gbs, threads, ceilings.gemm_gflops, threads, ceilings.gemm_gflops_1t
    );
    println!(
        "{:<28} {:<28} {:<9} {:>3} {:>10} {:>14} {:>9} {:>7}",
        "op", "shape", "dtype", "thr", "median", "throughput", "ceiling", "paired"
    );
    // The bf16-vs-f32 attention comparison runs when the sweep kept both dtypes' attention.
    let kept = |dt: DType| cases.iter().any(|c| c.op() == "sdpa" && c.dtype() == dt);
    let compare_sdpa_dtypes = kept(DType::F32) && kept(DType::BF16);
    let mut records = Vec::new();
    for case in cases {
        let inputs = case.inputs(&opts.device, 7)?;
        // Compute-bound CPU cases also run on one thread: the second core of this kind of
        // machine adds far less than a second core's worth.
        let thread_counts: Vec<usize> = if case.bound() == Bound::Compute
            && threads > 1
            && opts.device.is_cpu()
            && !case.runs_own_threads()
        {
            vec![1, threads]
        } else {
            vec![threads]
        };
        for &n in &thread_counts {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
            // CPU memory-bound cases alternate with a copy of the same bytes (the "paired"
            // column): the machine's load drifts, and a ratio taken pair by pair does not.
            let paired = case.bound() == Bound::Memory && opts.device.is_cpu();
            let timed = pool.install(|| {
                if paired {
                    measure::time_case_paired(&case, &inputs, 5, 1.0)
                } else {
                    measure::time_case(&case, &inputs, &opts.device, 5, 1.0).map(|t| (t, f64::NAN))
                }
            });
            let (t, paired_fraction) = match timed {
                Err(Error::Unsupported(why)) => {
                    print_not_run(&case, &why);
                    continue;
                }
                other => other?,
            };
            let (value, unit, fraction) = match case.bound() {
                Bound::Memory => {
                    let gbs = case.bytes() / t.median / 1e9;
                    (gbs, "GB/s", gbs / ceilings.copy_gbs)
                }
                // The GEMM ceiling is the host's; a GPU case has no fraction to print (GPU
                // rates in TFLOP/s).
                Bound::Compute if !opts.device.is_cpu() => {
                    (case.flops() / t.median / 1e12, "TFLOP/s", f64::NAN)
                }
                Bound::Compute => {
                    let gf = case.flops() / t.median / 1e9;
                    let peak = match n {
                        1 => ceilings.gemm_gflops_1t,
                        _ => ceilings.gemm_gflops,
                    };
                    (gf, "GFLOP/s", gf / peak)
                }
            };
            let percent = |f: f64| {
                if f.is_finite() {
                    format!("{:.0}%", 100.0 * f)
                } else {
                    "-".to_string()
                }
            };
            let paired_col = percent(paired_fraction);
            println!(
                "{:<28} {:<28} {:<9} {:>3} {:>10} {:>14} {:>9} {:>7}",
                case.op(),
                case.shape(),
                case.dtype().name(),
                n,
                measure::fmt_time(t.median),
                format!("{value:.1} {unit}"),
                percent(fraction),
                paired_col
            );
            records.push(measure::Record {
                op: case.op().to_string(),
                shape: case.shape(),
                dtype: case.dtype().name().to_string(),
                threads: n,
                median_s: t.median,
                min_s: t.min,
                reps: t.reps,
                value,
                unit: unit.to_string(),
                fraction_of_ceiling: fraction,
                fraction_of_paired_copy: paired_fraction,
            });
        }
    }
    if let Some(run) = &decode {
        print_decode_loop(run, &opts.device);
        records.extend(run.records(threads));
    }
    if opts.device.is_cpu() && !opts.quick && compare_sdpa_dtypes {
        sdpa_bf16_vs_f32(threads)?;
    }
    if opts.big {
        let mem = measure::sdpa_memory_check(&opts.device)?;
        println!(
            "\nsdpa B1 H8 T16384 D128 f32 causal: {:.2} s, peak memory beyond inputs and output {:.0} MiB",
            mem.seconds, mem.extra_mib
        );
    }
    if let Some(path) = &opts.json {
        std::fs::write(
            path,
            measure::to_json(&opts.device, threads, &ceilings, &records),
        )?;
        println!("\nwrote {path}");
    }
    Ok(())
}

/// The decode loop's table: per cached length the step, attention and append medians and
/// the resident memory against the cache's filled part.
fn print_decode_loop(run: &decode_loop::DecodeLoop, device: &Device) {
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "\ndecode loop on {device}, {}, B1 H32/8 D128: each step appends one token to a \
         KvCache and attends with T_q=1 (medians of 64)",
        run.dtype.name()
    );
    println!(
        "  {:>7} {:>10} {:>10} {:>10} {:>10} {:>17}",
        "cached", "step", "attention", "append", "RSS", "cache filled/all"
    );
    for p in &run.points {
        println!(
            "  {:>7} {:>10} {:>10} {:>10} {:>6.1} MiB {:>6.1}/{:.1} MiB",
            p.len,
            measure::fmt_time(p.step),
            measure::fmt_time(p.attention),
            measure::fmt_time(p.append),
            mib(p.rss),
            mib(p.filled),
            mib(p.cache)
        );
    }
    let Some(last) = run.points.last() else {
        return;
    };
    let grown = last.rss - run.rss_start;
    let filled = last.filled - run.filled_start;
    let memory = if device.is_cpu() {
        format!(
            "the cache's filled part {:+.1} MiB, the rest {:+.1} MiB",
            mib(filled),
            mib(grown - filled)
        )
    } else {
        format!(
            "the cache ({:+.1} MiB filled) is in GPU memory",
            mib(filled)
        )
    };
    println!(
        "  RSS {:.1} MiB at the start, {:.1} MiB at the end: {:+.1} MiB; {memory} ({} steps \
         in {:.2} s, {} growths of the cache)",
        mib(run.rss_start),
        mib(last.rss),
        mib(grown),
        run.steps,
        run.seconds,
        run.growths
    );
}

/// The row of a case the device does not run, with the reason.
fn print_not_run(case: &Case, why: &str) {
    println!(
        "{:<28} {:<28} {:<9} not run: {why}",
        case.op(),
        case.shape(),
        case.dtype().name()
    );
}
