//! The `Array` API on the CPU: construction, views sharing the buffer, copies, casts and
//! errors.

use ferrofast::{bf16, f16, Array, DType, Device, Error};

fn iota(shape: &[usize]) -> Array {
    let n: usize = shape.iter().product();
    Array::from_vec((0..n).map(|i| i as f32 * 0.5 - 3.0).collect(), shape).unwrap()
}

#[test]
fn construction_and_shape_errors() {
    let a = Array::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3]).unwrap();
    assert_eq!(a.shape(), &[2, 3]);
    assert_eq!(a.strides(), &[3, 1]);
    assert_eq!(a.dtype(), DType::I32);
    assert_eq!(a.device(), Device::Cpu);
    assert_eq!(a.nbytes(), 24);
    assert!(matches!(
        Array::from_vec(vec![1.0f32; 5], &[2, 3]),
        Err(Error::Shape(_))
    ));
    let s = Array::scalar(2.5f64);
    assert_eq!(s.ndim(), 0);
    assert_eq!(s.to_vec::<f64>().unwrap(), vec![2.5]);
    for dtype in DType::ALL {
        let f = Array::full(&[2, 2], 3.0, dtype, &Device::Cpu).unwrap();
        assert_eq!(f.dtype(), dtype);
        let expect = if dtype == DType::Bool { 1.0 } else { 3.0 };
        assert_eq!(f.to_f64_vec().unwrap(), vec![expect; 4], "{dtype}");
    }
    assert_eq!(
        Array::zeros(&[3], DType::BF16, &Device::Cpu)
            .unwrap()
            .to_vec::<bf16>()
            .unwrap(),
        vec![bf16::ZERO; 3]
    );
    assert_eq!(
        Array::ones(&[2], DType::U8, &Device::Cpu)
            .unwrap()
            .to_vec::<u8>()
            .unwrap(),
        vec![1, 1]
    );
}

#[test]
fn to_vec_requires_the_exact_dtype() {
    let a = iota(&[4]);
    assert!(matches!(
        a.to_vec::<f64>(),
        Err(Error::DTypeMismatch {
            expected: DType::F32,
            got: DType::F64
        })
    ));
}

#[test]
fn random_arrays_are_seeded_and_bounded() {
    let d = Device::Cpu;
    let a = Array::uniform(&[10_000], -2.0, 3.0, DType::F32, 5, &d).unwrap();
    let v = a.to_vec::<f32>().unwrap();
    assert!(v.iter().all(|&x| (-2.0..3.0).contains(&x)));
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    assert!((mean - 0.5).abs() < 0.1, "mean {mean}");
    let b = Array::uniform(&[10_000], -2.0, 3.0, DType::F32, 6, &d).unwrap();
    assert_ne!(v, b.to_vec::<f32>().unwrap());
    assert!(Array::randn(&[2], DType::I32, 0, &d).is_err());
    assert!(Array::uniform(&[2], 1.0, 0.0, DType::F32, 0, &d).is_err());
    assert!(Array::uniform(&[2], f64::NAN, 0.0, DType::F32, 0, &d).is_err());
    let h = Array::randn(&[64], DType::F16, 1, &d).unwrap();
    assert!(h.to_vec::<f16>().unwrap().iter().any(|x| x.to_f32() != 0.0));
}

#[test]
fn views_share_the_buffer() {
    let a = iota(&[2, 3, 4]);
    let t = a.transpose(&[2, 0, 1]).unwrap();
    assert!(t.shares_buffer_with(&a));
    assert_eq!(t.shape(), &[4, 2, 3]);
    assert!(!t.is_contiguous());
    let s = a.swapaxes(0, -1).unwrap();
    assert_eq!(s.shape(), &[4, 3, 2]);
    assert!(s.shares_buffer_with(&a));
    let b = a.slice(&[1], &[2], &[1]).unwrap();
    assert!(b.shares_buffer_with(&a));
    let r = a.reshape(&[6, 4]).unwrap();
    assert!(r.shares_buffer_with(&a));
    let bc = iota(&[3, 1]).broadcast_to(&[2, 3, 5]).unwrap();
    assert_eq!(bc.strides(), &[0, 1, 0]);
    let c = a.contiguous().unwrap();
    assert!(c.shares_buffer_with(&a), "contiguous input is not copied");
    let c = t.contiguous().unwrap();
    assert!(!c.shares_buffer_with(&a));
    assert!(c.is_contiguous());
    let cp = a.copy().unwrap();
    assert!(!cp.shares_buffer_with(&a));
    assert_eq!(cp.to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
}

#[test]
fn transposed_and_sliced_values_match_index_arithmetic() {
    let a = iota(&[2, 3, 4]);
    let v = a.to_vec::<f32>().unwrap();
    let at = |i: usize, j: usize, k: usize| v[i * 12 + j * 4 + k];
    let t = a.transpose(&[2, 0, 1]).unwrap().to_vec::<f32>().unwrap();
    let mut n = 0;
    for k in 0..4 {
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(t[n], at(i, j, k));
                n += 1;
            }
        }
    }
    // a[:, ::-2, 1:4:2]
    let s = a.slice(&[0, -1, 1], &[2, -4, 4], &[1, -2, 2]).unwrap();
    assert_eq!(s.shape(), &[2, 2, 2]);
    let got = s.to_vec::<f32>().unwrap();
    let mut expect = Vec::new();
    for i in 0..2 {
        for j in [2, 0] {
            for k in [1, 3] {
                expect.push(at(i, j, k));
            }
        }
    }
    assert_eq!(got, expect);
    // Reshape of a non-contiguous view copies and keeps row-major order.
    let r = a.swapaxes(1, 2).unwrap().reshape(&[8, 3]).unwrap();
    assert_eq!(
        r.to_vec::<f32>().unwrap(),
        a.swapaxes(1, 2).unwrap().to_vec::<f32>().unwrap()
    );
    let empty = a.slice(&[1], &[1], &[1]).unwrap();
    assert_eq!(empty.shape(), &[0, 3, 4]);
    assert!(empty.to_vec::<f32>().unwrap().is_empty());
}

#[test]
fn broadcasting_follows_numpy_and_reports_mlx_text() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3, 1]).unwrap();
    let b = a.broadcast_to(&[2, 3, 2]).unwrap();
    assert_eq!(
        b.to_vec::<f32>().unwrap(),
        vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    );
    let e = a.broadcast_to(&[2, 2]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "[broadcast_shapes] Shapes (3,1) and (2,2) cannot be broadcast."
    );
}

#[test]
fn astype_converts_like_a_c_cast() {
    let a = Array::from_slice(&[-1.7f32, 0.0, 2.5, 300.0], &[4]).unwrap();
    assert_eq!(
        a.astype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        vec![-1, 0, 2, 300]
    );
    assert_eq!(
        a.astype(DType::U8).unwrap().to_vec::<u8>().unwrap(),
        vec![0, 0, 2, 255]
    );
    assert_eq!(
        a.astype(DType::Bool).unwrap().to_vec::<bool>().unwrap(),
        vec![true, false, true, true]
    );
    let h = a.astype(DType::BF16).unwrap();
    assert_eq!(h.to_vec::<bf16>().unwrap()[2], bf16::from_f32(2.5));
    // Round to nearest even at a bf16 tie: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
    let tie = Array::from_slice(&[1.0f32 + 1.0 / 256.0], &[1]).unwrap();
    assert_eq!(
        tie.astype(DType::BF16).unwrap().to_vec::<bf16>().unwrap()[0],
        bf16::from_f32(1.0)
    );
    let i = Array::from_slice(&[-1i64, 70000], &[2]).unwrap();
    assert_eq!(
        i.astype(DType::U32).unwrap().to_vec::<u32>().unwrap(),
        vec![u32::MAX, 70000]
    );
    // Casting a strided view reads it in logical order.
    let t = iota(&[2, 3]).transpose(&[1, 0]).unwrap();
    assert_eq!(
        t.astype(DType::F64).unwrap().to_vec::<f64>().unwrap(),
        t.to_f64_vec().unwrap()
    );
}

#[test]
fn view_errors_are_errors() {
    let a = iota(&[2, 3]);
    assert!(a.transpose(&[0]).is_err());
    assert!(a.transpose(&[0, 0]).is_err());
    assert!(a.transpose(&[0, 2]).is_err());
    assert!(a.swapaxes(0, 5).is_err());
    assert!(a.slice(&[0], &[1], &[0]).is_err());
    assert!(a.slice(&[0, 0, 0], &[1, 1, 1], &[1, 1, 1]).is_err());
    assert!(matches!(a.reshape(&[4, 2]), Err(Error::Shape(_))));
    assert!(a.dim(-3).is_err());
    assert_eq!(a.dim(-1).unwrap(), 3);
}

#[test]
fn cuda_without_a_device_is_an_error_not_a_panic() {
    if Device::cuda(0).is_ok() {
        println!("a CUDA device is present; the GPU tests cover transfers");
        return;
    }
    let a = iota(&[4]);
    assert!(a.to_device(&Device::Cuda(0)).is_err());
    assert!(Array::zeros(&[2], DType::F32, &Device::Cuda(0)).is_err());
}

#[test]
fn into_vec_takes_the_buffer_when_it_can_and_copies_otherwise() {
    use ferrofast::fast;
    let v: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5 - 7.0).collect();
    let owned = v.clone();
    let ptr = owned.as_ptr();
    let a = Array::from_vec(owned, &[64, 64]).unwrap();
    let back = a.into_vec::<f32>().unwrap();
    assert_eq!(
        back.as_ptr(),
        ptr,
        "from_vec's vector comes back without a copy"
    );
    assert_eq!(back, v);

    // An op's output: its own buffer.
    let x = Array::from_vec(v.clone(), &[64, 64]).unwrap();
    let y = fast::rms_norm(&x, None, 1e-5).unwrap();
    let y_ptr = y.host_ptr();
    let want = y.to_vec::<f32>().unwrap();
    let got = y.into_vec::<f32>().unwrap();
    assert_eq!(Some(got.as_ptr().cast::<u8>()), y_ptr);
    assert_eq!(got, want);

    // A view, or a buffer another array shares: a copy of the view's own elements.
    let t = x.transpose(&[1, 0]).unwrap();
    let tv = t.clone().into_vec::<f32>().unwrap();
    assert_eq!(tv, t.to_vec::<f32>().unwrap());
    assert_eq!(tv[1], v[64]);
    let shared = x.clone();
    let sv = shared.into_vec::<f32>().unwrap();
    assert_eq!(sv, v);
    assert_eq!(
        x.to_vec::<f32>().unwrap(),
        v,
        "the other handle is untouched"
    );

    // The wrong element type is an error.
    assert!(matches!(
        x.into_vec::<f64>(),
        Err(ferrofast::Error::DTypeMismatch { .. })
    ));
}
