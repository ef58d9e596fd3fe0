//! Timing, machine ceilings measured in the same run, and result records.

use crate::cases::{Case, Inputs};
use ferrofast::fast::{self, Mask};
use ferrofast::{Array, DType, Device, Result};
use rayon::prelude::*;
use std::time::Instant;

/// Summary of repeated runs of one case.
pub struct Timing {
    pub median: f64,
    pub min: f64,
    pub reps: usize,
}

/// Times `case` after one warm-up run: at least `min_reps` samples and at least
/// `min_seconds` in total (capped at 200 samples); reports the median sample.
///
/// On the CPU a sample is one call. GPU work is asynchronous: a sample there is a batch of
/// back-to-back calls followed by one device synchronisation, divided by the batch size, so
/// it measures the time each call adds to the stream (launch overhead included when the
/// host is slower than the GPU) rather than one synchronisation round trip per call.
pub fn time_case(
    case: &Case,
    inputs: &Inputs,
    device: &Device,
    min_reps: usize,
    min_seconds: f64,
) -> Result<Timing> {
    let batch = if device.is_cpu() { 1 } else { GPU_BATCH };
    case.run(inputs)?;
    device.synchronize()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while more_samples(times.len(), start, min_reps, min_seconds) {
        let t0 = Instant::now();
        for _ in 0..batch {
            drop(case.run(inputs)?);
        }
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() / batch as f64);
    }
    Ok(summarize(times))
}

/// Whether to take another sample: fewer than `min_reps` so far, or fewer than 200 while
/// under `min_seconds` since `start`.
fn more_samples(taken: usize, start: Instant, min_reps: usize, min_seconds: f64) -> bool {
    taken < min_reps || (start.elapsed().as_secs_f64() < min_seconds && taken < 200)
}

/// Calls per timed sample on a GPU.
const GPU_BATCH: usize = 20;

/// A host-to-host copy of a given number of bytes (read plus written), split over the
/// current rayon pool like [`Ceilings`]' copy; both buffers are faulted in up front.
///
/// Both buffers start on a 4 KiB boundary. Left to the allocator, two buffers can start a
/// few bytes apart modulo 4 KiB (allocations made on a pool thread come from a per-thread
/// arena), and then every load's address matches a just-issued store's in its low 12 bits:
/// x86 cores treat that as a possible dependency ("4K aliasing") and the copy runs at a
/// third of its speed.
pub struct HostCopy {
    src: Vec<f32>,
    dst: Vec<f32>,
    n: usize,
}

/// Elements to skip from the start of `v` to reach a 4 KiB boundary.
fn page_skip(v: &[f32]) -> usize {
    let misalign = v.as_ptr() as usize % 4096;
    ((4096 - misalign) % 4096) / std::mem::size_of::<f32>()
}

impl HostCopy {
    /// A copy that reads `bytes / 2` bytes and writes as many.
    pub fn new(bytes: f64) -> HostCopy {
        let n = ((bytes / 8.0) as usize).max(1);
        let pad = 4096 / std::mem::size_of::<f32>();
        HostCopy {
            src: (0..n + pad)
                .map(|i| (i % 1013) as f32 * 0.5 + 1.0)
                .collect(),
            dst: vec![0.5; n + pad],
            n,
        }
    }

    /// Runs the copy once; returns its time in seconds.
    pub fn run(&mut self) -> f64 {
        let (s0, d0) = (page_skip(&self.src), page_skip(&self.dst));
        let src = &self.src[s0..s0 + self.n];
        let dst = &mut self.dst[d0..d0 + self.n];
        let t0 = Instant::now();
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        let t = t0.elapsed().as_secs_f64();
        std::hint::black_box(&self.dst);
        t
    }
}

/// Times a CPU `case` as [`time_case`] does, with a copy of the same bytes run before each
/// sample, so that both see the same machine at the same moment. Returns the case's timing
/// and the median over the pairs of `copy time / case time`: the fraction of the copy
/// bandwidth the case reaches, robust to load that drifts during the run.
pub fn time_case_paired(
    case: &Case,
    inputs: &Inputs,
    min_reps: usize,
    min_seconds: f64,
) -> Result<(Timing, f64)> {
    let mut copy = HostCopy::new(case.bytes());
    copy.run();
    case.run(inputs)?;
    let (mut times, mut ratios) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while more_samples(times.len(), start, min_reps, min_seconds) {
        let c = copy.run();
        let t0 = Instant::now();
        drop(case.run(inputs)?);
        let t = t0.elapsed().as_secs_f64();
        times.push(t);
        ratios.push(c / t);
    }
    ratios.sort_by(f64::total_cmp);
    Ok((summarize(times), ratios[ratios.len() / 2]))
}

/// Alternates `a` and `b` (each returns the seconds one run took) `pairs` times after one
/// warm-up run each; returns the median over the pairs of `time(b) / time(a)`.
pub fn paired_time_ratio(
    pairs: usize,
    mut a: impl FnMut() -> Result<f64>,
    mut b: impl FnMut() -> Result<f64>,
) -> Result<f64> {
    a()?;
    b()?;
    let mut ratios = Vec::with_capacity(pairs.max(1));
    for _ in 0..pairs.max(1) {
        let ta = a()?;
        let tb = b()?;
        ratios.push(tb / ta);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(ratios[ratios.len() / 2])
}

fn summarize(mut times: Vec<f64>) -> Timing {
    times.sort_by(f64::total_cmp);
    Timing {
        median: times[times.len() / 2],
        min: times[0],
        reps: times.len(),
    }
}

/// "12.3 ms" style.
pub fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// Largest |out - reference| over all elements (NaN counts as infinite).
pub fn max_abs_error(out: &Array, reference: &Array) -> Result<f64> {
    let o = out.to_f64_vec()?;
    let r = reference.to_f64_vec()?;
    Ok(o.iter()
        .zip(&r)
        .map(|(a, b)| {
            let d = (a - b).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max))
}

/// The machine's limits, measured in this run.
pub struct Ceilings {
    /// Copy bandwidth in GB/s counting bytes read plus bytes written.
    pub copy_gbs: f64,
    /// f32 GEMM rate through the `gemm` crate with all threads.
    pub gemm_gflops: f64,
    /// The same with one thread.
    pub gemm_gflops_1t: f64,
}

impl Ceilings {
    /// Copies 256 MiB of f32 (best of 10; on the host with all threads, on a GPU device to
    /// device) and times a 2048^3 f32 GEMM on the host.
    pub fn measure(device: &Device, threads: usize) -> Result<Ceilings> {
        let copy_gbs = match device {
            Device::Cpu => copy_bandwidth(),
            Device::Cuda(_) => device_copy_bandwidth(device)?,
        };
        Ok(Ceilings {
            copy_gbs,
            gemm_gflops: gemm_rate(threads),
            gemm_gflops_1t: gemm_rate(1),
        })
    }
}

fn copy_bandwidth() -> f64 {
    // 256 MiB read, 256 MiB written.
    let bytes = 2.0 * (256u64 << 20) as f64;
    let mut copy = HostCopy::new(bytes);
    let best = (0..10).map(|_| copy.run()).fold(f64::INFINITY, f64::min);
    bytes / best / 1e9
}

fn device_copy_bandwidth(device: &Device) -> Result<f64> {
    let n = 64 << 20;
    let src = Array::randn(&[n], DType::F32, 11, device)?;
    drop(src.copy()?);
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..GPU_BATCH {
            drop(src.copy()?);
        }
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64() / GPU_BATCH as f64);
    }
    Ok(2.0 * (n * 4) as f64 / best / 1e9)
}

fn gemm_rate(threads: usize) -> f64 {
    let n = 2048;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let mut c = vec![0.0f32; n * n];
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        // SAFETY: a, b and c are n*n row-major buffers that outlive the call; c is not aliased.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Result of the long-sequence attention memory check.
pub struct MemoryCheck {
    pub seconds: f64,
    pub extra_mib: f64,
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(f64::NAN)
}

/// Runs causal attention with B=1, H=8, T=16384, D=128 (f32) and reports the peak resident
/// memory above what the inputs and the output need. No T x T matrix may exist.
pub fn sdpa_memory_check(device: &Device) -> Result<MemoryCheck> {
    let shape = [1, 8, 16384, 128];
    let q = Array::randn(&shape, DType::F32, 1, device)?;
    let k = Array::randn(&shape, DType::F32, 2, device)?;
    let v = Array::randn(&shape, DType::F32, 3, device)?;
    // Reset the peak-RSS mark (Linux: writing 5 to clear_refs), so that the peak below is
    // this call's and not an earlier case's (the copy ceiling alone touches 512 MiB).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let t0 = Instant::now();
    let out = fast::scaled_dot_product_attention(&q, &k, &v, 0.088, Mask::Causal, None)?;
    let seconds = t0.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:");
    let out_mib = out.nbytes() as f64 / (1 << 20) as f64;
    Ok(MemoryCheck {
        seconds,
        extra_mib: (peak - before) / 1024.0 - out_mib,
    })
}

/// One benchmark result, as written to JSON.
pub struct Record {
    pub op: String,
    pub shape: String,
    pub dtype: String,
    pub threads: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub reps: usize,
    pub value: f64,
    pub unit: String,
    pub fraction_of_ceiling: f64,
    /// For CPU memory-bound cases: median over interleaved pairs of copy time / case time,
    /// the copy moving the same bytes ([`time_case_paired`]); NaN otherwise.
    pub fraction_of_paired_copy: f64,
}

/// A finite number with 4 decimals, or `null`.
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "null".to_string()
    }
}

fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Serialises the run as JSON (machine, ceilings, one object per result).
pub fn to_json(device: &Device, threads: usize, c: &Ceilings, records: &[Record]) -> String {
    let rows: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "    {{\"op\": {}, \"shape\": {}, \"dtype\": {}, \"threads\": {}, \"median_s\": {:e}, \"min_s\": {:e}, \"reps\": {}, \"value\": {:.3}, \"unit\": {}, \"fraction_of_ceiling\": {:.4}, \"fraction_of_paired_copy\": {}}}",
                json_str(&r.op),
                json_str(&r.shape),
                json_str(&r.dtype),
                r.threads,
                r.median_s,
                r.min_s,
                r.reps,
                r.value,
                json_str(&r.unit),
                r.fraction_of_ceiling,
                json_num(r.fraction_of_paired_copy)
            )
        })
        .collect();
    format!(
        "{{\n  \"device\": {},\n  \"threads\": {},\n  \"copy_gbs\": {:.3},\n  \"gemm_f32_gflops\": {:.3},\n  \"gemm_f32_gflops_1_thread\": {:.3},\n  \"results\": [\n{}\n  ]\n}}\n",
        json_str(&device.to_string()),
        threads,
        c.copy_gbs,
        c.gemm_gflops,
        c.gemm_gflops_1t,
        rows.join(",\n")
    )
}
