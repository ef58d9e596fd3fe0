//! CPU helpers shared by the norm, rope, attention, merge and cross-entropy kernels:
//! instruction-set detection, f16 / bf16 conversions written so that loops over them
//! vectorise (`half` converts one element per call, and quiets NaNs with a branch),
//! [`Widen`], the one map from a storage dtype to the type its arithmetic runs in, and
//! [`View`], the strided `(B, H, T, D)` view the attention and merge kernels read through.

use crate::array::Array;
use crate::dtype::Element;
use crate::error::Result;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A floating storage dtype and its compute type `C` (f32 for f32, f16 and bf16; f64 for
/// f64), with the conversions every CPU kernel uses between them.
///
/// Contract: [`widen`](Widen::widen) is exact (every value of `Self` is a value of `C`; a NaN
/// stays a NaN, though a signalling one may stay signalling and its payload is not
/// preserved bit for bit, which no kernel observes since arithmetic quiets it);
/// [`narrow`](Widen::narrow) rounds to nearest even, overflowing to infinity, with a NaN
/// becoming a quiet NaN of the same sign: bit-identical to `half`'s `from_f32` for every
/// non-NaN value (and for bf16 for NaNs too). Both are branch-free for f16 and bf16, so
/// loops over them vectorise. For f32 and f64 both are the identity.
pub(crate) trait Widen: Element {
    /// The type the kernels compute in.
    type C: Copy + Send + Sync + PartialEq + 'static;

    /// `self` in the compute type, exactly.
    fn widen(self) -> Self::C;

    /// `c` rounded to this dtype (nearest even; see the trait's contract for NaN).
    fn narrow(c: Self::C) -> Self;

    /// Widens `src` into `dst` element by element, as [`widen`](Widen::widen) would (the
    /// same values; f16 may use the CPU's F16C conversion, which quiets signalling NaNs).
    ///
    /// # Panics
    /// When `src` and `dst` differ in length (f16's conversion checks it; callers pass equal
    /// lengths).
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [Self::C]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.widen();
        }
    }

    /// `buf` itself, seen as the compute type, when this dtype is its own compute type
    /// (f32, f64); `None` otherwise, when the caller must widen a copy.
    #[inline(always)]
    fn as_compute(buf: &[Self]) -> Option<&[Self::C]> {
        let _ = buf;
        None
    }
}

impl Widen for f32 {
    type C = f32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(c: f32) -> f32 {
        c
    }
    #[inline(always)]
    fn as_compute(buf: &[f32]) -> Option<&[f32]> {
        Some(buf)
    }
}

impl Widen for f64 {
    type C = f64;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(c: f64) -> f64 {
        c
    }
    #[inline(always)]
    fn as_compute(buf: &[f64]) -> Option<&[f64]> {
        Some(buf)
    }
}

impl Widen for bf16 {
    type C = f32;
    /// A shift ([`bf16_widen`]).
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_widen(self.to_bits())
    }
    /// [`bf16_bits_rne`]: the same bits as `bf16::from_f32` for every input, NaNs included.
    #[inline(always)]
    fn narrow(c: f32) -> bf16 {
        bf16::from_bits(bf16_bits_rne(c))
    }
}

impl Widen for f16 {
    type C = f32;
    /// [`f16_to_f32`] (branch-free; a NaN keeps its payload and is not quieted).
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    /// [`f32_to_f16`] (branch-free; every NaN becomes the quiet NaN `0x7E00` with its sign).
    #[inline(always)]
    fn narrow(c: f32) -> f16 {
        f16::from_bits(f32_to_f16(c))
    }
    /// `half`'s slice conversion, with F16C where the CPU has it (it quiets signalling NaNs,
    /// the only difference from [`widen`](Widen::widen)).
    #[inline(always)]
    fn widen_slice(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// A strided view `(B, H, T, D)` of a host buffer, read in place: element `[b, h, t, j]` is
/// `buf[offset + b * strides[0] + h * strides[1] + t * strides[2] + j * strides[3]]`. An
/// array of rank 3 is seen with `D` of stride 0.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    /// The whole host buffer.
    pub(crate) buf: &'a [T],
    /// Buffer position of element `[0, 0, 0, 0]`.
    pub(crate) offset: isize,
    /// Element strides of the four axes.
    pub(crate) strides: [isize; 4],
}

impl<'a, T: Element> View<'a, T> {
    /// The view of `a`, a host array of rank 3 or 4.
    ///
    /// # Errors
    /// When `a` is not a host array of `T`.
    ///
    /// # Panics
    /// When `a` has a rank above 4.
    pub(crate) fn new(a: &'a Array) -> Result<Self> {
        let s = a.strides();
        let mut strides = [0isize; 4];
        strides[..s.len()].copy_from_slice(s);
        Ok(View {
            buf: a.cpu_buffer::<T>()?,
            offset: a.offset() as isize,
            strides,
        })
    }
}

impl<'a, T: Copy> View<'a, T> {
    /// Buffer position of element `[b, h, t, 0]`.
    #[inline(always)]
    pub(crate) fn pos(&self, b: usize, h: usize, t: usize) -> isize {
        self.offset
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + t as isize * self.strides[2]
    }

    /// The `n` elements from buffer position `pos` as a slice, when they are unit-stride
    /// (`None` otherwise, and for `n = 0`).
    #[inline(always)]
    pub(crate) fn unit_row(&self, pos: isize, n: usize) -> Option<&'a [T]> {
        (n > 0 && (self.strides[3] == 1 || n == 1)).then(|| &self.buf[pos as usize..][..n])
    }

    /// The element at buffer position `pos`, feature `j` (`strides[3]` apart).
    #[inline(always)]
    pub(crate) fn at(&self, pos: isize, j: usize) -> T {
        self.buf[(pos + j as isize * self.strides[3]) as usize]
    }
}

/// Whether the CPU has AVX2 (the kernels' wide paths are compiled for it).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2, FMA and F16C (every AVX2 CPU has F16C; the kernels that convert
/// f16 in vector registers ask for it too).
pub(crate) fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 bits widened to f32, exact (a shift, which vectorises; signalling NaNs are not
/// quieted, arithmetic on them quiets them anyway).
#[inline(always)]
pub(crate) fn bf16_widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 -> bf16 bits, round to nearest even (as MLX's `bfloat16_t` and `half::bf16::from_f32`
/// do); NaN stays a quiet NaN. Both results are computed and one selected, with no
/// branch, so loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits_rne(v: f32) -> u16 {
    let bits = v.to_bits();
    // Wrapping: NaNs with a set sign overflow here, and take the other result.
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if v.is_nan() { quiet_nan } else { rounded }) as u16
}

/// [`bf16_bits_rne`] without the NaN test, for the row loops (three fewer vector ops per
/// rounding). Exact for every value except a NaN with some of its low 16 bits set, which
/// never reaches it: row elements are bf16 values (low bits zero) or results of arithmetic
/// on them, the weight and bias are bf16 values, the row statistics are canonicalised, and
/// arithmetic yields either a (quieted) input NaN or the default NaN. Adding the rounding
/// increment to such a NaN carries nothing into the upper half, so it stays that NaN.
#[inline(always)]
pub(crate) fn bf16_bits_rne_unchecked(v: f32) -> u16 {
    let bits = v.to_bits();
    (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to bf16 precision (nearest even), kept as f32: the reference the tests hold
/// [`bf16_round_unchecked`] to (the kernels round through [`Widen::narrow`] or the unchecked
/// form).
#[cfg(test)]
#[inline(always)]
pub(crate) fn bf16_round(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits_rne(v)) << 16)
}

/// [`bf16_round`] under the NaN precondition of [`bf16_bits_rne_unchecked`].
#[inline(always)]
pub(crate) fn bf16_round_unchecked(v: f32) -> f32 {
    let bits = v.to_bits();
    f32::from_bits(bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000)
}

/// IEEE half bits to f32, exact, without branches (`half` converts one element per call,
/// which keeps the rotation loop scalar). NaN stays NaN (its payload is not canonicalised).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7FFF;
    // Shifting puts the exponent and mantissa in f32 position; multiplying by 2^112 rebiases
    // the exponent (15 -> 127) and normalises subnormals exactly.
    let scaled = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let bits = if magnitude >= 0x7C00 {
        scaled | 0x7F80_0000
    } else {
        scaled
    };
    f32::from_bits(bits | sign)
}

/// f32 to IEEE half bits, rounding to nearest even, without branches: the same results as
/// `f16::from_f32` (overflow to infinity, gradual underflow; NaN becomes a quiet NaN).
#[inline(always)]
pub(crate) fn f32_to_f16(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7FFF_FFFF;
    // |v| >= 65536 (or inf/NaN); 65520..65536 round up to infinity in the normal path.
    let huge = if a > 0x7F80_0000 { 0x7E00 } else { 0x7C00 };
    // Results below 2^-14 are subnormal: adding 0.5 makes the FPU round at 2^-24, the
    // subnormal step, and the low mantissa bits are then the half's bits.
    let half_bits = 0x3F00_0000u32;
    let subnormal = (f32::from_bits(a) + f32::from_bits(half_bits)).to_bits() - half_bits;
    // Normal results: rebias the exponent (127 -> 15), round to nearest even at bit 13.
    let odd = (a >> 13) & 1;
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0xFFF + odd) >> 13;
    let h = if a >= 0x4780_0000 {
        huge
    } else if a < 0x3880_0000 {
        subnormal
    } else {
        normal
    };
    (h | sign) as u16
}

/// Prefetches the cache lines of `bytes` bytes from `p` into L1 (`p` may point anywhere:
/// a prefetch does not fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut off = 0;
    while off < bytes {
        // SAFETY: `prefetch` is SSE, which every x86-64 CPU has; it never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
        off += 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // Ties at 1.0: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(bf16_round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(bf16_round(-(1.0 + 2f32.powi(-8))), -1.0);
        assert_eq!(bf16_round(f32::MAX), f32::INFINITY);
        assert_eq!(bf16_round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(bf16_round(f32::NAN).is_nan());
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..100_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = f32::from_bits((state >> 32) as u32);
            if v.is_nan() {
                continue;
            }
            assert_eq!(bf16_bits_rne(v), bf16::from_f32(v).to_bits(), "{v:e}");
            assert_eq!(bf16_round_unchecked(v).to_bits(), bf16_round(v).to_bits());
            assert_eq!(bf16_bits_rne_unchecked(v), bf16_bits_rne(v));
        }
    }

    #[test]
    fn unchecked_bf16_rounding_keeps_bf16_nans() {
        // Every NaN a bf16 row can produce has its low 16 bits clear.
        for bits in [
            0x7FC0_0000u32,
            0xFFC0_0000,
            0x7FFF_0000,
            0xFFFF_0000,
            0x7F81_0000,
        ] {
            let v = f32::from_bits(bits);
            assert_eq!(bf16_round_unchecked(v).to_bits(), bits);
            assert_eq!(u32::from(bf16_bits_rne_unchecked(v)) << 16, bits);
        }
        assert!(bf16_round(f32::from_bits(0x7F80_0001)).is_nan());
        assert!(bf16_round(f32::from_bits(0xFFFF_FFFF)).is_nan());
    }

    #[test]
    fn f16_conversions_match_half() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            1e-8,
            2.98e-8,
            2.99e-8,
            6.1e-5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        // Every f16 value and the midpoints between neighbours (the ties).
        for h in 0..0x7C00u16 {
            let (a, b) = (f16_to_f32(h), f16_to_f32(h + 1));
            values.extend([a, -a, (a + b) / 2.0, -(a + b) / 2.0]);
        }
        values.extend((0..u32::MAX / 7919).map(|i| f32::from_bits(i * 7919)));
        for v in values {
            let want = f16::from_f32(v);
            let got = f32_to_f16(v);
            if v.is_nan() {
                assert!(f16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{v:e}");
            }
        }
    }

    /// [`Widen`] for f16 and bf16: the slice widening agrees with the element one, and every
    /// non-NaN value survives widening and narrowing unchanged (NaNs stay NaNs).
    #[test]
    fn widen_round_trips_and_slices_agree() {
        fn check<T: Widen<C = f32> + Copy>(all: &[T], bits: impl Fn(T) -> u16) {
            let mut wide = vec![0.0f32; all.len()];
            T::widen_slice(all, &mut wide);
            for (&h, &w) in all.iter().zip(&wide) {
                let one = h.widen();
                if one.is_nan() {
                    assert!(w.is_nan() && T::narrow(one).widen().is_nan());
                } else {
                    assert_eq!(w.to_bits(), one.to_bits(), "{:#06x}", bits(h));
                    assert_eq!(bits(T::narrow(one)), bits(h));
                }
            }
        }
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        check(&halves, f16::to_bits);
        let brains: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        check(&brains, bf16::to_bits);
        assert_eq!(f32::as_compute(&[1.0f32]), Some(&[1.0f32][..]));
        assert_eq!(bf16::as_compute(&[bf16::ONE]), None);
    }

    #[test]
    fn bf16_widening_is_exact() {
        for h in 0..=u16::MAX {
            let want = bf16::from_bits(h).to_f32();
            let got = bf16_widen(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }
}
