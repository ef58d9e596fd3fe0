//! [`Array::slice_update`]: MLX's `slice_update`, written into the array's own buffer when
//! no other handle can see it, into a fresh copy otherwise.

use super::{
    broadcast_shapes, dispatch_dtype, fmt_shape, host_pool, Array, CpuData, Recycle, Storage,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::Device;
use std::sync::Arc;

const OP: &str = "slice_update";

/// The GPU copy's `collapse` over two layouts of one shape at once: drops size-1 axes and
/// merges neighbours that are contiguous with each other in both layouts. Returns (shape,
/// strides of `a`, strides of `b`), outermost first.
pub(crate) fn collapse2(
    shape: &[usize],
    a: &[isize],
    b: &[isize],
) -> (Vec<usize>, Vec<isize>, Vec<isize>) {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_a: Vec<isize> = Vec::new();
    let mut out_b: Vec<isize> = Vec::new();
    for ((&d, &sa), &sb) in shape.iter().zip(a).zip(b) {
        if d == 1 {
            continue;
        }
        match (out_shape.last_mut(), out_a.last_mut(), out_b.last_mut()) {
            (Some(pd), Some(pa), Some(pb)) if *pa == sa * d as isize && *pb == sb * d as isize => {
                *pd *= d;
                *pa = sa;
                *pb = sb;
            }
            _ => {
                out_shape.push(d);
                out_a.push(sa);
                out_b.push(sb);
            }
        }
    }
    (out_shape, out_a, out_b)
}

/// Steps the row-major multi-index `idx` over `shape` (the last of its axes fastest; `shape`
/// may go on past `idx.len()`) to the next index, keeping each `offsets[i]` the element
/// offset of `idx` under `strides[i]` (stepping along an axis adds its stride, wrapping it
/// back to 0 takes `stride * size` off). Returns false, with `idx` back at zeros and the
/// offsets where they started, once every index has been visited.
#[inline(always)]
pub(crate) fn next_index<const N: usize>(
    idx: &mut [usize],
    shape: &[usize],
    strides: [&[isize]; N],
    offsets: &mut [isize; N],
) -> bool {
    let mut ax = idx.len();
    loop {
        if ax == 0 {
            return false;
        }
        ax -= 1;
        idx[ax] += 1;
        for (o, s) in offsets.iter_mut().zip(strides) {
            *o += s[ax];
        }
        if idx[ax] < shape[ax] {
            return true;
        }
        for (o, s) in offsets.iter_mut().zip(strides) {
            *o -= s[ax] * shape[ax] as isize;
        }
        idx[ax] = 0;
    }
}

/// Whether the layout addresses every element at its own place in memory (no two indices
/// share an element, as they do along a broadcast axis). Sufficient, not necessary: the axes
/// sorted by stride must each step past everything the smaller ones reach, which every
/// layout a slice, transpose or reshape of a buffer can make satisfies.
pub(crate) fn distinct_elements(shape: &[usize], strides: &[isize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut axes: Vec<(u128, u128)> = shape
        .iter()
        .zip(strides)
        .filter(|(&d, _)| d > 1)
        .map(|(&d, &s)| (d as u128, s.unsigned_abs() as u128))
        .collect();
    axes.sort_by_key(|&(_, s)| s);
    let mut reach = 0u128;
    for (d, s) in axes {
        if s <= reach {
            return false;
        }
        reach += (d - 1) * s;
    }
    true
}

/// `x` converted from `S` to `D` with [`Array::astype`]'s rules (integer to integer through
/// `i64`, anything involving a float or bool through `f64`).
fn convert<S: Element, D: Element>(x: S) -> D {
    if !S::DTYPE.is_floating() && !D::DTYPE.is_floating() {
        D::from_i64(x.to_i64())
    } else {
        D::from_f64(x.to_f64())
    }
}

/// A layout walked by [`copy_region`]: element offset of index `(0, ..., 0)` and strides.
struct Side<'a> {
    offset: usize,
    strides: &'a [isize],
}

/// Writes `f(src[j])` for every index of `shape` at the matching element of `dst`: the two
/// layouts share `shape`. Every offset is checked against its buffer (an error, never a
/// panic, if a layout were to leave it).
fn copy_region<S: Copy, D>(
    dst: &mut [D],
    d: Side<'_>,
    shape: &[usize],
    src: &[S],
    s: Side<'_>,
    f: impl Fn(S) -> D,
) -> Result<()> {
    let outside = || Error::invalid("internal: slice_update reached outside a buffer");
    let (shape, ds, ss) = collapse2(shape, d.strides, s.strides);
    let n = shape.len();
    let (inner, d_step, s_step) = match n {
        0 => (1, 1, 1),
        _ => (shape[n - 1], ds[n - 1], ss[n - 1]),
    };
    let outer = n.saturating_sub(1);
    let mut idx = vec![0usize; outer];
    let mut bases = [d.offset as isize, s.offset as isize];
    loop {
        let [d_base, s_base] = bases;
        let d0 = usize::try_from(d_base).map_err(|_| outside())?;
        let s0 = usize::try_from(s_base).map_err(|_| outside())?;
        if d_step == 1 && s_step == 1 {
            let to = dst.get_mut(d0..d0 + inner).ok_or_else(outside)?;
            let from = src.get(s0..s0 + inner).ok_or_else(outside)?;
            for (t, &x) in to.iter_mut().zip(from) {
                *t = f(x);
            }
        } else {
            let (mut di, mut si) = (d_base, s_base);
            for _ in 0..inner {
                let x = usize::try_from(si)
                    .ok()
                    .and_then(|i| src.get(i))
                    .ok_or_else(outside)?;
                let t = usize::try_from(di)
                    .ok()
                    .and_then(|i| dst.get_mut(i))
                    .ok_or_else(outside)?;
                *t = f(*x);
                di += d_step;
                si += s_step;
            }
        }
        if !next_index(&mut idx, &shape, [&ds, &ss], &mut bases) {
            return Ok(());
        }
    }
}

/// Writes the host array `update` (already broadcast to `shape`, any dtype) into the view
/// (`offset`, `shape`, `strides`) of the host buffer `data`, converting each element to the
/// buffer's dtype.
fn write_host(
    data: &mut CpuData,
    offset: usize,
    shape: &[usize],
    strides: &[isize],
    update: &Array,
) -> Result<()> {
    let dst_dtype = data.dtype();
    let d = || Side { offset, strides };
    let s = || Side {
        offset: update.offset,
        strides: &update.strides,
    };
    let mismatch = || Error::invalid("internal: slice_update's buffer changed dtype");
    if update.dtype == dst_dtype {
        // Same dtype: the elements are copied as they are (NaN payloads included).
        return dispatch_dtype!(dst_dtype, T => {
            let src = update.cpu_buffer::<T>()?;
            let dst = T::slice_mut(data).ok_or_else(mismatch)?;
            copy_region(dst, d(), shape, src, s(), |x: T| x)
        });
    }
    dispatch_dtype!(update.dtype, S => {
        let src = update.cpu_buffer::<S>()?;
        dispatch_dtype!(dst_dtype, D => {
            let dst = D::slice_mut(data).ok_or_else(mismatch)?;
            copy_region(dst, d(), shape, src, s(), convert::<S, D>)
        })
    })
}

impl Array {
    /// Whether [`slice_update`](Array::slice_update) would write into this array's buffer
    /// itself: this handle is the only one on the buffer (no clone, no view, no result of a
    /// view op shares it), the buffer is ferrofast's own (not memory from
    /// [`Array::from_external`] or [`Array::from_cuda_external`]), and the layout addresses
    /// each element at its own place (not a broadcast view). Otherwise it writes into a fresh
    /// row-major copy.
    pub fn can_update_in_place(&self) -> bool {
        if Arc::strong_count(&self.storage) != 1 || Arc::weak_count(&self.storage) != 0 {
            return false;
        }
        let own = match &*self.storage {
            Storage::Cpu(..) => true,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => !b.is_borrowed(),
            #[cfg(not(feature = "cuda"))]
            Storage::Cuda(_) => false,
            Storage::External(_) => false,
        };
        own && distinct_elements(&self.shape, &self.strides)
    }

    /// MLX's `slice_update(a, update, start, stop, strides)`, in place: the elements of
    /// `self` selected as [`slice`](Array::slice) selects them (`self[start0:stop0:step0,
    /// ...]`, one entry per leading axis, missing trailing axes whole, negative `stop`s
    /// counting from the end and out-of-range `stop`s clamped as in Python, negative steps
    /// allowed) become `update`, broadcast to the slice's shape (numpy rules, as MLX
    /// broadcasts it) and converted to `self`'s dtype with [`astype`](Array::astype)'s rules.
    /// Elements outside the slice keep their values; the shape and dtype do not change.
    ///
    /// **When it writes in place.** When [`can_update_in_place`](Array::can_update_in_place)
    /// holds (this handle alone holds ferrofast's own buffer, in a layout without repeated
    /// elements), the slice is written into the existing buffer: nothing is allocated and no
    /// element outside the slice is touched. Otherwise `self` first gets a fresh row-major
    /// copy of its elements (copy-on-write) and the slice is written there: other handles
    /// and views of the old buffer keep the old values, and memory borrowed from another
    /// library is never written. Either way `self` holds the result afterwards (its
    /// strides and offset may change with the copy). An empty slice changes nothing.
    ///
    /// On the CPU the elements are copied on the calling thread. On a GPU the copy (and the
    /// conversion, for an update of another dtype) is queued on the stream that produced
    /// `self` with no host wait; an update produced on another stream is waited for on the
    /// GPU.
    ///
    /// Unlike MLX, which clamps every start, a start outside `-n..=n` for an axis of `n`
    /// elements is an error, so that a write past the end of an array is never silently
    /// dropped.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when the three lists differ in length or exceed `self`'s
    /// dimensions, a step is 0, or a start is out of range (naming the axis and its size);
    /// `Error::Shape` when `update` has more dimensions than the slice or cannot be broadcast
    /// to its shape (naming both shapes); `Error::Device` when `update` lives on another
    /// device than `self`; `Error::OutOfMemory` when the copy cannot be had; device errors.
    pub fn slice_update(
        &mut self,
        update: &Array,
        starts: &[isize],
        stops: &[isize],
        steps: &[isize],
    ) -> Result<()> {
        let (region, _, _) = self.slice_layout(OP, starts, stops, steps)?;
        for (ax, (&start, &n)) in starts.iter().zip(&self.shape).enumerate() {
            let n = n as isize;
            if start < -n || start > n {
                return Err(Error::invalid(format!(
                    "[{OP}] start {start} is out of range for axis {ax} of size {n} (starts \
                     must lie in [-{n}, {n}])."
                )));
            }
        }
        check_update(update, &region, self.device())?;
        if region.contains(&0) {
            return Ok(());
        }
        if !self.can_update_in_place() {
            *self = self.copy()?;
        }
        let (shape, strides, offset) = self.slice_layout(OP, starts, stops, steps)?;
        let dtype = self.dtype;
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(data, _)) => {
                let update = update.broadcast_to(&shape)?;
                write_host(data, offset, &shape, &strides, &update)
            }
            Some(Storage::Cuda(buffer)) => {
                let update = if update.dtype == dtype {
                    update.clone()
                } else {
                    // Converted before it is broadcast: the copy is the update's size.
                    let stream = buffer.stream().clone();
                    crate::cuda::storage::copy_cast(update, dtype, Some(&stream))?
                };
                let update = update.broadcast_to(&shape)?;
                crate::cuda::storage::copy_into(buffer, offset, &shape, &strides, &update)
            }
            _ => Err(Error::invalid(
                "internal: slice_update's copy is not ferrofast's own buffer",
            )),
        }
    }

    /// The functional form of [`slice_update`](Array::slice_update) (MLX's
    /// `mx.slice_update`): a new array holding `self` with the slice replaced by `update`;
    /// `self` and every view of its buffer are unchanged. Always copies `self` (use
    /// `slice_update` on the only handle to write in place).
    ///
    /// # Errors
    /// As [`slice_update`](Array::slice_update).
    pub fn slice_updated(
        &self,
        update: &Array,
        starts: &[isize],
        stops: &[isize],
        steps: &[isize],
    ) -> Result<Array> {
        // The clone shares the buffer, so the update copies it first.
        let mut out = self.clone();
        out.slice_update(update, starts, stops, steps)?;
        Ok(out)
    }

    /// An array of `shape` and `dtype` on `device` whose elements are unspecified (valid
    /// values of the dtype, never read before written by its user): zeroed fresh memory
    /// the system maps on first touch, or a recycled buffer, on the host; an uninitialised
    /// buffer on the device's default stream on a GPU. The host buffer never joins the host
    /// pool when dropped (it is meant to be long-lived and large: a cache).
    pub(crate) fn uninit(shape: &[usize], dtype: DType, device: &Device) -> Result<Array> {
        match device {
            Device::Cpu => {
                let n = super::checked_layout(shape, dtype)?;
                let data = dispatch_dtype!(dtype, T => T::wrap(host_pool::take_or_zeroed::<T>(n)?));
                Array::wrap_cpu_data(data, shape, Recycle::Never)
            }
            Device::Cuda(i) => {
                let stream = crate::cuda::storage::default_stream(*i)?;
                crate::cuda::storage::uninit(&stream, shape, dtype)
            }
        }
    }

    /// [`uninit`](Array::uninit) on `stream`'s device, produced on `stream`.
    pub(crate) fn uninit_on(
        stream: &crate::Stream,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Array> {
        crate::cuda::storage::uninit(stream, shape, dtype)
    }

    /// The view of this array's first `len` elements along `axis` (`len` clamped to the
    /// axis; an out-of-range axis gives the whole array).
    pub(crate) fn prefix(&self, axis: usize, len: usize) -> Array {
        let mut shape = self.shape.clone();
        if let Some(d) = shape.get_mut(axis) {
            *d = len.min(*d);
        }
        self.view(shape, self.strides.clone(), self.offset)
    }
}

/// Checks that `update` can be written into a slice of shape `region` of an array on
/// `device`: at most as many dimensions, broadcastable, on the same device.
fn check_update(update: &Array, region: &[usize], device: Device) -> Result<()> {
    if update.device() != device {
        return Err(Error::Device(format!(
            "[{OP}] the array is on {device} but the update is on {}; move the update with \
             to_device first.",
            update.device()
        )));
    }
    let fits = update.ndim() <= region.len()
        && broadcast_shapes(update.shape(), region).is_ok_and(|s| s == region);
    if !fits {
        let why = if update.ndim() > region.len() {
            "has more dimensions than"
        } else {
            "cannot be broadcast to"
        };
        return Err(Error::Shape(format!(
            "[{OP}] update of shape {} {why} the slice's shape {}.",
            fmt_shape(update.shape()),
            fmt_shape(region)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse2_merges_axes_contiguous_in_both_layouts() {
        // A [1, 8, t, 128] update into a [1, 8, cap, 128] cache: rows merge only along t.
        assert_eq!(
            collapse2(
                &[1, 8, 3, 128],
                &[3072, 384, 128, 1],
                &[999, 1024 * 128, 128, 1]
            ),
            (vec![8, 384], vec![384, 1], vec![1024 * 128, 1])
        );
        assert_eq!(
            collapse2(&[2, 3, 4], &[12, 4, 1], &[12, 4, 1]),
            (vec![24], vec![1], vec![1])
        );
        // A broadcast source keeps its axes apart.
        assert_eq!(
            collapse2(&[2, 3, 4], &[0, 4, 1], &[12, 4, 1]),
            (vec![2, 12], vec![0, 1], vec![12, 1])
        );
        assert_eq!(
            collapse2(&[3, 4], &[4, 1], &[-4, 1]),
            (vec![3, 4], vec![4, 1], vec![-4, 1])
        );
        assert_eq!(
            collapse2(&[1, 1], &[5, 7], &[1, 1]),
            (vec![], vec![], vec![])
        );
    }

    #[test]
    fn distinct_elements_rejects_repeated_ones() {
        assert!(distinct_elements(&[2, 3], &[3, 1]));
        assert!(distinct_elements(&[2, 3], &[1, 2]));
        assert!(distinct_elements(&[2, 3], &[-3, -1]));
        assert!(distinct_elements(&[4, 1], &[1, 0]));
        assert!(distinct_elements(&[0, 3], &[0, 0]));
        assert!(!distinct_elements(&[2, 3], &[0, 1]));
        assert!(!distinct_elements(&[2, 3], &[2, 1]));
    }
}
