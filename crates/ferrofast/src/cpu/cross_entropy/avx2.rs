//! The row passes in AVX2 + FMA + F16C intrinsics, 16 logits a step (two vectors of 8 f32).
//!
//! - **exp.** `d = max(x - m, -127 ln 2)`; `z = d log2 e + (1.5 * 2^23 + 127)` in one FMA
//!   rounds `d log2 e` to the nearest integer `n` and leaves `n + 127` in `z`'s low mantissa
//!   bits, so `2^n` is `z`'s bits shifted left by 23 (0 for `n = -127`); `f = d log2 e - n`
//!   (a second FMA, exact up to its one rounding) and [`EXP2_POLY`] in six FMAs give `2^f`.
//!   Thirteen vector instructions per 8 values and no conversion.
//! - **bf16 in registers.** A 32-bit lane holding two bf16 values is the odd one as f32 once
//!   its low half is masked off and the even one once shifted left by 16: the passes work on
//!   the even and odd elements of each 16 as two vectors (the stored exponentials keep that
//!   order, which the second pass undoes), and narrowing rounds both to nearest even in
//!   32-bit lanes and merges them with one 16-bit blend.
//! - **f16** through F16C (`vcvtph2ps` / `vcvtps2ph`, round to nearest even).
//! - **Memory.** Each block's maximum is taken before its exponentials (the block in L1),
//!   with four independent maxima; the exponential loop prefetches the next block (the next
//!   row after the last) and keeps four independent sums. The second pass writes a new
//!   buffer with 16-byte streaming stores (where the row starts on a 16-byte boundary), so
//!   the output's lines are never read.
//!
//! Every function here is compiled with AVX2, FMA and F16C; the entry points ([`scan`],
//! [`block_write`]) are safe `#[target_feature]` functions, which callers without those
//! features call in `unsafe` after detecting them.

use super::{blocks, exp_nonpositive, Logit, Scan, Scratch, EXP2_POLY};
use crate::cpu::simd::prefetch;
use half::{bf16, f16};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// `1.5 * 2^23 + 127`: adding it to a value in `[-2^22, 2^22]` rounds the value to an
/// integer `n` and leaves `n + 127` in the low 23 bits.
const MAGIC: f32 = 12_583_039.0;
/// `-127 ln 2`, rounded up: exponents below it are clamped to `n = -127` (result 0).
const LOW: f32 = -88.029_69;

/// An element type the passes load and store 16 at a time.
pub(in crate::cpu) trait Lanes: Logit {
    /// 16 elements from `p`, widened to f32, as two vectors in the type's step order
    /// (elements 0-7 and 8-15; bf16: the even elements, then the odd ones).
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; `p` is valid for reads of 16 elements.
    unsafe fn load16(p: *const Self) -> (__m256, __m256);

    /// Narrows two vectors in [`Lanes::load16`]'s order (finite values or infinities) and
    /// stores them as 16 elements at `p`.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; `p` is valid for writes of 16 elements.
    unsafe fn store16(p: *mut Self, a: __m256, b: __m256);

    /// [`Lanes::store16`] with non-temporal stores (the caller fences them).
    ///
    /// # Safety
    /// As [`Lanes::store16`], and `p` is 16-byte aligned.
    unsafe fn stream16(p: *mut Self, a: __m256, b: __m256);
}

impl Lanes for f32 {
    /// # Safety
    /// As [`Lanes::load16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const f32) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of 16 f32 (the caller's obligation): 0-7, 8-15.
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }

    /// # Safety
    /// As [`Lanes::store16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store16(p: *mut f32, a: __m256, b: __m256) {
        // SAFETY: `p` is valid for writes of 16 f32 (the caller's obligation): 0-7, 8-15.
        unsafe {
            _mm256_storeu_ps(p, a);
            _mm256_storeu_ps(p.add(8), b);
        }
    }

    /// # Safety
    /// As [`Lanes::stream16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stream16(p: *mut f32, a: __m256, b: __m256) {
        // SAFETY: `p` is 16-byte aligned and valid for writes of 16 f32 (the caller's
        // obligation): four aligned stores of 4 f32 at `p`, `p + 4`, `p + 8`, `p + 12`.
        unsafe {
            _mm_stream_ps(p, _mm256_castps256_ps128(a));
            _mm_stream_ps(p.add(4), _mm256_extractf128_ps::<1>(a));
            _mm_stream_ps(p.add(8), _mm256_castps256_ps128(b));
            _mm_stream_ps(p.add(12), _mm256_extractf128_ps::<1>(b));
        }
    }
}

/// bf16 bits of each lane of `v`, rounded to nearest even, in the lane's high half (the low
/// half holds rounding debris). Exact for finite values and infinities.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_rne_high(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)))
}

/// The 16 bf16 of two vectors in bf16's step order (even elements, odd elements).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_pack(even: __m256, odd: __m256) -> __m256i {
    let even = _mm256_srli_epi32::<16>(bf16_rne_high(even));
    _mm256_blend_epi16::<0b1010_1010>(even, bf16_rne_high(odd))
}

impl Lanes for bf16 {
    /// # Safety
    /// As [`Lanes::load16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const bf16) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of 16 bf16 (the caller's obligation): 32 bytes.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        let even = _mm256_slli_epi32::<16>(v);
        let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    }

    /// # Safety
    /// As [`Lanes::store16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store16(p: *mut bf16, a: __m256, b: __m256) {
        let v = bf16_pack(a, b);
        // SAFETY: `p` is valid for writes of 16 bf16 (the caller's obligation): 32 bytes.
        unsafe { _mm256_storeu_si256(p.cast(), v) }
    }

    /// # Safety
    /// As [`Lanes::stream16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stream16(p: *mut bf16, a: __m256, b: __m256) {
        let v = bf16_pack(a, b);
        // SAFETY: `p` is 16-byte aligned and valid for writes of 16 bf16 (the caller's
        // obligation): two aligned 16-byte stores at `p` and `p + 8`.
        unsafe {
            _mm_stream_si128(p.cast(), _mm256_castsi256_si128(v));
            _mm_stream_si128(p.add(8).cast(), _mm256_extracti128_si256::<1>(v));
        }
    }
}

impl Lanes for f16 {
    /// # Safety
    /// As [`Lanes::load16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const f16) -> (__m256, __m256) {
        // SAFETY: `p` is valid for reads of 16 f16 (the caller's obligation): elements
        // 0-7 and 8-15, 16 bytes each.
        let (a, b) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())) };
        (_mm256_cvtph_ps(a), _mm256_cvtph_ps(b))
    }

    /// # Safety
    /// As [`Lanes::store16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store16(p: *mut f16, a: __m256, b: __m256) {
        let a = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a);
        let b = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b);
        // SAFETY: `p` is valid for writes of 16 f16 (the caller's obligation): elements
        // 0-7 and 8-15, 16 bytes each.
        unsafe {
            _mm_storeu_si128(p.cast(), a);
            _mm_storeu_si128(p.add(8).cast(), b);
        }
    }

    /// # Safety
    /// As [`Lanes::stream16`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stream16(p: *mut f16, a: __m256, b: __m256) {
        let a = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a);
        let b = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b);
        // SAFETY: `p` is 16-byte aligned and valid for writes of 16 f16 (the caller's
        // obligation): two aligned 16-byte stores at `p` and `p + 8`.
        unsafe {
            _mm_stream_si128(p.cast(), a);
            _mm_stream_si128(p.add(8).cast(), b);
        }
    }
}

/// The largest lane of `v`.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

/// The sum of the lanes of `v`.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `exp(x - m)` of 8 lanes, each `x <= m` (see the module docs); `vm` holds `m`.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp8(x: __m256, vm: __m256) -> __m256 {
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let magic = _mm256_set1_ps(MAGIC);
    // `max(LOW, d)` keeps a NaN `d`.
    let d = _mm256_max_ps(_mm256_set1_ps(LOW), _mm256_sub_ps(x, vm));
    let t = _mm256_mul_ps(d, log2e);
    let z = _mm256_add_ps(t, magic);
    let n = _mm256_sub_ps(z, magic);
    let f = _mm256_sub_ps(t, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    let two_n = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}

/// A block's maximum (NaNs ignored), whether it holds a NaN, and with `SUM_X` its sum.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
fn block_max<T: Lanes, const SUM_X: bool>(x: &[T]) -> (f32, bool, f64) {
    let n = x.len();
    let p = x.as_ptr();
    let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut s = [_mm256_setzero_ps(); 4];
    let mut unordered = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n = x.len() (loop condition): 16 elements from i and from
        // i + 16 lie inside `x`; the CPU features are this function's.
        let (a, b, c, d) = unsafe {
            let (a, b) = T::load16(p.add(i));
            let (c, d) = T::load16(p.add(i + 16));
            (a, b, c, d)
        };
        // `max(v, m)` is `m` where `v` is NaN: NaNs are ignored here and found below.
        m[0] = _mm256_max_ps(a, m[0]);
        m[1] = _mm256_max_ps(b, m[1]);
        m[2] = _mm256_max_ps(c, m[2]);
        m[3] = _mm256_max_ps(d, m[3]);
        let u = _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(c, d),
        );
        unordered = _mm256_or_ps(unordered, u);
        if SUM_X {
            s[0] = _mm256_add_ps(s[0], a);
            s[1] = _mm256_add_ps(s[1], b);
            s[2] = _mm256_add_ps(s[2], c);
            s[3] = _mm256_add_ps(s[3], d);
        }
        i += 32;
    }
    if i + 16 <= n {
        // SAFETY: i + 16 <= n = x.len(): 16 elements from i lie inside `x`.
        let (a, b) = unsafe { T::load16(p.add(i)) };
        m[0] = _mm256_max_ps(a, m[0]);
        m[1] = _mm256_max_ps(b, m[1]);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b));
        if SUM_X {
            s[0] = _mm256_add_ps(s[0], a);
            s[1] = _mm256_add_ps(s[1], b);
        }
        i += 16;
    }
    let mut max = hmax(_mm256_max_ps(
        _mm256_max_ps(m[0], m[1]),
        _mm256_max_ps(m[2], m[3]),
    ));
    let mut nan = _mm256_movemask_ps(unordered) != 0;
    let mut sum_x = 0.0f64;
    if SUM_X {
        let s = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
        sum_x = f64::from(hsum(s));
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

/// `sum_j exp(x_j - m)` over a block (`m` at least every element), with `STORE` each term
/// also stored to `e` (in [`Lanes::load16`]'s order within each 16; `e` as long as `x`).
/// Prefetches the elements `ahead` further on.
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
fn block_exp<T: Lanes, const STORE: bool>(x: &[T], m: f32, e: &mut [f32], ahead: usize) -> f32 {
    let n = x.len();
    assert!(
        !STORE || e.len() == n,
        "cross_entropy: exponentials row too short"
    );
    let (p, q) = (x.as_ptr(), e.as_mut_ptr());
    let vm = _mm256_set1_ps(m);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        prefetch(
            p.wrapping_add(i + ahead).cast(),
            32 * std::mem::size_of::<T>(),
        );
        // SAFETY: i + 32 <= n = x.len() (loop condition): 16 elements from i and from
        // i + 16 lie inside `x`.
        let ((a, b), (c, d)) = unsafe { (T::load16(p.add(i)), T::load16(p.add(i + 16))) };
        let y = [exp8(a, vm), exp8(b, vm), exp8(c, vm), exp8(d, vm)];
        if STORE {
            // SAFETY: with STORE, e.len() = n (asserted above) and i + 32 <= n: 32 f32 from
            // i lie inside `e`.
            unsafe {
                for (u, &y) in y.iter().enumerate() {
                    _mm256_storeu_ps(q.add(i + 8 * u), y);
                }
            }
        }
        for (acc, y) in acc.iter_mut().zip(y) {
            *acc = _mm256_add_ps(*acc, y);
        }
        i += 32;
    }
    if i + 16 <= n {
        // SAFETY: i + 16 <= n = x.len(): 16 elements from i lie inside `x`.
        let (a, b) = unsafe { T::load16(p.add(i)) };
        let y = [exp8(a, vm), exp8(b, vm)];
        if STORE {
            // SAFETY: with STORE, e.len() = n and i + 16 <= n: 16 f32 from i lie inside `e`.
            unsafe {
                _mm256_storeu_ps(q.add(i), y[0]);
                _mm256_storeu_ps(q.add(i + 8), y[1]);
            }
        }
        acc[0] = _mm256_add_ps(acc[0], y[0]);
        acc[1] = _mm256_add_ps(acc[1], y[1]);
        i += 16;
    }
    let mut sum = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        let y = exp_nonpositive(x[j].widen() - m);
        if STORE {
            e[j] = y;
        }
        sum += y;
    }
    sum
}

/// The first pass over a row (see [`super::scan`]).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn scan<T: Lanes>(x: &[T], want_sum_x: bool, mut store: Option<&mut Scratch>) -> Scan {
    let block_max = |block: &[T]| {
        if want_sum_x {
            block_max::<T, true>(block)
        } else {
            block_max::<T, false>(block)
        }
    };
    let mut acc = Scan::start(x.len(), store.as_deref_mut());
    for r in blocks(x.len()) {
        let block = &x[r.clone()];
        let ahead = r.len();
        acc.add_block(block_max(block));
        acc.add_terms(
            store.as_deref_mut(),
            r,
            |m| block_exp::<T, false>(block, m, &mut [], ahead),
            |m, e| block_exp::<T, true>(block, m, e, ahead),
        );
    }
    acc
}

/// `o_j = k e_j - c` over a block (`e` as long as `o`): one block of the second pass of a
/// gradient (see [`super::write`]), with `STREAM` by non-temporal stores (`o` must then
/// start on a 16-byte boundary; the caller fences them).
///
/// # Safety
/// Safe to call from this module's functions (compiled with AVX2, FMA and F16C); from
/// anywhere else, the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (vk, vc) = (_mm256_set1_ps(k), _mm256_set1_ps(c));
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n = e.len() = o.len() (loop condition and the assert): 16
        // elements from i lie inside both. With STREAM, `o` starts 16-byte aligned
        // (asserted) and 16 elements are 32 or 64 bytes, so `p + i` is aligned too.
        unsafe {
            let a = _mm256_fmsub_ps(_mm256_loadu_ps(q.add(i)), vk, vc);
            let b = _mm256_fmsub_ps(_mm256_loadu_ps(q.add(i + 8)), vk, vc);
            if STREAM {
                T::stream16(p.add(i), a, b);
            } else {
                T::store16(p.add(i), a, b);
            }
        }
        i += 16;
    }
    for j in i..n {
        o[j].write(T::narrow(e[j] * k - c));
    }
}
