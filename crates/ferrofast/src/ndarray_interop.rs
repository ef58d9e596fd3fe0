//! Conversions between [`Array`] and [ndarray](https://docs.rs/ndarray)'s arrays (feature
//! `ndarray`). Moving an owned array either way takes its vector without copying when the
//! layout allows it; views are copied, or borrowed through the unsafe
//! [`Array::from_ndarray_view_borrowed`].

use ndarray::{ArrayBase, ArrayD, ArrayView, Data, Dimension, IxDyn};

use crate::array::Array;
use crate::dtype::Element;
use crate::error::{Error, Result};

impl Array {
    /// A host array holding `a`'s elements. `a`'s vector becomes the array's buffer without
    /// a copy when `a` is in standard (row-major) layout over its whole vector; any other
    /// layout (a transposed or sliced array) is copied in row-major order.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when a needed copy cannot be allocated.
    pub fn from_ndarray<T: Element, D: Dimension>(a: ndarray::Array<T, D>) -> Result<Array> {
        let shape = a.shape().to_vec();
        let n = a.len();
        if a.is_standard_layout() {
            let (v, offset) = a.into_raw_vec_and_offset();
            let offset = offset.unwrap_or(0);
            if offset == 0 && v.len() == n {
                return Array::from_vec(v, &shape);
            }
            let part = v.get(offset..offset + n).ok_or_else(|| {
                Error::invalid("[from_ndarray] the array's elements lie outside its vector")
            })?;
            return Array::from_slice(part, &shape);
        }
        Array::from_ndarray_ref(&a)
    }

    /// A host array holding a copy of `a`'s elements (any ndarray array or view, any
    /// strides), in row-major order.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the copy cannot be allocated.
    pub fn from_ndarray_ref<S, D>(a: &ArrayBase<S, D>) -> Result<Array>
    where
        S: Data,
        S::Elem: Element,
        D: Dimension,
    {
        let shape = a.shape().to_vec();
        if let Some(s) = a.as_slice() {
            return Array::from_slice(s, &shape);
        }
        let mut v: Vec<S::Elem> = Vec::new();
        v.try_reserve_exact(a.len())
            .map_err(|_| Error::OutOfMemory(format!("[from_ndarray] {} elements", a.len())))?;
        v.extend(a.iter().copied());
        Array::from_vec(v, &shape)
    }

    /// A host array over the memory of an ndarray view, without copying, with the view's
    /// strides (negative ones included). Ops read it like any array and never write it.
    ///
    /// # Safety
    /// The memory the view covers must stay alive and unwritten until the returned array,
    /// every view of it and every result that shares its buffer are dropped (the borrow's
    /// lifetime `'a` is not tracked past this call). Results of ops are new buffers, but
    /// views ([`slice`](Array::slice), [`reshape`](Array::reshape) of contiguous data, ...)
    /// share it.
    ///
    /// # Errors
    /// As [`Array::from_external`].
    pub unsafe fn from_ndarray_view_borrowed<T: Element, D: Dimension>(
        a: ArrayView<'_, T, D>,
    ) -> Result<Array> {
        let shape = a.shape().to_vec();
        let strides = a.strides().to_vec();
        // SAFETY: the view's pointer, shape and strides describe initialised elements of
        // `T` inside one allocation (ndarray's invariant); the caller keeps them alive and
        // unwritten while the array lives.
        unsafe {
            Array::from_external(
                a.as_ptr().cast::<u8>(),
                &shape,
                &strides,
                T::DTYPE,
                Box::new(()),
            )
        }
    }

    /// The elements as an owned ndarray array of the same shape (copied; GPU arrays are
    /// downloaded).
    ///
    /// # Errors
    /// `Error::DTypeMismatch` unless `T` is the array's dtype; as [`to_vec`](Array::to_vec).
    pub fn to_ndarray<T: Element>(&self) -> Result<ArrayD<T>> {
        let v = self.to_vec::<T>()?;
        ArrayD::from_shape_vec(IxDyn(self.shape()), v)
            .map_err(|e| Error::Shape(format!("[to_ndarray] {e}")))
    }

    /// The elements as an owned ndarray array, consuming the array: its buffer without a
    /// copy when this is the only handle on a whole row-major host buffer (an op's output),
    /// a copy otherwise ([`into_vec`](Array::into_vec)).
    ///
    /// # Errors
    /// As [`to_ndarray`](Array::to_ndarray).
    pub fn into_ndarray<T: Element>(self) -> Result<ArrayD<T>> {
        let shape = self.shape().to_vec();
        let v = self.into_vec::<T>()?;
        ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(|e| Error::Shape(format!("[into_ndarray] {e}")))
    }
}
