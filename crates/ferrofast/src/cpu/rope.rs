//! CPU kernel of `rope` (forward).
//!
//! The input is read in place through its strides as `(B, heads, T, D)` (all axes between the
//! first and the last two flattened into heads). Work is cut into groups of rows that share a
//! block of positions: each group fills a small cos/sin table for its positions once (it stays
//! in L1) and then rotates every row of the group against it, so the inner loop is a handful
//! of multiplies per element that the compiler vectorises (the table fill and the rotation
//! are compiled twice, for the build's baseline and for AVX2, picked at run time). Groups run
//! on the rayon pool; small inputs stay on the calling thread.
//!
//! Precision is that of MLX's fused GPU kernels: for f32/f16/bf16 the inverse frequencies,
//! the angle `(scale * pos) * inv_freq`, its cos/sin and the rotation are f32, and each output
//! is rounded once to the input dtype. Inputs in f64 are computed in f64 throughout.

#[cfg(target_arch = "x86_64")]
use super::simd::prefetch;
use super::simd::{has_avx2, Widen};
use crate::array::{host_pool, Array};
use crate::ops::rope::{RopeArgs, RopeFreqs, RopeOffsets};
use crate::{DType, Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, Mul, Sub};

/// Cos/sin pairs per group table: 2048 pairs of f32 cos and sin are 16 KiB, half of L1.
const TABLE_PAIRS: usize = 2048;
/// Elements a group aims to cover: enough to amortise its table, small enough to balance.
const GROUP_ELEMS: usize = 1 << 17;
/// Inputs smaller than this many elements stay on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Runs a validated `rope` call on the CPU and returns a new row-major array.
pub(crate) fn run(plan: &RopeArgs) -> Result<Array> {
    let a = &plan.x;
    let on_gpu = match (&plan.offsets, &plan.freqs) {
        (RopeOffsets::Device(o), _) => Some(o.device()),
        (_, RopeFreqs::Device(f)) => Some(f.device()),
        _ => None,
    };
    if let Some(dev) = on_gpu {
        return Err(Error::Device(format!(
            "[rope] the CPU kernel got offsets or freqs on {dev}"
        )));
    }
    match a.dtype() {
        DType::F32 => rope_typed::<f32>(a, plan),
        DType::F64 => rope_typed::<f64>(a, plan),
        DType::F16 => rope_typed::<f16>(a, plan),
        DType::BF16 => rope_typed::<bf16>(a, plan),
        other => Err(Error::invalid(format!(
            "[rope] Input must be a floating type but got {other}."
        ))),
    }
}

/// The arithmetic type of a rotation: f32 for f32/f16/bf16 inputs, f64 for f64 inputs.
trait Compute:
    Copy
    + Send
    + Sync
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + 'static
{
    /// The inverse frequency of every pair, in this precision.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the `dims / 2` values cannot be allocated.
    fn inv_freqs(plan: &RopeArgs) -> Result<Vec<Self>>;

    /// `cos` and `sin` of `theta_i = (scale * pos) * inv[i]` for every pair `i`.
    /// `max_abs_inv` is the largest `|inv[i]|` (it bounds the angles of the row).
    fn cos_sin(
        pos: i64,
        scale: f32,
        inv: &[Self],
        max_abs_inv: Self,
        cos: &mut [Self],
        sin: &mut [Self],
    );

    /// `|v|`.
    fn abs(self) -> Self;

    /// The larger of two values, ignoring NaN as `f32::max` does.
    fn max(self, other: Self) -> Self;
}

impl Compute for f32 {
    fn inv_freqs(plan: &RopeArgs) -> Result<Vec<f32>> {
        let half = plan.dims / 2;
        let mut out = host_pool::with_capacity(half)?;
        match &plan.freqs {
            // As the GPU kernels: d = i / (dims/2) and exp2(-d * log2(base)), all in f32.
            RopeFreqs::Base(base) => {
                let log2_base = base.log2();
                out.extend((0..half).map(|i| (-(i as f32 / half as f32) * log2_base).exp2()));
            }
            // MLX casts freqs to float32 before inverting them.
            RopeFreqs::Periods(p) => out.extend(p.iter().map(|&v| 1.0 / v as f32)),
            RopeFreqs::Device(f) => out.extend(f.to_vec::<f32>()?.iter().map(|&v| 1.0 / v)),
        }
        Ok(out)
    }

    #[inline(always)]
    fn cos_sin(
        pos: i64,
        scale: f32,
        inv: &[f32],
        max_abs_inv: f32,
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        let l = scale * pos as f32;
        if l.abs() * max_abs_inv <= FAST_SIN_COS_LIMIT {
            for ((&f, c), s) in inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
                (*s, *c) = sin_cos_f32(l * f);
            }
        } else {
            // Huge (or non-finite) angles: the fast reduction would lose accuracy.
            for ((&f, c), s) in inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
                (*s, *c) = (l * f).sin_cos();
            }
        }
    }

    fn abs(self) -> f32 {
        f32::abs(self)
    }

    fn max(self, other: f32) -> f32 {
        f32::max(self, other)
    }
}

impl Compute for f64 {
    fn inv_freqs(plan: &RopeArgs) -> Result<Vec<f64>> {
        let half = plan.dims / 2;
        let mut out = host_pool::with_capacity(half)?;
        match &plan.freqs {
            RopeFreqs::Base(base) => {
                let log2_base = f64::from(*base).log2();
                out.extend((0..half).map(|i| (-(i as f64 / half as f64) * log2_base).exp2()));
            }
            RopeFreqs::Periods(p) => out.extend(p.iter().map(|&v| 1.0 / v)),
            RopeFreqs::Device(f) => out.extend(f.to_f64_vec()?.iter().map(|&v| 1.0 / v)),
        }
        Ok(out)
    }

    #[inline(always)]
    fn cos_sin(
        pos: i64,
        scale: f32,
        inv: &[f64],
        _max_abs_inv: f64,
        cos: &mut [f64],
        sin: &mut [f64],
    ) {
        let l = f64::from(scale) * pos as f64;
        for ((&f, c), s) in inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            (*s, *c) = (l * f).sin_cos();
        }
    }

    fn abs(self) -> f64 {
        f64::abs(self)
    }

    fn max(self, other: f64) -> f64 {
        f64::max(self, other)
    }
}

/// Largest `|theta|` handed to [`sin_cos_f32`]: below it the three-part reduction leaves an
/// error under 1e-8, far below half an f32 ulp of the result.
const FAST_SIN_COS_LIMIT: f32 = (1u32 << 26) as f32;

/// `(sin, cos)` of an f32 angle, rounded to f32, without branches so that a loop over angles
/// vectorises (libm's `sin_cos` is a call per element and dominated the table cost).
///
/// The angle is widened to f64, reduced by `k * pi/2` (Cody-Waite with fdlibm's three-part
/// pi/2, exact products for `|k| < 2^20` and errors far below f32 resolution up to
/// [`FAST_SIN_COS_LIMIT`]) and the Taylor polynomials on `[-pi/4, pi/4]` are evaluated in f64
/// (truncation error < 4e-13), so both results are within one f32 rounding of the truth.
#[inline(always)]
fn sin_cos_f32(theta: f32) -> (f32, f32) {
    // Adding 1.5 * 2^52 rounds to an integer in the low mantissa bits (round to nearest).
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    const FRAC_2_PI: f64 = std::f64::consts::FRAC_2_PI;
    let pio2_1 = f64::from_bits(0x3FF9_21FB_5440_0000);
    let pio2_2 = f64::from_bits(0x3DD0_B461_1A60_0000);
    let pio2_2t = f64::from_bits(0x3BA3_198A_2E03_7073);

    let x = f64::from(theta);
    let shifted = x * FRAC_2_PI + SHIFTER;
    let quadrant = shifted.to_bits();
    let k = shifted - SHIFTER;
    let r = ((x - k * pio2_1) - k * pio2_2) - k * pio2_2t;
    let r2 = r * r;
    let s = r + r
        * r2
        * (-1.0 / 6.0
            + r2 * (1.0 / 120.0
                + r2 * (-1.0 / 5040.0
                    + r2 * (1.0 / 362_880.0
                        + r2 * (-1.0 / 39_916_800.0 + r2 * (1.0 / 6_227_020_800.0))))));
    let c = 1.0
        + r2 * (-0.5
            + r2 * (1.0 / 24.0
                + r2 * (-1.0 / 720.0
                    + r2 * (1.0 / 40_320.0
                        + r2 * (-1.0 / 3_628_800.0 + r2 * (1.0 / 479_001_600.0))))));
    // Quadrant q: rotate (sin, cos) by q * 90 degrees.
    let odd = quadrant & 1 != 0;
    let (s, c) = (if odd { c } else { s }, if odd { -s } else { c });
    let flip = (quadrant & 2) << 62;
    (
        f64::from_bits(s.to_bits() ^ flip) as f32,
        f64::from_bits(c.to_bits() ^ flip) as f32,
    )
}

/// A floating element the kernel reads and writes: a [`Widen`] dtype whose compute type is
/// a [`Compute`] (f32, or f64 for f64). Implemented for every such type; adds nothing to
/// [`Widen`], whose conversions are branch-free so that the rotation loop vectorises.
trait RopeElem: Widen<C: Compute> {}

impl<T: Widen<C: Compute>> RopeElem for T {}

/// Rotates the first `cos.len()` pairs of `x` into `o` (`x.len() == o.len() == 2 *
/// cos.len()`), with the element conversions inlined so that the loop vectorises.
#[inline(always)]
fn rotate_pairs<T: RopeElem>(
    x: &[T],
    o: &mut [MaybeUninit<T>],
    cos: &[T::C],
    sin: &[T::C],
    traditional: bool,
) {
    debug_assert!(x.len() == o.len() && x.len() == 2 * cos.len() && sin.len() == cos.len());
    if traditional {
        for (((xp, op), &c), &s) in x
            .chunks_exact(2)
            .zip(o.chunks_exact_mut(2))
            .zip(cos)
            .zip(sin)
        {
            let (a, b) = (xp[0].widen(), xp[1].widen());
            op[0] = MaybeUninit::new(T::narrow(a * c - b * s));
            op[1] = MaybeUninit::new(T::narrow(a * s + b * c));
        }
    } else {
        let half = cos.len();
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = o.split_at_mut(half);
        for ((((&p, &q), (u, v)), &c), &s) in x1
            .iter()
            .zip(x2)
            .zip(o1.iter_mut().zip(o2.iter_mut()))
            .zip(cos)
            .zip(sin)
        {
            let (a, b) = (p.widen(), q.widen());
            *u = MaybeUninit::new(T::narrow(a * c - b * s));
            *v = MaybeUninit::new(T::narrow(a * s + b * c));
        }
    }
}

/// The input seen as `(B, heads, T, D)` over its buffer.
struct Layout {
    heads: usize,
    seq: usize,
    dim: usize,
    /// `(extent, stride)` of each head axis, outermost first.
    mid: Vec<(usize, isize)>,
    batch_stride: isize,
    seq_stride: isize,
    dim_stride: isize,
    offset: isize,
}

impl Layout {
    fn new(a: &Array) -> Layout {
        let n = a.ndim();
        let (shape, strides) = (a.shape(), a.strides());
        let mid: Vec<(usize, isize)> = (1..n - 2).map(|k| (shape[k], strides[k])).collect();
        Layout {
            heads: mid.iter().map(|m| m.0).product(),
            seq: shape[n - 2],
            dim: shape[n - 1],
            mid,
            batch_stride: strides[0],
            seq_stride: strides[n - 2],
            dim_stride: strides[n - 1],
            offset: a.offset() as isize,
        }
    }

    /// Buffer offset of element `(b, h, 0, 0)` for row `r = b * heads + h`.
    fn row_base(&self, r: usize) -> isize {
        let (b, mut h) = (r / self.heads, r % self.heads);
        let mut off = self.offset + b as isize * self.batch_stride;
        for &(extent, stride) in self.mid.iter().rev() {
            off += (h % extent) as isize * stride;
            h /= extent;
        }
        off
    }
}

/// True if every element of `a` lies inside a buffer of `len` elements (checked once so the
/// kernel's indexing cannot go out of bounds).
fn view_fits(a: &Array, len: usize) -> bool {
    let (mut lo, mut hi) = (a.offset() as isize, a.offset() as isize);
    for (&d, &s) in a.shape().iter().zip(a.strides()) {
        let span = (d as isize - 1) * s;
        if span < 0 {
            lo += span;
        } else {
            hi += span;
        }
    }
    lo >= 0 && (hi as usize) < len
}

/// Rows `(row index, output block)` that share one block of positions (and one offset).
struct Group<'o, T> {
    batch: usize,
    block: usize,
    rows: Vec<(usize, &'o mut [MaybeUninit<T>])>,
}

fn rope_typed<T: RopeElem>(a: &Array, plan: &RopeArgs) -> Result<Array> {
    let n = a.size();
    let mut out = host_pool::take_uninit::<T>(n)?;
    rope_into(a, plan, &mut out.spare_capacity_mut()[..n], Isa::detect())?;
    // SAFETY: `rope_into` succeeded, and on success it has written all `n` elements: every
    // output row lies in exactly one group piece, and every row of a piece is written in
    // full (rotated features by `rotate_pairs`, the rest by the tail copy).
    unsafe { out.set_len(n) };
    Array::from_kernel_vec(out, a.shape())
}

/// Writes `rope(a)` into `out` (row-major, `a.size()` elements) with the kernels compiled for
/// `isa`; on success every element of `out` has been written.
fn rope_into<T: RopeElem>(
    a: &Array,
    plan: &RopeArgs,
    out: &mut [MaybeUninit<T>],
    isa: Isa,
) -> Result<()> {
    let size = a.size();
    if out.len() != size {
        return Err(Error::Shape(format!(
            "[rope] output buffer has {} elements but the input has {size}",
            out.len()
        )));
    }
    if size == 0 {
        return Ok(());
    }
    let src = a.cpu_buffer::<T>()?;
    if !view_fits(a, src.len()) {
        return Err(Error::Shape(format!(
            "[rope] the input view (offset {}, strides {:?}) exceeds its buffer of {} elements",
            a.offset(),
            a.strides(),
            src.len()
        )));
    }
    let lay = Layout::new(a);
    let half = plan.dims / 2;
    let inv = T::C::inv_freqs(plan)?;
    let max_abs_inv = inv
        .iter()
        .fold(T::C::default(), |m, &f| Compute::max(m, f.abs()));
    let per_batch = matches!(plan.offsets, RopeOffsets::PerBatch(_));

    // Position blocks whose table fits in TABLE_PAIRS; rows of one block (and, for per-batch
    // offsets, one batch example) are grouped up to about GROUP_ELEMS elements.
    let block = (TABLE_PAIRS / half).clamp(1, lay.seq);
    let nblocks = lay.seq.div_ceil(block);
    let rows_per_group = (GROUP_ELEMS / (block * lay.dim)).max(1);
    let nkeys = if per_batch {
        (size / (lay.heads * lay.seq * lay.dim)) * nblocks
    } else {
        nblocks
    };
    let mut groups: Vec<Group<'_, T>> = Vec::new();
    let mut open = host_pool::filled(nkeys, usize::MAX)?;
    for (r, head) in out.chunks_mut(lay.seq * lay.dim).enumerate() {
        let b = r / lay.heads;
        for (k, piece) in head.chunks_mut(block * lay.dim).enumerate() {
            let key = if per_batch { b * nblocks + k } else { k };
            let g = match open[key] {
                g if g != usize::MAX && groups[g].rows.len() < rows_per_group => g,
                _ => {
                    groups
                        .try_reserve(1)
                        .map_err(|_| host_pool::out_of_memory::<Group<'_, T>>(groups.len() + 1))?;
                    groups.push(Group {
                        batch: b,
                        block: k,
                        rows: Vec::new(),
                    });
                    open[key] = groups.len() - 1;
                    groups.len() - 1
                }
            };
            let rows = &mut groups[g].rows;
            rows.try_reserve(1)
                .map_err(|_| host_pool::out_of_memory::<(usize, &mut [T])>(rows.len() + 1))?;
            rows.push((r, piece));
        }
    }

    debug_assert_eq!(
        groups
            .iter()
            .flat_map(|g| &g.rows)
            .map(|(_, p)| p.len())
            .sum::<usize>(),
        size
    );
    let kernel = Kernel {
        src,
        lay: &lay,
        plan,
        block,
        inv: &inv,
        max_abs_inv,
        isa,
    };
    let run = |g: Group<'_, T>| kernel.run_group(g);
    if size < PARALLEL_MIN_ELEMS {
        groups.into_iter().try_for_each(run)
    } else {
        groups.into_par_iter().try_for_each(run)
    }
}

/// Everything a group needs besides its own rows.
struct Kernel<'a, T: RopeElem> {
    src: &'a [T],
    lay: &'a Layout,
    plan: &'a RopeArgs,
    /// Positions per block.
    block: usize,
    inv: &'a [T::C],
    max_abs_inv: T::C,
    isa: Isa,
}

impl<T: RopeElem> Kernel<'_, T> {
    /// Fills the group's cos/sin table, then rotates each of its rows.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the table or the gathered row cannot be allocated (nothing
    /// of the group is written then).
    fn run_group(&self, g: Group<'_, T>) -> Result<()> {
        let (lay, plan) = (self.lay, self.plan);
        let t0 = g.block * self.block;
        let count = g.rows.first().map_or(0, |(_, p)| p.len() / lay.dim);
        let table_len = count
            .checked_mul(plan.dims)
            .ok_or_else(|| host_pool::out_of_memory::<T::C>(usize::MAX))?;
        let mut table = host_pool::filled(table_len, T::C::default())?;
        let table_spec = TableSpec {
            t0,
            offset: plan.offsets.get(g.batch),
            scale: plan.scale,
            inv: self.inv,
            max_abs_inv: self.max_abs_inv,
        };
        let spec = PieceSpec {
            seq_stride: lay.seq_stride,
            dim_stride: lay.dim_stride,
            dim: lay.dim,
            dims: plan.dims,
            traditional: plan.traditional,
        };
        let gathered_len = if lay.dim_stride == 1 { 0 } else { lay.dim };
        let mut gathered = host_pool::filled(gathered_len, T::from_f64(0.0))?;
        let src = self.src;
        match self.isa {
            Isa::Baseline => {
                fill_table(&mut table, &table_spec);
                for (r, out) in g.rows {
                    let first = lay.row_base(r) + t0 as isize * lay.seq_stride;
                    rotate_piece(src, first, out, &table, &spec, &mut gathered, None);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only made by `Isa::detect` after it checked that this
            // CPU supports AVX2, the one requirement of these functions.
            Isa::Avx2 => unsafe {
                fill_table_avx2(&mut table, &table_spec);
                // Each piece's rows are prefetched while the piece before it is rotated
                // (a piece is a few KiB of one head: the hardware prefetcher would start
                // over at each one).
                let first = |r: usize| lay.row_base(r) + t0 as isize * lay.seq_stride;
                let mut rows = g.rows.into_iter().peekable();
                while let Some((r, out)) = rows.next() {
                    let ahead = rows.peek().map(|(next, next_out)| Ahead {
                        src: src.as_ptr().wrapping_offset(first(*next)),
                        out: next_out.as_ptr(),
                    });
                    rotate_piece_avx2(src, first(r), out, &table, &spec, &mut gathered, ahead);
                }
            },
        }
        Ok(())
    }
}

/// Instruction sets the kernels are compiled for, chosen at run time.
#[derive(Clone, Copy, Debug)]
enum Isa {
    /// The build's target features (SSE2 on a generic x86-64 build).
    Baseline,
    /// AVX2: twice the vector width for the rotation and the table.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return Isa::Avx2;
        }
        Isa::Baseline
    }
}

/// What the cos/sin table of one group depends on.
struct TableSpec<'a, C> {
    /// First position of the block.
    t0: usize,
    offset: i64,
    scale: f32,
    inv: &'a [C],
    max_abs_inv: C,
}

/// Row `j` of `table` gets the `half` cosines then the `half` sines of position `t0 + j`.
#[inline(always)]
fn fill_table_impl<C: Compute>(table: &mut [C], spec: &TableSpec<'_, C>) {
    let half = spec.inv.len();
    for (j, row) in table.chunks_exact_mut(2 * half).enumerate() {
        let (cos, sin) = row.split_at_mut(half);
        let pos = ((spec.t0 + j) as i64).saturating_add(spec.offset);
        C::cos_sin(pos, spec.scale, spec.inv, spec.max_abs_inv, cos, sin);
    }
}

#[inline(never)]
fn fill_table<C: Compute>(table: &mut [C], spec: &TableSpec<'_, C>) {
    fill_table_impl(table, spec);
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_table_avx2<C: Compute>(table: &mut [C], spec: &TableSpec<'_, C>) {
    fill_table_impl(table, spec);
}

/// Layout of the input rows of one output piece.
struct PieceSpec {
    seq_stride: isize,
    dim_stride: isize,
    dim: usize,
    dims: usize,
    traditional: bool,
}

/// The next piece's first input element and its output, prefetched row by row while a piece
/// is rotated (only offset and prefetched, never read or written through).
#[derive(Clone, Copy)]
struct Ahead<T> {
    src: *const T,
    out: *const MaybeUninit<T>,
}

/// Rotates the rows of one output piece (consecutive positions of one head); the input row
/// of output row `j` starts at buffer offset `first + j * seq_stride`. Every offset was
/// checked against the buffer by `view_fits`. With `ahead` (x86-64), row `j` of the next
/// piece (input and output) is prefetched as row `j` is rotated.
///
/// A function of its own so that the compiler knows input, output and table do not alias
/// (otherwise it guards the vector loop with overlap checks).
#[inline(always)]
fn rotate_piece_impl<T: RopeElem>(
    src: &[T],
    first: isize,
    out: &mut [MaybeUninit<T>],
    table: &[T::C],
    spec: &PieceSpec,
    gathered: &mut [T],
    ahead: Option<Ahead<T>>,
) {
    let (dim, dims) = (spec.dim, spec.dims);
    debug_assert!(out.len().is_multiple_of(dim) && table.len() / dims == out.len() / dim);
    for ((j, o), tab) in out
        .chunks_exact_mut(dim)
        .enumerate()
        .zip(table.chunks_exact(dims))
    {
        let start = first + j as isize * spec.seq_stride;
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = ahead {
            let bytes = dim * std::mem::size_of::<T>();
            if spec.dim_stride == 1 {
                prefetch(
                    a.src.wrapping_offset(j as isize * spec.seq_stride).cast(),
                    bytes,
                );
            }
            prefetch(a.out.wrapping_add(j * dim).cast(), bytes);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ahead;
        let x: &[T] = if spec.dim_stride == 1 {
            &src[start as usize..start as usize + dim]
        } else {
            for (d, v) in gathered.iter_mut().enumerate() {
                *v = src[(start + d as isize * spec.dim_stride) as usize];
            }
            gathered
        };
        let (cos, sin) = tab.split_at(dims / 2);
        let (o_rot, o_tail) = o.split_at_mut(dims);
        rotate_pairs(&x[..dims], o_rot, cos, sin, spec.traditional);
        for (o, &v) in o_tail.iter_mut().zip(&x[dims..]) {
            *o = MaybeUninit::new(v);
        }
    }
}

#[inline(never)]
fn rotate_piece<T: RopeElem>(
    src: &[T],
    first: isize,
    out: &mut [MaybeUninit<T>],
    table: &[T::C],
    spec: &PieceSpec,
    gathered: &mut [T],
    ahead: Option<Ahead<T>>,
) {
    rotate_piece_impl(src, first, out, table, spec, gathered, ahead);
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rotate_piece_avx2<T: RopeElem>(
    src: &[T],
    first: isize,
    out: &mut [MaybeUninit<T>],
    table: &[T::C],
    spec: &PieceSpec,
    gathered: &mut [T],
    ahead: Option<Ahead<T>>,
) {
    rotate_piece_impl(src, first, out, table, spec, gathered, ahead);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::{RopeOffset, RopeOptions};
    use crate::Device;
    use std::time::Instant;

    /// Distance in f32 ulps between `got` and the correctly rounded `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (f64::from(got) - want).abs() / ulp
    }

    #[test]
    fn sin_cos_f32_is_within_one_ulp() {
        let mut worst = 0.0f64;
        let mut check = |theta: f32| {
            let (s, c) = sin_cos_f32(theta);
            let (ws, wc) = f64::from(theta).sin_cos();
            // Near a zero of sin or cos the absolute error is what matters.
            let es = ulps(s, ws).min((f64::from(s) - ws).abs() / f64::from(f32::EPSILON));
            let ec = ulps(c, wc).min((f64::from(c) - wc).abs() / f64::from(f32::EPSILON));
            worst = worst.max(es).max(ec);
            assert!(
                es <= 1.0 && ec <= 1.0,
                "theta {theta}: sin {s} vs {ws}, cos {c} vs {wc}"
            );
        };
        for i in -200_000..200_000 {
            check(i as f32 * 1e-4);
        }
        let mut t = 1e-3f32;
        while t < FAST_SIN_COS_LIMIT {
            for k in 0..64 {
                let v = t * (1.0 + k as f32 / 64.0);
                check(v);
                check(-v);
            }
            t *= 1.5;
        }
        for pos in (0..(1 << 24)).step_by(4099) {
            check(pos as f32);
        }
        for q in 0..100_000 {
            // Multiples of pi/2, where the reduction is hardest.
            check((q as f64 * std::f64::consts::FRAC_PI_2) as f32);
        }
        assert!(worst <= 1.0, "worst {worst} ulp");
    }

    #[test]
    fn sin_cos_handles_special_angles() {
        let (s, c) = sin_cos_f32(0.0);
        assert_eq!((s, c), (0.0, 1.0));
        let (s, c) = sin_cos_f32(f32::NAN);
        assert!(s.is_nan() && c.is_nan());
        let mut cos = [0.0f32; 2];
        let mut sin = [0.0f32; 2];
        // Non-finite and huge angles go through libm.
        f32::cos_sin(1, f32::INFINITY, &[1.0, 0.5], 1.0, &mut cos, &mut sin);
        assert!(cos.iter().chain(&sin).all(|v| v.is_nan()));
        f32::cos_sin(1 << 28, 1.0, &[1.0, 0.5], 1.0, &mut cos, &mut sin);
        let (ws, wc) = ((1u32 << 28) as f32).sin_cos();
        assert_eq!((sin[0], cos[0]), (ws, wc));
    }

    #[test]
    fn bf16_store_matches_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
            // NaNs, including those whose rounding addition overflows.
            f32::from_bits(0xFFFF_FFFF),
            f32::from_bits(0xFFC0_0001),
            f32::from_bits(0x7FFF_FFFF),
            f32::from_bits(0x7F80_0001),
        ];
        let mut bits = 0x0000_0001u32;
        let mut values: Vec<f32> = specials.to_vec();
        while bits < 0xFFFF_0000 {
            values.push(f32::from_bits(bits));
            bits = bits.wrapping_mul(3).wrapping_add(0x8001);
        }
        for v in values {
            let want = bf16::from_f32(v);
            let got = <bf16 as Widen>::narrow(v);
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn isa_variants_agree_bit_for_bit() {
        fn outputs<T: RopeElem>(x: &Array, plan: &RopeArgs) -> Vec<Vec<u64>> {
            let mut isas = vec![Isa::Baseline];
            if !matches!(Isa::detect(), Isa::Baseline) {
                isas.push(Isa::detect());
            }
            isas.into_iter()
                .map(|isa| {
                    let mut out = vec![MaybeUninit::new(T::from_f64(-7.0)); x.size()];
                    rope_into(x, plan, &mut out, isa).unwrap();
                    out.iter()
                        // SAFETY: every element was initialised by `vec!` and rewritten.
                        .map(|v| unsafe { v.assume_init() }.to_f64().to_bits())
                        .collect()
                })
                .collect()
        }
        let offsets = Array::from_slice(&[3i32, -40, 1 << 20], &[3]).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let x = Array::randn(&[3, 5, 70, 40], dtype, 9, &Device::Cpu).unwrap();
            let x = x.swapaxes(1, 2).unwrap();
            for traditional in [false, true] {
                for offset in [RopeOffset::Int(11), RopeOffset::Array(&offsets)] {
                    let options = RopeOptions {
                        traditional,
                        base: Some(500.0),
                        scale: 0.7,
                        offset,
                        freqs: None,
                    };
                    let plan = RopeArgs::new(&x, 36, &options).unwrap();
                    let outs = match dtype {
                        DType::F32 => outputs::<f32>(&x, &plan),
                        DType::BF16 => outputs::<bf16>(&x, &plan),
                        DType::F16 => outputs::<f16>(&x, &plan),
                        _ => outputs::<f64>(&x, &plan),
                    };
                    assert!(
                        outs.windows(2).all(|w| w[0] == w[1]),
                        "{dtype} {traditional}"
                    );
                }
            }
        }
    }

    /// Kernel time into an already-touched output buffer (no page faults), on the whole pool
    /// and on one thread, next to the copy bandwidth measured in the same run (best of
    /// several copies taken around each measurement, so a busy machine shows in both).
    /// A benchmark, not a test: run with
    /// `cargo test --release -p ferrofast --lib bench_rope_kernel -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_rope_kernel() {
        fn best(iters: usize, mut f: impl FnMut()) -> f64 {
            (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        }
        fn run<T: RopeElem>(x: &Array, plan: &RopeArgs, iters: usize) -> f64 {
            let mut out = vec![MaybeUninit::new(T::from_f64(0.0)); x.size()];
            best(iters, || {
                rope_into(x, plan, &mut out, Isa::detect()).unwrap()
            })
        }
        let n = 64 << 20;
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut dst = vec![1.0f32; n];
        let mut copy_gbs = |iters| {
            let s = best(iters, || {
                dst.par_chunks_mut(1 << 16)
                    .zip(src.par_chunks(1 << 16))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            });
            (8 * n) as f64 / s / 1e9
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        // (label, dtype, input, traditional, per-batch offsets)
        let f32_main = Array::randn(&[1, 32, 2048, 128], DType::F32, 1, &Device::Cpu).unwrap();
        let mut cases: Vec<(String, DType, Array, bool, bool)> = Vec::new();
        for traditional in [false, true] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = f32_main.astype(dtype).unwrap();
                cases.push(("[1,32,2048,128]".into(), dtype, x, traditional, false));
            }
        }
        let bthd = Array::randn(&[1, 2048, 32, 128], DType::BF16, 2, &Device::Cpu).unwrap();
        let label = "[1,2048,32,128].swapaxes(1,2)".to_string();
        cases.push((
            label,
            DType::BF16,
            bthd.swapaxes(1, 2).unwrap(),
            false,
            false,
        ));
        let batch = Array::randn(&[4, 8, 2048, 128], DType::BF16, 3, &Device::Cpu).unwrap();
        cases.push((
            "[4,8,2048,128] per-batch".into(),
            DType::BF16,
            batch,
            false,
            true,
        ));
        let offsets = Array::from_slice(&[7i32, 100, 3000, 5], &[4]).unwrap();
        for (label, dtype, x, traditional, per_batch) in &cases {
            let offset = if *per_batch {
                RopeOffset::Array(&offsets)
            } else {
                RopeOffset::Int(7)
            };
            let options = RopeOptions {
                traditional: *traditional,
                offset,
                ..Default::default()
            };
            let plan = RopeArgs::new(x, 128, &options).unwrap();
            let time = |iters| match dtype {
                DType::F32 => run::<f32>(x, &plan, iters),
                DType::BF16 => run::<bf16>(x, &plan, iters),
                _ => run::<f16>(x, &plan, iters),
            };
            let copy_before = copy_gbs(5);
            let t = time(20);
            let t1 = one.install(|| time(5));
            let copy = copy_before.max(copy_gbs(5));
            let bytes = 2.0 * x.nbytes() as f64;
            let (gbs, gbs1) = (bytes / t / 1e9, bytes / t1 / 1e9);
            println!(
                "rope kernel {dtype} {label} traditional={traditional}: {:.3} ms, \
                 {gbs:.1} GB/s = {:.0}% of copy ({copy:.1} GB/s); one thread {gbs1:.1} GB/s",
                t * 1e3,
                100.0 * gbs / copy
            );
        }
    }
}
