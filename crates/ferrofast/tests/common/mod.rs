//! Helpers shared by the integration tests: seeded random inputs, tolerances per dtype and
//! closeness checks against the float64 oracle.
#![allow(dead_code)]

use ferrofast::fast::Mask;
use ferrofast::{reference, Array, DType, Device};

/// Per-dtype `(atol, rtol)` used when an op's test has no sharper requirement.
pub fn default_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-10),
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (1e-3, 1e-3),
        DType::BF16 => (1e-2, 1e-2),
        _ => (0.0, 0.0),
    }
}

/// The entry of `table` (f32, f16, bf16, f64 in this order) for `dtype`.
pub fn by_dtype<T: Copy>(dtype: DType, table: [T; 4]) -> T {
    match dtype {
        DType::F32 => table[0],
        DType::F16 => table[1],
        DType::BF16 => table[2],
        DType::F64 => table[3],
        other => panic!("no tolerance for {other}"),
    }
}

/// The float dtypes the ops take on `dev`: f32, f16 and bf16, and f64 on the CPU only (the
/// CUDA kernels have no f64 and return `Error::Unsupported` for it).
pub fn float_dtypes(dev: &Device) -> Vec<DType> {
    let mut dtypes = vec![DType::F32, DType::F16, DType::BF16];
    if dev.is_cpu() {
        dtypes.push(DType::F64);
    }
    dtypes
}

/// Seeded normal input; the seed is part of every failure message through `check_close`.
pub fn randn(shape: &[usize], dtype: DType, seed: u64) -> Array {
    Array::randn(shape, dtype, seed, &Device::Cpu).expect("randn")
}

/// Seeded uniform input in `[lo, hi)`.
pub fn uniform(shape: &[usize], lo: f64, hi: f64, dtype: DType, seed: u64) -> Array {
    Array::uniform(shape, lo, hi, dtype, seed, &Device::Cpu).expect("uniform")
}

/// Asserts `|out - ref| <= atol + rtol * |ref|` elementwise, same shape, no NaN unless the
/// reference is NaN at that position. `what` names the case (include the seed).
pub fn check_close(out: &Array, reference: &Array, atol: f64, rtol: f64, what: &str) {
    assert_eq!(out.shape(), reference.shape(), "{what}: shape mismatch");
    let o = out.to_f64_vec().expect("read output");
    let r = reference.to_f64_vec().expect("read reference");
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &b)) in o.iter().zip(&r).enumerate() {
        if b.is_nan() {
            assert!(a.is_nan(), "{what}: element {i} is {a}, reference NaN");
            continue;
        }
        if b.is_infinite() {
            assert_eq!(a, b, "{what}: element {i} is {a}, reference {b}");
            continue;
        }
        assert!(!a.is_nan(), "{what}: element {i} is NaN, reference {b}");
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    if worst.0 > 0.0 {
        let i = worst.1;
        panic!(
            "{what}: element {i} = {} but reference = {} (atol {atol}, rtol {rtol}, shape {:?})",
            o[i],
            r[i],
            out.shape()
        );
    }
}

/// The attention backward's gradients: `(dq, dk, dv, dsinks)`.
pub type AttnGrads = (Array, Array, Array, Option<Array>);

/// One problem for the attention backward, made on the CPU: the inputs, the output's
/// cotangent, the sinks and the scale.
pub struct AttnProblem {
    pub q: Array,
    pub k: Array,
    pub v: Array,
    pub d_out: Array,
    pub sinks: Option<Array>,
    pub scale: f32,
}

impl AttnProblem {
    /// Normal q, k, v and cotangent of `(B, N_q, N_kv, T_q, T_kv, D, D_v)` from seeds `seed`
    /// to `seed + 3`, and sinks uniform in `sinks`' range (when given) from `seed + 4`.
    pub fn new(
        (b, nq, nkv, tq, tkv, d, dv): (usize, usize, usize, usize, usize, usize, usize),
        dtype: DType,
        sinks: Option<(f64, f64)>,
        scale: f32,
        seed: u64,
    ) -> AttnProblem {
        AttnProblem {
            q: randn(&[b, nq, tq, d], dtype, seed),
            k: randn(&[b, nkv, tkv, d], dtype, seed + 1),
            v: randn(&[b, nkv, tkv, dv], dtype, seed + 2),
            d_out: randn(&[b, nq, tq, dv], dtype, seed + 3),
            sinks: sinks.map(|(lo, hi)| uniform(&[nq], lo, hi, dtype, seed + 4)),
            scale,
        }
    }

    /// The float64 oracle's forward with its log-sum-exp: `(out, lse)`.
    pub fn oracle_with_lse(&self, mask: Mask<'_>) -> (Array, Array) {
        let (q, k, v, s) = (&self.q, &self.k, &self.v, self.sinks.as_ref());
        reference::scaled_dot_product_attention_with_lse(q, k, v, self.scale, mask, s)
            .expect("oracle forward")
    }

    /// The float64 oracle's gradients for the problem's cotangent.
    pub fn oracle_grads(&self, mask: Mask<'_>) -> AttnGrads {
        let (q, k, v, s) = (&self.q, &self.k, &self.v, self.sinks.as_ref());
        reference::scaled_dot_product_attention_vjp(q, k, v, self.scale, mask, s, &self.d_out)
            .expect("oracle backward")
    }
}

/// Maximum absolute difference between two arrays of the same shape.
pub fn max_abs_diff(a: &Array, b: &Array) -> f64 {
    let x = a.to_f64_vec().expect("read");
    let y = b.to_f64_vec().expect("read");
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

/// A permutation of `0..n` drawn from `seed` (a Fisher-Yates shuffle on a 64-bit LCG).
pub fn seeded_permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        perm.swap(i, (s >> 33) as usize % (i + 1));
    }
    perm
}

/// `n` integers in `[0, below)` drawn from `seed` (a xorshift generator).
pub fn seeded_below(n: usize, below: u64, seed: u64) -> Vec<u64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % below
        })
        .collect()
}

/// A random view of a random array: a permutation of the axes and a stepped (possibly
/// reversed) slice, so rows can have any stride.
pub fn random_view(base: &Array, perm_seed: u64, steps: &[isize]) -> Array {
    let n = base.ndim();
    let axes: Vec<isize> = seeded_permutation(n, perm_seed)
        .into_iter()
        .map(|a| a as isize)
        .collect();
    let t = base.transpose(&axes).unwrap();
    let steps = &steps[..n];
    let starts: Vec<isize> = steps
        .iter()
        .map(|&st| if st > 0 { 0 } else { -1 })
        .collect();
    let stops: Vec<isize> = steps
        .iter()
        .zip(t.shape())
        .map(|(&st, &len)| {
            if st > 0 {
                len as isize
            } else {
                -(len as isize) - 1
            }
        })
        .collect();
    t.slice(&starts, &stops, steps).unwrap()
}

/// The first CUDA device with new GPU buffers poisoned (NaN bytes), so elements a kernel
/// skips fail the checks. GPU tests are ignored unless built with the `gpu-tests` feature;
/// when one runs on a machine without a usable GPU it prints why and returns `None` (the test
/// then ends without checking anything), unless `FERROFAST_REQUIRE_GPU=1`, which makes that
/// a failure (the GPU machine's runs set it).
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<Device> {
    gpus().into_iter().next()
}

/// Every usable CUDA device, with new GPU buffers poisoned (NaN bytes) so that elements a
/// kernel skips fail the checks. Empty without a GPU, which prints why, unless
/// `FERROFAST_REQUIRE_GPU=1`, which makes that a failure (the GPU machine's runs set it).
#[cfg(feature = "cuda")]
pub fn gpus() -> Vec<Device> {
    let count = Device::cuda_device_count();
    let found: Vec<Device> = (0..count).filter_map(|i| Device::cuda(i).ok()).collect();
    if found.is_empty() {
        let why = Device::cuda(0)
            .err()
            .map_or_else(|| "none found".to_string(), |e| e.to_string());
        if std::env::var("FERROFAST_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1") {
            panic!("FERROFAST_REQUIRE_GPU=1 but there is no usable CUDA device: {why}");
        }
        println!("skipping: no CUDA device ({why})");
    } else {
        ferrofast::testing::poison_gpu_buffers(true);
    }
    found
}

/// A test that needs a GPU: ignored (reported as such, never as passed) unless the crate is
/// built with the `gpu-tests` feature.
#[allow(unused_macros)]
macro_rules! gpu_only {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
        fn $name() $body
    };
}

/// Declares each case `fn name(dev: &Device) { ... }` once and runs it on every device:
/// `name::cpu` on the CPU, and `name::cuda` on every CUDA device found. The CUDA test is
/// ignored (reported as such, never as passed) unless the crate is built with the
/// `gpu-tests` feature. Inputs are made on the CPU and moved with [`on`].
/// Test files use it with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_every_device {
    ($($(#[$meta:meta])* fn $name:ident($dev:ident: &Device) $body:block)*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn case($dev: &ferrofast::Device) $body

            #[test]
            fn cpu() {
                case(&ferrofast::Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            gpu_only! {
                fn cuda() {
                    for dev in crate::common::gpus() {
                        case(&dev)
                    }
                }
            }
        }
    )*};
}

/// Declares tests `fn name(dev: Device) { ... }` that need a GPU ([`gpu_only!`]): each runs
/// once on the first CUDA device ([`gpu`]; without one it prints why and returns, unless
/// `FERROFAST_REQUIRE_GPU=1`). Test files use it with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! gpu_test {
    ($($(#[$meta:meta])* fn $name:ident($dev:ident: Device) $body:block)*) => {$(
        gpu_only! {
            $(#[$meta])*
            fn $name() {
                let Some($dev) = crate::common::gpu() else { return };
                $body
            }
        }
    )*};
}

/// Declares tests `fn name(gpu: Device) { ... }` for CUDA alone ([`gpu_only!`]): each runs
/// its body on every CUDA device ([`gpus`]).
#[allow(unused_macros)]
macro_rules! on_every_gpu {
    ($($(#[$meta:meta])* fn $name:ident($dev:ident: Device) $body:block)*) => {$(
        gpu_only! { $(#[$meta])* fn $name() { for $dev in crate::common::gpus() $body } }
    )*};
}

/// `a` on `dev`: `a` itself when it is there already (keeping its strides), else a copy.
pub fn on(a: &Array, dev: &Device) -> Array {
    a.to_device(dev).expect("move to device")
}

/// One input of a case: `host` on the CPU, which the float64 oracle reads, and `dev`, the
/// same elements on the device under test with the same shape and strides, which the op
/// gets.
pub struct Input {
    /// On the CPU.
    pub host: Array,
    /// On the device under test.
    pub dev: Array,
}

impl Input {
    /// The contiguous CPU array `x` and its copy on `dev`.
    pub fn new(x: &Array, dev: &Device) -> Input {
        assert!(
            x.is_contiguous(),
            "a strided input is built with Input::view"
        );
        Input {
            host: x.clone(),
            dev: on(x, dev),
        }
    }

    /// `base` (contiguous, on the CPU) seen through `view`, next to `base`'s copy on `dev`
    /// seen through the same view: strided layouts are made on the device, not copied there.
    pub fn view(base: &Array, dev: &Device, view: impl Fn(&Array) -> Array) -> Input {
        let host = view(base);
        let on_dev = view(&on(base, dev));
        assert_eq!(
            on_dev.strides(),
            host.strides(),
            "the view's layout on {dev}"
        );
        Input { host, dev: on_dev }
    }
}
