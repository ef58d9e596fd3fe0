//! The row passes in AVX-512 (F + BW + VL) intrinsics, 32 logits a step (two vectors of 16
//! f32): the same arithmetic as [`super::avx2`] in vectors twice as wide, with twice the
//! registers (four exponentials in flight without spills).
//!
//! - **exp of the gradient passes.** As in [`super::avx2`]: `d = max(x - m, -127 ln 2)`;
//!   adding [`MAGIC`] to `d log2 e` rounds it to the nearest integer `n` and leaves `n + 127`
//!   in the sum's low mantissa bits, so `2^n` is the sum's bits shifted left by 23 (0 for
//!   `n = -127`); `f = d log2 e - n` and [`EXP2_POLY`] in six FMAs give `2^f`. The same
//!   operations in the same order as the AVX2 kernel, so both store the same bits for each
//!   exponential.
//! - **exp of the forward's sum** ([`pow2_16`]; no exponential is stored, so the bits are
//!   free): fewer operations per logit, since the forward does little else. `t = x log2 e -
//!   m log2 e` in one FMA (the rounding of `m log2 e` is a common factor of every term,
//!   taken out of the block's sum once); `vrndscaleps` rounds `t` to the nearest integer
//!   `n`, `f = t - n`, [`SUM_POLY`] (degree 5) gives `2^f` in five FMAs and `vscalefps`
//!   multiplies by `2^n`, underflowing gradually to 0 without a clamp (and `t = -inf` gives
//!   exactly 0 by `vscalefps`'s special cases; NaN stays NaN). Six FMAs and four other
//!   operations per 16 logits with the running sum, against eight and seven. The forward
//!   also takes each block in one pass, its maximum beside the sum (see [`scan`]).
//! - **bf16 in registers.** A 32-bit lane holding two bf16 values is the odd one as f32 once
//!   its low half is masked off and the even one once shifted left by 16: the passes work on
//!   the even and odd elements of each 32 as two vectors (the stored exponentials keep that
//!   order, which the second pass undoes), and narrowing rounds both to nearest even in
//!   32-bit lanes and merges them with one masked 16-bit blend (AVX-512 BW). The BF16
//!   extension's conversions are not used: `vcvtne2ps2bf16` flushes subnormals to zero and
//!   packs the two vectors one after the other, not interleaved.
//! - **f16** through AVX-512 F's `vcvtph2ps` / `vcvtps2ph` (round to nearest even).
//! - **Memory.** In the gradient passes each block's maximum is taken before its
//!   exponentials (the block in L1), with four independent maxima; the forward takes the
//!   block once, its maximum beside the sum. The exponential loops prefetch the next block
//!   (the next row after the last) and keep four independent sums. The second pass writes a new
//!   buffer with 16-byte streaming stores (where the row starts on a 16-byte boundary: large
//!   allocations are 16-byte, not 64-byte, aligned), so the output's lines are never read.
//!
//! Every function here is compiled with AVX-512 F, BW and VL (and AVX2, FMA and F16C, which
//! every such CPU has); the entry points ([`scan`], [`block_write`]) are safe
//! `#[target_feature]` functions, which callers without those features call in `unsafe`
//! after detecting them ([`detected`]).

use super::{blocks, exp_f32, exp_nonpositive, Logit, Scan, Scratch, EXP2_POLY};
use crate::cpu::simd::prefetch;
use half::{bf16, f16};
use std::arch::x86_64::*;
use std::f32::consts::{LN_2, LOG2_E};
use std::mem::MaybeUninit;

/// `1.5 * 2^23 + 127`: adding it to a value in `[-2^22, 2^22]` rounds the value to an
/// integer `n` and leaves `n + 127` in the low 23 bits.
const MAGIC: f32 = 12_583_039.0;
/// `-127 ln 2`, rounded up: exponents below it are clamped to `n = -127` (result 0).
const LOW: f32 = -88.029_69;
/// `vrndscaleps` immediate: round to the nearest integer (ties to even), no precision
/// exception.
const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// `2^f` for `|f| <= 1/2`, highest degree first: the minimax polynomial of degree 5 for
/// relative error with the constant term 1 (9.2e-8 in exact arithmetic, 1.7e-7 evaluated
/// in f32 with fused multiply-adds: under 1.5 ulp). Used only for the forward's sum, where
/// a term's relative error is at most the loss's absolute error.
// The degree-1 coefficient is the minimax one (0.693147004, 3 ulps below ln 2), not ln 2.
#[allow(clippy::approx_constant)]
pub(super) const SUM_POLY: [f32; 6] = [
    1.326_470_9e-3,
    9.671_511e-3,
    5.550_734e-2,
    2.402_224_2e-1,
    6.931_47e-1,
    1.0,
];

/// Whether this CPU runs the kernels of this module: AVX-512 F, BW and VL, plus AVX2, FMA
/// and F16C. (Valgrind reports no AVX-512 through CPUID, so under it this is false and the
/// AVX2 kernels run.)
pub(super) fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// An element type the passes load and store 32 at a time.
pub(in crate::cpu) trait Lanes: Logit {
    /// 32 elements from `p`, widened to f32, as two vectors in the type's step order
    /// (elements 0-15 and 16-31; bf16: the even elements, then the odd ones).
    ///
    /// # Safety
    /// The CPU supports AVX-512 F, BW and VL, AVX2, FMA and F16C; `p` is valid for reads of
    /// 32 elements.
    unsafe fn load32(p: *const Self) -> (__m512, __m512);

    /// Narrows two vectors in [`Lanes::load32`]'s order (finite values or infinities) and
    /// stores them as 32 elements at `p`.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F, BW and VL, AVX2, FMA and F16C; `p` is valid for writes
    /// of 32 elements.
    unsafe fn store32(p: *mut Self, a: __m512, b: __m512);

    /// [`Lanes::store32`] with 16-byte non-temporal stores (the caller fences them).
    ///
    /// # Safety
    /// As [`Lanes::store32`], and `p` is 16-byte aligned.
    unsafe fn stream32(p: *mut Self, a: __m512, b: __m512);
}

/// Streams the 64 bytes of `v` to `p` as four 16-byte non-temporal stores.
///
/// # Safety
/// The CPU supports AVX-512 F; `p` is 16-byte aligned and valid for writes of 64 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn stream64(p: *mut u8, v: __m512i) {
    // SAFETY: `p` is 16-byte aligned and valid for writes of 64 bytes (the caller's
    // obligation): four aligned 16-byte stores at `p`, `p + 16`, `p + 32`, `p + 48`.
    unsafe {
        _mm_stream_si128(p.cast(), _mm512_castsi512_si128(v));
        _mm_stream_si128(p.add(16).cast(), _mm512_extracti32x4_epi32::<1>(v));
        _mm_stream_si128(p.add(32).cast(), _mm512_extracti32x4_epi32::<2>(v));
        _mm_stream_si128(p.add(48).cast(), _mm512_extracti32x4_epi32::<3>(v));
    }
}

impl Lanes for f32 {
    /// # Safety
    /// As [`Lanes::load32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load32(p: *const f32) -> (__m512, __m512) {
        // SAFETY: `p` is valid for reads of 32 f32 (the caller's obligation): 0-15, 16-31.
        unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) }
    }

    /// # Safety
    /// As [`Lanes::store32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn store32(p: *mut f32, a: __m512, b: __m512) {
        // SAFETY: `p` is valid for writes of 32 f32 (the caller's obligation): 0-15, 16-31.
        unsafe {
            _mm512_storeu_ps(p, a);
            _mm512_storeu_ps(p.add(16), b);
        }
    }

    /// # Safety
    /// As [`Lanes::stream32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn stream32(p: *mut f32, a: __m512, b: __m512) {
        // SAFETY: `p` is 16-byte aligned and valid for writes of 32 f32 (the caller's
        // obligation): 64 bytes at `p` and 64 bytes at `p + 16` (16-byte aligned too).
        unsafe {
            stream64(p.cast(), _mm512_castps_si512(a));
            stream64(p.add(16).cast(), _mm512_castps_si512(b));
        }
    }
}

/// bf16 bits of each lane of `v`, rounded to nearest even, in the lane's high half (the low
/// half holds rounding debris). Exact for finite values and infinities.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn bf16_rne_high(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)))
}

/// The 32 bf16 of two vectors in bf16's step order (even elements, odd elements).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn bf16_pack(even: __m512, odd: __m512) -> __m512i {
    let even = _mm512_srli_epi32::<16>(bf16_rne_high(even));
    _mm512_mask_blend_epi16(0xAAAA_AAAA, even, bf16_rne_high(odd))
}

impl Lanes for bf16 {
    /// # Safety
    /// As [`Lanes::load32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load32(p: *const bf16) -> (__m512, __m512) {
        // SAFETY: `p` is valid for reads of 32 bf16 (the caller's obligation): 64 bytes.
        let v = unsafe { _mm512_loadu_si512(p.cast()) };
        let even = _mm512_slli_epi32::<16>(v);
        let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }

    /// # Safety
    /// As [`Lanes::store32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn store32(p: *mut bf16, a: __m512, b: __m512) {
        let v = bf16_pack(a, b);
        // SAFETY: `p` is valid for writes of 32 bf16 (the caller's obligation): 64 bytes.
        unsafe { _mm512_storeu_si512(p.cast(), v) }
    }

    /// # Safety
    /// As [`Lanes::stream32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn stream32(p: *mut bf16, a: __m512, b: __m512) {
        let v = bf16_pack(a, b);
        // SAFETY: `p` is 16-byte aligned and valid for writes of 32 bf16 (the caller's
        // obligation): 64 bytes.
        unsafe { stream64(p.cast(), v) }
    }
}

/// Two vectors of 16 f32 narrowed to f16 (round to nearest even), 16 f16 each.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn f16_pack(a: __m512, b: __m512) -> (__m256i, __m256i) {
    (
        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a),
        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b),
    )
}

impl Lanes for f16 {
    /// # Safety
    /// As [`Lanes::load32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load32(p: *const f16) -> (__m512, __m512) {
        // SAFETY: `p` is valid for reads of 32 f16 (the caller's obligation): elements
        // 0-15 and 16-31, 32 bytes each.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(16).cast()),
            )
        };
        (_mm512_cvtph_ps(a), _mm512_cvtph_ps(b))
    }

    /// # Safety
    /// As [`Lanes::store32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn store32(p: *mut f16, a: __m512, b: __m512) {
        let (a, b) = f16_pack(a, b);
        // SAFETY: `p` is valid for writes of 32 f16 (the caller's obligation): elements
        // 0-15 and 16-31, 32 bytes each.
        unsafe {
            _mm256_storeu_si256(p.cast(), a);
            _mm256_storeu_si256(p.add(16).cast(), b);
        }
    }

    /// # Safety
    /// As [`Lanes::stream32`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn stream32(p: *mut f16, a: __m512, b: __m512) {
        let (a, b) = f16_pack(a, b);
        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
        // SAFETY: `p` is 16-byte aligned and valid for writes of 32 f16 (the caller's
        // obligation): 64 bytes.
        unsafe { stream64(p.cast(), v) }
    }
}

/// `exp(x - m)` of 16 lanes, each `x <= m` (see the module docs); `vm` holds `m`.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp16(x: __m512, vm: __m512) -> __m512 {
    let log2e = _mm512_set1_ps(LOG2_E);
    let magic = _mm512_set1_ps(MAGIC);
    // `max(LOW, d)` keeps a NaN `d` (the second operand is returned when one is NaN).
    let d = _mm512_max_ps(_mm512_set1_ps(LOW), _mm512_sub_ps(x, vm));
    let t = _mm512_mul_ps(d, log2e);
    let z = _mm512_add_ps(t, magic);
    let n = _mm512_sub_ps(z, magic);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    let two_n = _mm512_slli_epi32::<23>(_mm512_castps_si512(z));
    _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
}

/// `2^t` of 16 lanes for the forward's sum (see the module docs): relative error under
/// 1.7e-7 where the result is normal; gradual underflow to 0 below `t = -126` (exactly 0 by
/// `t = -150`); `2^-inf = 0`, `2^+inf = +inf`, NaN stays NaN. `t` at most about 127 (the
/// callers' `t` are at most a few units above 0).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn pow2_16(t: __m512) -> __m512 {
    // `n + f = t` exactly for finite `t` (`n` rounded to nearest even; `vsubps` rather than
    // AVX-512 DQ's `vreduceps`, which takes two issue slots on Zen).
    let n = _mm512_roundscale_ps::<NEAREST>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(SUM_POLY[0]);
    for &c in &SUM_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    // `p 2^floor(n)`, `n` an integer. For an infinite `t`, `n = t` and `f` and `p` are the
    // default quiet NaN: `vscalefps` returns +0 for (QNaN, -inf) and +inf for (QNaN, +inf)
    // (its special cases in the Intel SDM and AMD's APM), so `-inf` logits add exactly 0.
    _mm512_scalef_ps(p, n)
}

/// A block's maximum (NaNs ignored), whether it holds a NaN, and with `SUM_X` its sum.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn block_max<T: Lanes, const SUM_X: bool>(x: &[T]) -> (f32, bool, f64) {
    let n = x.len();
    let p = x.as_ptr();
    let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut s = [_mm512_setzero_ps(); 4];
    let mut unordered: __mmask16 = 0;
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n = x.len() (loop condition): 32 elements from i and from
        // i + 32 lie inside `x`; the CPU features are this function's.
        let (a, b, c, d) = unsafe {
            let (a, b) = T::load32(p.add(i));
            let (c, d) = T::load32(p.add(i + 32));
            (a, b, c, d)
        };
        // `max(v, m)` is `m` where `v` is NaN: NaNs are ignored here and found below.
        m[0] = _mm512_max_ps(a, m[0]);
        m[1] = _mm512_max_ps(b, m[1]);
        m[2] = _mm512_max_ps(c, m[2]);
        m[3] = _mm512_max_ps(d, m[3]);
        unordered |=
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(c, d);
        if SUM_X {
            s[0] = _mm512_add_ps(s[0], a);
            s[1] = _mm512_add_ps(s[1], b);
            s[2] = _mm512_add_ps(s[2], c);
            s[3] = _mm512_add_ps(s[3], d);
        }
        i += 64;
    }
    if i + 32 <= n {
        // SAFETY: i + 32 <= n = x.len(): 32 elements from i lie inside `x`.
        let (a, b) = unsafe { T::load32(p.add(i)) };
        m[0] = _mm512_max_ps(a, m[0]);
        m[1] = _mm512_max_ps(b, m[1]);
        unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
        if SUM_X {
            s[0] = _mm512_add_ps(s[0], a);
            s[1] = _mm512_add_ps(s[1], b);
        }
        i += 32;
    }
    // No lane holds a NaN (they were skipped above), so the reduction's order is immaterial.
    let mut max = _mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_max_ps(m[0], m[1]),
        _mm512_max_ps(m[2], m[3]),
    ));
    let mut nan = unordered != 0;
    let mut sum_x = 0.0f64;
    if SUM_X {
        let s = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
        sum_x = f64::from(_mm512_reduce_add_ps(s));
    }
    for &e in &x[i..] {
        let v = e.widen();
        max = if v > max { v } else { max };
        nan |= v.is_nan();
        if SUM_X {
            sum_x += f64::from(v);
        }
    }
    (max, nan, sum_x)
}

/// `sum_j exp(x_j - m)` over a block (`m` at least every element), each term also stored
/// to `e` (in [`Lanes::load32`]'s order within each 32 counted from the block's start; the
/// last `len % 32` in order; `e` as long as `x`) with [`exp16`], the AVX2 kernel's bits.
/// Prefetches the elements `ahead` further on.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn block_exp<T: Lanes>(x: &[T], m: f32, e: &mut [f32], ahead: usize) -> f32 {
    let n = x.len();
    assert!(e.len() == n, "cross_entropy: exponentials row too short");
    let (p, q) = (x.as_ptr(), e.as_mut_ptr());
    let vm = _mm512_set1_ps(m);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        prefetch(
            p.wrapping_add(i + ahead).cast(),
            64 * std::mem::size_of::<T>(),
        );
        // SAFETY: i + 64 <= n = x.len() (loop condition): 32 elements from i and from
        // i + 32 lie inside `x`.
        let ((a, b), (c, d)) = unsafe { (T::load32(p.add(i)), T::load32(p.add(i + 32))) };
        let y = [exp16(a, vm), exp16(b, vm), exp16(c, vm), exp16(d, vm)];
        // SAFETY: e.len() = n (asserted above) and i + 64 <= n: 64 f32 from i lie inside `e`.
        unsafe {
            for (u, &y) in y.iter().enumerate() {
                _mm512_storeu_ps(q.add(i + 16 * u), y);
            }
        }
        for (acc, y) in acc.iter_mut().zip(y) {
            *acc = _mm512_add_ps(*acc, y);
        }
        i += 64;
    }
    if i + 32 <= n {
        // SAFETY: i + 32 <= n = x.len(): 32 elements from i lie inside `x`.
        let (a, b) = unsafe { T::load32(p.add(i)) };
        let y = [exp16(a, vm), exp16(b, vm)];
        // SAFETY: e.len() = n and i + 32 <= n: 32 f32 from i lie inside `e`.
        unsafe {
            _mm512_storeu_ps(q.add(i), y[0]);
            _mm512_storeu_ps(q.add(i + 16), y[1]);
        }
        acc[0] = _mm512_add_ps(acc[0], y[0]);
        acc[1] = _mm512_add_ps(acc[1], y[1]);
        i += 32;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        let y = exp_nonpositive(x[j].widen() - m);
        e[j] = y;
        sum += y;
    }
    sum
}

/// Below this `|m|` the forward's sum takes `t = x log2 e - h` in one FMA (`h` the f32
/// rounding of `m log2 e`, off by at most 2^-7 there, so the terms near the maximum keep
/// their accuracy); above it, `t = (x - m) log2 e` in two operations.
const FMA_MAX_BELOW: f32 = 65_536.0;

/// How far a block's maximum may rise above the maximum `b` its terms were taken against in
/// the forward's one pass ([`block_fused`]) before the block is taken again against its own
/// maximum. A term's `t` is rounded to f32, so its relative error grows with `|x - b|` (by
/// `|x - b| 2^-24` at most): the largest terms, those that count, keep 2.4e-7 at most.
const RISE: f32 = 4.0;

/// One pass over a block for the forward, which stores no term: the sum of
/// `exp(x_j - b)` (`b` finite; `x_j` may exceed it), the block's maximum (NaNs ignored)
/// and, with `SUM_X`, its sum. The terms are [`pow2_16`] of `t = x log2 e - h` (`h` the f32
/// rounding of `b log2 e`: every term is off by the common factor `2^(b log2 e - h)`, taken
/// out of the sum once) where `|b|` is below [`FMA_MAX_BELOW`], of `t = (x - b) log2 e`
/// elsewhere. A NaN gives a NaN sum, `+inf` an infinite or NaN sum, `-inf` a term 0.
/// Prefetches the elements `ahead` further on.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn block_fused<T: Lanes, const SUM_X: bool>(x: &[T], b: f32, ahead: usize) -> (f32, f32, f64) {
    let log2e = _mm512_set1_ps(LOG2_E);
    if b.abs() < FMA_MAX_BELOW {
        let h = b * LOG2_E;
        // b log2 e - h exactly (the error of a product is representable).
        let h_lo = b.mul_add(LOG2_E, -h);
        let neg_h = _mm512_set1_ps(-h);
        let r = block_terms::<T, SUM_X>(x, b, ahead, |v| pow2_16(_mm512_fmadd_ps(v, log2e, neg_h)));
        (r.vector * exp_f32(-h_lo * LN_2) + r.tail, r.max, r.sum_x)
    } else {
        let vb = _mm512_set1_ps(b);
        let r = block_terms::<T, SUM_X>(x, b, ahead, |v| {
            pow2_16(_mm512_mul_ps(_mm512_sub_ps(v, vb), log2e))
        });
        (r.vector + r.tail, r.max, r.sum_x)
    }
}

/// What [`block_terms`] gathers over a block.
struct Terms {
    /// The sum of `term` over the 32-element steps.
    vector: f32,
    /// The sum of `exp(x_j - base)` over the last `len % 32` elements.
    tail: f32,
    /// The block's maximum, NaNs ignored.
    max: f32,
    /// With `SUM_X`, the block's sum.
    sum_x: f64,
}

/// [`Terms`] of a block: `term` of each 16 widened elements of the 32-element steps (four
/// independent sums; the elements `ahead` further on prefetched), `exp(x_j - base)` of the
/// rest.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn block_terms<T: Lanes, const SUM_X: bool>(
    x: &[T],
    base: f32,
    ahead: usize,
    term: impl Fn(__m512) -> __m512,
) -> Terms {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut sx = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        prefetch(
            p.wrapping_add(i + ahead).cast(),
            64 * std::mem::size_of::<T>(),
        );
        // SAFETY: i + 64 <= n = x.len() (loop condition): 32 elements from i and from
        // i + 32 lie inside `x`.
        let ((a, b), (c, d)) = unsafe { (T::load32(p.add(i)), T::load32(p.add(i + 32))) };
        for (k, v) in [a, b, c, d].into_iter().enumerate() {
            // `max(v, m)` is `m` where `v` is NaN (NaNs show in the sum instead).
            mx[k] = _mm512_max_ps(v, mx[k]);
            acc[k] = _mm512_add_ps(acc[k], term(v));
            if SUM_X {
                sx[k] = _mm512_add_ps(sx[k], v);
            }
        }
        i += 64;
    }
    if i + 32 <= n {
        // SAFETY: i + 32 <= n = x.len(): 32 elements from i lie inside `x`.
        let (a, b) = unsafe { T::load32(p.add(i)) };
        for (k, v) in [a, b].into_iter().enumerate() {
            mx[k] = _mm512_max_ps(v, mx[k]);
            acc[k] = _mm512_add_ps(acc[k], term(v));
            if SUM_X {
                sx[k] = _mm512_add_ps(sx[k], v);
            }
        }
        i += 32;
    }
    let sum4 = |v: [__m512; 4]| {
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(v[0], v[1]),
            _mm512_add_ps(v[2], v[3]),
        ))
    };
    let mut r = Terms {
        vector: sum4(acc),
        tail: 0.0,
        // No lane holds a NaN (they were skipped), so the reduction's order is immaterial.
        max: _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(mx[0], mx[1]),
            _mm512_max_ps(mx[2], mx[3]),
        )),
        sum_x: if SUM_X { f64::from(sum4(sx)) } else { 0.0 },
    };
    for &e in &x[i..] {
        let v = e.widen();
        r.max = if v > r.max { v } else { r.max };
        r.tail += exp_f32(v - base);
        if SUM_X {
            r.sum_x += f64::from(v);
        }
    }
    r
}

/// The first pass over a row (see [`super::scan`]). Without `store` (the forward), each
/// block is first taken in one pass ([`block_fused`]) against the running maximum (the
/// maximum of the block's first 32 elements for the first block), which is kept unless the
/// block holds a NaN or `+inf`, or its maximum rises more than [`RISE`] above it; otherwise,
/// and with `store`, the block's maximum is taken before its terms.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them (see [`detected`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn scan<T: Lanes>(x: &[T], want_sum_x: bool, mut store: Option<&mut Scratch>) -> Scan {
    let block_max = |block: &[T]| {
        if want_sum_x {
            block_max::<T, true>(block)
        } else {
            block_max::<T, false>(block)
        }
    };
    let block_fused = |block: &[T], b: f32, ahead: usize| {
        if want_sum_x {
            block_fused::<T, true>(block, b, ahead)
        } else {
            block_fused::<T, false>(block, b, ahead)
        }
    };
    let mut acc = Scan::start(x.len(), store.as_deref_mut());
    for r in blocks(x.len()) {
        let block = &x[r.clone()];
        let ahead = r.len();
        if store.is_none() {
            let b = if acc.max == f32::NEG_INFINITY {
                let head = &block[..block.len().min(32)];
                head.iter().fold(f32::NEG_INFINITY, |a, e| a.max(e.widen()))
            } else {
                acc.max
            };
            if b.is_finite() {
                let (bs, bm, bsx) = block_fused(block, b, ahead);
                // A finite sum: no NaN or +inf in the block (nor an overflow).
                if bs.is_finite() && bm - b <= RISE {
                    // `sum` was taken against `max`, which is `b` or -inf (then `sum` is 0).
                    acc.sum = if bm > b {
                        (acc.sum + bs) * exp_f32(b - bm)
                    } else {
                        acc.sum + bs
                    };
                    acc.max = b.max(bm);
                    acc.sum_x += bsx;
                    continue;
                }
            }
        }
        acc.add_block(block_max(block));
        acc.add_terms(
            store.as_deref_mut(),
            r,
            |m| block_fused(block, m, ahead).0,
            |m, e| block_exp(block, m, e, ahead),
        );
    }
    acc
}

/// `o_j = k e_j - c` over a block (`e` as long as `o`, in [`block_exp`]'s order): one
/// block of the second pass of a gradient (see [`super::write`]), with `STREAM` by
/// non-temporal stores (`o` must then start on a 16-byte boundary; the caller fences them).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX-512 F, BW and VL); from
/// anywhere else, the CPU must support them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn block_write<T: Lanes, const STREAM: bool>(
    e: &[f32],
    k: f32,
    c: f32,
    o: &mut [MaybeUninit<T>],
) {
    let n = o.len();
    assert!(
        e.len() == n && (!STREAM || (o.as_ptr() as usize).is_multiple_of(16)),
        "cross_entropy: misplaced gradient block"
    );
    let (q, p) = (e.as_ptr(), o.as_mut_ptr().cast::<T>());
    let (vk, vc) = (_mm512_set1_ps(k), _mm512_set1_ps(c));
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n = e.len() = o.len() (loop condition and the assert): 32
        // elements from i lie inside both. With STREAM, `o` starts 16-byte aligned
        // (asserted) and 32 elements are 64 or 128 bytes, so `p + i` is aligned too.
        unsafe {
            let a = _mm512_fmsub_ps(_mm512_loadu_ps(q.add(i)), vk, vc);
            let b = _mm512_fmsub_ps(_mm512_loadu_ps(q.add(i + 16)), vk, vc);
            if STREAM {
                T::stream32(p.add(i), a, b);
            } else {
                T::store32(p.add(i), a, b);
            }
        }
        i += 32;
    }
    for j in i..n {
        o[j].write(T::narrow(e[j] * k - c));
    }
}

/// [`pow2_16`] over `t` (its length a multiple of 16), for the tests.
///
/// # Safety
/// The CPU supports AVX-512 F, BW and VL, AVX2, FMA and F16C (see [`detected`]).
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn pow2_all(t: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; t.len()];
    for (o, c) in out.chunks_exact_mut(16).zip(t.chunks_exact(16)) {
        // SAFETY: `c` and `o` are 16 f32 each (`chunks_exact`).
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), pow2_16(_mm512_loadu_ps(c.as_ptr()))) };
    }
    out
}
