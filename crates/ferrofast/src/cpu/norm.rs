//! CPU kernels for `rms_norm` and `layer_norm`.
//!
//! Both follow MLX's fallback definition (spec §2.1, §3.1): the input is taken in the output
//! dtype, statistics and the normalised row are computed in f32, the row is rounded to the
//! output dtype, and only then multiplied by the weight and shifted by the bias, each step
//! rounded to the output dtype as an elementwise op in that dtype would be. f64 data is the
//! exception: it is computed in f64 throughout.
//!
//! Work is per row of the last axis, and each row is read from memory once. A contiguous
//! row in the output dtype is read in place (f32, f64, bf16: widening to the compute type is
//! a register op, done as each element is used); anything else (strided rows, another input
//! dtype, f16) is first converted into a per-thread scratch row, which stays in L1/L2 for
//! the remaining passes. Rows are spread over rayon in chunks; small inputs stay on the
//! calling thread.
//!
//! Contiguous rows of bf16, f16 or f32 in the output dtype go to the hand-vectorised AVX2
//! kernel of [`avx2`] where the CPU has AVX2, FMA and F16C (bit for bit the same results).
//! Everything else takes the portable row loop, compiled twice, for baseline x86-64 and for
//! AVX2, and picked at run time.

use super::simd::{bf16_bits_rne_unchecked, bf16_round_unchecked, has_avx2, Widen};
use crate::array::{dispatch_dtype, host_pool, Array};
use crate::dtype::{DType, Element, Float};
use crate::error::{Error, Result};
use crate::ops::norm::{NormArgs, NormKind};
use crate::Device;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, Div, Mul, Sub};

#[cfg(target_arch = "x86_64")]
mod avx2;
pub(crate) mod vjp;

/// Below this many elements the whole op runs on the calling thread: splitting would cost
/// more than it saves.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;
/// Elements per rayon task (whole rows, at least one): enough work to amortise a task, small
/// enough that both cores stay busy to the end.
const TASK_ELEMENTS: usize = 1 << 15;
/// Independent accumulators per reduction: breaks the add dependency chain and gives the
/// compiler whole vectors to work with (two AVX2 registers of f32; LLVM's SLP vectoriser
/// falls back to 2-wide code at 32).
const LANES: usize = 16;

/// Runs a validated `rms_norm` / `layer_norm` call on the CPU. `x`, the weight and the bias
/// may have any dtype and layout and are converted to the output dtype on the fly.
pub(crate) fn run(args: &NormArgs) -> Result<Array> {
    norm(
        args.kind,
        &args.x,
        args.weight.as_ref(),
        args.bias.as_ref(),
        args.eps,
        args.dtype,
    )
}

fn norm(
    kind: NormKind,
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
    out: DType,
) -> Result<Array> {
    match out {
        DType::F16 => norm_typed::<f16>(kind, x, weight, bias, eps),
        DType::BF16 => norm_typed::<bf16>(kind, x, weight, bias, eps),
        DType::F32 => norm_typed::<f32>(kind, x, weight, bias, eps),
        DType::F64 => norm_typed::<f64>(kind, x, weight, bias, eps),
        other => Err(Error::invalid(format!(
            "normalization kernels compute in a floating dtype, not {other}"
        ))),
    }
}

fn norm_typed<T: NormFloat>(
    kind: NormKind,
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
) -> Result<Array> {
    // Every element is written below, so a recycled buffer's old contents never show.
    let mut y = host_pool::take_or_zeroed::<T>(x.size())?;
    norm_into(kind, x, weight, bias, eps, &mut y)?;
    Array::from_cpu_data(T::wrap(y), x.shape())
}

/// Normalises `x` into `y` (row-major, `x.size()` elements).
fn norm_into<T: NormFloat>(
    kind: NormKind,
    x: &Array,
    weight: Option<&Array>,
    bias: Option<&Array>,
    eps: f32,
    y: &mut [T],
) -> Result<()> {
    let d = x.shape().last().copied().unwrap_or(1);
    if y.is_empty() {
        // No rows, or rows of length 0: nothing to compute (and no division by d).
        return Ok(());
    }
    let w = weight.map(param_values::<T>).transpose()?;
    let b = bias.map(param_values::<T>).transpose()?;
    let job = Job {
        kind,
        rows: RowIndex::new(x),
        d,
        eps: T::C::from_f64(f64::from(eps)),
        inv_d: T::C::from_f64(1.0 / d as f64),
        affine: Affine {
            w: w.as_deref(),
            b: b.as_deref(),
        },
    };
    let stride = x.strides().last().copied().unwrap_or(1);
    if x.dtype() == T::DTYPE && stride == 1 && T::simd_rows(&job, x.cpu_buffer::<T>()?, y) {
        return Ok(());
    }
    if x.dtype() == T::DTYPE {
        let loader = SameDtype {
            buf: x.cpu_buffer::<T>()?,
            stride,
            d,
        };
        job.run(&loader, y)?;
    } else {
        dispatch_dtype!(x.dtype(), S => {
            let loader = Converting::<S, T> {
                buf: x.cpu_buffer::<S>()?,
                stride,
                d,
                out: std::marker::PhantomData,
            };
            job.run(&loader, y)?;
        });
    }
    Ok(())
}

/// A weight or bias vector (any dtype and layout) as MLX's `astype(out)` would make it,
/// held in the compute type.
fn param_values<T: NormFloat>(a: &Array) -> Result<Vec<T::C>> {
    if a.dtype() == T::DTYPE {
        // Already of the output dtype: widening is exact, no rounding to do (and a
        // conversion through f64 costs more than the whole op on a single row).
        if a.device() == Device::Cpu {
            if let Some(s) = a.contiguous_slice::<T>()? {
                return host_pool::map(s, T::widen);
            }
        }
        return host_pool::map(&a.to_vec::<T>()?, T::widen);
    }
    host_pool::map(&a.to_f64_vec()?, T::from_f64_rounded)
}

/// Everything a row needs besides its data.
struct Job<'a, C> {
    kind: NormKind,
    rows: RowIndex,
    d: usize,
    eps: C,
    inv_d: C,
    affine: Affine<'a, C>,
}

impl<C: Acc> Job<'_, C> {
    /// Normalises every row into `y` (row-major, `rows * d` elements).
    ///
    /// # Errors
    /// `Error::OutOfMemory` when a thread's scratch rows cannot be allocated.
    fn run<T: NormFloat<C = C>, L: LoadRow<T>>(&self, loader: &L, y: &mut [T]) -> Result<()> {
        self.split(
            y,
            || Scratch::new(self.d),
            |first, chunk, scratch| self.rows_into(loader, first, chunk, scratch),
        )
    }

    /// Calls `rows(first, chunk, scratch)` over `y` cut into chunks of whole rows (`first` is
    /// the chunk's first row), on the rayon pool when `y` is large enough; each thread makes
    /// its scratch once with `scratch`. A thread whose scratch cannot be made writes nothing
    /// and its error is returned.
    fn split<T: Send, S>(
        &self,
        y: &mut [T],
        scratch: impl Fn() -> Result<S> + Sync + Send,
        rows: impl Fn(usize, &mut [T], &mut S) + Sync,
    ) -> Result<()> {
        let d = self.d;
        if y.len() < PARALLEL_MIN_ELEMENTS || rayon::current_num_threads() == 1 {
            rows(0, y, &mut scratch()?);
            return Ok(());
        }
        let rows_per_task = (TASK_ELEMENTS / d).max(1);
        let failed = std::sync::Mutex::new(None);
        y.par_chunks_mut(rows_per_task * d)
            .enumerate()
            .for_each_init(&scratch, |s, (task, chunk)| match s {
                Ok(s) => rows(task * rows_per_task, chunk, s),
                Err(e) => {
                    if let Ok(mut first) = failed.lock() {
                        first.get_or_insert_with(|| e.clone());
                    }
                }
            });
        match failed.into_inner() {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err(Error::invalid("internal: a normalization task panicked")),
        }
    }

    /// Normalises rows `first..` into `y`, one row per `d` elements, with the widest vector
    /// instructions the CPU has. The crate is built for baseline x86-64 (SSE2), where the
    /// bf16 rounding and narrowing alone cost more than the memory traffic; the same code
    /// compiled for AVX2 keeps up with DRAM.
    fn rows_into<T: NormFloat<C = C>, L: LoadRow<T>>(
        &self,
        loader: &L,
        first: usize,
        y: &mut [T],
        scratch: &mut Scratch<C>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: the CPU has every feature `rows_into_avx2` is compiled for.
                unsafe { self.rows_into_avx2(loader, first, y, scratch) };
                return;
            }
        }
        self.rows_into_generic(loader, first, y, scratch);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_into_avx2<T: NormFloat<C = C>, L: LoadRow<T>>(
        &self,
        loader: &L,
        first: usize,
        y: &mut [T],
        scratch: &mut Scratch<C>,
    ) {
        self.rows_into_generic(loader, first, y, scratch);
    }

    /// The row loop itself. Everything it calls is `#[inline(always)]`, so each
    /// feature-specific caller gets its own vectorisation of the whole pipeline.
    #[inline(always)]
    fn rows_into_generic<T: NormFloat<C = C>, L: LoadRow<T>>(
        &self,
        loader: &L,
        first: usize,
        y: &mut [T],
        scratch: &mut Scratch<C>,
    ) {
        for (r, out) in y.chunks_exact_mut(self.d).enumerate() {
            let offset = self.rows.offset(first + r);
            match loader.load(offset, &mut scratch.row) {
                Row::InPlace(row) => self.row_into(row, T::widen, &mut scratch.out, out),
                Row::Widened(row) => self.row_into(row, |v| v, &mut scratch.out, out),
            }
        }
    }

    /// Statistics of one row, then its output. `widen` turns a stored element into the
    /// compute type.
    #[inline(always)]
    fn row_into<T: NormFloat<C = C>, E: Copy>(
        &self,
        row: &[E],
        widen: impl Fn(E) -> C + Copy,
        staging: &mut [C],
        out: &mut [T],
    ) {
        let (mean, inv) = match self.kind {
            NormKind::Rms => {
                let ms = lane_sum(row, |v| {
                    let x = widen(v);
                    x * x
                }) * self.inv_d;
                (C::ZERO, C::ONE / (ms + self.eps).sqrt())
            }
            NormKind::Layer => {
                let mean = lane_sum(row, widen) * self.inv_d;
                let var = lane_sum(row, |v| {
                    let c = widen(v) - mean;
                    c * c
                }) * self.inv_d;
                (mean, C::ONE / (var + self.eps).sqrt())
            }
        };
        let row_stats = RowStats {
            mean: mean.canonical_nan(),
            inv: inv.canonical_nan(),
        };
        T::write_row(row, widen, row_stats, self.affine, staging, out);
    }
}

/// A row's mean (0 for RMS normalisation) and `1 / sqrt(var + eps)`. A NaN here is always
/// the canonical quiet NaN (see [`bf16_bits_rne_unchecked`]).
#[derive(Clone, Copy)]
struct RowStats<C> {
    mean: C,
    inv: C,
}

/// Per-thread scratch rows: the widened input row and a staging row for the output.
struct Scratch<C> {
    row: Vec<C>,
    out: Vec<C>,
}

impl<C: Acc> Scratch<C> {
    /// # Errors
    /// `Error::OutOfMemory` when two rows of `d` elements cannot be allocated.
    fn new(d: usize) -> Result<Self> {
        Ok(Scratch {
            row: host_pool::filled(d, C::ZERO)?,
            out: host_pool::filled(d, C::ZERO)?,
        })
    }
}

/// Buffer offset of each row's first element: the leading axes of `x`, with axes that step
/// through memory evenly merged so most layouts need a single division per row.
struct RowIndex {
    base: isize,
    /// Innermost axis last.
    shape: Vec<usize>,
    strides: Vec<isize>,
}

impl RowIndex {
    fn new(x: &Array) -> Self {
        let lead = x.ndim().saturating_sub(1);
        let mut shape: Vec<usize> = Vec::with_capacity(lead);
        let mut strides: Vec<isize> = Vec::with_capacity(lead);
        for (&n, &s) in x.shape()[..lead].iter().zip(&x.strides()[..lead]) {
            if n == 1 {
                continue;
            }
            // The previous (outer) axis folds into this one when its stride spans exactly
            // this axis: together they step through memory evenly.
            match (shape.last_mut(), strides.last_mut()) {
                (Some(outer_n), Some(outer_s)) if *outer_s == s * n as isize => {
                    *outer_n *= n;
                    *outer_s = s;
                }
                _ => {
                    shape.push(n);
                    strides.push(s);
                }
            }
        }
        RowIndex {
            base: x.offset() as isize,
            shape,
            strides,
        }
    }

    /// The distance from each row's offset to the next one's, when all rows are evenly
    /// spaced (at most one leading axis remains after merging).
    fn uniform_step(&self) -> Option<isize> {
        match self.strides.as_slice() {
            [] => Some(0),
            [s] => Some(*s),
            _ => None,
        }
    }

    #[inline(always)]
    fn offset(&self, mut row: usize) -> isize {
        let mut off = self.base;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            off += (row % n) as isize * s;
            row /= n;
        }
        off
    }
}

/// Weight and bias rows in the compute type (already rounded to the output dtype).
#[derive(Clone, Copy)]
struct Affine<'a, C> {
    w: Option<&'a [C]>,
    b: Option<&'a [C]>,
}

/// One row of `x` as the kernels read it.
enum Row<'a, T, C> {
    /// Contiguous in the input buffer, in the output dtype: read in place and widened element
    /// by element, so the row streams from memory once with no copy.
    InPlace(&'a [T]),
    /// Converted into scratch in the compute type (strided rows, other input dtypes, f16).
    Widened(&'a [C]),
}

/// Fetches rows of `x` for output dtype `T`.
trait LoadRow<T: NormFloat>: Sync {
    /// The row starting at buffer `offset`, in place when possible, else in `scratch`.
    fn load<'a>(&'a self, offset: isize, scratch: &'a mut [T::C]) -> Row<'a, T, T::C>;
}

/// Rows of an input that already has the output dtype.
struct SameDtype<'a, T> {
    buf: &'a [T],
    stride: isize,
    d: usize,
}

impl<T: NormFloat> LoadRow<T> for SameDtype<'_, T> {
    #[inline(always)]
    fn load<'a>(&'a self, offset: isize, scratch: &'a mut [T::C]) -> Row<'a, T, T::C> {
        if self.stride == 1 {
            let start = offset as usize;
            T::contiguous_row(&self.buf[start..start + self.d], scratch)
        } else {
            for (i, s) in scratch.iter_mut().enumerate() {
                *s = self.buf[(offset + i as isize * self.stride) as usize].widen();
            }
            Row::Widened(scratch)
        }
    }
}

/// Rows of an input of another dtype `S`, cast to the output dtype `T` element by element
/// (MLX's `x.astype(out)`, fused into the load instead of materialised).
struct Converting<'a, S, T> {
    buf: &'a [S],
    stride: isize,
    d: usize,
    out: std::marker::PhantomData<T>,
}

impl<S: Element, T: NormFloat> LoadRow<T> for Converting<'_, S, T> {
    #[inline(always)]
    fn load<'a>(&'a self, offset: isize, scratch: &'a mut [T::C]) -> Row<'a, T, T::C> {
        if self.stride == 1 {
            let start = offset as usize;
            let src = &self.buf[start..start + self.d];
            for (s, &v) in scratch.iter_mut().zip(src) {
                *s = T::from_f64_rounded(v.to_f64());
            }
        } else {
            for (i, s) in scratch.iter_mut().enumerate() {
                let v = self.buf[(offset + i as isize * self.stride) as usize];
                *s = T::from_f64_rounded(v.to_f64());
            }
        }
        Row::Widened(scratch)
    }
}

/// The accumulation type: f32 for every output dtype but f64.
trait Acc:
    Copy
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn sqrt(self) -> Self;
    /// `self`, or the canonical quiet NaN if `self` is any NaN.
    fn canonical_nan(self) -> Self;
}

/// Implements [`Acc`] for the float type `$t`.
macro_rules! acc_impl {
    ($t:ident) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            #[inline(always)]
            fn canonical_nan(self) -> Self {
                if self.is_nan() {
                    $t::NAN
                } else {
                    self
                }
            }
        }
    };
}
acc_impl!(f32);
acc_impl!(f64);

/// Sums `f(v)` over a row with [`LANES`] independent accumulators.
#[inline(always)]
fn lane_sum<E: Copy, C: Acc>(row: &[E], f: impl Fn(E) -> C) -> C {
    let mut acc = [C::ZERO; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = *a + f(v);
        }
    }
    let mut rest = C::ZERO;
    for &v in chunks.remainder() {
        rest = rest + f(v);
    }
    // A plain fold: a pairwise tree here makes LLVM vectorise the main loop 2-wide.
    acc.iter().fold(rest, |a, &b| a + b)
}

/// Writes `narrow(affine(round((x - mean) * inv)))` for every element: `round` rounds to the
/// output precision while staying in the compute type, `narrow` is the final conversion.
/// Each op of MLX's fallback (normalise, cast, `* w`, `+ b`) rounds once, in that order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_affine<E: Copy, C: Acc, T>(
    row: &[E],
    widen: impl Fn(E) -> C,
    stats: RowStats<C>,
    affine: Affine<'_, C>,
    out: &mut [T],
    round: impl Fn(C) -> C,
    narrow: impl Fn(C) -> T,
) {
    let RowStats { mean, inv } = stats;
    let xhat = |v: E| (widen(v) - mean) * inv;
    match (affine.w, affine.b) {
        (None, None) => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = narrow(xhat(x));
            }
        }
        (Some(w), None) => {
            for ((o, &x), &w) in out.iter_mut().zip(row).zip(w) {
                *o = narrow(round(xhat(x)) * w);
            }
        }
        (None, Some(b)) => {
            for ((o, &x), &b) in out.iter_mut().zip(row).zip(b) {
                *o = narrow(round(xhat(x)) + b);
            }
        }
        (Some(w), Some(b)) => {
            for (((o, &x), &w), &b) in out.iter_mut().zip(row).zip(w).zip(b) {
                *o = narrow(round(round(xhat(x)) * w) + b);
            }
        }
    }
}

/// An output dtype of the norm kernels: a [`Widen`] float whose compute type is an [`Acc`]
/// (f32, or f64 for f64), with the row reading and writing that differ per dtype.
trait NormFloat: Float + Widen<C: Acc> {
    /// How a contiguous row is read: in place, widening each element as it is used, where
    /// that vectorises well (f32, f64, bf16); an f16 row is converted into `scratch` with
    /// one slice conversion ([`Widen::widen_slice`], F16C where the CPU has it) instead.
    fn contiguous_row<'a>(src: &'a [Self], scratch: &'a mut [Self::C]) -> Row<'a, Self, Self::C>;
    /// `v` cast to this dtype the way MLX's `astype` does (through f32 for f16/bf16, one
    /// rounding to nearest even), returned in the compute type.
    #[inline(always)]
    fn from_f64_rounded(v: f64) -> Self::C {
        Self::narrow(Self::C::from_f64(v)).widen()
    }
    /// Writes one normalised row; `widen` reads an element of `row`, `staging` has the row's
    /// length.
    fn write_row<E: Copy>(
        row: &[E],
        widen: impl Fn(E) -> Self::C,
        stats: RowStats<Self::C>,
        affine: Affine<'_, Self::C>,
        staging: &mut [Self::C],
        out: &mut [Self],
    );
    /// Runs `job` over `buf` (rows of this dtype, each contiguous) into `y` with a
    /// hand-vectorised kernel for this dtype and CPU, and returns `true`; or returns `false`
    /// without touching `y` where there is none.
    fn simd_rows(job: &Job<'_, Self::C>, buf: &[Self], y: &mut [Self]) -> bool {
        let _ = (job, buf, y);
        false
    }
}

/// `NormFloat` for a type that is its own compute type (no widening, no rounding);
/// `simd` names its hand-vectorised row kernel where it has one.
macro_rules! native_norm_float {
    ($t:ty $(, simd: $simd:path)?) => {
        impl NormFloat for $t {
            #[inline(always)]
            fn contiguous_row<'a>(src: &'a [$t], _scratch: &'a mut [$t]) -> Row<'a, $t, $t> {
                Row::InPlace(src)
            }
            #[inline(always)]
            fn write_row<E: Copy>(
                row: &[E],
                widen: impl Fn(E) -> $t,
                stats: RowStats<$t>,
                affine: Affine<'_, $t>,
                _staging: &mut [$t],
                out: &mut [$t],
            ) {
                write_affine(row, widen, stats, affine, out, |v| v, |v| v);
            }
            $(
                fn simd_rows(job: &Job<'_, $t>, buf: &[$t], y: &mut [$t]) -> bool {
                    $simd(job, buf, y)
                }
            )?
        }
    };
}

native_norm_float!(f32, simd: avx2_rows);
native_norm_float!(f64);

/// bf16 rows are read in place (widening is a shift) and written with the unchecked
/// rounding, whose NaN precondition the row pipeline meets (see [`bf16_bits_rne_unchecked`]).
impl NormFloat for bf16 {
    #[inline(always)]
    fn contiguous_row<'a>(src: &'a [bf16], _scratch: &'a mut [f32]) -> Row<'a, bf16, f32> {
        Row::InPlace(src)
    }
    #[inline(always)]
    fn write_row<E: Copy>(
        row: &[E],
        widen: impl Fn(E) -> f32,
        stats: RowStats<f32>,
        affine: Affine<'_, f32>,
        _staging: &mut [f32],
        out: &mut [bf16],
    ) {
        write_affine(row, widen, stats, affine, out, bf16_round_unchecked, |v| {
            bf16::from_bits(bf16_bits_rne_unchecked(v))
        });
    }
    fn simd_rows(job: &Job<'_, f32>, buf: &[bf16], y: &mut [bf16]) -> bool {
        avx2_rows(job, buf, y)
    }
}

/// f16 rows are widened into scratch and written through staging, both with `half`'s slice
/// conversions (F16C where the CPU has it).
impl NormFloat for f16 {
    #[inline(always)]
    fn contiguous_row<'a>(src: &'a [f16], scratch: &'a mut [f32]) -> Row<'a, f16, f32> {
        <f16 as Widen>::widen_slice(src, scratch);
        Row::Widened(scratch)
    }
    /// Staged through `staging` with `half`'s slice conversions (F16C where the CPU has it):
    /// each rounding to f16 is a narrow into `out`, widened back when another op follows.
    #[inline(always)]
    fn write_row<E: Copy>(
        row: &[E],
        widen: impl Fn(E) -> f32,
        stats: RowStats<f32>,
        affine: Affine<'_, f32>,
        staging: &mut [f32],
        out: &mut [f16],
    ) {
        let RowStats { mean, inv } = stats;
        for (s, &x) in staging.iter_mut().zip(row) {
            *s = (widen(x) - mean) * inv;
        }
        out.convert_from_f32_slice(staging);
        if let Some(w) = affine.w {
            out.convert_to_f32_slice(staging);
            for (s, &w) in staging.iter_mut().zip(w) {
                *s *= w;
            }
            out.convert_from_f32_slice(staging);
        }
        if let Some(b) = affine.b {
            out.convert_to_f32_slice(staging);
            for (s, &b) in staging.iter_mut().zip(b) {
                *s += b;
            }
            out.convert_from_f32_slice(staging);
        }
    }
    fn simd_rows(job: &Job<'_, f32>, buf: &[f16], y: &mut [f16]) -> bool {
        avx2_rows(job, buf, y)
    }
}

/// [`NormFloat::simd_rows`] for the 16-bit floats: the AVX2 kernel of [`avx2`] where the
/// CPU can run it.
#[cfg(target_arch = "x86_64")]
fn avx2_rows<H: avx2::Format>(job: &Job<'_, f32>, buf: &[H], y: &mut [H]) -> bool {
    match avx2::Kernel::<H>::new(job) {
        Some(kernel) => {
            // Scratch-free, so the split cannot fail.
            job.split(
                y,
                || Ok(()),
                |first, chunk, _| kernel.rows(buf, first, chunk),
            )
            .is_ok()
        }
        None => false,
    }
}

/// Without x86-64 there is no hand-vectorised kernel: the portable loop runs.
#[cfg(not(target_arch = "x86_64"))]
fn avx2_rows<H>(_job: &Job<'_, f32>, _buf: &[H], _y: &mut [H]) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_index_merges_even_axes() {
        let x = Array::from_vec((0..24).map(|v| v as f32).collect(), &[2, 3, 4]).unwrap();
        let rows = RowIndex::new(&x);
        assert_eq!(rows.shape, vec![6]);
        let offsets: Vec<isize> = (0..6).map(|r| rows.offset(r)).collect();
        assert_eq!(offsets, vec![0, 4, 8, 12, 16, 20]);
        let t = x.transpose(&[1, 0, 2]).unwrap();
        let rows = RowIndex::new(&t);
        let offsets: Vec<isize> = (0..6).map(|r| rows.offset(r)).collect();
        assert_eq!(offsets, vec![0, 12, 4, 16, 8, 20]);
    }

    /// Throughput on [4096, 4096]: kernel only (into a reused, already faulted-in buffer)
    /// and end to end through `fast::*` (which allocates its output), each interleaved with
    /// a 2-thread copy of the same bytes so that both see the same machine load; prints best
    /// times and the median of the per-round ratios. Also one row in cache on one thread. A
    /// benchmark, not a check: run with
    /// `cargo test --release -p ferrofast --lib norm_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn norm_throughput() {
        use std::time::Instant;
        fn time(f: &mut impl FnMut()) -> f64 {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        }
        /// Alternates `copy` and `op` `rounds` times: (best copy, best op, median ratio).
        fn paired(rounds: usize, mut copy: impl FnMut(), mut op: impl FnMut()) -> (f64, f64, f64) {
            let (mut best_c, mut best_o, mut ratios) = (f64::MAX, f64::MAX, Vec::new());
            for _ in 0..rounds {
                let c = time(&mut copy);
                let o = time(&mut op);
                best_c = best_c.min(c);
                best_o = best_o.min(o);
                ratios.push(c / o);
            }
            ratios.sort_by(f64::total_cmp);
            (best_c, best_o, ratios[rounds / 2])
        }
        fn bench<T: NormFloat>(dt: DType) {
            let dev = crate::Device::Cpu;
            let x = Array::randn(&[4096, 4096], dt, 1, &dev).unwrap();
            let w = Array::randn(&[4096], dt, 2, &dev).unwrap();
            let b = Array::randn(&[4096], dt, 3, &dev).unwrap();
            let mut y = host_pool::take_or_zeroed::<T>(x.size()).unwrap();
            y.fill(T::from_f32(1.0));
            let src = x.contiguous_slice::<T>().unwrap().unwrap();
            let mut dst = host_pool::take_or_zeroed::<T>(x.size()).unwrap();
            dst.fill(T::from_f32(1.0));
            let mut copy = || {
                dst.par_chunks_mut(1 << 16)
                    .zip(src.par_chunks(1 << 16))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            };
            let bytes = 2.0 * x.nbytes() as f64;
            let gbs = |t: f64| bytes / t / 1e9;
            let xs = Array::randn(&[64, 4096], dt, 4, &dev).unwrap();
            let mut ys = host_pool::take_or_zeroed::<T>(xs.size()).unwrap();
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            for kind in [NormKind::Rms, NormKind::Layer] {
                let bias = Some(&b).filter(|_| kind == NormKind::Layer);
                let name = if kind == NormKind::Rms {
                    "rms_norm  "
                } else {
                    "layer_norm"
                };
                let (c, k, r) = paired(15, &mut copy, || {
                    norm_into(kind, &x, Some(&w), bias, 1e-5, &mut y).unwrap()
                });
                println!(
                    "{name} {dt:>8} kernel    : {:6.2} ms {:5.1} GB/s | copy {:5.1} GB/s | \
                     median ratio {:3.0}%",
                    k * 1e3,
                    gbs(k),
                    gbs(c),
                    100.0 * r
                );
                let (c, e, r) = paired(7, &mut copy, || {
                    let args = match kind {
                        NormKind::Rms => NormArgs::rms(&x, Some(&w), 1e-5),
                        NormKind::Layer => NormArgs::layer(&x, Some(&w), bias, 1e-5),
                    };
                    let out = args.and_then(|a| run(&a));
                    std::hint::black_box(out.unwrap());
                });
                println!(
                    "{name} {dt:>8} end to end: {:6.2} ms {:5.1} GB/s | copy {:5.1} GB/s | \
                     median ratio {:3.0}%",
                    e * 1e3,
                    gbs(e),
                    gbs(c),
                    100.0 * r
                );
                let t = one.install(|| {
                    (0..300)
                        .map(|_| {
                            time(&mut || {
                                norm_into(kind, &xs, Some(&w), bias, 1e-5, &mut ys).unwrap()
                            })
                        })
                        .fold(f64::MAX, f64::min)
                });
                println!(
                    "{name} {dt:>8} in cache, 1 thread: {:.0} ns per row",
                    t * 1e9 / 64.0
                );
            }
        }
        let n = 64 << 20;
        let src = vec![1.5f32; n];
        let mut dst = vec![0.5f32; n];
        let bytes = 2.0 * (n * 4) as f64;
        let t = (0..10)
            .map(|_| {
                time(&mut || {
                    dst.par_chunks_mut(1 << 16)
                        .zip(src.par_chunks(1 << 16))
                        .for_each(|(d, s)| d.copy_from_slice(s))
                })
            })
            .fold(f64::MAX, f64::min);
        println!(
            "copy 256 MiB, 2 threads, existing buffer: {:.1} GB/s",
            bytes / t / 1e9
        );
        let t = (0..5)
            .map(|_| {
                time(&mut || {
                    let mut fresh = vec![0.0f32; n];
                    fresh
                        .par_chunks_mut(1 << 16)
                        .zip(src.par_chunks(1 << 16))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    std::hint::black_box(&fresh);
                })
            })
            .fold(f64::MAX, f64::min);
        println!(
            "copy 256 MiB, 2 threads, fresh allocation: {:.1} GB/s",
            bytes / t / 1e9
        );
        drop((src, dst));
        bench::<f32>(DType::F32);
        bench::<bf16>(DType::BF16);
        bench::<f16>(DType::F16);
    }
}
