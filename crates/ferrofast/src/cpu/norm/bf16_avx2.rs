//! Hand-vectorised AVX2 + FMA row kernel for bf16 `rms_norm` and `layer_norm` on contiguous
//! bf16 rows, the common case for transformer activations.
//!
//! It computes exactly what the portable row loop computes (same formulas, same per-op
//! rounding to bf16), with changes that matter on a CPU whose vector units, not its memory,
//! limit the portable loop (every instruction saved in the output pass shows):
//!
//! - **Widening without zero-extension.** A 32-bit lane holding two bf16 values is the odd
//!   one as f32 once its low half is masked off, and the even one once shifted left by 16:
//!   one instruction per 8 values (the portable loop zero-extends and shifts). The output
//!   pass works on even and odd elements as two vectors, and the weight and bias are stored
//!   split the same way once per call. The statistics use `unpacklo/hi_epi16` instead
//!   (order does not matter to a sum).
//! - **Narrowing in 16-bit lanes.** The two rounded vectors are recombined with one blend
//!   of their high halves and one of their low halves, and the round-to-nearest-even carry
//!   is computed for all 16 values at once in 16-bit lanes (the high half already sits
//!   where the output element goes).
//! - **Masks as `and`.** Clearing the low half of a rounded f32 is an `and` with an opaque
//!   mask. Given a constant, LLVM emits `vpblendw` with zero, which competes with the
//!   shifts and shuffles for two of the four vector ports.
//! - **Prefetch.** While a row is written, the row after the next is prefetched one cache
//!   line per 32 elements, and the next row's statistics are computed before this row is
//!   written, so the reductions' latency and DRAM overlap the output pass.

use super::{bf16_bits_rne_unchecked, bf16_round_unchecked, Acc, Job, Kind, RowStats};
use half::bf16;
use std::arch::x86_64::*;

/// Elements per vector step: one 256-bit load of bf16.
const STEP: usize = 16;

/// The prepared kernel: the job, and its weight and bias with every full step of 16 split
/// into its even and odd elements (see the module doc). Elements past the last full step
/// stay in place and are handled by the scalar tail.
pub(super) struct Kernel<'a> {
    job: &'a Job<'a, f32>,
    w: Option<Vec<f32>>,
    b: Option<Vec<f32>>,
    /// `0xFFFF0000` in every lane, hidden from the optimiser (see the module doc).
    high: [u32; 8],
}

impl<'a> Kernel<'a> {
    /// `Some(())` if this CPU has what the kernel needs: AVX2 and FMA.
    fn new_checked() -> Option<()> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(())
    }

    /// The kernel for `job`, if this CPU has AVX2 and FMA.
    pub(super) fn new(job: &'a Job<'a, f32>) -> Option<Self> {
        Self::new_checked()?;
        Some(Kernel {
            job,
            w: job.affine.w.map(interleaved),
            b: job.affine.b.map(interleaved),
            high: std::hint::black_box([0xFFFF_0000; 8]),
        })
    }

    /// Normalises rows `first..` of `buf` (laid out as `job.rows` says, each row contiguous)
    /// into `y`, one row per `job.d` elements.
    pub(super) fn rows(&self, buf: &[bf16], first: usize, y: &mut [bf16]) {
        // SAFETY: `new` checked that the CPU has AVX2 and FMA.
        unsafe { self.rows_avx2(buf, first, y) }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, buf: &[bf16], first: usize, y: &mut [bf16]) {
        let layer = self.job.kind == Kind::Layer;
        match (layer, self.w.is_some(), self.b.is_some()) {
            (false, false, false) => self.rows_typed::<false, false, false>(buf, first, y),
            (false, true, false) => self.rows_typed::<false, true, false>(buf, first, y),
            (false, false, true) => self.rows_typed::<false, false, true>(buf, first, y),
            (false, true, true) => self.rows_typed::<false, true, true>(buf, first, y),
            (true, false, false) => self.rows_typed::<true, false, false>(buf, first, y),
            (true, true, false) => self.rows_typed::<true, true, false>(buf, first, y),
            (true, false, true) => self.rows_typed::<true, false, true>(buf, first, y),
            (true, true, true) => self.rows_typed::<true, true, true>(buf, first, y),
        }
    }

    /// The row loop for one kind and affine combination. The statistics of row `r + 1` are
    /// computed before row `r` is written: they are independent, so the out-of-order core
    /// overlaps the reductions' latency (long for short rows) with the output pass. The
    /// output pass prefetches row `r + 2`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_typed<const LAYER: bool, const W: bool, const B: bool>(
        &self,
        buf: &[bf16],
        first: usize,
        y: &mut [bf16],
    ) {
        let job = self.job;
        let d = job.d;
        let n_rows = y.len() / d;
        // Rows that step through memory evenly (most layouts) need no division per row.
        let step = job.rows.uniform_step();
        let offset_of = |r: usize, previous: usize| match step {
            Some(step) => previous.wrapping_add_signed(step),
            None => job.rows.offset(first + r) as usize,
        };
        let mut offset = job.rows.offset(first) as usize;
        let mut stats = row_stats::<LAYER>(job, &buf[offset..offset + d]);
        let mut next = offset;
        if n_rows > 1 {
            next = offset_of(1, offset);
        }
        for (r, out) in y.chunks_exact_mut(d).enumerate() {
            let (next_stats, after) = if r + 1 < n_rows {
                let after = if r + 2 < n_rows {
                    offset_of(r + 2, next)
                } else {
                    next
                };
                (row_stats::<LAYER>(job, &buf[next..next + d]), after)
            } else {
                (stats, next)
            };
            // In bounds: `after` starts a row of `buf`.
            let prefetch = buf[after..after + d].as_ptr();
            write_row::<LAYER, W, B>(self, &buf[offset..offset + d], stats, prefetch, out);
            (offset, next, stats) = (next, after, next_stats);
        }
    }
}

/// `v` with each full step of 16 reordered to its 8 even elements, then its 8 odd ones: the
/// order in which [`split`] delivers them.
fn interleaved(v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    for (o, s) in out.chunks_exact_mut(STEP).zip(v.chunks_exact(STEP)) {
        for j in 0..STEP / 2 {
            o[j] = s[2 * j];
            o[STEP / 2 + j] = s[2 * j + 1];
        }
    }
    out
}

/// 16 bf16 values from `p` as f32: the even elements, then the odd ones. `high` is the
/// opaque `0xFFFF0000` mask.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn split(p: *const bf16, high: __m256i) -> (__m256, __m256) {
    let v = _mm256_loadu_si256(p.cast());
    (
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
        _mm256_castsi256_ps(_mm256_and_si256(v, high)),
    )
}

/// The even and odd results of [`split`]'s order, rounded to bf16 (nearest even) and
/// stored as 16 consecutive bf16 values. The high half of each even result moves down into
/// its lane's low half and the odd result's high half stays: one blend gives the 16
/// truncated values, another their 16 discarded halves, and the carry
/// `low + (value & 1) > 0x8000` is then a comparison per 16-bit lane. Exact under the NaN
/// precondition of [`bf16_bits_rne_unchecked`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow_store(even: __m256, odd: __m256, o: *mut bf16) {
    let (e, d) = (_mm256_castps_si256(even), _mm256_castps_si256(odd));
    let hi = _mm256_blend_epi16::<0xAA>(_mm256_srli_epi32::<16>(e), d);
    let lo = _mm256_blend_epi16::<0xAA>(e, _mm256_slli_epi32::<16>(d));
    // Saturating: 0xFFFF + 1 must stay above 0x8000.
    let t = _mm256_adds_epu16(lo, _mm256_and_si256(hi, _mm256_set1_epi16(1)));
    // Unsigned `t > 0x8000` as a signed comparison: flip the sign bit first.
    let flipped = _mm256_xor_si256(t, _mm256_set1_epi16(i16::MIN));
    let carry = _mm256_cmpgt_epi16(flipped, _mm256_setzero_si256());
    // `carry` is -1 where the value rounds up.
    _mm256_storeu_si256(o.cast(), _mm256_sub_epi16(hi, carry));
}

/// 16 bf16 values from `p` as two f32 vectors, in the interleaved order.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen(p: *const bf16) -> (__m256, __m256) {
    let v = _mm256_loadu_si256(p.cast());
    let z = _mm256_setzero_si256();
    (
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)),
    )
}

/// f32 bits plus the round-to-nearest-even increment of their low half: the upper half is
/// then the bf16 rounding (the NaN precondition of [`bf16_bits_rne_unchecked`] applies).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_bits(v: __m256) -> __m256i {
    let b = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb)
}

/// `v` rounded to bf16 precision, kept as f32; `high` is the opaque `0xFFFF0000` mask.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn round(v: __m256, high: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_and_si256(round_bits(v), high))
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Sum over the row of `f(x)` for every element, vector part with four accumulators.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum(
    row: &[bf16],
    f: impl Fn(__m256, __m256) -> __m256,
    tail: impl Fn(f32) -> f32,
) -> f32 {
    let steps = row.len() / STEP;
    let p = row.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 2 <= steps {
        let (a, b) = widen(p.add(i * STEP));
        let (c, e) = widen(p.add((i + 1) * STEP));
        acc[0] = f(a, acc[0]);
        acc[1] = f(b, acc[1]);
        acc[2] = f(c, acc[2]);
        acc[3] = f(e, acc[3]);
        i += 2;
    }
    if i < steps {
        let (a, b) = widen(p.add(i * STEP));
        acc[0] = f(a, acc[0]);
        acc[1] = f(b, acc[1]);
    }
    let mut total = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for &v in &row[steps * STEP..] {
        total += tail(v.to_f32());
    }
    total
}

/// The row's mean (0 for RMS) and `1 / sqrt(var + eps)`, computed in f32 as the portable
/// loop computes them (two passes for `LAYER`, one for RMS), NaNs canonical.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats<const LAYER: bool>(job: &Job<'_, f32>, row: &[bf16]) -> RowStats<f32> {
    let (mean, inv) = if LAYER {
        let mean = row_sum(row, |x, acc| _mm256_add_ps(x, acc), |x| x) * job.inv_d;
        let m = _mm256_set1_ps(mean);
        let var = row_sum(
            row,
            |x, acc| {
                let c = _mm256_sub_ps(x, m);
                _mm256_fmadd_ps(c, c, acc)
            },
            |x| (x - mean) * (x - mean),
        ) * job.inv_d;
        (mean, 1.0 / (var + job.eps).sqrt())
    } else {
        let ms = row_sum(row, |x, acc| _mm256_fmadd_ps(x, x, acc), |x| x * x) * job.inv_d;
        (0.0, 1.0 / (ms + job.eps).sqrt())
    };
    RowStats {
        mean: mean.canonical_nan(),
        inv: inv.canonical_nan(),
    }
}

/// The output pass: `narrow(affine(round((x - mean) * inv)))` for every element, each op of
/// MLX's fallback rounded to bf16 in order, bit for bit what the portable loop writes.
/// Prefetches the row at `prefetch` (same length) meanwhile.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn write_row<const LAYER: bool, const W: bool, const B: bool>(
    k: &Kernel<'_>,
    row: &[bf16],
    stats: RowStats<f32>,
    prefetch: *const bf16,
    out: &mut [bf16],
) {
    let RowStats { mean, inv } = stats;
    let (m, s) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv));
    let high = _mm256_loadu_si256(k.high.as_ptr().cast());
    let xhat = |x: __m256| {
        if LAYER {
            _mm256_mul_ps(_mm256_sub_ps(x, m), s)
        } else {
            _mm256_mul_ps(x, s)
        }
    };
    let (w, b) = (k.w.as_deref().unwrap_or(&[]), k.b.as_deref().unwrap_or(&[]));
    let affine = |v: __m256, i: usize| {
        let mut v = v;
        if W {
            v = _mm256_mul_ps(round(v, high), _mm256_loadu_ps(w.as_ptr().add(i)));
        }
        if B {
            v = _mm256_add_ps(round(v, high), _mm256_loadu_ps(b.as_ptr().add(i)));
        }
        v
    };
    let steps = row.len() / STEP;
    let (p, o) = (row.as_ptr(), out.as_mut_ptr());
    for i in 0..steps {
        if i % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(prefetch.add(i * STEP).cast());
        }
        let (even, odd) = split(p.add(i * STEP), high);
        let even = affine(xhat(even), i * STEP);
        let odd = affine(xhat(odd), i * STEP + STEP / 2);
        narrow_store(even, odd, o.add(i * STEP));
    }
    // The last `d % 16` elements, as the portable loop computes them.
    for j in steps * STEP..row.len() {
        let x = row[j].to_f32();
        let mut v = if LAYER {
            (x - mean) * inv
        } else {
            (x - 0.0) * inv
        };
        if W {
            v = bf16_round_unchecked(v) * w[j];
        }
        if B {
            v = bf16_round_unchecked(v) + b[j];
        }
        out[j] = bf16::from_bits(bf16_bits_rne_unchecked(v));
    }
}

#[cfg(test)]
mod tests {
    use super::super::{write_affine, Affine, RowIndex};
    use super::*;
    use crate::{Array, DType, Device};

    /// A deterministic stream of bf16 bit patterns: mostly ordinary values, with zeros,
    /// subnormals, values near the top of the range, infinities, NaNs (quiet and
    /// signalling) and exact rounding ties mixed in.
    struct Values(u64);

    impl Values {
        fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        fn bf16(&mut self) -> bf16 {
            let r = self.next_u32();
            let bits = match r % 16 {
                0 => 0x0000,
                1 => 0x8000,
                2 => 0x0001 + (r >> 8) as u16 % 0x7F,
                3 => 0x7F7F - (r >> 8) as u16 % 4,
                4 => 0x7F80,
                5 => 0xFF80,
                6 => 0x7FC0,
                7 => 0x7F81,
                _ => return bf16::from_f32((r >> 4) as f32 / (1u32 << 27) as f32 * 8.0 - 4.0),
            };
            bf16::from_bits(bits ^ ((r >> 20) as u16 & 0x8000))
        }
        /// A value whose products with bf16 values often tie at bf16 precision.
        fn stat(&mut self) -> f32 {
            let r = self.next_u32();
            match r % 8 {
                0 => f32::NAN,
                1 => 0.0,
                2 => f32::INFINITY,
                3 => 1.5,
                _ => (r >> 8) as f32 / (1u32 << 24) as f32 * 3.0 - 1.0,
            }
        }
    }

    #[test]
    fn output_pass_matches_the_portable_loop_bit_for_bit() {
        if Kernel::new_checked().is_none() {
            eprintln!("no AVX2/FMA on this CPU: the kernel is never used, nothing to compare");
            return;
        }
        let mut values = Values(0x9E37_79B9_7F4A_7C15);
        for d in [1, 7, 15, 16, 17, 31, 32, 33, 48, 128, 131, 1000] {
            let x = Array::zeros(&[2, d], DType::BF16, &Device::Cpu).unwrap();
            let row: Vec<bf16> = (0..d).map(|_| values.bf16()).collect();
            let next: Vec<bf16> = (0..d).map(|_| values.bf16()).collect();
            let w: Vec<f32> = (0..d).map(|_| values.bf16().to_f32()).collect();
            let b: Vec<f32> = (0..d).map(|_| values.bf16().to_f32()).collect();
            for kind in [Kind::Rms, Kind::Layer] {
                for (use_w, use_b) in [(false, false), (true, false), (false, true), (true, true)] {
                    let affine = Affine {
                        w: Some(&w[..]).filter(|_| use_w),
                        b: Some(&b[..]).filter(|_| use_b),
                    };
                    let job = Job {
                        kind,
                        rows: RowIndex::new(&x),
                        d,
                        eps: 1e-5,
                        inv_d: 1.0 / d as f32,
                        affine,
                    };
                    let k = Kernel::new(&job).unwrap();
                    for _ in 0..8 {
                        let mean = if kind == Kind::Layer {
                            values.stat()
                        } else {
                            0.0
                        };
                        let stats = RowStats {
                            mean,
                            inv: values.stat(),
                        };
                        let mut want = vec![bf16::ZERO; d];
                        write_affine(
                            &row,
                            |v: bf16| v.to_f32(),
                            stats,
                            affine,
                            &mut want,
                            bf16_round_unchecked,
                            |v| bf16::from_bits(bf16_bits_rne_unchecked(v)),
                        );
                        let mut got = vec![bf16::ZERO; d];
                        // SAFETY: `Kernel::new` succeeded, so the CPU has AVX2 and FMA.
                        unsafe {
                            match (kind, use_w, use_b) {
                                (Kind::Rms, false, false) => write_row::<false, false, false>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Rms, true, false) => write_row::<false, true, false>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Rms, false, true) => write_row::<false, false, true>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Rms, true, true) => write_row::<false, true, true>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Layer, false, false) => write_row::<true, false, false>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Layer, true, false) => write_row::<true, true, false>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Layer, false, true) => write_row::<true, false, true>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                                (Kind::Layer, true, true) => write_row::<true, true, true>(
                                    &k,
                                    &row,
                                    stats,
                                    next.as_ptr(),
                                    &mut got,
                                ),
                            }
                        }
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            // Which NaN operand x86 propagates depends on operand order,
                            // which the compiler may swap: any quiet NaN is right.
                            if e.is_nan() {
                                assert!(
                                    g.to_bits() & 0x7FC0 == 0x7FC0,
                                    "{kind:?} d {d} element {i}: {:#06x} is not a quiet NaN",
                                    g.to_bits()
                                );
                                continue;
                            }
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{kind:?} w {use_w} b {use_b} d {d} element {i}: x {:#06x} \
                                 mean {} inv {}",
                                row[i].to_bits(),
                                stats.mean,
                                stats.inv
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn statistics_match_f64() {
        if Kernel::new_checked().is_none() {
            eprintln!("no AVX2/FMA on this CPU: the kernel is never used, nothing to compare");
            return;
        }
        let mut values = Values(7);
        for d in [1, 15, 16, 17, 33, 64, 100, 4099] {
            // Finite values around 10, so that the mean matters for the variance.
            let row: Vec<bf16> = (0..d)
                .map(|_| bf16::from_f32((values.next_u32() >> 8) as f32 / 1e6 + 10.0))
                .collect();
            let x = Array::from_slice(&row, &[1, d]).unwrap();
            for kind in [Kind::Rms, Kind::Layer] {
                let job = Job {
                    kind,
                    rows: RowIndex::new(&x),
                    d,
                    eps: 1e-5,
                    inv_d: 1.0 / d as f32,
                    affine: Affine { w: None, b: None },
                };
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                let got = unsafe {
                    match kind {
                        Kind::Rms => row_stats::<false>(&job, &row),
                        Kind::Layer => row_stats::<true>(&job, &row),
                    }
                };
                let xs: Vec<f64> = row.iter().map(|v| v.to_f64()).collect();
                let mean = xs.iter().sum::<f64>() / d as f64;
                let (mean, var) = match kind {
                    Kind::Rms => (0.0, xs.iter().map(|x| x * x).sum::<f64>() / d as f64),
                    Kind::Layer => (
                        mean,
                        xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / d as f64,
                    ),
                };
                let inv = 1.0 / (var + 1e-5).sqrt();
                assert!(
                    (f64::from(got.mean) - mean).abs() <= 1e-5 * mean.abs().max(1.0),
                    "{kind:?} d {d}: mean {} vs {mean}",
                    got.mean
                );
                assert!(
                    (f64::from(got.inv) - inv).abs() <= 1e-4 * inv,
                    "{kind:?} d {d}: inv {} vs {inv}",
                    got.inv
                );
            }
        }
    }
}
