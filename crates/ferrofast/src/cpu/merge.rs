//! CPU kernel of `merge_attention_states`, and the float32 accumulation the context-parallel
//! backward sums its partial gradients with.
//!
//! Rows (`B * H * T` of them, `D_v` elements each) are cut into blocks that run on the rayon
//! pool (small inputs stay on the calling thread). Per row the two factors
//! `c_a = w_a / (w_a + w_b)`, `c_b = w_b / (w_a + w_b)` and the merged log-sum-exp come
//! from `ops::merge::row_factors_*`; the row is then `c_a out_a + c_b out_b`, with a part
//! whose factor is exactly 0 not read at all, so each row takes one of four branch-free
//! loops that the compiler vectorises (compiled a second time for AVX2 and FMA, picked at
//! run time). The parts are read in place through their strides; rows whose feature axis
//! has unit stride are read as slices.

use super::simd::{bf16_bits_rne, bf16_widen, f16_to_f32, f32_to_f16, has_avx2_fma};
use crate::array::{host_pool, Array};
use crate::ops::merge::{row_factors_f32, row_factors_f64, MergeArgs};
use crate::{DType, Element, Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, Mul};

/// Elements a parallel task aims to cover.
const TASK_ELEMS: usize = 1 << 15;
/// Inputs with fewer elements than this stay on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// The arithmetic of a merge: f32 (the log-sum-exps are f32) or f64.
trait Compute:
    Element + Copy + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self>
{
    const ZERO: Self;
    /// `(c_a, c_b, lse)` of one row.
    fn factors(la: Self, lb: Self) -> (Self, Self, Self);
}

impl Compute for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn factors(la: f32, lb: f32) -> (f32, f32, f32) {
        row_factors_f32(la, lb)
    }
}

impl Compute for f64 {
    const ZERO: f64 = 0.0;
    #[inline(always)]
    fn factors(la: f64, lb: f64) -> (f64, f64, f64) {
        row_factors_f64(la, lb)
    }
}

/// An output element type and its conversions to and from the arithmetic type `C`.
trait Elem<C>: Element {
    fn widen(self) -> C;
    fn narrow(v: C) -> Self;
}

impl Elem<f32> for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}

impl Elem<f32> for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_widen(self.to_bits())
    }
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        bf16::from_bits(bf16_bits_rne(v))
    }
}

impl Elem<f32> for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        f16::from_bits(f32_to_f16(v))
    }
}

impl Elem<f64> for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(v: f64) -> f64 {
        v
    }
}

/// Runs a validated `merge_attention_states` call on the CPU: `(out, lse)`, both new
/// row-major arrays.
pub(crate) fn run(args: &MergeArgs) -> Result<(Array, Array)> {
    match args.dtype {
        DType::F32 => merge_typed::<f32, f32>(args),
        DType::F16 => merge_typed::<f16, f32>(args),
        DType::BF16 => merge_typed::<bf16, f32>(args),
        DType::F64 => merge_typed::<f64, f64>(args),
        other => Err(Error::invalid(format!(
            "[merge_attention_states] Received unsupported type {other}."
        ))),
    }
}

/// One strided view `(B, H, T[, D_v])`: its buffer, offset and strides.
struct View<'a, T> {
    data: &'a [T],
    offset: isize,
    strides: [isize; 4],
}

impl<'a, T: Element> View<'a, T> {
    fn new(a: &'a Array) -> Result<View<'a, T>> {
        let s = a.strides();
        // (b, h, t[, j]): a 3-D log-sum-exp leaves the feature stride 0.
        let mut strides = [0isize; 4];
        strides[..s.len()].copy_from_slice(s);
        Ok(View {
            data: a.cpu_buffer::<T>()?,
            offset: a.offset() as isize,
            strides,
        })
    }

    /// Element offset of row `(b, h, t)`.
    #[inline(always)]
    fn row(&self, b: usize, h: usize, t: usize) -> isize {
        self.offset
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + t as isize * self.strides[2]
    }

    /// The `n` elements from row offset `row` as a slice, when they are unit-stride
    /// (`None` otherwise, and for `n = 0`).
    #[inline(always)]
    fn unit_row(&self, row: isize, n: usize) -> Option<&'a [T]> {
        (n > 0 && (self.strides[3] == 1 || n == 1)).then(|| &self.data[row as usize..][..n])
    }

    /// The element at row offset `row`, feature `j` (`strides[3]` apart).
    #[inline(always)]
    fn at(&self, row: isize, j: usize) -> T {
        self.data[(row + j as isize * self.strides[3]) as usize]
    }
}

fn merge_typed<T: Elem<C>, C: Compute>(args: &MergeArgs) -> Result<(Array, Array)> {
    let [bn, hn, tn, dv] = args.shape;
    let rows = bn * hn * tn;
    let mut out = host_pool::take_or_zeroed::<T>(rows * dv)?;
    let mut lse = host_pool::take_or_zeroed::<C>(rows)?;
    let oa = View::<T>::new(&args.out_a)?;
    let ob = View::<T>::new(&args.out_b)?;
    let la = View::<C>::new(&args.lse_a)?;
    let lb = View::<C>::new(&args.lse_b)?;
    let avx2 = has_avx2_fma();
    let block = |first: usize, out: &mut [T], lse: &mut [C]| {
        for (i, l) in lse.iter_mut().enumerate() {
            let r = first + i;
            let (b, h, t) = (r / (hn * tn), (r / tn) % hn, r % tn);
            let (ca, cb, m) = C::factors(la.at(la.row(b, h, t), 0), lb.at(lb.row(b, h, t), 0));
            *l = m;
            let o = &mut out[i * dv..][..dv];
            let (ra, rb) = (oa.row(b, h, t), ob.row(b, h, t));
            match (oa.unit_row(ra, dv), ob.unit_row(rb, dv)) {
                (Some(a), Some(bs)) => row_slices(o, ca, a, cb, bs, avx2),
                _ => {
                    for (j, x) in o.iter_mut().enumerate() {
                        let pa = if ca == C::ZERO {
                            C::ZERO
                        } else {
                            ca * oa.at(ra, j).widen()
                        };
                        let pb = if cb == C::ZERO {
                            C::ZERO
                        } else {
                            cb * ob.at(rb, j).widen()
                        };
                        *x = T::narrow(pa + pb);
                    }
                }
            }
        }
    };
    let rows_per_task = (TASK_ELEMS / dv.max(1)).max(1);
    if rows * dv.max(1) < PARALLEL_MIN_ELEMS {
        block(0, &mut out, &mut lse);
    } else {
        out.par_chunks_mut(rows_per_task * dv.max(1))
            .zip(lse.par_chunks_mut(rows_per_task))
            .enumerate()
            .for_each(|(task, (o, l))| block(task * rows_per_task, o, l));
    }
    let mut lse_shape = args.shape.to_vec();
    lse_shape.pop();
    Ok((
        Array::from_kernel_vec(out, &args.shape)?,
        Array::from_kernel_vec(lse, &lse_shape)?,
    ))
}

/// One row from unit-stride parts: `o = c_a a + c_b b`, a part with factor 0 not read.
#[inline]
fn row_slices<T: Elem<C>, C: Compute>(o: &mut [T], ca: C, a: &[T], cb: C, b: &[T], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma`, checked by the caller).
        return unsafe { row_slices_avx2(o, ca, a, cb, b) };
    }
    let _ = avx2;
    row_slices_generic(o, ca, a, cb, b)
}

/// [`row_slices_generic`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_slices_avx2<T: Elem<C>, C: Compute>(o: &mut [T], ca: C, a: &[T], cb: C, b: &[T]) {
    row_slices_generic(o, ca, a, cb, b)
}

#[inline(always)]
fn row_slices_generic<T: Elem<C>, C: Compute>(o: &mut [T], ca: C, a: &[T], cb: C, b: &[T]) {
    match (ca == C::ZERO, cb == C::ZERO) {
        (true, true) => o.fill(T::narrow(C::ZERO)),
        (false, true) => {
            for (x, &p) in o.iter_mut().zip(a) {
                *x = T::narrow(ca * p.widen());
            }
        }
        (true, false) => {
            for (x, &p) in o.iter_mut().zip(b) {
                *x = T::narrow(cb * p.widen());
            }
        }
        (false, false) => {
            for ((x, &p), &q) in o.iter_mut().zip(a).zip(b) {
                *x = T::narrow(ca * p.widen() + cb * q.widen());
            }
        }
    }
}

/// `acc + x` as a new row-major array of `x`'s shape, float32 (float64 for a float64 `x`;
/// `x` alone, converted, when `acc` is `None`): `x` of any floating dtype and strides, `acc`
/// of the result's dtype and `x`'s shape. One addition per element, in the result's dtype.
pub(crate) fn accumulate(acc: Option<&Array>, x: &Array) -> Result<Array> {
    if x.dtype() == DType::F64 {
        accumulate_typed::<f64>(acc, x)
    } else {
        accumulate_typed::<f32>(acc, x)
    }
}

fn accumulate_typed<T: Compute>(acc: Option<&Array>, x: &Array) -> Result<Array> {
    let mut sum = x.astype(T::DTYPE)?.to_vec::<T>()?;
    if let Some(acc) = acc {
        let a = acc.astype(T::DTYPE)?.to_vec::<T>()?;
        let add = |(s, &v): (&mut T, &T)| *s = v + *s;
        if sum.len() >= PARALLEL_MIN_ELEMS {
            sum.par_iter_mut().zip(a.par_iter()).for_each(add);
        } else {
            sum.iter_mut().zip(a.iter()).for_each(add);
        }
    }
    Array::from_kernel_vec(sum, x.shape())
}
