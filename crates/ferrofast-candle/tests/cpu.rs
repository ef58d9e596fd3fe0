//! ferrofast's ops on candle CPU tensors against candle's own math (values and gradients).

mod common;

use candle_core::{DType, Device, Tensor};

#[test]
fn rms_norm() {
    common::rms_norm(&Device::Cpu);
}

#[test]
fn layer_norm() {
    common::layer_norm(&Device::Cpu);
}

#[test]
fn rope() {
    common::rope(&Device::Cpu);
}

#[test]
fn attention() {
    common::attention(&Device::Cpu);
}

#[test]
fn attention_decode_and_lse() {
    common::attention_decode_and_lse(&Device::Cpu);
}

#[test]
fn sinks() {
    common::sinks(&Device::Cpu);
}

#[test]
fn merge_attention_states() {
    common::merge_attention_states(&Device::Cpu);
}

#[test]
fn cross_entropy() {
    common::cross_entropy(&Device::Cpu);
}

#[test]
fn gated_delta() {
    common::gated_delta(&Device::Cpu);
}

#[test]
fn autograd() {
    common::autograd(&Device::Cpu);
}

#[test]
fn errors() {
    common::errors(&Device::Cpu);
}

/// Inputs are read where they are: the array over a tensor points at the tensor's vector.
#[test]
fn inputs_are_not_copied() {
    let t = common::rand(&[4, 6], 1, DType::F32, &Device::Cpu);
    let col = t.narrow(1, 2, 3).unwrap();
    // SAFETY: nothing writes `t` while the array lives.
    let a = unsafe { ferrofast_candle::tensor_to_array(&col) }.unwrap();
    let (storage, layout) = t.storage_and_layout();
    let base = match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr(),
        _ => panic!("not a CPU f32 tensor"),
    };
    assert_eq!(layout.start_offset(), 0);
    let expected = base.wrapping_add(2) as usize;
    assert_eq!(a.host_ptr().map(|p| p as usize), Some(expected));
    assert_eq!(a.shape(), &[4, 3]);
    assert_eq!(a.strides(), &[6, 1]);
    assert_eq!(
        a.to_vec::<f32>().unwrap(),
        col.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// A result moves into the tensor: the values round-trip, and a view's result is copied.
#[test]
fn results_move_into_tensors() {
    let a = ferrofast::Array::from_vec((0..12).map(|i| i as f32 * 0.5 - 1.0).collect(), &[3, 4])
        .unwrap();
    let t = ferrofast_candle::array_to_tensor(a.clone(), &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 4]);
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        a.to_vec::<f32>().unwrap()
    );
    let view = a.transpose(&[1, 0]).unwrap();
    let t = ferrofast_candle::array_to_tensor(view.clone(), &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[4, 3]);
    let want = Tensor::from_vec(a.to_vec::<f32>().unwrap(), (3, 4), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert_eq!(common::max_diff(&t, &want), 0.0);
}
