//! ferrofast's ops on candle CUDA tensors (built with the `cuda` feature, run on a GPU
//! machine): the same checks as the CPU suite, on `cuda:0`, plus agreement with the CPU.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests run on the GPU machine)")
}

#[test]
fn rms_norm() {
    common::rms_norm(&gpu());
}

#[test]
fn layer_norm() {
    common::layer_norm(&gpu());
}

#[test]
fn rope() {
    common::rope(&gpu());
}

#[test]
fn attention() {
    common::attention(&gpu());
}

#[test]
fn attention_decode_and_lse() {
    common::attention_decode_and_lse(&gpu());
}

#[test]
fn sinks() {
    common::sinks(&gpu());
}

#[test]
fn merge_attention_states() {
    common::merge_attention_states(&gpu());
}

#[test]
fn cross_entropy() {
    common::cross_entropy(&gpu());
}

#[test]
fn gated_delta() {
    common::gated_delta(&gpu());
}

#[test]
fn autograd() {
    common::autograd(&gpu());
}

#[test]
fn errors() {
    common::errors(&gpu());
}

/// The GPU result agrees with the CPU one, and GPU inputs are read in place: the array
/// over a CUDA tensor has the tensor's device address.
#[test]
fn gpu_matches_cpu_and_reads_in_place() {
    let dev = gpu();
    let q = common::rand(&[2, 8, 64, 128], 1, DType::BF16, &Device::Cpu);
    let k = common::rand(&[2, 2, 64, 128], 2, DType::BF16, &Device::Cpu);
    let v = common::rand(&[2, 2, 64, 128], 3, DType::BF16, &Device::Cpu);
    let cpu = ferrofast_candle::scaled_dot_product_attention(
        &q,
        &k,
        &v,
        0.088,
        ferrofast_candle::Mask::Causal,
        None,
    )
    .unwrap();
    let (qg, kg, vg) = (
        q.to_device(&dev).unwrap(),
        k.to_device(&dev).unwrap(),
        v.to_device(&dev).unwrap(),
    );
    let out = ferrofast_candle::scaled_dot_product_attention(
        &qg,
        &kg,
        &vg,
        0.088,
        ferrofast_candle::Mask::Causal,
        None,
    )
    .unwrap();
    assert!(out.device().is_cuda());
    assert!(common::max_diff(&out, &cpu) < 2e-2);
    // Chained with candle's own ops on the same stream, no synchronisation needed.
    let y = (out.to_dtype(DType::F32).unwrap() * 2.0).unwrap();
    assert!(common::max_diff(&y, &(cpu.to_dtype(DType::F32).unwrap() * 2.0).unwrap()) < 4e-2);

    // SAFETY: nothing writes `qg` while the array lives.
    let a = unsafe { ferrofast_candle::tensor_to_array(&qg) }.unwrap();
    let (storage, _) = qg.storage_and_layout();
    let addr = match &*storage {
        candle_core::Storage::Cuda(s) => {
            let slice = s.as_cuda_slice::<ferrofast::bf16>().unwrap();
            let stream = s.device.cuda_stream();
            let (p, _g) =
                candle_core::cuda_backend::cudarc::driver::DevicePtr::device_ptr(slice, &stream);
            p
        }
        _ => panic!("not a CUDA tensor"),
    };
    assert_eq!(a.cuda_ptr(), Some(addr));
}
