//! CPU kernel for `scaled_dot_product_attention`: flash-style blocked attention.
//!
//! Work is split into tasks of (batch, kv head, chunk of queries[, key range]). A task
//! stacks the query rows of all `R = N_q / N_kv` query heads that share its kv head, so each
//! key/value tile it loads serves all of them. Per tile of keys it computes the scores
//! `S = Q K^T`, masks them, updates an online softmax (running max, running sum, rescaled
//! accumulator) and adds `P V` to the accumulator. Tasks of many rows (prefill) do both
//! products through `gemm`, one call per tile over every row the tile reaches (under a
//! causal mask, tiles above the diagonal are skipped and only rows crossing it are masked
//! element by element). Tasks of at most `SMALL_ROWS` rows (decoding, a few queries) use
//! register-blocked AVX2 dot products and axpys instead, and prefetch the next tile while
//! computing one, so that streaming K and V from memory overlaps the arithmetic.
//!
//! Nothing of size `T_q x T_kv` is ever allocated: per task there is a `Q` tile (scaled), an
//! accumulator, one score tile and, when the inputs are not of the compute type with unit
//! last stride, a key and a value tile widened to it. Strided inputs are read in place.
//!
//! When there are too few tasks for the threads (decoding with few kv heads), the keys are
//! split into ranges computed in parallel, each giving a partial (max, sum, accumulator),
//! and the partials are merged.
//!
//! Inputs of f16/bf16/f32 compute in f32 (softmax weights through a polynomial `exp` with
//! relative error below 2e-7); f64 inputs compute in f64 through the same code, with the
//! standard `exp`.

use super::simd::{has_avx2_fma, View, Widen};
use crate::array::{host_pool, Array};
use crate::dtype::{DType, Element, Float};
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaArgs;
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, Mul, Sub};

pub(crate) mod vjp;

/// `f::<N>(args)` for `N = n` in 1..=7, else `N = 8`: a row count known only at run time
/// picks the const-generic instantiation that keeps that many rows in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($n:expr, $($f:ident)::+($($arg:expr),*)) => {
        match $n {
            1 => $($f)::+::<1>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            4 => $($f)::+::<4>($($arg),*),
            5 => $($f)::+::<5>($($arg),*),
            6 => $($f)::+::<6>($($arg),*),
            7 => $($f)::+::<7>($($arg),*),
            _ => $($f)::+::<8>($($arg),*),
        }
    };
}

/// Query block: tasks cover whole blocks of one head's queries.
const BQ: usize = 64;
/// Most rows per `gemm` call (one call serves the rows of several query heads and blocks).
const MAX_TILE_ROWS: usize = 256;
/// Keys per tile (for tasks of `MAX_TILE_ROWS` rows or of at most `SMALL_ROWS` rows).
const BK: usize = 128;
/// Most keys per tile (tasks of few rows take longer tiles).
const MAX_BK: usize = 1024;
/// Query rows a task aims for: enough to amortise loading each key/value tile.
const TASK_ROWS: usize = 256;
/// Tasks with at most this many rows (decoding) use register-blocked dot products and
/// axpys instead of `gemm`.
const SMALL_ROWS: usize = 32;
/// Below this many multiply-adds a call runs on the calling thread (about 100 us of work).
const SEQUENTIAL_WORK: usize = 1 << 22;

/// The type scores, softmax and accumulator are computed in: f32, or f64 for f64 inputs.
///
/// The vector helpers take `const FMA: bool`. `FMA = true` is instantiated only inside
/// `Ctx::attend_avx2` (x86_64, entered after AVX2 and FMA were detected) and on aarch64
/// (which always has FMA); on x86_64 the f32 helpers then use AVX2 intrinsics.
trait Acc:
    Element
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Default
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    const NAN: Self;
    fn from_f32(x: f32) -> Self;
    fn is_nan(self) -> bool;
    fn exp(self) -> Self;
    /// `a * b + c`, fused when `FMA`.
    fn fma<const FMA: bool>(a: Self, b: Self, c: Self) -> Self;

    /// `sum(a[i] * b[i])`.
    #[inline(always)]
    fn dot<const FMA: bool>(a: &[Self], b: &[Self]) -> Self {
        let mut acc = [Self::ZERO; 4];
        let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
        let mut tail = Self::ZERO;
        for (&x, &y) in ac.remainder().iter().zip(bc.remainder()) {
            tail = Self::fma::<FMA>(x, y, tail);
        }
        for (x, y) in ac.zip(bc) {
            for l in 0..4 {
                acc[l] = Self::fma::<FMA>(x[l], y[l], acc[l]);
            }
        }
        (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
    }

    /// `y += a * x`.
    #[inline(always)]
    fn axpy<const FMA: bool>(y: &mut [Self], a: Self, x: &[Self]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = Self::fma::<FMA>(a, x, *y);
        }
    }

    /// `y *= a`.
    #[inline(always)]
    fn scale<const FMA: bool>(y: &mut [Self], a: Self) {
        for y in y.iter_mut() {
            *y = *y * a;
        }
    }

    /// The largest element, ignoring NaN; -inf for an empty or all-NaN slice.
    #[inline(always)]
    fn max_of<const FMA: bool>(xs: &[Self]) -> Self {
        let mut m = Self::NEG_INF;
        for &x in xs {
            if x > m {
                m = x;
            }
        }
        m
    }

    /// Scores of the `nr` query rows of `q` (row stride `d`) against keys `0..nk`:
    /// `s[r * nk + j] = q[r] · keys[j]`. `prefetch(j)` is called once per key, before it is
    /// read.
    #[inline(always)]
    fn scores_rows<const FMA: bool>(
        q: &[Self],
        d: usize,
        nr: usize,
        keys: &Rows<'_, Self>,
        nk: usize,
        s: &mut [Self],
        prefetch: impl Fn(usize),
    ) {
        scores_rows_plain::<Self, FMA>(q, d, nr, keys, nk, s, prefetch);
    }

    /// `acc[r] += sum_j p[r * nk + j] * vals[j]` for the `nr` rows of `acc` (row stride
    /// `dv`). `prefetch(j)` is called once per value row, before it is read.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn accumulate_rows<const FMA: bool>(
        p: &[Self],
        nk: usize,
        nr: usize,
        vals: &Rows<'_, Self>,
        dv: usize,
        acc: &mut [Self],
        prefetch: impl Fn(usize),
    ) {
        accumulate_rows_plain::<Self, FMA>(p, nk, nr, vals, dv, acc, prefetch);
    }

    /// Replaces every `x` by `exp(x - m)` and returns their sum. `m` is at least every `x`
    /// (or NaN), so the arguments are `<= 0`.
    #[inline(always)]
    fn exp_sub_sum<const FMA: bool>(xs: &mut [Self], m: Self) -> Self {
        let mut sum = Self::ZERO;
        for x in xs {
            *x = (*x - m).exp();
            sum = sum + *x;
        }
        sum
    }
}

/// [`Acc::scores_rows`] one key and one row at a time (every type's path, and f32's when
/// it has no AVX2 tile for the call).
#[inline(always)]
fn scores_rows_plain<T: Acc, const FMA: bool>(
    q: &[T],
    d: usize,
    nr: usize,
    keys: &Rows<'_, T>,
    nk: usize,
    s: &mut [T],
    prefetch: impl Fn(usize),
) {
    for j in 0..nk {
        prefetch(j);
        let kj = keys.row(j, d);
        for r in 0..nr {
            s[r * nk + j] = T::dot::<FMA>(&q[r * d..][..d], kj);
        }
    }
}

/// [`Acc::accumulate_rows`] one value row and one output row at a time (zero weights
/// skipped), as [`scores_rows_plain`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn accumulate_rows_plain<T: Acc, const FMA: bool>(
    p: &[T],
    nk: usize,
    nr: usize,
    vals: &Rows<'_, T>,
    dv: usize,
    acc: &mut [T],
    prefetch: impl Fn(usize),
) {
    for j in 0..nk {
        prefetch(j);
        let vj = vals.row(j, dv);
        for r in 0..nr {
            let pr = p[r * nk + j];
            if pr != T::ZERO {
                T::axpy::<FMA>(&mut acc[r * dv..][..dv], pr, vj);
            }
        }
    }
}

/// The [`Acc`] items that read alike for f32 and f64: the constants, `from_f32` (a
/// lossless `From`), `is_nan`, `exp` and `fma`.
macro_rules! acc_scalar_items {
    ($t:ident) => {
        const ZERO: $t = 0.0;
        const ONE: $t = 1.0;
        const NEG_INF: $t = $t::NEG_INFINITY;
        const NAN: $t = $t::NAN;
        #[inline(always)]
        fn from_f32(x: f32) -> $t {
            $t::from(x)
        }
        #[inline(always)]
        fn is_nan(self) -> bool {
            $t::is_nan(self)
        }
        #[inline(always)]
        fn exp(self) -> $t {
            $t::exp(self)
        }
        #[inline(always)]
        fn fma<const FMA: bool>(a: $t, b: $t, c: $t) -> $t {
            if FMA {
                a.mul_add(b, c)
            } else {
                a * b + c
            }
        }
    };
}

impl Acc for f32 {
    acc_scalar_items!(f32);

    #[inline(always)]
    fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: `FMA = true` runs on x86_64 only inside `Ctx::attend_avx2`, entered
            // after AVX2 and FMA were detected (see the trait); `dot` checks its own bounds.
            return unsafe { avx2::dot(a, b) };
        }
        let mut acc = [0.0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let mut tail = 0.0;
        for (&x, &y) in ac.remainder().iter().zip(bc.remainder()) {
            tail = f32::fma::<FMA>(x, y, tail);
        }
        for (x, y) in ac.zip(bc) {
            for l in 0..8 {
                acc[l] = f32::fma::<FMA>(x[l], y[l], acc[l]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }
    #[inline(always)]
    fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: AVX2 and FMA were detected, as for `dot`; no other obligation.
            return unsafe { avx2::axpy(y, a, x) };
        }
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f32::fma::<FMA>(a, x, *y);
        }
    }
    #[inline(always)]
    fn scale<const FMA: bool>(y: &mut [f32], a: f32) {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: AVX2 and FMA were detected, as for `dot`; no other obligation.
            return unsafe { avx2::scale(y, a) };
        }
        for y in y.iter_mut() {
            *y *= a;
        }
    }
    #[inline(always)]
    fn max_of<const FMA: bool>(xs: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: AVX2 and FMA were detected, as for `dot`; no other obligation.
            return unsafe { avx2::max(xs) };
        }
        let mut mx = [f32::NEG_INFINITY; 8];
        let chunks = xs.chunks_exact(8);
        let mut m = f32::NEG_INFINITY;
        for &x in chunks.remainder() {
            if x > m {
                m = x;
            }
        }
        for c in chunks {
            for l in 0..8 {
                if c[l] > mx[l] {
                    mx[l] = c[l];
                }
            }
        }
        for x in mx {
            if x > m {
                m = x;
            }
        }
        m
    }
    #[inline(always)]
    fn scores_rows<const FMA: bool>(
        q: &[f32],
        d: usize,
        nr: usize,
        keys: &Rows<'_, f32>,
        nk: usize,
        s: &mut [f32],
        prefetch: impl Fn(usize),
    ) {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // Groups of up to 8 rows: each key is loaded once per group and every row keeps
            // its accumulator in a register.
            for g0 in (0..nr).step_by(8) {
                let (q, s) = (&q[g0 * d..], &mut s[g0 * nk..]);
                let first = |j: usize| {
                    if g0 == 0 {
                        prefetch(j)
                    }
                };
                // SAFETY: in every arm, `FMA = true` runs on x86_64 only inside
                // `Ctx::attend_avx2`, after AVX2 and FMA were detected (see the trait);
                // `scores_n` asserts the bounds of everything it reads and writes.
                unsafe { by_rows!(nr - g0, avx2::scores_n(q, d, keys, nk, s, &first)) }
            }
            return;
        }
        scores_rows_plain::<f32, FMA>(q, d, nr, keys, nk, s, prefetch);
    }
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn accumulate_rows<const FMA: bool>(
        p: &[f32],
        nk: usize,
        nr: usize,
        vals: &Rows<'_, f32>,
        dv: usize,
        acc: &mut [f32],
        prefetch: impl Fn(usize),
    ) {
        // With more than one group of 8 rows, or a value tile just widened into scratch, the
        // values are read from cache, where register blocking wins; a single group streaming
        // its tile once from memory measured faster with the row-by-row axpys below.
        #[cfg(target_arch = "x86_64")]
        if FMA && (nr > 8 || vals.widened) {
            // Groups of up to 8 rows, 8 output columns at a time held in registers across
            // blocks of keys.
            for g0 in (0..nr).step_by(8) {
                let (p, acc) = (&p[g0 * nk..], &mut acc[g0 * dv..]);
                let first = |j: usize| {
                    if g0 == 0 {
                        prefetch(j)
                    }
                };
                // SAFETY: in every arm, AVX2 and FMA as for `scores_rows`; `accumulate_n`
                // asserts the bounds of everything it reads and writes.
                unsafe { by_rows!(nr - g0, avx2::accumulate_n(p, nk, vals, dv, acc, &first)) }
            }
            return;
        }
        accumulate_rows_plain::<f32, FMA>(p, nk, nr, vals, dv, acc, prefetch);
    }
    #[inline(always)]
    fn exp_sub_sum<const FMA: bool>(xs: &mut [f32], m: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: AVX2 and FMA were detected, as for `dot`; no other obligation.
            return unsafe { avx2::exp_sub_sum(xs, m) };
        }
        // Two simple loops vectorise where one fused loop does not.
        for x in xs.iter_mut() {
            *x = exp_nonpositive::<FMA>(*x - m);
        }
        let mut acc = [0.0f32; 8];
        let chunks = xs.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for l in 0..8 {
                acc[l] += c[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

impl Acc for f64 {
    acc_scalar_items!(f64);
}

// exp(x) for x <= 0: Cody-Waite reduction x = n ln2 + r with |r| <= ln(2)/2 (ln 2 split so
// that n * LN2_HI is exact), exp(r) by its degree-7 Taylor polynomial (truncation error
// 6e-9), 2^n built in the exponent bits. Relative error below 2e-7. Arguments below -87
// give 0 (exp(-87) is 1.6e-38, nothing next to a row maximum of weight 1).
const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_LN2_HI: f32 = 355.0 / 512.0;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_LOW: f32 = -87.0;
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `exp(x)` for `x <= 0`, or NaN (returned as NaN); see the constants above.
#[inline(always)]
fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
    let xc = if x < EXP_LOW { EXP_LOW } else { x };
    let z = f32::fma::<FMA>(xc, EXP_LOG2E, EXP_ROUND);
    let n = z - EXP_ROUND;
    let r = f32::fma::<FMA>(n, -EXP_LN2_LO, f32::fma::<FMA>(n, -EXP_LN2_HI, xc));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = f32::fma::<FMA>(p, r, c);
    }
    // n in [-126, 0] sits in z's mantissa as 0x40_0000 + n; build 2^n from it.
    let n_int = (z.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let two_n = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if x < EXP_LOW {
        0.0
    } else {
        p * two_n
    }
}

/// AVX2 + FMA versions of the f32 helpers. Every `unsafe fn` here has one obligation, the
/// CPU features: each checks the lengths its raw loads and stores depend on itself.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{
        exp_nonpositive, Rows, EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_LOW, EXP_POLY, EXP_ROUND,
    };
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    ///
    /// # Safety
    /// Safe to call from code compiled with AVX2 and FMA (the rest of this module); from
    /// anywhere else, the CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `sum(a[i] * b[i])` over the length of the shorter slice.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                // SAFETY: o + 8 <= i + 32 <= n (loop condition), and n is at most the length
                // of both slices, so 8 floats from `o` lie inside each.
                let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o))) };
                *a = _mm256_fmadd_ps(x, y, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n (loop condition) <= both lengths.
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(v);
        while i < n {
            total = a[i].mul_add(b[i], total);
            i += 1;
        }
        total
    }

    /// `y += a * x` over the length of the shorter slice.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n (loop condition) <= both lengths; `y` is borrowed mutably,
            // so nothing else reads or writes it meanwhile.
            unsafe {
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), r);
            }
            i += 8;
        }
        while i < n {
            y[i] = a.mul_add(x[i], y[i]);
            i += 1;
        }
    }

    /// `y *= a`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale(y: &mut [f32], a: f32) {
        let n = y.len();
        let py = y.as_mut_ptr();
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n = y.len() (loop condition); `y` is borrowed mutably.
            unsafe { _mm256_storeu_ps(py.add(i), _mm256_mul_ps(va, _mm256_loadu_ps(py.add(i)))) };
            i += 8;
        }
        while i < n {
            y[i] *= a;
            i += 1;
        }
    }

    /// The largest element, ignoring NaN; -inf for an empty or all-NaN slice.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(xs: &[f32]) -> f32 {
        let n = xs.len();
        let p = xs.as_ptr();
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        // `max_ps(x, acc)` returns acc when x is NaN: NaN is ignored.
        while i + 8 <= n {
            // SAFETY: i + 8 <= n = xs.len() (loop condition).
            acc = _mm256_max_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, acc);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds exactly the 8 floats stored.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut m = f32::NEG_INFINITY;
        for &x in lanes.iter().chain(&xs[i..]) {
            if x > m {
                m = x;
            }
        }
        m
    }

    /// Base pointer of `rows` after checking that rows `0..n` of `len` values lie inside
    /// its data.
    #[inline]
    fn rows_base(rows: &Rows<'_, f32>, n: usize, len: usize) -> *const f32 {
        assert!(n == 0 || rows.start + (n - 1) * rows.stride + len <= rows.data.len());
        rows.data[rows.start..].as_ptr()
    }

    /// `s[r * nk + j] = q[r] · keys[j]` for `N` rows of `q` (row stride `d`). Panics unless
    /// `q`, `s` and `keys` hold the rows it reads and writes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_n<const N: usize>(
        q: &[f32],
        d: usize,
        keys: &Rows<'_, f32>,
        nk: usize,
        s: &mut [f32],
        prefetch: &impl Fn(usize),
    ) {
        assert!(q.len() >= N * d && s.len() >= (N - 1) * nk + nk);
        let kbase = rows_base(keys, nk, d);
        let qp = q.as_ptr();
        for j in 0..nk {
            prefetch(j);
            // SAFETY: j < nk, and `rows_base` checked that rows 0..nk (stride
            // `keys.stride`, `d` values each) lie inside `keys.data` from `kbase`.
            let kp = unsafe { kbase.add(j * keys.stride) };
            let mut acc = [_mm256_setzero_ps(); N];
            let mut c = 0;
            while c + 8 <= d {
                // SAFETY: c + 8 <= d (loop condition): 8 values inside key row j; r < N and
                // q.len() >= N * d (asserted above): 8 values inside query row r.
                unsafe {
                    let kv = _mm256_loadu_ps(kp.add(c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(r * d + c)), kv, *a);
                    }
                }
                c += 8;
            }
            for (r, a) in acc.iter().enumerate() {
                let mut t = hsum(*a);
                for cc in c..d {
                    // SAFETY: cc < d: inside key row j (see `kp`).
                    t = q[r * d + cc].mul_add(unsafe { *kp.add(cc) }, t);
                }
                s[r * nk + j] = t;
            }
        }
    }

    /// `acc[r] += sum_j p[r * nk + j] * vals[j]` for `N` rows of `acc` (row stride `dv`).
    /// Panics unless `p`, `acc` and `vals` hold the rows it reads and writes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate_n<const N: usize>(
        p: &[f32],
        nk: usize,
        vals: &Rows<'_, f32>,
        dv: usize,
        acc: &mut [f32],
        prefetch: &impl Fn(usize),
    ) {
        assert!(p.len() >= (N - 1) * nk + nk && acc.len() >= N * dv);
        let vbase = rows_base(vals, nk, dv);
        let (pp, ap) = (p.as_ptr(), acc.as_mut_ptr());
        // Blocks of 16 value rows (8 KiB at D_v = 128) stay in L1 while the output columns
        // sweep over them, 8 at a time in registers.
        const JB: usize = 16;
        let full = dv - dv % 8;
        for j0 in (0..nk).step_by(JB) {
            let j1 = (j0 + JB).min(nk);
            for j in j0..j1 {
                prefetch(j);
            }
            for c in (0..full).step_by(8) {
                // SAFETY: c + 8 <= full <= dv, r < N and j < j1 <= nk, so
                // - `acc` at r * dv + c: 8 values inside row r, as acc.len() >= N * dv
                //   (asserted above; `acc` is borrowed mutably, `ap` is its only user here);
                // - `vals` at j * stride + c: 8 values inside value row j (`rows_base`);
                // - `p` at r * nk + j < N * nk <= p.len() (asserted above).
                unsafe {
                    let mut a = [_mm256_setzero_ps(); N];
                    for (r, x) in a.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(ap.add(r * dv + c));
                    }
                    for j in j0..j1 {
                        let vv = _mm256_loadu_ps(vbase.add(j * vals.stride + c));
                        for (r, x) in a.iter_mut().enumerate() {
                            *x = _mm256_fmadd_ps(_mm256_set1_ps(*pp.add(r * nk + j)), vv, *x);
                        }
                    }
                    for (r, x) in a.iter().enumerate() {
                        _mm256_storeu_ps(ap.add(r * dv + c), *x);
                    }
                }
            }
        }
        if full < dv {
            for j in 0..nk {
                // SAFETY: j < nk and cc < dv: element cc of value row j, which lies inside
                // `vals.data` (`rows_base`).
                unsafe {
                    let v = vbase.add(j * vals.stride);
                    for r in 0..N {
                        let pr = p[r * nk + j];
                        for cc in full..dv {
                            acc[r * dv + cc] = pr.mul_add(*v.add(cc), acc[r * dv + cc]);
                        }
                    }
                }
            }
        }
    }

    /// exp of 8 lanes, each `<= 0` or NaN (kept NaN); as `exp_nonpositive`.
    ///
    /// # Safety
    /// As [`hsum`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let low = _mm256_set1_ps(EXP_LOW);
        let too_small = _mm256_cmp_ps::<_CMP_LT_OQ>(x, low);
        let xc = _mm256_blendv_ps(x, low, too_small);
        let round = _mm256_set1_ps(EXP_ROUND);
        let z = _mm256_fmadd_ps(xc, _mm256_set1_ps(EXP_LOG2E), round);
        let n = _mm256_sub_ps(z, round);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let n_int = _mm256_sub_epi32(_mm256_castps_si256(z), _mm256_set1_epi32(0x4B40_0000));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)));
        _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)))
    }

    /// Replaces every `x` by `exp(x - m)` and returns their sum (`m` at least every `x`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub_sum(xs: &mut [f32], m: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let vm = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n = xs.len() (loop condition), for the load and the store;
            // `xs` is borrowed mutably.
            let y = unsafe {
                let y = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
                _mm256_storeu_ps(p.add(i), y);
                y
            };
            acc = _mm256_add_ps(acc, y);
            i += 8;
        }
        let mut total = hsum(acc);
        while i < n {
            xs[i] = exp_nonpositive::<true>(xs[i] - m);
            total += xs[i];
            i += 1;
        }
        total
    }
}

/// An input element type of the attention kernels: a float whose [`Widen`] compute type
/// (f32, or f64 for f64) is an [`Acc`], the type every score, softmax statistic and
/// accumulator is held in. Implemented for every such type; adds nothing to [`Widen`].
trait Elem: Float + Widen<C: Acc> {}

impl<T: Float + Widen<C: Acc>> Elem for T {}

impl<T: Widen> View<'_, T> {
    /// Widens row `[b, h, t, ..dst.len()]` into `dst`.
    #[inline(always)]
    fn load_row(&self, b: usize, h: usize, t: usize, dst: &mut [T::C]) {
        let start = self.pos(b, h, t);
        let step = self.strides[3];
        if step == 1 || dst.len() <= 1 {
            let s = start as usize;
            T::widen_slice(&self.buf[s..s + dst.len()], dst);
        } else {
            for (c, x) in dst.iter_mut().enumerate() {
                *x = self.buf[(start + c as isize * step) as usize].widen();
            }
        }
    }
}

impl<T: Copy> View<'_, T> {
    /// Hints the CPU to fetch row `[b, h, t, ..len]` into cache (nothing if `t >= end` or
    /// the row is not contiguous).
    #[inline(always)]
    fn prefetch_row(&self, b: usize, h: usize, t: usize, len: usize, end: usize) {
        #[cfg(target_arch = "x86_64")]
        if t < end && self.strides[3] == 1 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let start = self.buf.as_ptr().wrapping_offset(self.pos(b, h, t)) as *const i8;
            let bytes = len * std::mem::size_of::<T>();
            for line in (0..bytes).step_by(64) {
                // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, h, t, len, end);
    }
}

/// `n` rows of `len` compute-type values: row `j` is `data[start + j * stride..][..len]`.
struct Rows<'s, A> {
    data: &'s [A],
    start: usize,
    stride: usize,
    /// Widened into a scratch tile just now (so in cache), rather than read in place.
    widened: bool,
}

impl<A> Rows<'_, A> {
    #[inline(always)]
    fn row(&self, j: usize, len: usize) -> &[A] {
        &self.data[self.start + j * self.stride..][..len]
    }
}

impl<A: Acc> Rows<'_, A> {
    /// True if one of the first `n` rows (`len` values each) holds a NaN or an infinity.
    fn any_non_finite(&self, n: usize, len: usize) -> bool {
        // `x * 0` is 0 for every finite `x` and NaN otherwise.
        (0..n).any(|j| self.row(j, len).iter().any(|&x| x * A::ZERO != A::ZERO))
    }
}

/// `acc[r] += sum_j p[r * nk + j] * vals[j]` for `nr` rows, skipping every weight of exactly
/// 0: a masked key (or one whose weight underflowed) contributes nothing even when its value
/// row holds NaN or an infinity, where a product `0 * NaN` would poison the row. The slow
/// path for the rare tiles whose values are not all finite.
fn accumulate_nonzero<A: Acc>(
    p: &[A],
    nk: usize,
    nr: usize,
    vals: &Rows<'_, A>,
    dv: usize,
    acc: &mut [A],
) {
    for r in 0..nr {
        let out = &mut acc[r * dv..][..dv];
        for (j, &w) in p[r * nk..][..nk].iter().enumerate() {
            if w != A::ZERO {
                for (o, &x) in out.iter_mut().zip(vals.row(j, dv)) {
                    *o = *o + w * x;
                }
            }
        }
    }
}

/// Rows `t0..t0 + n` of head `(b, h)`, `len` values each: borrowed from the input when it
/// is already of the compute type with unit last stride, otherwise widened into `scratch`.
#[inline(always)]
fn tile_rows<'s, T: Elem>(
    view: View<'s, T>,
    b: usize,
    h: usize,
    t0: usize,
    n: usize,
    len: usize,
    scratch: &'s mut Vec<T::C>,
) -> Result<Rows<'s, T::C>> {
    if let Some(buf) = T::as_compute(view.buf) {
        let start = view.pos(b, h, t0);
        let stride = view.strides[2];
        let borrowable = (view.strides[3] == 1 || len <= 1)
            && stride > 0
            && start >= 0
            && start as usize + (n - 1) * stride as usize + len <= buf.len();
        if borrowable {
            return Ok(Rows {
                data: buf,
                start: start as usize,
                stride: stride as usize,
                widened: false,
            });
        }
    }
    // Grow only: every value read back is written below first.
    let need = checked_len(n, len)?;
    if scratch.len() < need {
        scratch
            .try_reserve_exact(need - scratch.len())
            .map_err(|_| host_pool::out_of_memory::<T::C>(need))?;
        scratch.resize(need, T::C::ZERO);
    }
    for (j, row) in scratch[..n * len].chunks_exact_mut(len.max(1)).enumerate() {
        view.load_row(b, h, t0 + j, &mut row[..len]);
    }
    Ok(Rows {
        data: scratch,
        start: 0,
        stride: len,
        widened: true,
    })
}

/// `a * b` as an element count, or `Error::OutOfMemory` when it overflows.
fn checked_len(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| host_pool::out_of_memory::<f32>(usize::MAX))
}

/// The array mask, already broadcast to `[B, N_q, T_q, T_kv]` (stride-0 views included).
enum MaskView<'a, T> {
    Bool(View<'a, bool>),
    Additive(View<'a, T>),
}

impl<'a, T: Elem> MaskView<'a, T> {
    /// The view of an array mask (bool: keep or hide; any other dtype: additive), or `None`
    /// without one.
    ///
    /// # Errors
    /// When the mask is not a host array of its dtype.
    fn new(mask: Option<&'a Array>) -> Result<Option<Self>> {
        Ok(match mask {
            None => None,
            Some(m) if m.dtype() == DType::Bool => Some(MaskView::Bool(View::new(m)?)),
            Some(m) => Some(MaskView::Additive(View::new(m)?)),
        })
    }

    /// Applies the mask of row `[b, h, t, k0..k0 + s.len()]` to the scores `s`: a `false`
    /// bool entry sets the score to -inf, an additive entry is added.
    #[inline(always)]
    fn apply(&self, b: usize, h: usize, t: usize, k0: usize, s: &mut [T::C]) {
        match self {
            MaskView::Bool(v) => zip_row(v, b, h, t, k0, s, |x, keep| {
                if !keep {
                    *x = T::C::NEG_INF;
                }
            }),
            MaskView::Additive(v) => zip_row(v, b, h, t, k0, s, |x, a| *x = *x + a.widen()),
        }
    }
}

/// Calls `f(x, e)` for every score `x` of `s` and the entry `e` of row `[b, h, t, k0..]` of
/// `v` at the same key (read in place through its last stride, 0 included).
#[inline(always)]
fn zip_row<M: Copy, A>(
    v: &View<'_, M>,
    b: usize,
    h: usize,
    t: usize,
    k0: usize,
    s: &mut [A],
    f: impl Fn(&mut A, M),
) {
    let step = v.strides[3];
    let base = v.pos(b, h, t) + k0 as isize * step;
    if step == 0 {
        let e = v.buf[base as usize];
        for x in s.iter_mut() {
            f(x, e);
        }
    } else if step == 1 {
        let n = s.len();
        for (x, &e) in s.iter_mut().zip(&v.buf[base as usize..][..n]) {
            f(x, e);
        }
    } else {
        for (j, x) in s.iter_mut().enumerate() {
            f(x, v.buf[(base + j as isize * step) as usize]);
        }
    }
}

/// `dst[m x n] = (accumulate ? dst : 0) + lhs[m x k] * rhs[k x n]` through `gemm`, single
/// threaded (we are inside a rayon task). Each operand is `(slice, base, row stride, column
/// stride)` with non-negative strides; `dst` is row-major with row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn matmul<A: Acc>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [A],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[A], usize, usize, usize),
    rhs: (&[A], usize, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, (_, base, rs, cs): (&[A], usize, usize, usize)| {
        base + (rows - 1) * rs + (cols - 1) * cs
    };
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst out of range");
    if k > 0 {
        assert!(last(m, k, lhs) < lhs.0.len(), "gemm lhs out of range");
        assert!(last(k, n, rhs) < rhs.0.len(), "gemm rhs out of range");
    } else if !accumulate {
        for row in dst.chunks_mut(dst_rs.max(1)).take(m) {
            row[..n].fill(A::ZERO);
        }
        return;
    } else {
        return;
    }
    // SAFETY: the asserts above show that every element gemm reads (lhs, rhs) or writes
    // (dst, row-major m x n with row stride dst_rs) lies inside its slice; dst is borrowed
    // mutably and cannot alias the shared lhs/rhs borrows. A is f32 or f64, both supported.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr().add(lhs.1),
            lhs.3 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr().add(rhs.1),
            rhs.3 as isize,
            rhs.2 as isize,
            A::ONE,
            A::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `dst[m x nk] = lhs[m x len] rows^T` through [`matmul`]: each of `m` rows of `lhs` (row
/// stride `len`, the first at `base`) against each of the first `nk` of `rows` (`len`
/// values each); `dst` is row-major with row stride `nk`.
#[inline(always)]
fn matmul_rows_t<A: Acc>(
    (m, nk, len): (usize, usize, usize),
    dst: &mut [A],
    (lhs, base): (&[A], usize),
    rows: &Rows<'_, A>,
) {
    let rhs = (rows.data, rows.start, 1, rows.stride);
    matmul(m, nk, len, dst, nk, false, (lhs, base, len, 1), rhs);
}

/// `dst[m x len] += p[m x nk] rows` through [`matmul`]: `p` row-major with row stride `nk`,
/// `rows` its first `nk` rows of `len` values, `dst` row-major with row stride `len`.
#[inline(always)]
fn matmul_add_rows<A: Acc>(
    (m, nk, len): (usize, usize, usize),
    dst: &mut [A],
    p: &[A],
    rows: &Rows<'_, A>,
) {
    let rhs = (rows.data, rows.start, rows.stride, 1);
    matmul(m, len, nk, dst, len, true, (p, 0, nk, 1), rhs);
}

/// Online softmax step for one row of scores `s` (masked entries are -inf): updates the
/// running max `m` and sum `l`, rescales the accumulator row, and leaves the unnormalised
/// probabilities in `s`.
#[inline(always)]
fn softmax_step<A: Acc, const FMA: bool>(s: &mut [A], m: &mut A, l: &mut A, acc: &mut [A]) {
    let block_max = A::max_of::<FMA>(s);
    let new_max = if block_max > *m { block_max } else { *m };
    if new_max == A::NEG_INF {
        // Nothing visible in this row yet: no weight, no change. Unless the scores are NaN
        // (the max skips NaN): then the row is NaN from here on.
        if s.iter().any(|x| x.is_nan()) {
            (*m, *l) = (A::NAN, A::NAN);
            acc.fill(A::NAN);
        }
        s.fill(A::ZERO);
        return;
    }
    let sum = A::exp_sub_sum::<FMA>(s, new_max);
    if new_max != *m {
        let alpha = (*m - new_max).exp();
        *l = *l * alpha;
        A::scale::<FMA>(acc, alpha);
        *m = new_max;
    }
    *l = *l + sum;
}

/// Running softmax state of a task's rows: max, sum and unnormalised output, row-major.
struct State<A> {
    m: Vec<A>,
    l: Vec<A>,
    acc: Vec<A>,
}

impl<A: Acc> State<A> {
    /// `f(m, l)` of row `row`, or NaN when its maximum is NaN (a NaN logit, from a score, the
    /// mask or a sink, makes the row NaN even when no tile reached it), or `empty` when its
    /// sum is 0 (nothing visible).
    #[inline(always)]
    fn by_row(&self, row: usize, empty: A, f: impl FnOnce(A, A) -> A) -> A {
        let (m, l) = (self.m[row], self.l[row]);
        if m.is_nan() {
            A::NAN
        } else if l == A::ZERO {
            empty
        } else {
            f(m, l)
        }
    }
}

/// Everything a task needs, shared by all tasks.
struct Ctx<'a, T: Elem> {
    q: View<'a, T>,
    k: View<'a, T>,
    v: View<'a, T>,
    mask: Option<MaskView<'a, T>>,
    sinks: Option<Vec<T::C>>,
    causal: bool,
    scale: T::C,
    nkv: usize,
    /// Query heads per kv head.
    r: usize,
    tq: usize,
    tkv: usize,
    d: usize,
    dv: usize,
    /// Queries per task, and chunks per head.
    qc: usize,
    nqc: usize,
    fma: bool,
}

impl<T: Elem> Ctx<'_, T> {
    /// (batch, kv head, first query, end query) of group chunk `gc`.
    fn chunk(&self, gc: usize) -> (usize, usize, usize, usize) {
        let c = gc % self.nqc;
        let bg = gc / self.nqc;
        let q0 = c * self.qc;
        (
            bg / self.nkv,
            bg % self.nkv,
            q0,
            (q0 + self.qc).min(self.tq),
        )
    }

    /// Attention of group chunk `gc` over keys `k_lo..k_hi`; `with_sink` seeds each row with
    /// its head's sink logit (exactly one key range of a row does).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the task's tiles cannot be allocated.
    fn attend(&self, gc: usize, k_lo: usize, k_hi: usize, with_sink: bool) -> Result<State<T::C>> {
        #[cfg(target_arch = "x86_64")]
        if self.fma {
            // SAFETY: `fma` is set only when the CPU reports AVX2 and FMA.
            return unsafe { self.attend_avx2(gc, k_lo, k_hi, with_sink) };
        }
        // aarch64 always has fused multiply-add.
        #[cfg(target_arch = "aarch64")]
        {
            return self.attend_impl::<true>(gc, k_lo, k_hi, with_sink);
        }
        #[allow(unreachable_code)]
        self.attend_impl::<false>(gc, k_lo, k_hi, with_sink)
    }

    /// [`attend_impl`](Self::attend_impl) with `FMA` (the f32 helpers' AVX2 paths),
    /// compiled for AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(
        &self,
        gc: usize,
        k_lo: usize,
        k_hi: usize,
        with_sink: bool,
    ) -> Result<State<T::C>> {
        self.attend_impl::<true>(gc, k_lo, k_hi, with_sink)
    }

    #[inline(always)]
    fn attend_impl<const FMA: bool>(
        &self,
        gc: usize,
        k_lo: usize,
        k_hi: usize,
        with_sink: bool,
    ) -> Result<State<T::C>> {
        let (b, g, q0, q1) = self.chunk(gc);
        let (d, dv, nqr) = (self.d, self.dv, q1 - q0);
        let rows = self.r * nqr;
        // Row `r * nqr + i` is query `q0 + i` of query head `g * R + r`.
        let head_of = |row: usize| g * self.r + row / nqr;
        let query_of = |row: usize| q0 + row % nqr;

        let mut qt = host_pool::filled(checked_len(rows, d)?, T::C::ZERO)?;
        for (row, dst) in qt.chunks_exact_mut(d.max(1)).enumerate().take(rows) {
            let dst = &mut dst[..d];
            self.q.load_row(b, head_of(row), query_of(row), dst);
            for x in dst.iter_mut() {
                *x = *x * self.scale;
            }
        }
        let mut m = host_pool::filled(rows, T::C::NEG_INF)?;
        let mut l = host_pool::filled(rows, T::C::ZERO)?;
        if let (true, Some(sinks)) = (with_sink, &self.sinks) {
            for row in 0..rows {
                let sink = sinks[head_of(row)];
                // A sink of +inf makes the softmax inf / inf: NaN, as MLX's definition.
                m[row] = if sink == T::C::ZERO - T::C::NEG_INF {
                    T::C::NAN
                } else {
                    sink
                };
                l[row] = T::C::ONE;
            }
        }
        let mut acc = host_pool::filled(checked_len(rows, dv)?, T::C::ZERO)?;

        // Query t sees key j iff j <= t + off.
        let off = self.tkv as isize - self.tq as isize;
        let k_hi = if self.causal {
            k_hi.min((q1 as isize - 1 + off + 1).max(0) as usize)
        } else {
            k_hi
        };
        let small = rows <= SMALL_ROWS;
        let max_rows = if small { rows } else { MAX_TILE_ROWS };
        // Keys per tile: BK for full tasks; longer for tasks of fewer rows, so that each `gemm`
        // call keeps a worthwhile size next to its fixed cost.
        let bk = if small {
            BK
        } else {
            (BK * MAX_TILE_ROWS / rows.min(MAX_TILE_ROWS)).min(MAX_BK)
        };
        let mut s = host_pool::filled(max_rows.min(rows) * bk, T::C::ZERO)?;
        let (mut kscratch, mut vscratch) = (Vec::new(), Vec::new());
        let mut segments: Vec<(usize, usize)> = host_pool::with_capacity(self.r)?;

        let mut k0 = k_lo;
        while k0 < k_hi {
            let nk = bk.min(k_hi - k0);
            // The rows this key tile reaches: all of them, or under a causal mask the queries
            // of each head from the first one that sees key k0 (adjacent ranges merged).
            segments.clear();
            let first = if self.causal {
                (k0 as isize - off - q0 as isize).max(0) as usize
            } else {
                0
            };
            for r in 0..self.r {
                if first < nqr {
                    let (lo, hi) = (r * nqr + first, (r + 1) * nqr);
                    match segments.last_mut() {
                        Some(last) if last.1 == lo => last.1 = hi,
                        _ => segments.push((lo, hi)),
                    }
                }
            }
            if segments.is_empty() {
                k0 += nk;
                continue;
            }
            let kr = tile_rows(self.k, b, g, k0, nk, d, &mut kscratch)?;
            let vr = tile_rows(self.v, b, g, k0, nk, dv, &mut vscratch)?;
            let mut v_non_finite: Option<bool> = None;
            if !small {
                // `gemm` reads the tiles in an order the hardware prefetcher does not follow
                // well; fetch the next tile while this one computes.
                for j in k0 + bk..(k0 + 2 * bk).min(k_hi) {
                    self.k.prefetch_row(b, g, j, d, self.tkv);
                    self.v.prefetch_row(b, g, j, dv, self.tkv);
                }
            }
            for &(lo, hi) in &segments {
                let mut row0 = lo;
                while row0 < hi {
                    let nr = max_rows.min(hi - row0);
                    let sb = &mut s[..nr * nk];
                    if small {
                        // Streaming decode: ask for the next tile's rows while this one
                        // computes, so memory and arithmetic overlap.
                        T::C::scores_rows::<FMA>(&qt[row0 * d..], d, nr, &kr, nk, sb, |j| {
                            self.k.prefetch_row(b, g, k0 + bk + j, d, self.tkv)
                        });
                    } else {
                        matmul_rows_t((nr, nk, d), sb, (&qt, row0 * d), &kr);
                    }
                    for rr in 0..nr {
                        let row = row0 + rr;
                        let t = query_of(row);
                        let srow = &mut sb[rr * nk..][..nk];
                        if let Some(mask) = &self.mask {
                            mask.apply(b, head_of(row), t, k0, srow);
                        }
                        if self.causal {
                            let first_hidden = (t as isize + off + 1 - k0 as isize).max(0) as usize;
                            if first_hidden < nk {
                                srow[first_hidden..].fill(T::C::NEG_INF);
                            }
                        }
                        softmax_step::<T::C, FMA>(
                            srow,
                            &mut m[row],
                            &mut l[row],
                            &mut acc[row * dv..][..dv],
                        );
                    }
                    // A weight of 0 (masked key) must not meet a NaN or infinite value: the
                    // fast products below would give 0 * NaN = NaN. Checked only for tiles
                    // with a zero weight, and the values scanned once per tile.
                    if sb.contains(&T::C::ZERO)
                        && *v_non_finite.get_or_insert_with(|| vr.any_non_finite(nk, dv))
                    {
                        let arows = &mut acc[row0 * dv..][..nr * dv];
                        accumulate_nonzero(sb, nk, nr, &vr, dv, arows);
                    } else if small {
                        let arows = &mut acc[row0 * dv..][..nr * dv];
                        T::C::accumulate_rows::<FMA>(sb, nk, nr, &vr, dv, arows, |j| {
                            self.v.prefetch_row(b, g, k0 + bk + j, dv, self.tkv)
                        });
                    } else {
                        matmul_add_rows((nr, nk, dv), &mut acc[row0 * dv..], sb, &vr);
                    }
                    row0 += nr;
                }
            }
            k0 += nk;
        }
        Ok(State { m, l, acc })
    }

    /// Writes `acc / l` of each row into the output pieces (one per query head of the
    /// group), and the rows' log-sum-exp `m + ln(l)` into the lse pieces when there are any.
    fn finish(&self, st: &State<T::C>, pieces: &mut Pieces<'_, T>) {
        let dv = self.dv;
        let nqr = st.m.len() / self.r;
        for (r, lse) in pieces.lse.iter_mut().enumerate() {
            for (i, x) in lse.iter_mut().enumerate().take(nqr) {
                *x = st.by_row(r * nqr + i, T::C::NEG_INF, |m, l| {
                    m + T::C::from_f64(l.to_f64().ln())
                });
            }
        }
        for (r, piece) in pieces.out.iter_mut().enumerate() {
            for i in 0..nqr {
                let row = r * nqr + i;
                let inv = st.by_row(row, T::C::ZERO, |_, l| T::C::ONE / l);
                let src = &st.acc[row * dv..][..dv];
                for (o, &a) in piece[i * dv..][..dv].iter_mut().zip(src) {
                    *o = T::narrow(a * inv);
                }
            }
        }
    }

    /// Merges the partial states of one group chunk's key ranges and writes the output.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the merged state cannot be allocated.
    fn merge(&self, parts: &[State<T::C>], pieces: &mut Pieces<'_, T>) -> Result<()> {
        let dv = self.dv;
        let rows = parts.first().map_or(0, |p| p.m.len());
        let mut merged = State {
            m: host_pool::filled(rows, T::C::NEG_INF)?,
            l: host_pool::filled(rows, T::C::ZERO)?,
            acc: host_pool::filled(checked_len(rows, dv)?, T::C::ZERO)?,
        };
        for row in 0..rows {
            let mut mx = T::C::NEG_INF;
            for p in parts {
                if p.m[row] > mx || p.m[row].is_nan() {
                    mx = p.m[row];
                }
            }
            if mx.is_nan() {
                // A NaN part makes the row NaN.
                merged.m[row] = mx;
                merged.l[row] = mx;
                merged.acc[row * dv..][..dv].fill(mx);
                continue;
            }
            if mx == T::C::NEG_INF {
                continue;
            }
            let out = &mut merged.acc[row * dv..][..dv];
            let mut l = T::C::ZERO;
            for p in parts.iter().filter(|p| p.m[row] != T::C::NEG_INF) {
                let w = (p.m[row] - mx).exp();
                l = l + p.l[row] * w;
                for (o, &a) in out.iter_mut().zip(&p.acc[row * dv..][..dv]) {
                    *o = *o + a * w;
                }
            }
            merged.m[row] = mx;
            merged.l[row] = l;
        }
        self.finish(&merged, pieces);
        Ok(())
    }
}

/// What one group chunk writes: for each of its `R` query heads, its queries' output rows
/// and (when asked) their log-sum-exp values.
struct Pieces<'a, T: Elem> {
    out: Vec<&'a mut [T]>,
    lse: Vec<&'a mut [T::C]>,
}

/// Splits `buf` (`heads` heads of `tq` rows of `width` values, row-major) into pieces of
/// `qc` rows and hands each to its group chunk: head `h` of batch `b`, chunk `ci` goes to
/// chunk `(b * nkv + h / r) * nqc + ci`. Zero widths give empty pieces.
#[allow(clippy::too_many_arguments)]
fn split_pieces<'a, X>(
    mut buf: &'a mut [X],
    (nq, nkv, r): (usize, usize, usize),
    heads: usize,
    tq: usize,
    qc: usize,
    width: usize,
    mut give: impl FnMut(usize, &'a mut [X]),
) {
    let nqc = tq.div_ceil(qc);
    for bh in 0..heads {
        let (b, h) = (bh / nq, bh % nq);
        for ci in 0..nqc {
            let rows = qc.min(tq - ci * qc);
            let (piece, rest) = std::mem::take(&mut buf).split_at_mut(rows * width);
            buf = rest;
            give((b * nkv + h / r) * nqc + ci, piece);
        }
    }
}

/// Runs a validated attention call on the CPU (see `fast::scaled_dot_product_attention` for
/// the contract). Returns a new row-major `[B, N_q, T_q, D_v]` array of the output dtype.
pub(crate) fn run(c: &SdpaArgs) -> Result<Array> {
    dispatch(c, false).map(|(out, _)| out)
}

/// [`run`] that also returns the rows' log-sum-exp, `[B, N_q, T_q]` of the compute type
/// (f32, or f64 for f64 calls); see `fast::scaled_dot_product_attention_with_lse`.
pub(crate) fn run_with_lse(c: &SdpaArgs) -> Result<(Array, Array)> {
    let (out, lse) = dispatch(c, true)?;
    let lse = lse.ok_or_else(|| Error::Device("the CPU attention gave no log-sum-exp".into()))?;
    Ok((out, lse))
}

fn dispatch(c: &SdpaArgs, with_lse: bool) -> Result<(Array, Option<Array>)> {
    let scale = c.scale;
    match c.dtype {
        DType::F16 => run_typed::<f16>(c, scale, with_lse),
        DType::BF16 => run_typed::<bf16>(c, scale, with_lse),
        DType::F32 => run_typed::<f32>(c, scale, with_lse),
        DType::F64 => run_typed::<f64>(c, scale, with_lse),
        other => Err(Error::invalid(format!(
            "[scaled_dot_product_attention] Received unsupported type {other}."
        ))),
    }
}

fn run_typed<T: Elem>(c: &SdpaArgs, scale: f32, with_lse: bool) -> Result<(Array, Option<Array>)> {
    let [bn, nq, tq, dv] = c.out_shape;
    let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
    // Checked: with D or D_v of 0 the inputs hold no element whatever the other sizes.
    let rows = crate::array::checked_size(&[bn, nq, tq])?;
    let out_len = crate::array::checked_size(&c.out_shape)?;
    let mut out = host_pool::take_filled(out_len, T::default())?;
    let mut lse = host_pool::take_filled(if with_lse { rows } else { 0 }, T::C::NEG_INF)?;
    let lse_shape = [bn, nq, tq];
    let finish = |out: Vec<T>, lse: Vec<T::C>| -> Result<(Array, Option<Array>)> {
        let lse = if with_lse {
            Some(Array::from_kernel_vec(lse, &lse_shape)?)
        } else {
            None
        };
        Ok((Array::from_kernel_vec(out, &c.out_shape)?, lse))
    };
    if rows == 0 || (dv == 0 && !with_lse) {
        return finish(out, lse);
    }
    if tkv == 0 {
        // No key at all: every row is 0; its log-sum-exp is its sink's, or -inf.
        if let (true, Some(s)) = (with_lse, &c.sinks) {
            let sinks: Vec<T::C> = host_pool::map(&s.to_vec::<T>()?, T::widen)?;
            for (row, x) in lse.iter_mut().enumerate() {
                *x = sinks[(row / tq) % nq];
            }
        }
        return finish(out, lse);
    }
    let mask = MaskView::new(c.mask.as_ref())?;
    let sinks = match &c.sinks {
        None => None,
        Some(s) => Some(host_pool::map(&s.to_vec::<T>()?, T::widen)?),
    };
    let r = nq / nkv;
    let threads = rayon::current_num_threads().max(1);
    let groups = bn * nkv;
    // Queries per task: whole query blocks of one head, about TASK_ROWS rows per task, fewer
    // if that leaves threads idle; short query sequences go whole.
    let mut qc = if tq <= BQ {
        tq
    } else {
        BQ * (TASK_ROWS / (r * BQ)).max(1)
    };
    if groups * tq.div_ceil(qc) < 2 * threads && qc > BQ {
        qc = BQ;
    }
    let nqc = tq.div_ceil(qc);
    let chunks = groups * nqc;
    // Split the keys when there are fewer tasks than threads can use (decoding with few kv
    // heads): ranges of whole key tiles, at least two tiles each.
    let mut split_len = tkv;
    if threads > 1 && chunks < 2 * threads {
        let want = (4 * threads).div_ceil(chunks);
        let max_splits = tkv.div_ceil(2 * BK).max(1);
        let nsplit = want.min(max_splits);
        split_len = tkv.div_ceil(nsplit).div_ceil(BK) * BK;
    }
    let nsplit = tkv.div_ceil(split_len);

    let ctx = Ctx {
        q: View::new(&c.q)?,
        k: View::new(&c.k)?,
        v: View::new(&c.v)?,
        mask,
        sinks,
        causal: c.causal,
        scale: T::C::from_f32(scale),
        nkv,
        r,
        tq,
        tkv,
        d,
        dv,
        qc,
        nqc,
        fma: has_avx2_fma(),
    };

    // The pieces each chunk writes: for each of its R query heads, its queries.
    let mut pieces: Vec<Pieces<'_, T>> = host_pool::with_capacity(chunks)?;
    for _ in 0..chunks {
        pieces.push(Pieces {
            out: host_pool::with_capacity(r)?,
            lse: host_pool::with_capacity(if with_lse { r } else { 0 })?,
        });
    }
    let heads = bn * nq;
    split_pieces(&mut out, (nq, nkv, r), heads, tq, qc, dv, |i, p| {
        pieces[i].out.push(p)
    });
    if with_lse {
        split_pieces(&mut lse, (nq, nkv, r), heads, tq, qc, 1, |i, p| {
            pieces[i].lse.push(p)
        });
    }
    // Multiply-adds of the whole call: small calls stay on the calling thread.
    let work = (bn * nq * tq * tkv).saturating_mul(d + dv);
    if work < SEQUENTIAL_WORK {
        for (gc, mut p) in pieces.into_iter().enumerate() {
            ctx.finish(&ctx.attend(gc, 0, tkv, true)?, &mut p);
        }
    } else if nsplit == 1 {
        pieces
            .into_par_iter()
            .enumerate()
            .try_for_each(|(gc, mut p)| {
                ctx.finish(&ctx.attend(gc, 0, tkv, true)?, &mut p);
                Ok::<(), Error>(())
            })?;
    } else {
        let parts: Vec<State<T::C>> = (0..chunks * nsplit)
            .into_par_iter()
            .map(|t| {
                let (gc, sp) = (t / nsplit, t % nsplit);
                let lo = sp * split_len;
                ctx.attend(gc, lo, (lo + split_len).min(tkv), sp == 0)
            })
            .collect::<Result<_>>()?;
        pieces
            .into_par_iter()
            .enumerate()
            .try_for_each(|(gc, mut p)| ctx.merge(&parts[gc * nsplit..][..nsplit], &mut p))?;
    }
    finish(out, lse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments from -90 to 0 (and the special values), through both the scalar and the
    /// AVX2 path, against f64's exp.
    #[test]
    fn fast_exp_relative_error() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -90.0 * i as f32 / 200_000.0).collect();
        xs.extend([0.0, -0.0, -1e-30, -86.99, -87.0, -87.01, f32::NEG_INFINITY]);
        let check = |got: f32, x: f32| {
            let want = f64::from(x).exp();
            if x < EXP_LOW {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                let rel = ((f64::from(got) - want) / want).abs();
                assert!(rel < 2e-7, "exp({x}) = {got}, want {want}, rel {rel}");
            }
        };
        for &x in &xs {
            check(exp_nonpositive::<false>(x), x);
        }
        assert!(exp_nonpositive::<false>(f32::NAN).is_nan());
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            let mut ys = xs.clone();
            ys.push(f32::NAN);
            // SAFETY: AVX2 and FMA were just detected.
            let sum = unsafe { avx2::exp_sub_sum(&mut ys, 0.0) };
            assert!(sum.is_nan() && ys[ys.len() - 1].is_nan());
            for (&y, &x) in ys.iter().zip(&xs) {
                check(y, x);
            }
        }
    }
}
