//! Shapes too large for memory (reachable for free through `broadcast_to`) give errors that
//! name the size, never a panic or an abort: element counts are checked, host buffers are
//! allocated fallibly. Every size here is beyond any machine (at least 2^44 bytes), so the
//! allocation fails even where the system overcommits memory.

use ferrofast::fast::{self, Mask, RopeOffset};
use ferrofast::{Array, DType, Device, Error};

/// 2^44 rows.
const HUGE: usize = 1 << 44;

fn scalar_f32(v: f32) -> Array {
    Array::scalar(v)
}

/// An error that says the work does not fit: out of memory, or a shape beyond the address
/// space.
fn assert_too_large<T: std::fmt::Debug>(r: ferrofast::Result<T>, what: &str) {
    match r {
        Err(Error::OutOfMemory(m)) => assert!(
            m.contains("bytes") && m.chars().any(|c| c.is_ascii_digit()),
            "{what}: the message should name the size: {m}"
        ),
        Err(Error::Shape(m)) => {
            assert!(m.contains("address"), "{what}: unexpected shape error: {m}")
        }
        other => panic!("{what}: expected an out-of-memory or shape error, got {other:?}"),
    }
}

#[test]
fn broadcast_to_rejects_sizes_that_overflow() {
    let x = scalar_f32(0.5);
    // 2^32 * 2^32 * 4 elements wraps a 64-bit count to 0.
    let r = x.broadcast_to(&[1 << 32, 1 << 32, 4]);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // Counts that fit but whose byte size does not.
    let r = x.broadcast_to(&[1 << 31, 1 << 31]);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // A large but addressable view is fine and reports its true size.
    let v = x.broadcast_to(&[1 << 33, 4]).unwrap();
    assert_eq!(v.size(), 1 << 35);
    assert_eq!(v.nbytes(), 1 << 37);
}

#[test]
fn reshape_and_constructors_check_sizes() {
    let x = Array::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[4]).unwrap();
    assert!(x.reshape(&[1 << 32, 1 << 32, 4]).is_err());
    assert!(Array::zeros(&[1 << 32, 1 << 32, 4], DType::F32, &Device::Cpu).is_err());
    assert_too_large(
        Array::zeros(&[HUGE], DType::F32, &Device::Cpu),
        "zeros of 2^46 bytes",
    );
    assert_too_large(
        Array::randn(&[HUGE], DType::F32, 1, &Device::Cpu),
        "randn of 2^46 bytes",
    );
}

#[test]
fn copies_of_huge_views_fail_cleanly() {
    let v = scalar_f32(0.5).broadcast_to(&[HUGE, 4]).unwrap();
    assert_too_large(v.to_vec::<f32>(), "to_vec");
    assert_too_large(v.contiguous(), "contiguous");
    assert_too_large(v.copy(), "copy");
    assert_too_large(v.astype(DType::F16), "astype");
    assert_too_large(v.reshape(&[4, HUGE]), "reshape of a broadcast view");
}

/// The repro: this used to abort the process.
#[test]
fn rms_norm_of_a_huge_broadcast_returns_an_error() {
    // The issue's own shape, [2^33, 4] (128 GiB of f32 output), fails on the CI machines but
    // a host with that much memory and overcommit may run it to the end (the GPU machine's
    // kernel killed the process for memory in run 40): [2^44, 4] fails everywhere.
    let x = scalar_f32(0.5).broadcast_to(&[HUGE, 4]).unwrap();
    assert_too_large(fast::rms_norm(&x, None, 1e-5), "rms_norm");
    let w = Array::from_vec(vec![1.0f32; 4], &[4]).unwrap();
    assert_too_large(fast::rms_norm(&x, Some(&w), 1e-5), "rms_norm with weight");
    assert_too_large(fast::layer_norm(&x, Some(&w), Some(&w), 1e-5), "layer_norm");
    let g = scalar_f32(1.0).broadcast_to(&[HUGE, 4]).unwrap();
    assert_too_large(fast::rms_norm_vjp(&x, Some(&w), 1e-5, &g), "rms_norm_vjp");
    assert_too_large(
        fast::layer_norm_vjp(&x, Some(&w), Some(&w), 1e-5, &g),
        "layer_norm_vjp",
    );
    // One huge row: the output and the weight's widened copy are both too large.
    let row = scalar_f32(0.5).broadcast_to(&[1, HUGE]).unwrap();
    let wide = scalar_f32(1.0).broadcast_to(&[HUGE]).unwrap();
    assert_too_large(
        fast::rms_norm(&row, Some(&wide), 1e-5),
        "rms_norm of one huge row",
    );
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let x = Array::scalar(0.5f64)
            .astype(dtype)
            .unwrap()
            .broadcast_to(&[HUGE, 8])
            .unwrap();
        assert_too_large(fast::rms_norm(&x, None, 1e-5), "rms_norm 16/64-bit");
    }
}

#[test]
fn rope_of_a_huge_broadcast_returns_an_error() {
    let x = scalar_f32(0.5).broadcast_to(&[HUGE, 1, 1, 8]).unwrap();
    assert_too_large(
        fast::rope(&x, 8, false, Some(10000.0), 1.0, RopeOffset::Int(0), None),
        "rope",
    );
    // A per-batch offset of 2^44 values is read only after every check passed.
    let off = Array::scalar(3i32).broadcast_to(&[HUGE]).unwrap();
    let offset = RopeOffset::Array(&off);
    let rope_dims = |dims| fast::rope(&x, dims, true, Some(10000.0), 1.0, offset, None);
    assert_too_large(rope_dims(8), "rope with a huge offset");
    // An argument error still comes first.
    let r = rope_dims(7);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert_too_large(
        fast::rope_vjp(&x, 8, false, Some(10000.0), 1.0, RopeOffset::Int(0), None),
        "rope_vjp",
    );
}

#[test]
fn attention_of_huge_broadcasts_returns_an_error() {
    let small = |shape: &[usize]| scalar_f32(0.25).broadcast_to(shape).unwrap();
    // Huge batch: the output is too large.
    let q = small(&[HUGE, 1, 1, 8]);
    let k = small(&[HUGE, 1, 2, 8]);
    let v = small(&[HUGE, 1, 2, 8]);
    assert_too_large(
        fast::scaled_dot_product_attention(&q, &k, &v, 0.5, Mask::None, None),
        "attention, huge batch",
    );
    assert_too_large(
        fast::scaled_dot_product_attention_with_lse(&q, &k, &v, 0.5, Mask::Causal, None),
        "attention with lse, huge batch",
    );
    // Huge head dim with a small output: the scaled query tile is too large.
    let q = small(&[1, 1, 1, HUGE]);
    let k = small(&[1, 1, 2, HUGE]);
    let v = small(&[1, 1, 2, 4]);
    assert_too_large(
        fast::scaled_dot_product_attention(&q, &k, &v, 0.5, Mask::None, None),
        "attention, huge head dim",
    );
    // Sizes whose product overflows while the arrays hold nothing (D = D_v = 0).
    let q = Array::zeros(&[0], DType::F32, &Device::Cpu)
        .unwrap()
        .reshape(&[1, 1, 1, 0])
        .unwrap()
        .broadcast_to(&[1 << 40, 1 << 40, 1, 0])
        .unwrap();
    let k = Array::zeros(&[1, 1, 2, 0], DType::F32, &Device::Cpu).unwrap();
    let k = k.broadcast_to(&[1 << 40, 1, 2, 0]).unwrap();
    let r = fast::scaled_dot_product_attention(&q, &k, &k, 0.5, Mask::None, None);
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn attention_vjp_of_huge_broadcasts_returns_an_error() {
    let small = |shape: &[usize]| scalar_f32(0.25).broadcast_to(shape).unwrap();
    let q = small(&[HUGE, 1, 1, 8]);
    let k = small(&[HUGE, 1, 2, 8]);
    let lse = small(&[HUGE, 1, 1]);
    assert_too_large(
        fast::scaled_dot_product_attention_vjp(&q, &k, &k, 0.5, Mask::None, None, &q, &lse, &q),
        "attention vjp",
    );
}

#[test]
fn merge_of_huge_broadcasts_returns_an_error() {
    let small = |shape: &[usize]| scalar_f32(0.25).broadcast_to(shape).unwrap();
    // Huge batch: the merged output (and its log-sum-exp) cannot be allocated.
    let out = small(&[HUGE, 1, 1, 8]);
    let lse = small(&[HUGE, 1, 1]);
    assert_too_large(
        fast::merge_attention_states(&out, &lse, &out, &lse),
        "merge, huge batch",
    );
    // One row of a huge feature axis.
    let out = small(&[1, 1, 1, HUGE]);
    let lse = small(&[1, 1, 1]);
    assert_too_large(
        fast::merge_attention_states(&out, &lse, &out, &lse),
        "merge, huge feature axis",
    );
    // A huge log-sum-exp alone (no features): still too large.
    let out = Array::zeros(&[1, 1, 1, 0], DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_to(&[1, 1, HUGE, 0])
        .unwrap();
    let lse = small(&[1, 1, HUGE]);
    assert_too_large(
        fast::merge_attention_states(&out, &lse, &out, &lse),
        "merge, huge log-sum-exp",
    );
    // 16-bit and 64-bit parts.
    for (dtype, lse_dtype) in [
        (DType::F16, DType::F32),
        (DType::BF16, DType::F32),
        (DType::F64, DType::F64),
    ] {
        let out = Array::scalar(0.5f64)
            .astype(dtype)
            .unwrap()
            .broadcast_to(&[1, HUGE, 1, 4])
            .unwrap();
        let lse = Array::scalar(-0.5f64)
            .astype(lse_dtype)
            .unwrap()
            .broadcast_to(&[1, HUGE, 1])
            .unwrap();
        assert_too_large(
            fast::merge_attention_states(&out, &lse, &out, &lse),
            &format!("merge, {dtype}"),
        );
    }
    // An argument error still comes first: a log-sum-exp of the wrong dtype.
    let out = small(&[HUGE, 1, 1, 8]);
    let lse = Array::scalar(1.0f64).broadcast_to(&[HUGE, 1, 1]).unwrap();
    let r = fast::merge_attention_states(&out, &lse, &out, &lse);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}
