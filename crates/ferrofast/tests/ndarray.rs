//! Conversions to and from ndarray (feature `ndarray`).
#![cfg(feature = "ndarray")]

use ferrofast::fast;
use ferrofast::{Array, DType};
use ndarray::{s, Array2, Array3, ArrayD, IxDyn};

fn sample(shape: (usize, usize, usize)) -> Array3<f32> {
    Array3::from_shape_fn(shape, |(i, j, k)| {
        (i * 100 + j * 10 + k) as f32 * 0.25 - 3.0
    })
}

#[test]
fn owned_arrays_move_in_without_a_copy() {
    let a = sample((2, 3, 4));
    let ptr = a.as_ptr() as usize;
    let want: Vec<f32> = a.iter().copied().collect();
    let x = Array::from_ndarray(a).unwrap();
    assert_eq!(x.shape(), &[2, 3, 4]);
    assert_eq!(x.dtype(), DType::F32);
    assert_eq!(x.host_ptr().map(|p| p as usize), Some(ptr));
    assert_eq!(x.to_vec::<f32>().unwrap(), want);
}

#[test]
fn non_standard_layouts_are_copied_in_row_major_order() {
    let a = sample((3, 4, 5));
    // Transposed and sliced with a negative step: the logical order is what counts.
    let t = a.clone().permuted_axes([2, 0, 1]);
    let want: Vec<f32> = t.iter().copied().collect();
    let x = Array::from_ndarray(t).unwrap();
    assert_eq!(x.shape(), &[5, 3, 4]);
    assert_eq!(x.to_vec::<f32>().unwrap(), want);

    let view = a.slice(s![.., 1..3, ..;-2]);
    let want: Vec<f32> = view.iter().copied().collect();
    let x = Array::from_ndarray_ref(&view).unwrap();
    assert_eq!(x.shape(), &[3, 2, 3]);
    assert_eq!(x.to_vec::<f32>().unwrap(), want);
    // An owned array whose data starts past its vector's start (sliced in place).
    let mut b = sample((4, 3, 2));
    b.slice_collapse(s![1.., .., ..]);
    let want: Vec<f32> = b.iter().copied().collect();
    let x = Array::from_ndarray(b).unwrap();
    assert_eq!(x.shape(), &[3, 3, 2]);
    assert_eq!(x.to_vec::<f32>().unwrap(), want);
}

#[test]
fn borrowed_views_are_read_in_place_with_their_strides() {
    let a = sample((4, 6, 8));
    let view = a.slice(s![1..4;2, ..;-1, 2..]);
    // SAFETY: `a` outlives `x` and its results, and nothing writes it.
    let x = unsafe { Array::from_ndarray_view_borrowed(view.view()) }.unwrap();
    assert_eq!(x.shape(), view.shape());
    assert_eq!(x.strides(), view.strides());
    assert_eq!(
        x.host_ptr().map(|p| p as usize),
        Some(view.as_ptr() as usize)
    );
    assert_eq!(
        x.to_vec::<f32>().unwrap(),
        view.iter().copied().collect::<Vec<_>>()
    );
    // An op reads it and gives the same result as on a copy.
    let y = fast::rms_norm(&x, None, 1e-5).unwrap();
    let copy = Array::from_ndarray_ref(&view).unwrap();
    let y2 = fast::rms_norm(&copy, None, 1e-5).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), y2.to_vec::<f32>().unwrap());
    drop((x, y));
}

#[test]
fn results_move_out_to_ndarray() {
    let x = Array::from_ndarray(Array2::from_shape_fn((5, 16), |(i, j)| {
        (i as f32) - j as f32 * 0.5
    }))
    .unwrap();
    let y = fast::rms_norm(&x, None, 1e-5).unwrap();
    let ptr = y.host_ptr().map(|p| p as usize);
    let want = y.to_vec::<f32>().unwrap();
    let out: ArrayD<f32> = y.into_ndarray().unwrap();
    assert_eq!(out.shape(), &[5, 16]);
    assert_eq!(
        Some(out.as_ptr() as usize),
        ptr,
        "an op's output moves out without a copy"
    );
    assert_eq!(out.iter().copied().collect::<Vec<_>>(), want);
    // A view is copied out; the dtype must match.
    let t = x.transpose(&[1, 0]).unwrap();
    let out = t.to_ndarray::<f32>().unwrap();
    assert_eq!(out.shape(), &[16, 5]);
    assert_eq!(out[IxDyn(&[3, 2])], x.to_vec::<f32>().unwrap()[2 * 16 + 3]);
    assert!(t.to_ndarray::<f64>().is_err());
}
