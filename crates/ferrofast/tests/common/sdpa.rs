//! Helpers shared by the attention tests (`tests/sdpa.rs`, `tests/cuda_sdpa_prefill.rs`):
//! tolerances, masks, input layouts and the check against the float64 oracle. Included as
//! `#[path = "common/sdpa.rs"] mod attn;` next to `mod common;`.
#![allow(dead_code)]

use crate::common::{by_dtype, check_close, randn, uniform, Input};
use ferrofast::fast::{scaled_dot_product_attention as sdpa, Mask};
use ferrofast::reference::scaled_dot_product_attention as sdpa_ref;
use ferrofast::{Array, DType, Device};

/// `(atol, rtol)` for outputs of `dtype` against the f64 oracle, for unit-scale (normal)
/// inputs: the rounding of the output to `dtype` (up to 2^-11 relative for f16, 2^-8 for
/// bf16) plus f32 arithmetic.
pub fn tol(dtype: DType) -> (f64, f64) {
    by_dtype(
        dtype,
        [(2e-5, 2e-5), (1e-3, 1e-3), (8e-3, 8e-3), (1e-12, 1e-12)],
    )
}

/// MLX's tolerances for `test_sdpa` (`|out - ref| <= atol + atol * |ref|`: f32 2e-5, f16
/// 3e-4, bf16 5e-3), which hold for its small inputs ([`mlx_inputs`]).
pub fn mlx_tol(dtype: DType) -> (f64, f64) {
    let atol = match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 3e-4,
        _ => 5e-3,
    };
    (atol, atol)
}

/// The mask of a call, its array (if any) on the CPU and on the device.
#[derive(Clone, Copy)]
pub enum Masking<'a> {
    /// No mask.
    None,
    /// Lower-right causal.
    Causal,
    /// An array mask.
    Array(&'a Input),
}

impl<'a> Masking<'a> {
    /// The mask the oracle gets.
    fn host(self) -> Mask<'a> {
        match self {
            Masking::None => Mask::None,
            Masking::Causal => Mask::Causal,
            Masking::Array(m) => Mask::Array(&m.host),
        }
    }

    /// The mask the op gets.
    fn dev(self) -> Mask<'a> {
        match self {
            Masking::None => Mask::None,
            Masking::Causal => Mask::Causal,
            Masking::Array(m) => Mask::Array(&m.dev),
        }
    }
}

/// Runs the op on the device inputs and the oracle on the CPU ones, checks that the output
/// stays on the inputs' device and compares it with the oracle at `tolerance(output dtype)`.
/// Returns the output.
#[allow(clippy::too_many_arguments)]
pub fn check_with(
    q: &Input,
    k: &Input,
    v: &Input,
    scale: f32,
    mask: Masking<'_>,
    sinks: Option<&Input>,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let dev = q.dev.device();
    let what = format!("{what} on {dev}");
    let out = sdpa(
        &q.dev,
        &k.dev,
        &v.dev,
        scale,
        mask.dev(),
        sinks.map(|s| &s.dev),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.device(), dev, "{what}: output device");
    let reference = sdpa_ref(
        &q.host,
        &k.host,
        &v.host,
        scale,
        mask.host(),
        sinks.map(|s| &s.host),
    )
    .expect("oracle");
    let (atol, rtol) = tolerance(out.dtype());
    check_close(&out, &reference, atol, rtol, &what);
    out
}

/// [`check_with`] at the tolerance of [`tol`].
pub fn check(
    q: &Input,
    k: &Input,
    v: &Input,
    scale: f32,
    mask: Masking<'_>,
    sinks: Option<&Input>,
    what: &str,
) -> Array {
    check_with(q, k, v, scale, mask, sinks, tol, what)
}

/// A bool mask of `shape` (on the CPU) keeping each entry with probability `p_true`.
pub fn bool_mask(shape: &[usize], p_true: f64, seed: u64) -> Array {
    let u = uniform(shape, 0.0, 1.0, DType::F32, seed)
        .to_vec::<f32>()
        .unwrap();
    let m: Vec<bool> = u.iter().map(|&x| f64::from(x) < p_true).collect();
    Array::from_vec(m, shape).unwrap()
}

/// The mask kinds the cases rotate through.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    None,
    Additive,
    Bool,
    Causal,
}

/// Every [`Kind`].
pub const KINDS: [Kind; 4] = [Kind::None, Kind::Additive, Kind::Bool, Kind::Causal];

/// The mask array of `kind` for q `[B, N_q, T_q, _]` and `tkv` keys, full shape: additive
/// U(0, 0.5) in q's dtype, or bool keeping half the keys; `None` for no mask and causal.
pub fn mask_array(kind: Kind, q: &Input, tkv: usize, seed: u64) -> Option<Input> {
    let s = q.host.shape();
    let shape = [s[0], s[1], s[2], tkv];
    let dev = q.dev.device();
    match kind {
        Kind::None | Kind::Causal => None,
        Kind::Additive => Some(Input::new(
            &uniform(&shape, 0.0, 0.5, q.host.dtype(), seed),
            &dev,
        )),
        Kind::Bool => Some(Input::new(&bool_mask(&shape, 0.5, seed), &dev)),
    }
}

/// The [`Masking`] of `kind`, with `array` from [`mask_array`].
pub fn masking(kind: Kind, array: Option<&Input>) -> Masking<'_> {
    match (kind, array) {
        (Kind::Causal, _) => Masking::Causal,
        (_, Some(m)) => Masking::Array(m),
        _ => Masking::None,
    }
}

/// [`check_with`] with the mask of `kind` (its array from [`mask_array`] with `seed`).
#[allow(clippy::too_many_arguments)]
pub fn run_kind(
    q: &Input,
    k: &Input,
    v: &Input,
    scale: f32,
    kind: Kind,
    seed: u64,
    tolerance: fn(DType) -> (f64, f64),
    what: &str,
) -> Array {
    let m = mask_array(kind, q, k.host.shape()[2], seed);
    check_with(
        q,
        k,
        v,
        scale,
        masking(kind, m.as_ref()),
        None,
        tolerance,
        what,
    )
}

/// [`layout`] kind: row-major.
pub const ROW_MAJOR: u8 = 0;
/// [`layout`] kind: `[B, T, H, D]` memory seen through `swapaxes(1, 2)`.
pub const BTHD: u8 = 1;
/// [`layout`] kind: every other position and feature of a larger array.
pub const STEPPED: u8 = 2;
/// [`layout`] kind: the features start one element into wider rows (rows not 16-byte
/// aligned).
pub const UNALIGNED: u8 = 3;

/// A normal `[B, H, T, D]` input on the CPU and on `dev`, in the layout `kind`
/// ([`ROW_MAJOR`], [`BTHD`], [`STEPPED`], [`UNALIGNED`]), the view made on each device.
pub fn layout(
    dev: &Device,
    (b, h, t, d): (usize, usize, usize, usize),
    kind: u8,
    dtype: DType,
    seed: u64,
) -> Input {
    let (bi, hi, ti, di) = (b as isize, h as isize, t as isize, d as isize);
    let x = match kind {
        ROW_MAJOR => Input::new(&randn(&[b, h, t, d], dtype, seed), dev),
        BTHD => Input::view(&randn(&[b, t, h, d], dtype, seed), dev, |a| {
            a.swapaxes(1, 2).unwrap()
        }),
        STEPPED => Input::view(&randn(&[b, h, 2 * t, 2 * d], dtype, seed), dev, |a| {
            a.slice(&[0, 0, 1, 0], &[bi, hi, 2 * ti, 2 * di], &[1, 1, 2, 2])
                .unwrap()
        }),
        _ => Input::view(&randn(&[b, h, t, d + 1], dtype, seed), dev, |a| {
            a.slice(&[0, 0, 0, 1], &[bi, hi, ti, di + 1], &[1, 1, 1, 1])
                .unwrap()
        }),
    };
    assert_eq!(x.host.shape(), &[b, h, t, d]);
    x
}

/// MLX's `prepare_inputs` for `(B, qL, kL, D, qH, kH)`: q, k ~ U(0, 0.5), v ~ U(0, scale),
/// row-major or (`transposed`) `[B, T, H, D]` memory seen as `[B, H, T, D]`; with the scale
/// `1 / sqrt(D)`.
pub fn mlx_inputs(
    dev: &Device,
    (b, ql, kl, d, qh, kh): (usize, usize, usize, usize, usize, usize),
    transposed: bool,
    dtype: DType,
    seed: u64,
) -> (Input, Input, Input, f32) {
    let scale = 1.0 / (d as f32).sqrt();
    let make = |h: usize, l: usize, lo: f64, hi: f64, s: u64| {
        if transposed {
            Input::view(&uniform(&[b, l, h, d], lo, hi, dtype, s), dev, |a| {
                a.swapaxes(1, 2).unwrap()
            })
        } else {
            Input::new(&uniform(&[b, h, l, d], lo, hi, dtype, s), dev)
        }
    };
    (
        make(qh, ql, 0.0, 0.5, seed),
        make(kh, kl, 0.0, 0.5, seed + 1),
        make(kh, kl, 0.0, f64::from(scale), seed + 2),
        scale,
    )
}
