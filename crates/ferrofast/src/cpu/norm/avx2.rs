//! Hand-vectorised AVX2 + FMA (+ F16C) row kernel for `rms_norm` and `layer_norm` on
//! contiguous rows of bf16, f16 or f32, the common case for transformer activations.
//!
//! It computes exactly what the portable row loop computes (same formulas, same per-op
//! rounding to the output dtype), in the form that matters on a CPU whose vector units, not
//! its memory, limit the portable loop (every instruction saved in the output pass shows):
//!
//! - **bf16 widening without zero-extension.** A 32-bit lane holding two bf16 values is the
//!   odd one as f32 once its low half is masked off, and the even one once shifted left by
//!   16: one instruction per 8 values. The output pass works on even and odd elements as two
//!   vectors, and the weight and bias are stored split the same way once per call. The
//!   statistics use `unpacklo/hi_epi16` instead (order does not matter to a sum).
//! - **bf16 narrowing in 16-bit lanes.** The two rounded vectors are recombined with one
//!   blend of their high halves and one of their low halves, and the round-to-nearest-even
//!   carry is computed for all 16 values at once in 16-bit lanes.
//! - **Masks as `and`.** Clearing the low half of a rounded f32 is an `and` with an opaque
//!   mask. Given a constant, LLVM emits `vpblendw` with zero, which competes with the
//!   shifts and shuffles for two of the four vector ports.
//! - **f16 through F16C.** `vcvtph2ps` / `vcvtps2ph` (round to nearest even) convert 8
//!   values per instruction, so each rounding step is two instructions; the portable f16
//!   path stages every step through a scratch row instead.
//! - **Prefetch.** While a row is written, the input row after the next and the next
//!   output row are prefetched one cache line at a time, and the next row's statistics
//!   are computed before this row is written, so the reductions' latency and DRAM overlap
//!   the output pass. This is all f32 rows get from the kernel (there is no rounding to
//!   do); it is worth 10-20% on rows that stream from DRAM.
//! - **Four rounding chains at once.** The output pass handles two steps per iteration,
//!   each stage on all four vectors before the next, so that the out-of-order core always
//!   has independent work beside the long serial chain of each value.
//! - **Per-call set-up.** The weight and bias tables are built with vector shuffles
//!   (borrowed as they are where the order is natural): a decode step normalises a single
//!   row, and the set-up had cost twice the row itself.

/// `recv.m::<L, W, B>(args)` with the const generics set from three run-time flags (layer
/// norm, has weight, has bias).
macro_rules! by_flags {
    (($l:expr, $w:expr, $b:expr), $recv:ident.$m:ident($($arg:expr),*)) => {
        match ($l, $w, $b) {
            (false, false, false) => $recv.$m::<false, false, false>($($arg),*),
            (false, true, false) => $recv.$m::<false, true, false>($($arg),*),
            (false, false, true) => $recv.$m::<false, false, true>($($arg),*),
            (false, true, true) => $recv.$m::<false, true, true>($($arg),*),
            (true, false, false) => $recv.$m::<true, false, false>($($arg),*),
            (true, true, false) => $recv.$m::<true, true, false>($($arg),*),
            (true, false, true) => $recv.$m::<true, false, true>($($arg),*),
            (true, true, true) => $recv.$m::<true, true, true>($($arg),*),
        }
    };
}

use super::{Acc, Job, RowStats};
use crate::cpu::simd::{bf16_bits_rne_unchecked, bf16_round_unchecked};
use crate::ops::norm::NormKind;
use half::{bf16, f16};
use std::arch::x86_64::*;
use std::borrow::Cow;

/// Elements per vector step: 16 values (one 256-bit load of a 16-bit format, two of f32).
const STEP: usize = 16;

/// Rows shorter than this many elements take [`Kernel::rows_grouped`] (where the format
/// says so).
const SHORT_ROW: usize = 1024;

/// Rows whose statistics [`Kernel::rows_grouped`] computes together.
const GROUP: usize = 4;

/// An element format the kernel reads and writes (the 16-bit floats, and f32). Every
/// `unsafe fn` needs AVX2, FMA and F16C (which every AVX2 CPU has); those that take a
/// pointer also need it valid for one step ([`STEP`] elements).
pub(super) trait Format: Copy + Send + Sync + 'static {
    /// Steps per 64-byte cache line of the row (one line is prefetched per this many).
    const STEPS_PER_LINE: usize;
    /// Whether short rows take [`Kernel::rows_grouped`] (compute-bound formats; f32 rows
    /// are bound by memory, and measured 5-10% slower that way).
    const GROUP_SHORT_ROWS: bool;
    /// The weight or bias row in the order [`split`](Format::split) delivers a step's
    /// elements (elements past the last full step stay in place), borrowed where that is
    /// the natural order.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn step_layout(v: &[f32]) -> Cow<'_, [f32]>;
    /// One step of `p` as f32, in the output pass's order (the first and second vector
    /// take the elements of [`step_layout`](Format::step_layout)'s first and second 8).
    /// `high` is the `0xFFFF0000` mask of [`Kernel::high`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `p` must be valid for reads of [`STEP`]
    /// elements (no alignment needed).
    unsafe fn split(p: *const Self, high: __m256i) -> (__m256, __m256);
    /// One step of `p` as f32 in any order (for sums).
    ///
    /// # Safety
    /// As [`split`](Format::split).
    unsafe fn widen_any(p: *const Self, high: __m256i) -> (__m256, __m256) {
        // SAFETY: the caller meets `split`'s contract, which is this function's.
        unsafe { Self::split(p, high) }
    }
    /// `v` rounded to this format, kept as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn round(v: __m256, high: __m256i) -> __m256;
    /// A step's results (in [`split`](Format::split)'s order) rounded and stored at `o`;
    /// with `NT`, by non-temporal stores (past the caches: for outputs larger than them,
    /// which then skip the read of each line before it is written; the caller issues an
    /// `sfence` before another thread may read them).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `o` must be valid for writes of [`STEP`]
    /// elements (no alignment needed without `NT`; 32-byte aligned with it).
    unsafe fn narrow_store<const NT: bool>(a: __m256, b: __m256, o: *mut Self);
    /// One element as f32.
    fn to_f32(self) -> f32;
    /// The element with these bits.
    #[cfg(test)]
    fn from_bits(bits: u16) -> Self;
    /// [`round`](Format::round) for one value.
    fn round_scalar(v: f32) -> f32;
    /// [`narrow_store`](Format::narrow_store) for one value.
    fn narrow_scalar(v: f32) -> Self;
}

impl Format for bf16 {
    const STEPS_PER_LINE: usize = 2;
    const GROUP_SHORT_ROWS: bool = true;
    /// Each full step's 8 even elements, then its 8 odd ones (two shuffles and two lane
    /// permutes per step: this runs on every call, and a call may be one row).
    ///
    /// # Safety
    /// As [`Format::step_layout`] (this one uses AVX2 and FMA only).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step_layout(v: &[f32]) -> Cow<'_, [f32]> {
        let mut out = Vec::<f32>::with_capacity(v.len());
        let o = out.as_mut_ptr();
        let full = v.len() / STEP * STEP;
        for i in (0..full).step_by(STEP) {
            // SAFETY: i + 16 <= full <= v.len(): both loads of 8 read inside `v`.
            let (a, b) = unsafe {
                (
                    _mm256_loadu_ps(v.as_ptr().add(i)),
                    _mm256_loadu_ps(v.as_ptr().add(i + 8)),
                )
            };
            // Per 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6; the permute orders the quarters.
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let even = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even));
            let odd = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(odd));
            // SAFETY: i + 16 <= full <= v.len() = out's capacity: both stores of 8 write
            // inside `out`'s allocation (not yet its length; `set_len` follows).
            unsafe {
                _mm256_storeu_ps(o.add(i), _mm256_castpd_ps(even));
                _mm256_storeu_ps(o.add(i + 8), _mm256_castpd_ps(odd));
            }
        }
        // SAFETY: full <= capacity, and the first `full` elements were written just above.
        unsafe { out.set_len(full) };
        let tail = &v[full..];
        out.extend_from_slice(tail);
        Cow::Owned(out)
    }

    /// The even elements, then the odd ones; `high` is the opaque `0xFFFF0000` mask.
    ///
    /// # Safety
    /// As [`Format::split`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn split(p: *const bf16, high: __m256i) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of one step (the caller's obligation): 16 bf16,
        // the 32 bytes loaded.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
            _mm256_castsi256_ps(_mm256_and_si256(v, high)),
        )
    }

    /// Elements 0-3 and 8-11, then 4-7 and 12-15 (one unpack each).
    ///
    /// # Safety
    /// As [`Format::split`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen_any(p: *const bf16, _high: __m256i) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of one step (the caller's obligation): 16 bf16,
        // the 32 bytes loaded.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        let z = _mm256_setzero_si256();
        (
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)),
        )
    }

    /// Round to nearest even by integer arithmetic, under the NaN precondition of
    /// [`bf16_bits_rne_unchecked`].
    ///
    /// # Safety
    /// As [`Format::round`] (this one uses AVX2 and FMA only).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn round(v: __m256, high: __m256i) -> __m256 {
        let b = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let b = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
        _mm256_castsi256_ps(_mm256_and_si256(b, high))
    }

    /// The high half of each even result moves down into its lane's low half and the odd
    /// result's high half stays: one blend gives the 16 truncated values, another their 16
    /// discarded halves, and the carry `low + (value & 1) > 0x8000` is then a comparison
    /// per 16-bit lane. Exact under the NaN precondition of [`bf16_bits_rne_unchecked`].
    ///
    /// # Safety
    /// As [`Format::narrow_store`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn narrow_store<const NT: bool>(even: __m256, odd: __m256, o: *mut bf16) {
        let (e, d) = (_mm256_castps_si256(even), _mm256_castps_si256(odd));
        let hi = _mm256_blend_epi16::<0xAA>(_mm256_srli_epi32::<16>(e), d);
        let lo = _mm256_blend_epi16::<0xAA>(e, _mm256_slli_epi32::<16>(d));
        // Saturating: 0xFFFF + 1 must stay above 0x8000.
        let t = _mm256_adds_epu16(lo, _mm256_and_si256(hi, _mm256_set1_epi16(1)));
        // Unsigned `t > 0x8000` as a signed comparison: flip the sign bit first.
        let flipped = _mm256_xor_si256(t, _mm256_set1_epi16(i16::MIN));
        let carry = _mm256_cmpgt_epi16(flipped, _mm256_setzero_si256());
        // `carry` is -1 where the value rounds up.
        let rounded = _mm256_sub_epi16(hi, carry);
        // SAFETY: `o` is valid for writes of one step (the caller's obligation): 16 bf16,
        // the 32 bytes stored; with NT it is 32-byte aligned (also the caller's).
        unsafe {
            if NT {
                _mm256_stream_si256(o.cast(), rounded);
            } else {
                _mm256_storeu_si256(o.cast(), rounded);
            }
        }
    }

    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(test)]
    fn from_bits(bits: u16) -> bf16 {
        bf16::from_bits(bits)
    }
    fn round_scalar(v: f32) -> f32 {
        bf16_round_unchecked(v)
    }
    fn narrow_scalar(v: f32) -> bf16 {
        bf16::from_bits(bf16_bits_rne_unchecked(v))
    }
}

impl Format for f16 {
    const STEPS_PER_LINE: usize = 2;
    const GROUP_SHORT_ROWS: bool = true;
    /// Natural order: the conversions keep it.
    ///
    /// # Safety
    /// None beyond the trait's (this one executes no vector instruction).
    unsafe fn step_layout(v: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(v)
    }

    /// Elements 0-7, then 8-15.
    ///
    /// # Safety
    /// As [`Format::split`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn split(p: *const f16, _high: __m256i) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of one step (the caller's obligation): 16 f16,
        // read as elements 0-7 and 8-15 (16 bytes each).
        let (a, b) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())) };
        (_mm256_cvtph_ps(a), _mm256_cvtph_ps(b))
    }

    /// # Safety
    /// As [`Format::round`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round(v: __m256, _high: __m256i) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }

    /// # Safety
    /// As [`Format::narrow_store`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn narrow_store<const NT: bool>(a: __m256, b: __m256, o: *mut f16) {
        let (a, b) = (
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a),
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b),
        );
        // SAFETY: `o` is valid for writes of one step (the caller's obligation): 16 f16,
        // written as elements 0-7 and 8-15 (16 bytes each, both 16-byte aligned with NT).
        unsafe {
            if NT {
                _mm_stream_si128(o.cast(), a);
                _mm_stream_si128(o.add(8).cast(), b);
            } else {
                _mm_storeu_si128(o.cast(), a);
                _mm_storeu_si128(o.add(8).cast(), b);
            }
        }
    }

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(test)]
    fn from_bits(bits: u16) -> f16 {
        f16::from_bits(bits)
    }
    fn round_scalar(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }
    fn narrow_scalar(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

/// f32 rows take the same row loop (statistics one row ahead, prefetch), with no rounding.
impl Format for f32 {
    const STEPS_PER_LINE: usize = 1;
    const GROUP_SHORT_ROWS: bool = false;

    /// # Safety
    /// None beyond the trait's (this one executes no vector instruction).
    unsafe fn step_layout(v: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(v)
    }

    /// # Safety
    /// As [`Format::split`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn split(p: *const f32, _high: __m256i) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of one step (the caller's obligation): 16 f32,
        // read as elements 0-7 and 8-15.
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }

    /// # Safety
    /// As [`Format::round`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round(v: __m256, _high: __m256i) -> __m256 {
        v
    }

    /// # Safety
    /// As [`Format::narrow_store`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn narrow_store<const NT: bool>(a: __m256, b: __m256, o: *mut f32) {
        // SAFETY: `o` is valid for writes of one step (the caller's obligation): 16 f32,
        // written as elements 0-7 and 8-15 (both 32-byte aligned with NT).
        unsafe {
            if NT {
                _mm256_stream_ps(o, a);
                _mm256_stream_ps(o.add(8), b);
            } else {
                _mm256_storeu_ps(o, a);
                _mm256_storeu_ps(o.add(8), b);
            }
        }
    }

    fn to_f32(self) -> f32 {
        self
    }
    fn round_scalar(v: f32) -> f32 {
        v
    }
    fn narrow_scalar(v: f32) -> f32 {
        v
    }
    /// The bf16 value with these bits, widened (the tests' special values).
    #[cfg(test)]
    fn from_bits(bits: u16) -> f32 {
        f32::from_bits(u32::from(bits) << 16)
    }
}

/// The prepared kernel: the job, and its weight and bias in the format's
/// [`step_layout`](Format::step_layout). Invariant (made by [`new`](Kernel::new), relied on
/// by the raw loads of [`write_row`](Kernel::write_row)): the weight and bias, where given,
/// hold at least `job.d` values.
pub(super) struct Kernel<'a, H> {
    job: &'a Job<'a, f32>,
    w: Option<Cow<'a, [f32]>>,
    b: Option<Cow<'a, [f32]>>,
    /// `0xFFFF0000` in every lane, hidden from the optimiser (see the module doc).
    high: [u32; 8],
    format: std::marker::PhantomData<H>,
}

impl<'a, H: Format> Kernel<'a, H> {
    /// Whether this CPU has what the kernel needs: AVX2, FMA and F16C.
    fn supported() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The kernel for `job`, if this CPU can run it (and, always true for a validated call,
    /// the weight and bias hold a value per element of a row).
    pub(super) fn new(job: &'a Job<'a, f32>) -> Option<Self> {
        if !Self::supported() {
            return None;
        }
        let short = |v: Option<&[f32]>| v.is_some_and(|v| v.len() < job.d);
        if short(job.affine.w) || short(job.affine.b) {
            debug_assert!(false, "norm weight or bias shorter than the row");
            return None;
        }
        // SAFETY: the CPU has what `step_layout` needs (checked above).
        let layout = |v: &'a [f32]| unsafe { H::step_layout(v) };
        let (w, b) = (job.affine.w.map(layout), job.affine.b.map(layout));
        Some(Kernel {
            job,
            w,
            b,
            high: std::hint::black_box([0xFFFF_0000; 8]),
            format: std::marker::PhantomData,
        })
    }

    /// Normalises rows `first..` of `buf` (laid out as `job.rows` says, each row contiguous)
    /// into `y`, one row per `job.d` elements.
    pub(super) fn rows(&self, buf: &[H], first: usize, y: &mut [H]) {
        // SAFETY: `new` checked that the CPU has AVX2, FMA and F16C.
        unsafe { self.rows_avx2(buf, first, y) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(&self, buf: &[H], first: usize, y: &mut [H]) {
        let layer = self.job.kind == NormKind::Layer;
        // SAFETY: in every arm, the CPU supports AVX2, FMA and F16C (this function's contract),
        // all that `rows_typed` requires.
        unsafe {
            by_flags!(
                (layer, self.w.is_some(), self.b.is_some()),
                self.rows_typed(buf, first, y)
            )
        }
    }

    /// The row loop for one kind and affine combination: [`rows_grouped`](Self::rows_grouped)
    /// for short rows of 16-bit formats, else [`rows_ahead`](Self::rows_ahead).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_typed<const LAYER: bool, const W: bool, const B: bool>(
        &self,
        buf: &[H],
        first: usize,
        y: &mut [H],
    ) {
        // SAFETY: the CPU supports AVX2, FMA and F16C (this function's contract), all that
        // either row loop requires.
        unsafe {
            if H::GROUP_SHORT_ROWS && self.job.d < SHORT_ROW {
                self.rows_grouped::<LAYER, W, B>(buf, first, y)
            } else {
                self.rows_ahead::<LAYER, W, B>(buf, first, y)
            }
        }
    }

    /// The row loop for rows of [`SHORT_ROW`] elements or more: the statistics of row
    /// `r + 1` are computed before row `r` is written: they are independent, so the
    /// out-of-order core overlaps the reductions' latency with the output pass. The output
    /// pass prefetches input row `r + 2` and output row `r + 1` (so that its stores find
    /// their lines in cache, instead of waiting for each line's read-for-ownership).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_ahead<const LAYER: bool, const W: bool, const B: bool>(
        &self,
        buf: &[H],
        first: usize,
        y: &mut [H],
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
        let mut stats = self.row_stats::<LAYER>(&buf[offset..offset + d]);
        let mut next = offset;
        if n_rows > 1 {
            next = offset_of(1, offset);
        }
        // The output rows' start, for prefetching (only ever offset within `y`).
        let y_start = y.as_ptr();
        for (r, out) in y.chunks_exact_mut(d).enumerate() {
            let (next_stats, after) = if r + 1 < n_rows {
                let after = if r + 2 < n_rows {
                    offset_of(r + 2, next)
                } else {
                    next
                };
                (self.row_stats::<LAYER>(&buf[next..next + d]), after)
            } else {
                (stats, next)
            };
            // Row `after` of `buf` (the slice checks it).
            let prefetch = buf[after..after + d].as_ptr();
            // SAFETY: `write_row`'s contract: the CPU supports AVX2, FMA and F16C (this
            // function's contract); the input row and `out` hold `d` elements each;
            // `prefetch` starts `d` elements of `buf`, and `out_prefetch` row
            // (r + 1).min(n_rows - 1) < n_rows = y.len() / d of `y` (row r + 1 if there is
            // one, else this row); `new` made the weight and bias at least `d` long.
            unsafe {
                let out_prefetch = y_start.add((r + 1).min(n_rows - 1) * d);
                self.write_row::<LAYER, W, B>(
                    &buf[offset..offset + d],
                    stats,
                    prefetch,
                    out_prefetch,
                    out,
                );
            }
            (offset, next, stats) = (next, after, next_stats);
        }
    }

    /// The row loop for short rows: the statistics of [`GROUP`] rows are computed together,
    /// then the rows are written. A short row's output pass is too short to hide the
    /// latency of the next row's reductions (two horizontal sums, a square root and a
    /// division in a row for `layer_norm`); four independent chains side by side share it.
    /// Each output pass prefetches the same row of the next group (input and output).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_grouped<const LAYER: bool, const W: bool, const B: bool>(
        &self,
        buf: &[H],
        first: usize,
        y: &mut [H],
    ) {
        let job = self.job;
        let d = job.d;
        let n_rows = y.len() / d;
        let step = job.rows.uniform_step();
        let start = job.rows.offset(first) as usize;
        let offset_of = |r: usize| match step {
            Some(step) => start.wrapping_add_signed(step.wrapping_mul(r as isize)),
            None => job.rows.offset(first + r) as usize,
        };
        // The output rows' start, for prefetching (only ever offset within `y`).
        let y_start = y.as_ptr();
        let mut stats = [RowStats {
            mean: 0.0,
            inv: 0.0,
        }; GROUP];
        let mut offsets = [0usize; GROUP];
        for (g, rows) in y.chunks_mut(GROUP * d).enumerate() {
            let r0 = g * GROUP;
            let in_group = rows.len() / d;
            for k in 0..in_group {
                offsets[k] = offset_of(r0 + k);
                stats[k] = self.row_stats::<LAYER>(&buf[offsets[k]..offsets[k] + d]);
            }
            for (k, out) in rows.chunks_exact_mut(d).enumerate() {
                // Row `r0 + GROUP + k` if there is one, else the last row.
                let ahead = (r0 + GROUP + k).min(n_rows - 1);
                let at = offset_of(ahead);
                let prefetch = buf[at..at + d].as_ptr();
                let o = offsets[k];
                // SAFETY: `write_row`'s contract: the CPU supports AVX2, FMA and F16C (this
                // function's contract); the input row and `out` hold `d` elements each;
                // `prefetch` starts `d` elements of `buf` (the slice checks it), and
                // `out_prefetch` row ahead < n_rows = y.len() / d of `y`; `new` made the
                // weight and bias at least `d` long.
                unsafe {
                    let out_prefetch = y_start.add(ahead * d);
                    self.write_row::<LAYER, W, B>(
                        &buf[o..o + d],
                        stats[k],
                        prefetch,
                        out_prefetch,
                        out,
                    );
                }
            }
        }
    }

    /// `0xFFFF0000` in every lane, loaded from memory the optimiser cannot see through.
    ///
    /// # Safety
    /// Safe to call from code compiled with AVX2, FMA and F16C (the kernel's other
    /// functions); from anywhere else, the CPU must support them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn high(&self) -> __m256i {
        // SAFETY: `self.high` is 8 u32, the 32 bytes loaded.
        unsafe { _mm256_loadu_si256(self.high.as_ptr().cast()) }
    }

    /// Sum over the row of `f(x)` for every element, vector part with four accumulators.
    ///
    /// # Safety
    /// As [`high`](Self::high).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_sum(
        &self,
        row: &[H],
        f: impl Fn(__m256, __m256) -> __m256,
        tail: impl Fn(f32) -> f32,
    ) -> f32 {
        let high = self.high();
        let steps = row.len() / STEP;
        let p = row.as_ptr();
        // Eight accumulators, four steps per iteration, so that the adds' latency does not
        // bound the loop.
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 4 <= steps {
            for k in 0..4 {
                // SAFETY: i + k < steps = row.len() / STEP (loop condition), so step i + k
                // lies inside `row`; the CPU features are enabled in this function.
                let (a, b) = unsafe { H::widen_any(p.add((i + k) * STEP), high) };
                acc[2 * k] = f(a, acc[2 * k]);
                acc[2 * k + 1] = f(b, acc[2 * k + 1]);
            }
            i += 4;
        }
        for k in 0..steps - i {
            // SAFETY: i + k < steps: step i + k lies inside `row`, as above.
            let (a, b) = unsafe { H::widen_any(p.add((i + k) * STEP), high) };
            acc[2 * k] = f(a, acc[2 * k]);
            acc[2 * k + 1] = f(b, acc[2 * k + 1]);
        }
        // A tree, not a chain: for short rows this latency is on the critical path.
        let (q0, q1) = (_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[1], acc[5]));
        let (q2, q3) = (_mm256_add_ps(acc[2], acc[6]), _mm256_add_ps(acc[3], acc[7]));
        let v = _mm256_add_ps(_mm256_add_ps(q0, q2), _mm256_add_ps(q1, q3));
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        let mut total = _mm_cvtss_f32(s);
        for &v in &row[steps * STEP..] {
            total += tail(v.to_f32());
        }
        total
    }

    /// The row's mean (0 for RMS) and `1 / sqrt(var + eps)`, computed in f32 as the
    /// portable loop computes them (two passes for `LAYER`, one for RMS), NaNs canonical.
    ///
    /// # Safety
    /// As [`high`](Self::high).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_stats<const LAYER: bool>(&self, row: &[H]) -> RowStats<f32> {
        let job = self.job;
        let (mean, inv) = if LAYER {
            let mean = self.row_sum(row, |x, acc| _mm256_add_ps(x, acc), |x| x) * job.inv_d;
            let m = _mm256_set1_ps(mean);
            let var = self.row_sum(
                row,
                |x, acc| {
                    let c = _mm256_sub_ps(x, m);
                    _mm256_fmadd_ps(c, c, acc)
                },
                |x| (x - mean) * (x - mean),
            ) * job.inv_d;
            (mean, 1.0 / (var + job.eps).sqrt())
        } else {
            let ms = self.row_sum(row, |x, acc| _mm256_fmadd_ps(x, x, acc), |x| x * x) * job.inv_d;
            (0.0, 1.0 / (ms + job.eps).sqrt())
        };
        RowStats {
            mean: mean.canonical_nan(),
            inv: inv.canonical_nan(),
        }
    }

    /// The output pass: `narrow(affine(round((x - mean) * inv)))` for every element, each
    /// op of MLX's fallback rounded to the output dtype in order, bit for bit what the
    /// portable loop writes. Prefetches the rows at `prefetch` and `out_prefetch` (same
    /// length; the next input and output rows) meanwhile.
    ///
    /// # Safety
    /// - The CPU must support AVX2, FMA and F16C.
    /// - `out` must be at least as long as `row`.
    /// - `prefetch` and `out_prefetch` must each point at the first of `row.len()` elements
    ///   of one allocation (they are offset within them, never read or written).
    /// - With `W` (`B`), the kernel's weight (bias) must hold at least `row.len()` values:
    ///   [`new`](Kernel::new) makes them `job.d` long, so rows of `job.d` elements qualify.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn write_row<const LAYER: bool, const W: bool, const B: bool>(
        &self,
        row: &[H],
        stats: RowStats<f32>,
        prefetch: *const H,
        out_prefetch: *const H,
        out: &mut [H],
    ) {
        let RowStats { mean, inv } = stats;
        let (m, s) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv));
        let high = self.high();
        let xhat = |x: __m256| {
            if LAYER {
                _mm256_mul_ps(_mm256_sub_ps(x, m), s)
            } else {
                _mm256_mul_ps(x, s)
            }
        };
        let (w, b) = (
            self.w.as_deref().unwrap_or(&[]),
            self.b.as_deref().unwrap_or(&[]),
        );
        // Every stage on all of `v` (consecutive vectors of 8 from element `at`) before the
        // next: the rounding chains are long and serial, and two steps at a time give the
        // out-of-order core four of them to overlap (8-15% fewer cycles than one step).
        let stages = |v: &mut [__m256], at: usize| {
            for v in v.iter_mut() {
                *v = xhat(*v);
            }
            // SAFETY: at both uses below at + 8 * v.len() <= steps * STEP <= row.len(),
            // which the weight and bias (where used) reach (this function's contract), so the
            // 8 values from at + 8 * k are inside them; `round` needs only the CPU features,
            // which this function's contract provides.
            unsafe {
                if W {
                    for (k, v) in v.iter_mut().enumerate() {
                        let wk = _mm256_loadu_ps(w.as_ptr().add(at + 8 * k));
                        *v = _mm256_mul_ps(H::round(*v, high), wk);
                    }
                }
                if B {
                    for (k, v) in v.iter_mut().enumerate() {
                        let bk = _mm256_loadu_ps(b.as_ptr().add(at + 8 * k));
                        *v = _mm256_add_ps(H::round(*v, high), bk);
                    }
                }
            }
        };
        let fetch_ahead = |s: usize| {
            if s.is_multiple_of(H::STEPS_PER_LINE) {
                // SAFETY: s < steps (both uses below), so s * STEP < row.len(): both offsets
                // stay inside the `row.len()` elements the pointers start (this function's
                // contract). A prefetch itself never faults.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(prefetch.add(s * STEP).cast());
                    _mm_prefetch::<_MM_HINT_T0>(out_prefetch.add(s * STEP).cast());
                }
            }
        };
        let steps = row.len() / STEP;
        let (p, o) = (row.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 2 <= steps {
            fetch_ahead(i);
            fetch_ahead(i + 1);
            // SAFETY: (i + 2) * STEP <= steps * STEP <= row.len() <= out.len() (the loop
            // condition and this function's contract): steps i and i + 1 lie inside `row`
            // and inside `out`, which is borrowed mutably; the CPU features are this
            // function's contract.
            unsafe {
                let (a0, b0) = H::split(p.add(i * STEP), high);
                let (a1, b1) = H::split(p.add((i + 1) * STEP), high);
                let mut v = [a0, b0, a1, b1];
                stages(&mut v, i * STEP);
                H::narrow_store::<false>(v[0], v[1], o.add(i * STEP));
                H::narrow_store::<false>(v[2], v[3], o.add((i + 1) * STEP));
            }
            i += 2;
        }
        if i < steps {
            fetch_ahead(i);
            // SAFETY: i < steps: step i lies inside `row` and `out`, as above.
            unsafe {
                let (first, second) = H::split(p.add(i * STEP), high);
                let mut v = [first, second];
                stages(&mut v, i * STEP);
                H::narrow_store::<false>(v[0], v[1], o.add(i * STEP));
            }
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
                v = H::round_scalar(v) * w[j];
            }
            if B {
                v = H::round_scalar(v) + b[j];
            }
            out[j] = H::narrow_scalar(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Affine, NormFloat, RowIndex};
    use super::*;
    use crate::{Array, DType, Device};

    /// A deterministic stream of test values.
    struct Values(u64);

    impl Values {
        fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        /// Mostly ordinary values in [-4, 4), one in two drawn from `special` (zeros,
        /// subnormals, values near the top of the range, infinities, NaNs), with a random
        /// sign.
        fn element<T: NormFloat + Format>(&mut self, special: &[u16]) -> T {
            let r = self.next_u32();
            let i = r as usize % (2 * special.len());
            if i >= special.len() {
                return T::from_f32((r >> 4) as f32 / (1u32 << 27) as f32 * 8.0 - 4.0);
            }
            <T as Format>::from_bits(special[i] ^ ((r >> 20) as u16 & 0x8000))
        }
        /// A statistic: NaN, 0, infinity, 1.5, or ordinary; products with 16-bit values
        /// often tie at 16-bit precision.
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

    /// Special bit patterns of each format: zero, smallest and largest subnormals, largest
    /// finite values, infinity, quiet and signalling NaNs.
    const BF16_SPECIAL: [u16; 10] = [
        0x0000, 0x0001, 0x0055, 0x007F, 0x7F7F, 0x7F7E, 0x7F80, 0x7FC0, 0x7F81, 0x0080,
    ];
    const F16_SPECIAL: [u16; 10] = [
        0x0000, 0x0001, 0x0155, 0x03FF, 0x7BFF, 0x7BFE, 0x7C00, 0x7E00, 0x7C01, 0x0400,
    ];

    fn output_pass_matches<T: NormFloat<C = f32> + Format>(dtype: DType, special: &[u16]) {
        if !Kernel::<T>::supported() {
            eprintln!("this CPU cannot run the {dtype} kernel: it is never used");
            return;
        }
        let mut values = Values(0x9E37_79B9_7F4A_7C15);
        for d in [1, 7, 15, 16, 17, 31, 32, 33, 48, 128, 131, 1000] {
            let x = Array::zeros(&[2, d], dtype, &Device::Cpu).unwrap();
            let row: Vec<T> = (0..d).map(|_| values.element(special)).collect();
            let next: Vec<T> = (0..d).map(|_| values.element(special)).collect();
            let w: Vec<f32> = (0..d)
                .map(|_| values.element::<T>(special).widen())
                .collect();
            let b: Vec<f32> = (0..d)
                .map(|_| values.element::<T>(special).widen())
                .collect();
            for kind in [NormKind::Rms, NormKind::Layer] {
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
                    let k = Kernel::<T>::new(&job).unwrap();
                    for _ in 0..8 {
                        let mean = if kind == NormKind::Layer {
                            values.stat()
                        } else {
                            0.0
                        };
                        let stats = RowStats {
                            mean,
                            inv: values.stat(),
                        };
                        let mut want = crate::array::host_pool::take_or_zeroed::<T>(d).unwrap();
                        let mut staging = vec![0.0f32; d];
                        T::write_row(&row, T::widen, stats, affine, &mut staging, &mut want);
                        let mut got = crate::array::host_pool::take_or_zeroed::<T>(d).unwrap();
                        let p = next.as_ptr();
                        // SAFETY: `Kernel::new` succeeded, so the CPU can run the kernel;
                        // `row`, `got`, `next` (both prefetch pointers), the weight and the
                        // bias all hold `d` elements.
                        unsafe {
                            by_flags!(
                                (kind == NormKind::Layer, use_w, use_b),
                                k.write_row(&row, stats, p, p, &mut got)
                            )
                        }
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            let (g, e) = (g.widen(), e.widen());
                            // Which NaN operand x86 propagates depends on operand order,
                            // which the compiler may swap: any NaN is right.
                            if e.is_nan() {
                                assert!(g.is_nan(), "{dtype} {kind:?} d {d} element {i}: {g}");
                                continue;
                            }
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{dtype} {kind:?} w {use_w} b {use_b} d {d} element {i}: \
                                 x {} mean {} inv {}",
                                row[i].widen(),
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
    fn bf16_output_pass_matches_the_portable_loop_bit_for_bit() {
        output_pass_matches::<bf16>(DType::BF16, &BF16_SPECIAL);
    }

    #[test]
    fn f16_output_pass_matches_the_portable_loop_bit_for_bit() {
        output_pass_matches::<f16>(DType::F16, &F16_SPECIAL);
    }

    fn statistics_match_f64<T: NormFloat<C = f32> + Format>(dtype: DType) {
        if !Kernel::<T>::supported() {
            eprintln!("this CPU cannot run the {dtype} kernel: it is never used");
            return;
        }
        let mut values = Values(7);
        for d in [1, 15, 16, 17, 33, 64, 100, 4099] {
            // Finite values around 10, so that the mean matters for the variance.
            let row: Vec<T> = (0..d)
                .map(|_| T::from_f32((values.next_u32() >> 8) as f32 / 1e6 + 10.0))
                .collect();
            let x = Array::from_slice(&row, &[1, d]).unwrap();
            for kind in [NormKind::Rms, NormKind::Layer] {
                let job = Job {
                    kind,
                    rows: RowIndex::new(&x),
                    d,
                    eps: 1e-5,
                    inv_d: 1.0 / d as f32,
                    affine: Affine { w: None, b: None },
                };
                let k = Kernel::<T>::new(&job).unwrap();
                // SAFETY: `Kernel::new` succeeded, so the CPU can run the kernel.
                let got = unsafe {
                    match kind {
                        NormKind::Rms => k.row_stats::<false>(&row),
                        NormKind::Layer => k.row_stats::<true>(&row),
                    }
                };
                let xs: Vec<f64> = row.iter().map(|v| f64::from(v.widen())).collect();
                let mean = xs.iter().sum::<f64>() / d as f64;
                let (mean, var) = match kind {
                    NormKind::Rms => (0.0, xs.iter().map(|x| x * x).sum::<f64>() / d as f64),
                    NormKind::Layer => (
                        mean,
                        xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / d as f64,
                    ),
                };
                let inv = 1.0 / (var + 1e-5).sqrt();
                assert!(
                    (f64::from(got.mean) - mean).abs() <= 1e-5 * mean.abs().max(1.0),
                    "{dtype} {kind:?} d {d}: mean {} vs {mean}",
                    got.mean
                );
                assert!(
                    (f64::from(got.inv) - inv).abs() <= 1e-4 * inv,
                    "{dtype} {kind:?} d {d}: inv {} vs {inv}",
                    got.inv
                );
            }
        }
    }

    /// The grouped loop for short rows and the one-row-ahead loop give the same bits, for
    /// row counts around the group size, chunks that start mid-array, and rows that do not
    /// step evenly through memory.
    fn row_loops_agree<T: NormFloat<C = f32> + Format>(dtype: DType) {
        if !Kernel::<T>::supported() {
            eprintln!("this CPU cannot run the {dtype} kernel: it is never used");
            return;
        }
        for d in [16, 40, 128, 1000] {
            // [3, 6, d + 8] viewed as [3, 3, d]: every other row, and a jump between the
            // leading blocks that is not twice the row step.
            let base = Array::randn(&[3, 6, d + 8], dtype, d as u64, &Device::Cpu).unwrap();
            let strided = base
                .slice(&[0, 0, 0], &[3, 6, d as isize], &[1, 2, 1])
                .unwrap();
            let contiguous = Array::randn(&[9, d], dtype, 7, &Device::Cpu).unwrap();
            let w = Array::randn(&[d], DType::F32, 3, &Device::Cpu).unwrap();
            let b = Array::randn(&[d], DType::F32, 4, &Device::Cpu).unwrap();
            let (w, b) = (w.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
            for x in [&contiguous, &strided] {
                let n_rows = x.size() / d;
                let buf = x.cpu_buffer::<T>().unwrap();
                for kind in [NormKind::Rms, NormKind::Layer] {
                    let job = Job {
                        kind,
                        rows: RowIndex::new(x),
                        d,
                        eps: 1e-5,
                        inv_d: 1.0 / d as f32,
                        affine: Affine {
                            w: Some(&w[..]),
                            b: Some(&b[..]).filter(|_| kind == NormKind::Layer),
                        },
                    };
                    let k = Kernel::<T>::new(&job).unwrap();
                    for first in [0, 1, 4] {
                        for rows in 1..=n_rows - first {
                            let mut ahead =
                                crate::array::host_pool::take_or_zeroed::<T>(rows * d).unwrap();
                            let mut grouped =
                                crate::array::host_pool::take_or_zeroed::<T>(rows * d).unwrap();
                            // SAFETY: `Kernel::new` succeeded, so the CPU can run the kernel.
                            unsafe {
                                if kind == NormKind::Layer {
                                    k.rows_ahead::<true, true, true>(buf, first, &mut ahead);
                                    k.rows_grouped::<true, true, true>(buf, first, &mut grouped);
                                } else {
                                    k.rows_ahead::<false, true, false>(buf, first, &mut ahead);
                                    k.rows_grouped::<false, true, false>(buf, first, &mut grouped);
                                }
                            }
                            for (i, (a, g)) in ahead.iter().zip(&grouped).enumerate() {
                                assert_eq!(
                                    a.widen().to_bits(),
                                    g.widen().to_bits(),
                                    "{dtype} {kind:?} d {d} first {first} rows {rows} \
                                     element {i}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_row_loops_agree() {
        row_loops_agree::<bf16>(DType::BF16);
    }

    #[test]
    fn f16_row_loops_agree() {
        row_loops_agree::<f16>(DType::F16);
    }

    #[test]
    fn f32_output_pass_matches_the_portable_loop_bit_for_bit() {
        output_pass_matches::<f32>(DType::F32, &BF16_SPECIAL);
    }

    #[test]
    fn f32_statistics_match_f64() {
        statistics_match_f64::<f32>(DType::F32);
    }

    #[test]
    fn bf16_statistics_match_f64() {
        statistics_match_f64::<bf16>(DType::BF16);
    }

    #[test]
    fn f16_statistics_match_f64() {
        statistics_match_f64::<f16>(DType::F16);
    }
}
