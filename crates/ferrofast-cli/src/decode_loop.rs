//! The decode loop of one attention layer: each step appends one token's keys and values to
//! a `KvCache` and runs attention with one query over the whole cache. Its per-step time
//! should grow only with the attention's own O(T) work, and the process's memory only with
//! the cache's filled part.

use crate::measure::Record;
use ferrofast::fast::{self, Mask};
use ferrofast::{Array, DType, Device, KvCache, Result};
use std::time::Instant;

/// Query heads, key / value heads and head size: a Llama-3-8B attention layer.
const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
/// Cached tokens at which the loop is timed; it runs from the first to the last.
pub const POINTS: [usize; 3] = [256, 1024, 4096];
/// Timed steps (and timed calls of each part) at each point.
const WINDOW: usize = 64;

/// The timings at one cache length.
pub struct Point {
    /// Cached tokens after the step.
    pub len: usize,
    /// Median time of one step (append, then attention), in seconds.
    pub step: f64,
    /// Median time of the attention alone over `len` tokens.
    pub attention: f64,
    /// Median time of the append alone at `len` (an append and a trim of the same token).
    pub append: f64,
    /// The process's resident memory after the point's steps, in bytes.
    pub rss: f64,
    /// Bytes of the cache's filled part (keys and values).
    pub filled: f64,
    /// Bytes of the cache's buffers (its capacity).
    pub cache: f64,
}

/// The whole run.
pub struct DecodeLoop {
    pub dtype: DType,
    pub points: Vec<Point>,
    /// Resident memory when the loop starts (the cache filled to its first length).
    pub rss_start: f64,
    pub filled_start: f64,
    pub steps: usize,
    pub growths: usize,
    pub seconds: f64,
}

impl DecodeLoop {
    /// `B1 H32/8 T1x{len} D128`: the bench's shape label for one point.
    pub fn shape(len: usize) -> String {
        format!("B1 H{Q_HEADS}/{KV_HEADS} T1x{len} D{HEAD_DIM}")
    }

    /// One JSON record per point and part (`decode_step`, `decode_attention`,
    /// `decode_append`), times per step in microseconds.
    pub fn records(&self, threads: usize) -> Vec<Record> {
        let mut out = Vec::new();
        for p in &self.points {
            for (op, t) in [
                ("decode_step", p.step),
                ("decode_attention", p.attention),
                ("decode_append", p.append),
            ] {
                out.push(Record {
                    op: op.to_string(),
                    shape: DecodeLoop::shape(p.len),
                    dtype: self.dtype.name().to_string(),
                    threads,
                    median_s: t,
                    min_s: t,
                    reps: WINDOW,
                    value: t * 1e6,
                    unit: "us".to_string(),
                    fraction_of_ceiling: f64::NAN,
                    fraction_of_paired_copy: f64::NAN,
                });
            }
        }
        out
    }
}

/// The process's resident memory in bytes (`/proc/self/statm`'s second field, in pages of
/// 4 KiB); NaN where it cannot be read.
fn rss_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |pages| pages * 4096.0)
}

/// Calls per timed sample: one on the CPU; on a GPU a batch ended by one synchronisation,
/// so that a sample is the time each call adds to the stream.
fn batch(device: &Device) -> usize {
    if device.is_cpu() {
        1
    } else {
        8
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `f` over [`WINDOW`] calls in samples of [`batch`] calls; returns the median time of
/// one call.
fn timed(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let n = batch(device);
    let mut samples = Vec::new();
    for _ in 0..WINDOW / n {
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..n {
            f()?;
        }
        device.synchronize()?;
        samples.push(t0.elapsed().as_secs_f64() / n as f64);
    }
    Ok(median(samples))
}

/// Runs the loop on `device` (bf16 on a GPU, f32 on the CPU) from `POINTS[0] - WINDOW` to
/// the last point's cached tokens, timing the append alone [`WINDOW`] tokens before each
/// point, then the last [`WINDOW`] steps before it, then the attention alone at the point.
/// The cache starts with room for the first point and grows by doubling.
///
/// Run it before other large allocations: glibc raises its threshold for serving
/// allocations with `mmap` to the size of any `mmap`ed block freed, after which freed cache
/// buffers stay in its heap and count as resident.
pub fn run(device: &Device) -> Result<DecodeLoop> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let q = Array::randn(&[1, Q_HEADS, 1, HEAD_DIM], dtype, 1, device)?;
    let k_new = Array::randn(&[1, KV_HEADS, 1, HEAD_DIM], dtype, 2, device)?;
    let v_new = Array::randn(&[1, KV_HEADS, 1, HEAD_DIM], dtype, 3, device)?;
    let first = POINTS[0] - WINDOW;
    let prefill = |seed| Array::randn(&[1, KV_HEADS, first, HEAD_DIM], dtype, seed, device);
    let mut cache = KvCache::new(1, KV_HEADS, HEAD_DIM, POINTS[0], dtype, device)?;
    drop(cache.append(&prefill(4)?, &prefill(5)?)?);
    let per_token = (2 * KV_HEADS * HEAD_DIM * dtype.size()) as f64;
    // One decode step's attention over the cache's keys and values.
    let attend = |keys: &Array, values: &Array| -> Result<()> {
        drop(fast::scaled_dot_product_attention(
            &q,
            keys,
            values,
            scale,
            Mask::None,
            None,
        )?);
        Ok(())
    };
    let step = |cache: &mut KvCache| -> Result<()> {
        let (keys, values) = cache.append(&k_new, &v_new)?;
        attend(&keys, &values)
    };
    // Warm-up (kernel compilation on a GPU): one step, undone.
    step(&mut cache)?;
    cache.trim(1);
    device.synchronize()?;
    let rss_start = rss_bytes();
    let filled_start = cache.len() as f64 * per_token;
    let t0 = Instant::now();
    let (mut steps, mut growths) = (0, 0);
    let mut points = Vec::new();
    for &len in &POINTS {
        // Untimed steps up to the window.
        while cache.len() + WINDOW < len {
            let capacity = cache.capacity();
            step(&mut cache)?;
            growths += usize::from(cache.capacity() != capacity);
            steps += 1;
        }
        // The append alone (an append and a trim of the same token) before the window, where
        // it cannot grow the cache; then the timed steps; then the attention alone at `len`.
        let append = timed(device, || {
            drop(cache.append(&k_new, &v_new)?);
            cache.trim(1);
            Ok(())
        })?;
        let capacity = cache.capacity();
        let step_time = timed(device, || step(&mut cache))?;
        growths += usize::from(cache.capacity() != capacity);
        steps += WINDOW;
        let (keys, values) = (cache.keys(), cache.values());
        let attention = timed(device, || attend(&keys, &values))?;
        drop((keys, values));
        points.push(Point {
            len: cache.len(),
            step: step_time,
            attention,
            append,
            rss: rss_bytes(),
            filled: cache.len() as f64 * per_token,
            cache: cache.nbytes() as f64,
        });
    }
    Ok(DecodeLoop {
        dtype,
        points,
        rss_start,
        filled_start,
        steps,
        growths,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
