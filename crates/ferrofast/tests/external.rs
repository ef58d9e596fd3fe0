//! `Array::from_external` (memory owned elsewhere, as DLPack hands it over) and the host
//! pointer accessors.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferrofast::{fast, Array, DType};

/// Owns a buffer and counts its drops.
struct Owner {
    _data: Vec<f32>,
    drops: Arc<AtomicUsize>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin() + 0.1).collect()
}

#[test]
fn reads_external_memory_with_any_strides_and_drops_the_owner_last() {
    let values = data(24);
    let drops = Arc::new(AtomicUsize::new(0));
    let ptr = values.as_ptr().cast::<u8>();
    let owner = Owner {
        _data: values.clone(),
        drops: Arc::clone(&drops),
    };
    let owned_ptr = owner._data.as_ptr().cast::<u8>();
    // [4, 6] row-major over the owner's buffer.
    // SAFETY: the owner's 24 f32 stay alive and unwritten until it is dropped.
    let a =
        unsafe { Array::from_external(owned_ptr, &[4, 6], &[6, 1], DType::F32, Box::new(owner)) }
            .expect("from_external");
    assert_eq!(a.host_ptr(), Some(owned_ptr));
    assert_eq!(a.to_vec::<f32>().expect("to_vec"), values);

    // Rows reversed: the first element is row 3, strides negative.
    let last_row = owned_ptr.wrapping_add(18 * 4);
    let owner2 = Owner {
        _data: Vec::new(),
        drops: Arc::clone(&drops),
    };
    // SAFETY: as above; `a` keeps the memory alive for as long as `r` is used (it is
    // dropped after `r`).
    let r =
        unsafe { Array::from_external(last_row, &[4, 6], &[-6, 1], DType::F32, Box::new(owner2)) }
            .expect("reversed");
    assert_eq!(r.host_ptr(), Some(last_row));
    let rev: Vec<f32> = values.chunks(6).rev().flatten().copied().collect();
    assert_eq!(r.to_vec::<f32>().expect("to_vec"), rev);
    drop(r);
    assert_eq!(drops.load(Ordering::SeqCst), 1);

    // An op reads it in place; the view keeps the owner alive after `a` is gone.
    let y = fast::rms_norm(&a, None, 1e-5).expect("rms_norm");
    let t = a.transpose(&[1, 0]).expect("transpose");
    drop(a);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert_eq!(t.shape(), &[6, 4]);
    assert!(!t.shares_buffer_with(&y));
    drop(t);
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    // The host pointer of an external array is never lent for writing.
    // SAFETY: `values` outlives `e` and is not written meanwhile.
    let mut e = unsafe { Array::from_external(ptr, &[24], &[1], DType::F32, Box::new(())) }
        .expect("external");
    assert_eq!(e.host_ptr_mut(), None);
}

#[test]
fn rejects_bad_layouts() {
    let values = data(8);
    let p = values.as_ptr().cast::<u8>();
    // SAFETY (each call): `values` outlives every array made here and is not written.
    let err = unsafe { Array::from_external(p, &[2, 4], &[4], DType::F32, Box::new(())) };
    assert!(err.is_err());
    let err =
        unsafe { Array::from_external(p.wrapping_add(1), &[2], &[1], DType::F32, Box::new(())) };
    assert!(err.is_err(), "misaligned pointer accepted");
    let err =
        unsafe { Array::from_external(std::ptr::null(), &[2], &[1], DType::F32, Box::new(())) };
    assert!(err.is_err(), "null pointer accepted");
    let empty = unsafe {
        Array::from_external(std::ptr::null(), &[0, 3], &[3, 1], DType::F32, Box::new(()))
    }
    .expect("an empty array needs no memory");
    assert_eq!(empty.size(), 0);
}

#[test]
fn host_ptr_mut_needs_a_buffer_held_alone() {
    let mut a = Array::from_vec(data(6), &[2, 3]).expect("from_vec");
    let p = a.host_ptr_mut().expect("unique buffer");
    assert_eq!(Some(p.cast_const()), a.host_ptr());
    let view = a.clone();
    assert_eq!(
        a.host_ptr_mut(),
        None,
        "a shared buffer must not be lent for writing"
    );
    drop(view);
    assert!(a.host_ptr_mut().is_some());
    let mut s = a.slice(&[1, 0], &[2, 3], &[1, 1]).expect("slice");
    drop(a);
    // The slice now holds the buffer alone: its pointer is its first element, row 1.
    let q = s
        .host_ptr_mut()
        .expect("unique after the parent is dropped");
    assert_eq!(q, p.wrapping_add(3 * 4));
}

#[test]
fn into_cuda_allocation_refuses_host_arrays() {
    let a = Array::from_vec(data(6), &[2, 3]).unwrap();
    let e = a.into_cuda_allocation().unwrap_err();
    assert!(matches!(e, ferrofast::Error::Device(_)), "{e}");
}

/// An op's output hands over its own allocation; a view is copied first. The test wraps
/// each allocation again to read it back, and never frees it (a few hundred bytes).
#[test]
#[cfg(feature = "cuda")]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn into_cuda_allocation_hands_over_gpu_memory() {
    let Some(gpu) = common::gpu() else { return };
    let x = Array::from_vec(data(24), &[4, 6]).unwrap();
    let out = fast::rms_norm(&x.to_device(&gpu).unwrap(), None, 1e-5).unwrap();
    // The GPU's own values (its rounding differs from the CPU's in the last bit).
    let want = out.to_vec::<f32>().unwrap();
    let address = out.cuda_ptr().unwrap();
    let alloc = out.into_cuda_allocation().unwrap();
    assert_eq!(alloc.address, address);
    assert!(alloc.bytes >= 24 * 4);
    // SAFETY: the allocation is live (never freed here) and holds 24 f32 written on
    // `alloc.stream`; nothing writes it.
    assert_eq!(unsafe { read_back(&alloc, [4, 6]) }, want);

    // A transposed view is not a whole row-major buffer: it is copied, row-major.
    let t = Array::from_vec(data(24), &[4, 6])
        .unwrap()
        .to_device(&gpu)
        .unwrap();
    let view = t.transpose(&[1, 0]).unwrap();
    let want_t = view.to_vec::<f32>().unwrap();
    let alloc = view.into_cuda_allocation().unwrap();
    assert_ne!(Some(alloc.address), t.cuda_ptr());
    // SAFETY: as above, 24 f32 row-major [6, 4].
    assert_eq!(unsafe { read_back(&alloc, [6, 4]) }, want_t);
}

/// The f32 values of a row-major `[rows, cols]` allocation, wrapped again as an array.
///
/// # Safety
/// `alloc` is live and holds `rows * cols` f32 written on `alloc.stream`; nothing writes it.
#[cfg(feature = "cuda")]
unsafe fn read_back(alloc: &ferrofast::CudaAllocation, [rows, cols]: [usize; 2]) -> Vec<f32> {
    // SAFETY: as the caller promises.
    unsafe {
        Array::from_cuda_external(
            alloc.address,
            &[rows, cols],
            &[cols as isize, 1],
            DType::F32,
            &alloc.stream,
            Box::new(()),
        )
    }
    .unwrap()
    .to_vec::<f32>()
    .unwrap()
}
