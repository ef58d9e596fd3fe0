//! `fast::gated_delta_update` and `gated_delta_update_vjp` on the CPU against the float64
//! oracle, and the oracle's gradients against finite differences of its forward.
//!
//! MLX's cases (spec §11.3: q, k normal with k L2-normalised, v normal, gamma uniform in
//! linear space, beta `sigmoid(normal)`, a normal initial state; head ratios 1, 2, 3;
//! unaligned T), per-key-dim decay, masks (checked against MLX's identity: a masked step is
//! the unmasked call with k = q = 0 and gamma = 1 there), every float dtype and MLX's
//! output-dtype rule, strided inputs, head sizes that are not a multiple of the vector width,
//! T across the backward's checkpoint chunks and up to 8192, empty sizes, special values and
//! every error message.

#[macro_use]
mod common;

use common::{check_close, on};
use ferrofast::fast::{self, GatedDeltaGrads};
use ferrofast::{reference, Array, DType, Device, Error};
use std::sync::RwLock;

/// The environment variable that picks the forward's form (`sequential` / `chunked`).
const FORM_VAR: &str = "FERROFAST_GATED_DELTA_KERNEL";

/// Held for writing by the test that sets [`FORM_VAR`], for reading by every other call.
static FORM: RwLock<()> = RwLock::new(());

/// Sizes of one case.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
}

const fn dims(b: usize, t: usize, hk: usize, hv: usize, dk: usize, dv: usize) -> Dims {
    Dims {
        b,
        t,
        hk,
        hv,
        dk,
        dv,
    }
}

/// One call's inputs (contiguous, on the CPU).
struct Case {
    q: Array,
    k: Array,
    v: Array,
    gamma: Array,
    beta: Array,
    state0: Option<Array>,
    mask: Option<Array>,
}

/// `$op` (the forward or backward, the library's or the oracle's) over the inputs of the
/// case `$c` where they are, then any further arguments (the backward's cotangents).
macro_rules! call_on {
    ($op:path, $c:expr $(, $extra:expr)*) => {{
        let c: &Case = $c;
        $op(&c.q, &c.k, &c.v, &c.gamma, &c.beta, c.state0.as_ref(), c.mask.as_ref() $(, $extra)*)
    }};
}

impl Case {
    /// The case with `f` applied to every input.
    fn map(&self, f: impl Fn(&Array) -> Array) -> Case {
        Case {
            q: f(&self.q),
            k: f(&self.k),
            v: f(&self.v),
            gamma: f(&self.gamma),
            beta: f(&self.beta),
            state0: self.state0.as_ref().map(&f),
            mask: self.mask.as_ref().map(&f),
        }
    }
}

/// The gradients of q, k, v, gamma and beta, named.
fn named_grads(g: &GatedDeltaGrads) -> [(&'static str, &Array); 5] {
    [
        ("dq", &g.dq),
        ("dk", &g.dk),
        ("dv", &g.dv),
        ("dgamma", &g.dgamma),
        ("dbeta", &g.dbeta),
    ]
}

fn f64s(a: &Array) -> Vec<f64> {
    a.to_f64_vec().expect("read")
}

fn arr(data: Vec<f64>, shape: &[usize], dtype: DType) -> Array {
    Array::from_vec(data, shape)
        .and_then(|a| a.astype(dtype))
        .expect("array")
}

/// MLX's test data in `dtype` (the initial state is float32).
fn make_case(d: Dims, dtype: DType, per_key_gamma: bool, with_state: bool, seed: u64) -> Case {
    let Dims {
        b,
        t,
        hk,
        hv,
        dk,
        dv,
    } = d;
    let randn = |shape: &[usize], s: u64| {
        f64s(&Array::randn(shape, DType::F64, seed * 16 + s, &Device::Cpu).expect("randn"))
    };
    let q = randn(&[b, t, hk, dk], 1);
    // k L2-normalised per head (+1e-6), as MLX's test does.
    let mut k = randn(&[b, t, hk, dk], 2);
    for row in k.chunks_mut(dk.max(1)) {
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-6;
        row.iter_mut().for_each(|x| *x /= n);
    }
    let v = randn(&[b, t, hv, dv], 3);
    let gshape: Vec<usize> = if per_key_gamma {
        vec![b, t, hv, dk]
    } else {
        vec![b, t, hv]
    };
    let gamma = f64s(
        &Array::uniform(&gshape, 0.5, 1.0, DType::F64, seed * 16 + 4, &Device::Cpu)
            .expect("uniform"),
    );
    let beta: Vec<f64> = randn(&[b, t, hv], 5)
        .into_iter()
        .map(|x| 1.0 / (1.0 + (-x).exp()))
        .collect();
    Case {
        q: arr(q, &[b, t, hk, dk], dtype),
        k: arr(k, &[b, t, hk, dk], dtype),
        v: arr(v, &[b, t, hv, dv], dtype),
        gamma: arr(gamma, &gshape, dtype),
        beta: arr(beta, &[b, t, hv], dtype),
        state0: with_state.then(|| arr(randn(&[b, hv, dv, dk], 6), &[b, hv, dv, dk], DType::F32)),
        mask: None,
    }
}

/// A `[B, T]` bool mask from random lengths (MLX's masked test): row `b` takes its first
/// `len_b` steps.
fn length_mask(b: usize, t: usize, seed: u64) -> Array {
    let m: Vec<bool> = common::seeded_below(b, t as u64 + 1, seed)
        .into_iter()
        .flat_map(|len| (0..t).map(move |i| (i as u64) < len))
        .collect();
    Array::from_vec(m, &[b, t]).expect("mask")
}

/// A `[B, T]` bool mask with scattered holes.
fn holes_mask(b: usize, t: usize, seed: u64) -> Array {
    let m: Vec<bool> = (0..b * t)
        .map(|i| !(i as u64 * 7 + seed).is_multiple_of(5))
        .collect();
    Array::from_vec(m, &[b, t]).expect("mask")
}

/// The case's inputs on `dev` (same shapes and strides).
fn to_dev(c: &Case, dev: &Device) -> Case {
    c.map(|a| on(a, dev))
}

/// The op on `dev`, inputs moved there; results come back to the CPU.
fn forward(c: &Case, dev: &Device) -> ferrofast::Result<(Array, Array)> {
    let _form = FORM.read().unwrap_or_else(|e| e.into_inner());
    forward_in_set_form(c, dev)
}

/// [`forward`] in whatever form [`FORM_VAR`] picks now (the caller holds [`FORM`]).
fn forward_in_set_form(c: &Case, dev: &Device) -> ferrofast::Result<(Array, Array)> {
    let (out, state) = call_on!(fast::gated_delta_update, &to_dev(c, dev))?;
    assert_eq!(out.device(), *dev, "out stays on the inputs' device");
    Ok((on(&out, &Device::Cpu), on(&state, &Device::Cpu)))
}

fn oracle(c: &Case) -> (Array, Array) {
    call_on!(reference::gated_delta_update, &to_dev(c, &Device::Cpu)).expect("oracle")
}

/// `(atol, rtol)` of `out` rounded to `dtype` after f32 arithmetic over `t` steps.
fn out_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 | DType::F64 => (1e-4, 1e-4),
        DType::F16 => (2e-3, 2e-3),
        _ => (1e-2, 1e-2),
    }
}

fn check_forward(c: &Case, dev: &Device, what: &str) {
    let (out, state) = forward(c, dev).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (ro, rs) = oracle(c);
    let qk = ferrofast::promote_types(c.q.dtype(), c.k.dtype());
    let want = if qk.is_floating() {
        qk
    } else {
        ferrofast::promote_types(qk, DType::F32)
    };
    assert_eq!(out.dtype(), want, "{what}: out dtype");
    assert_eq!(state.dtype(), DType::F32, "{what}: state dtype");
    let (atol, rtol) = out_tol(out.dtype());
    check_close(&out, &ro, atol, rtol, &format!("{what}: out"));
    check_close(&state, &rs, 1e-4, 1e-4, &format!("{what}: state"));
}

/// The largest magnitude of `a`'s elements.
fn max_abs(a: &Array) -> f64 {
    f64s(a).into_iter().fold(0.0, |m, x| m.max(x.abs()))
}

const MLX_DIMS: [Dims; 6] = [
    dims(1, 1, 4, 4, 128, 128),
    dims(1, 33, 4, 4, 32, 32),
    dims(3, 16, 2, 2, 64, 64),
    dims(1, 33, 2, 4, 32, 48),
    dims(1, 33, 2, 6, 16, 16),
    dims(2, 7, 1, 3, 13, 21),
];

on_every_device! {
    fn matches_oracle_mlx_cases(dev: &Device) {
        for (n, d) in MLX_DIMS.iter().enumerate() {
            for with_state in [false, true] {
                let c = make_case(*d, DType::F32, false, with_state, n as u64);
                check_forward(&c, dev, &format!("{d:?} state {with_state}"));
            }
        }
    }
}

on_every_device! {
    fn every_dtype_and_per_key_gamma(dev: &Device) {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            for per_key in [false, true] {
                let d = dims(2, 19, 2, 4, 24, 40);
                let c = make_case(d, dtype, per_key, true, 7);
                check_forward(&c, dev, &format!("{dtype} per-key {per_key}"));
            }
        }
    }
}

on_every_device! {
    fn output_dtype_follows_q_and_k_not_v(dev: &Device) {
        let d = dims(1, 3, 1, 1, 8, 8);
        let mut c = make_case(d, DType::F16, false, false, 3);
        c.v = c.v.astype(DType::F32).expect("cast");
        let (out, state) = forward(&c, dev).expect("call");
        assert_eq!(out.dtype(), DType::F16);
        assert_eq!(state.dtype(), DType::F32);
        // f16 with bf16 promotes to f32.
        c.k = c.k.astype(DType::BF16).expect("cast");
        assert_eq!(forward(&c, dev).expect("call").0.dtype(), DType::F32);
        // Integer q and k: promoted with float32.
        let ints = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Array::from_vec(
                (0..n).map(|i| (i % 3) as i32 - 1).collect::<Vec<_>>(),
                shape,
            )
            .expect("ints")
        };
        c.q = ints(&[1, 3, 1, 8]);
        c.k = ints(&[1, 3, 1, 8]);
        let (out, _) = forward(&c, dev).expect("call");
        assert_eq!(out.dtype(), DType::F32);
        check_forward(&c, dev, "integer q, k");
    }
}

on_every_device! {
    fn masks_match_oracle_and_mlx_identity(dev: &Device) {
        for (n, d) in [dims(3, 33, 2, 4, 32, 16), dims(2, 40, 1, 2, 16, 16)]
            .into_iter()
            .enumerate()
        {
            for per_key in [false, true] {
                let mut c = make_case(d, DType::F32, per_key, true, 20 + n as u64);
                c.mask = Some(if n == 0 {
                    length_mask(d.b, d.t, 5)
                } else {
                    holes_mask(d.b, d.t, 5)
                });
                check_forward(&c, dev, &format!("{d:?} masked per-key {per_key}"));
                // MLX's check: the unmasked call on inputs with q = k = 0 and gamma = 1 at the
                // masked steps gives the same out and state.
                let m: Vec<bool> = c.mask.as_ref().expect("mask").to_vec().expect("read");
                let zero_where = |a: &Array, per_step: usize, fill: f64| {
                    let mut x = f64s(a);
                    for (i, v) in x.iter_mut().enumerate() {
                        if !m[i / per_step] {
                            *v = fill;
                        }
                    }
                    arr(x, a.shape(), a.dtype())
                };
                let qk_step = d.hk * d.dk;
                let g_step = d.hv * if per_key { d.dk } else { 1 };
                let plain = Case {
                    q: zero_where(&c.q, qk_step, 0.0),
                    k: zero_where(&c.k, qk_step, 0.0),
                    gamma: zero_where(&c.gamma, g_step, 1.0),
                    mask: None,
                    ..clone_case(&c)
                };
                let (o1, s1) = forward(&c, dev).expect("masked");
                let (o2, s2) = forward(&plain, dev).expect("plain");
                check_close(&o1, &o2, 1e-5, 1e-5, "masked vs identity: out");
                check_close(&s1, &s2, 1e-5, 1e-5, "masked vs identity: state");
            }
        }
    }
}

on_every_device! {
    fn numeric_mask_counts_nonzero_as_taken(dev: &Device) {
        let d = dims(2, 9, 1, 1, 8, 8);
        let mut c = make_case(d, DType::F32, false, true, 4);
        let holes = holes_mask(d.b, d.t, 1);
        c.mask = Some(holes.astype(DType::F32).expect("cast"));
        let (o1, s1) = forward(&c, dev).expect("numeric mask");
        c.mask = Some(holes);
        let (o2, s2) = forward(&c, dev).expect("bool mask");
        assert_eq!(f64s(&o1), f64s(&o2));
        assert_eq!(f64s(&s1), f64s(&s2));
    }
}

on_every_device! {
    fn strided_inputs(dev: &Device) {
        let d = dims(2, 11, 2, 4, 16, 24);
        // Made on the device under test, so the kernels get the strides.
        let c = to_dev(&make_case(d, DType::F32, true, true, 9), dev);
        // Every input seen through a transposed copy: same values, other strides.
        let strided = |a: &Array| -> Array {
            let nd = a.ndim() as isize;
            let t = a.swapaxes(0, nd - 1).expect("swap");
            let t = t.contiguous().expect("copy");
            t.swapaxes(0, nd - 1).expect("swap back")
        };
        let s = Case {
            mask: None,
            ..c.map(strided)
        };
        assert!(!s.q.is_contiguous());
        check_forward(&s, dev, "strided");
        // A broadcast gamma (one decay for every step).
        let g = Array::from_vec(vec![0.9f32; d.hv], &[1, 1, d.hv])
            .and_then(|g| on(&g, dev).broadcast_to(&[d.b, d.t, d.hv]))
            .expect("broadcast");
        let mut s = s;
        s.gamma = g;
        check_forward(&s, dev, "broadcast gamma");
    }
}

on_every_device! {
    /// Head sizes around the CUDA kernels' register layouts (16 columns per float4 group of
    /// four lanes, up to 256; 32 rows a forward block, 128 / 56 rows a backward block) and
    /// a model's shape (Hk 16, Hv 32, Dk = Dv = 128), forward and backward.
    fn head_sizes_across_kernel_layouts(dev: &Device) {
        for (n, d) in [
            dims(2, 5, 2, 2, 1, 1),
            dims(1, 9, 1, 2, 17, 33),
            dims(1, 6, 16, 32, 128, 128),
            dims(1, 4, 1, 1, 200, 129),
            dims(1, 5, 1, 2, 256, 256),
            dims(1, 3, 1, 1, 255, 300),
        ]
        .into_iter()
        .enumerate()
        {
            for per_key in [false, true] {
                let mut c = make_case(d, DType::F32, per_key, true, 80 + n as u64);
                if n % 2 == 1 {
                    c.mask = Some(holes_mask(d.b, d.t, n as u64));
                }
                let what = format!("{d:?} per-key {per_key}");
                check_forward(&c, dev, &what);
                check_vjp(&c, dev, d, n as u64, per_key, &what);
            }
        }
        // bf16 inputs with float32 decay and beta (the kernels' mixed instantiation).
        let d = dims(2, 7, 2, 4, 64, 32);
        let mut c = make_case(d, DType::BF16, true, true, 90);
        c.gamma = c.gamma.astype(DType::F32).expect("cast");
        c.beta = c.beta.astype(DType::F32).expect("cast");
        check_forward(&c, dev, "bf16 with f32 gamma, beta");
        check_vjp(&c, dev, d, 9, true, "bf16 with f32 gamma, beta");
        // Past the CUDA kernels' key head limit: the CPU computes it, CUDA says why not.
        let d = dims(1, 2, 1, 1, 257, 4);
        let c = make_case(d, DType::F32, false, true, 91);
        match dev {
            Device::Cpu => check_forward(&c, dev, "Dk 257"),
            Device::Cuda(_) => match forward(&c, dev) {
                Err(Error::Unsupported(msg)) => assert!(msg.contains("256"), "{msg}"),
                other => panic!("Dk 257 on {dev}: {other:?}"),
            },
        }
    }
}

on_every_device! {
    /// Both forms of the forward (`FERROFAST_GATED_DELTA_KERNEL`: the step-by-step recurrence
    /// and the chunked WY form, 64 steps a chunk) against the oracle and each other: T at and
    /// around chunk boundaries, the head sizes of the tensor-core kernel, f32 and bf16, GQA,
    /// masks, and decays with exact zeros (a reset inside a chunk) and negative values.
    fn sequential_and_chunked_forms_agree(dev: &Device) {
        let _form = FORM.write().unwrap_or_else(|e| e.into_inner());
        let cases = [
            (dims(1, 64, 1, 1, 16, 8), DType::F32, 0),
            (dims(1, 63, 2, 2, 32, 48), DType::F32, 1),
            (dims(2, 200, 2, 4, 64, 64), DType::F32, 2),
            (dims(1, 129, 1, 2, 128, 128), DType::BF16, 0),
            (dims(2, 65, 2, 4, 128, 128), DType::BF16, 1),
            (dims(1, 300, 1, 2, 128, 64), DType::BF16, 2),
            (dims(1, 130, 1, 1, 64, 128), DType::F16, 1),
        ];
        for (n, (d, dtype, extra)) in cases.into_iter().enumerate() {
            let c = chunk_case(d, dtype, n % 2 == 0, 40 + n as u64, extra, 3);
            let (ro, rs) = oracle(&c);
            // The tensor-core chunked kernel (bf16 inputs) multiplies bf16 operands (the state
            // and the chunk's W, U rounded to bf16) with f32 sums: its out and state agree to
            // bf16 precision relative to their scale, not to each element's own magnitude.
            let loose = |r: &Array| (4e-3 * max_abs(r), 1e-2);
            let half = dtype != DType::F32;
            let mut outs = Vec::new();
            for form in ["sequential", "chunked"] {
                std::env::set_var(FORM_VAR, form);
                let what = format!("{d:?} {dtype} {form}");
                let (out, state) = forward_in_set_form(&c, dev).unwrap_or_else(|e| panic!("{what}: {e}"));
                let ((oa, or), (sa, sr)) = if half && form == "chunked" {
                    (loose(&ro), loose(&rs))
                } else {
                    (out_tol(out.dtype()), (1e-4, 1e-4))
                };
                check_close(&out, &ro, oa, or, &format!("{what}: out"));
                check_close(&state, &rs, sa, sr, &format!("{what}: state"));
                outs.push((out, state));
            }
            std::env::remove_var(FORM_VAR);
            let ((oa, or), (sa, sr)) = if half {
                (loose(&ro), loose(&rs))
            } else {
                (out_tol(DType::F32), (1e-4, 1e-4))
            };
            let what = format!("{d:?} {dtype}: chunked vs sequential");
            check_close(&outs[1].0, &outs[0].0, oa, or, &format!("{what}: out"));
            check_close(&outs[1].1, &outs[0].1, sa, sr, &format!("{what}: state"));
            // Unforced: bf16 from 64 steps on takes the chunked form on CUDA, the CPU steps.
            if d.t >= 64 {
                let (out, state) = forward_in_set_form(&c, dev).expect("auto");
                let want = match (dev, dtype) {
                    (Device::Cuda(_), DType::BF16) => &outs[1],
                    _ => &outs[0],
                };
                check_close(&out, &want.0, 0.0, 0.0, &format!("{d:?} {dtype}: auto out"));
                check_close(&state, &want.1, 0.0, 0.0, &format!("{d:?} {dtype}: auto state"));
            }
        }
    }
}

on_every_device! {
    fn long_sequence_f32(dev: &Device) {
        let d = dims(1, 8192, 1, 2, 16, 8);
        let c = make_case(d, DType::F32, false, true, 11);
        check_forward(&c, dev, "T 8192");
    }
}

on_every_device! {
    fn empty_sizes(dev: &Device) {
        for d in [
            dims(0, 4, 2, 2, 8, 8),
            dims(2, 0, 2, 2, 8, 8),
            dims(2, 4, 0, 0, 8, 8),
            dims(2, 4, 2, 2, 0, 8),
            dims(2, 4, 2, 2, 8, 0),
        ] {
            let c = make_case(d, DType::F32, false, true, 2);
            let (out, state) = forward(&c, dev).expect("empty");
            assert_eq!(out.shape(), [d.b, d.t, d.hv, d.dv]);
            assert_eq!(state.shape(), [d.b, d.hv, d.dv, d.dk]);
            let (ro, rs) = oracle(&c);
            check_close(&out, &ro, 0.0, 0.0, &format!("{d:?} out"));
            check_close(&state, &rs, 0.0, 0.0, &format!("{d:?} state"));
        }
    }
}

on_every_device! {
    fn special_values(dev: &Device) {
        let d = dims(1, 6, 1, 1, 8, 4);
        let base = make_case(d, DType::F32, false, true, 13);
        // NaN in v at step 2: NaN from step 2 on (the state carries it), finite before.
        let mut v = f64s(&base.v);
        v[2 * d.dv] = f64::NAN;
        let c = Case {
            v: arr(v.clone(), base.v.shape(), DType::F32),
            ..clone_case(&base)
        };
        let (out, state) = forward(&c, dev).expect("nan v");
        let o = f64s(&out);
        assert!(o[..2 * d.dv].iter().all(|x| x.is_finite()), "{o:?}");
        assert!(o[2 * d.dv].is_nan());
        assert!(f64s(&state).iter().any(|x| x.is_nan()));
        check_close(&out, &oracle(&c).0, 1e-4, 1e-4, "nan v");
        // The same NaN at a masked-out step reads nothing: every output finite.
        let mask: Vec<bool> = (0..d.t).map(|t| t != 2).collect();
        let c = Case {
            v: arr(v, base.v.shape(), DType::F32),
            mask: Some(Array::from_vec(mask, &[1, d.t]).expect("mask")),
            ..clone_case(&base)
        };
        let (out, state) = forward(&c, dev).expect("masked nan");
        assert!(f64s(&out).iter().all(|x| x.is_finite()));
        assert!(f64s(&state).iter().all(|x| x.is_finite()));
        // An infinite decay overflows the state: inf / NaN as the arithmetic gives.
        let mut g = f64s(&base.gamma);
        g[3] = f64::INFINITY;
        let c = Case {
            gamma: arr(g, base.gamma.shape(), DType::F32),
            ..clone_case(&base)
        };
        let (out, _) = forward(&c, dev).expect("inf gamma");
        check_close(&out, &oracle(&c).0, 1e-4, 1e-4, "inf gamma");
    }
}

fn clone_case(c: &Case) -> Case {
    c.map(Array::clone)
}

// ----- backward ---------------------------------------------------------------------------

fn cotangents(d: Dims, seed: u64) -> (Array, Array) {
    let dout = Array::randn(&[d.b, d.t, d.hv, d.dv], DType::F32, seed, &Device::Cpu);
    let dstate = Array::randn(&[d.b, d.hv, d.dv, d.dk], DType::F32, seed + 1, &Device::Cpu);
    (dout.expect("dout"), dstate.expect("dstate"))
}

/// The backward on `dev`, inputs moved there; gradients come back to the CPU.
fn vjp(
    c: &Case,
    dev: &Device,
    dout: &Array,
    dstate: Option<&Array>,
) -> ferrofast::Result<GatedDeltaGrads> {
    let _form = FORM.read().unwrap_or_else(|e| e.into_inner());
    vjp_in_set_form(c, dev, dout, dstate)
}

/// [`vjp`] in whatever form [`FORM_VAR`] picks now (the caller holds [`FORM`]).
fn vjp_in_set_form(
    c: &Case,
    dev: &Device,
    dout: &Array,
    dstate: Option<&Array>,
) -> ferrofast::Result<GatedDeltaGrads> {
    let dstate = dstate.map(|s| on(s, dev));
    let g = call_on!(
        fast::gated_delta_update_vjp,
        &to_dev(c, dev),
        &on(dout, dev),
        dstate.as_ref()
    )?;
    let cpu = |a: &Array| on(a, &Device::Cpu);
    Ok(GatedDeltaGrads {
        dq: cpu(&g.dq),
        dk: cpu(&g.dk),
        dv: cpu(&g.dv),
        dgamma: cpu(&g.dgamma),
        dbeta: cpu(&g.dbeta),
        dstate0: g.dstate0.as_ref().map(cpu),
    })
}

fn oracle_vjp(c: &Case, dout: &Array, dstate: Option<&Array>) -> GatedDeltaGrads {
    let c = &to_dev(c, &Device::Cpu);
    call_on!(reference::gated_delta_update_vjp, c, dout, dstate).expect("oracle vjp")
}

fn check_vjp(c: &Case, dev: &Device, d: Dims, seed: u64, with_dstate: bool, what: &str) {
    let (dout, dstate) = cotangents(d, seed);
    let dstate = with_dstate.then_some(&dstate);
    let g = vjp(c, dev, &dout, dstate).unwrap_or_else(|e| panic!("{what}: {e}"));
    let r = oracle_vjp(c, &dout, dstate);
    let tol = |a: &Array| match a.dtype() {
        DType::F32 | DType::F64 => (2e-4, 2e-4),
        DType::F16 => (3e-3, 3e-3),
        _ => (2e-2, 2e-2),
    };
    let primals = [&c.q, &c.k, &c.v, &c.gamma, &c.beta];
    for (((name, a), (_, b)), like) in named_grads(&g)
        .into_iter()
        .zip(named_grads(&r))
        .zip(primals)
    {
        assert_eq!(a.dtype(), like.dtype(), "{what}: {name} dtype");
        let (atol, rtol) = tol(a);
        check_close(a, b, atol, rtol, &format!("{what}: {name}"));
    }
    match (&g.dstate0, &r.dstate0) {
        (Some(a), Some(b)) => {
            assert_eq!(a.dtype(), DType::F32);
            check_close(a, b, 2e-4, 2e-4, &format!("{what}: dstate0"));
        }
        (None, None) => assert!(c.state0.is_none()),
        _ => panic!("{what}: dstate0 presence differs"),
    }
}

on_every_device! {
    fn vjp_matches_oracle(dev: &Device) {
        for (n, d) in MLX_DIMS.iter().enumerate().skip(1) {
            for (per_key, with_state) in [(false, true), (true, false)] {
                let c = make_case(*d, DType::F32, per_key, with_state, 30 + n as u64);
                check_vjp(&c, dev,
                    *d,
                    n as u64,
                    with_state,
                    &format!("{d:?} per-key {per_key}"),
                );
            }
        }
    }
}

on_every_device! {
    fn vjp_dtypes_masks_and_chunk_boundaries(dev: &Device) {
        for dtype in [DType::F16, DType::BF16, DType::F64] {
            let d = dims(2, 12, 1, 2, 16, 16);
            let c = make_case(d, dtype, true, true, 40);
            check_vjp(&c, dev, d, 1, true, &format!("{dtype}"));
        }
        // T around the checkpoint chunk (about sqrt(T), at least 8), masked steps across them.
        for t in [1, 7, 8, 9, 17, 64, 65, 100] {
            let d = dims(2, t, 2, 4, 8, 12);
            let mut c = make_case(d, DType::F32, false, true, 50 + t as u64);
            c.mask = Some(holes_mask(d.b, d.t, t as u64));
            check_vjp(&c, dev, d, t as u64, t % 2 == 0, &format!("T {t} masked"));
        }
    }
}

on_every_device! {
    fn vjp_long_sequence(dev: &Device) {
        let d = dims(1, 2048, 1, 1, 16, 8);
        let c = make_case(d, DType::F32, true, true, 60);
        check_vjp(&c, dev, d, 3, true, "T 2048");
    }
}

on_every_device! {
    fn vjp_empty_sizes(dev: &Device) {
        for d in [
            dims(0, 4, 2, 2, 8, 8),
            dims(2, 0, 2, 2, 8, 8),
            dims(2, 4, 2, 2, 0, 8),
        ] {
            let c = make_case(d, DType::F32, false, true, 2);
            let (dout, dstate) = cotangents(d, 1);
            let g = vjp(&c, dev, &dout, Some(&dstate)).expect("empty vjp");
            assert_eq!(g.dq.shape(), c.q.shape());
            assert_eq!(g.dgamma.shape(), c.gamma.shape());
            let ds0 = g.dstate0.expect("dstate0");
            // With no step, the state's gradient passes through unchanged.
            if d.t == 0 {
                assert_eq!(f64s(&ds0), f64s(&dstate));
            }
        }
    }
}

on_every_device! {
    /// The backward in both forms (`FERROFAST_GATED_DELTA_KERNEL`; f32 inputs: the CPU has a
    /// chunked f32 backward, CUDA's chunked form takes bf16 only and steps here in both; the
    /// bf16 chunked backward has its own test below) against the oracle: T around the 64-step chunks, GQA,
    /// masks, decays with exact zeros (a reset inside a chunk) and negative values, with and
    /// without an initial state and the final state's cotangent.
    fn vjp_sequential_and_chunked_forms(dev: &Device) {
        let _form = FORM.write().unwrap_or_else(|e| e.into_inner());
        let cases = [
            (dims(1, 64, 1, 1, 16, 8), 0, true),
            (dims(1, 63, 2, 2, 32, 48), 1, false),
            (dims(2, 130, 2, 4, 24, 16), 1, true),
            (dims(1, 200, 1, 2, 64, 64), 2, true),
            (dims(2, 97, 1, 2, 8, 33), 2, false),
        ];
        for (n, (d, extra, with_state)) in cases.into_iter().enumerate() {
            let c = chunk_case(d, DType::F32, with_state, 80 + n as u64, extra, 5);
            let (dout, dstate) = cotangents(d, 90 + n as u64);
            let dstate = (n % 2 == 0).then_some(&dstate);
            let r = oracle_vjp(&c, &dout, dstate);
            let mut grads = Vec::new();
            for form in ["sequential", "chunked"] {
                std::env::set_var(FORM_VAR, form);
                let what = format!("{d:?} {form}");
                let g = vjp_in_set_form(&c, dev, &dout, dstate)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                for ((name, a), (_, b)) in named_grads(&g).into_iter().zip(named_grads(&r)) {
                    check_close(a, b, 3e-4, 3e-4, &format!("{what}: {name}"));
                    assert!(max_abs(a) > 0.0, "{what}: {name} is all zeros");
                }
                match (&g.dstate0, &r.dstate0) {
                    (Some(a), Some(b)) => check_close(a, b, 3e-4, 3e-4, &format!("{what}: ds0")),
                    (None, None) => assert!(!with_state),
                    _ => panic!("{what}: dstate0 presence differs"),
                }
                grads.push(g);
            }
            std::env::remove_var(FORM_VAR);
            // A masked-out step gets no gradient in either form.
            if let Some(m) = &c.mask {
                let keep = f64s(m);
                let (seq, chk) = (f64s(&grads[0].dbeta), f64s(&grads[1].dbeta));
                for (i, (a, b)) in seq.iter().zip(&chk).enumerate() {
                    if keep[i / d.hv] == 0.0 {
                        assert_eq!((*a, *b), (0.0, 0.0), "{d:?}: masked dbeta at {i}");
                    }
                }
            }
        }
    }
}

on_every_device! {
    /// The backward of bf16 prefill in the chunked form (on CUDA the tensor-core kernels:
    /// the forward's prep and walk keeping M and every chunk's state, the reverse walk of the
    /// state's gradient, the per-chunk gradients) against the oracle on the same bf16 inputs,
    /// and the automatic choice (chunked from 64 steps on CUDA) against the forced one: one
    /// chunk, a partial last chunk, GQA, the head sizes 64 and 128 in each role, masks,
    /// decays with exact zeros and negative values, with and without an initial state and the
    /// final state's cotangent. The products take bf16 operands with f32 sums, so the
    /// gradients agree to bf16 precision relative to their scale.
    fn vjp_chunked_bf16_matches_oracle(dev: &Device) {
        let _form = FORM.write().unwrap_or_else(|e| e.into_inner());
        let cases = [
            (dims(1, 64, 1, 1, 64, 64), 0, true),
            (dims(1, 200, 1, 2, 128, 128), 1, false),
            (dims(2, 130, 2, 4, 64, 128), 2, true),
            (dims(1, 97, 1, 1, 128, 64), 0, true),
            (dims(1, 640, 1, 1, 64, 64), 1, true),
        ];
        for (n, (d, extra, with_state)) in cases.into_iter().enumerate() {
            let c = chunk_case(d, DType::BF16, with_state, 120 + n as u64, extra, 7);
            let (dout, dstate) = cotangents(d, 130 + n as u64);
            let dstate = (n % 2 == 0).then_some(&dstate);
            let r = oracle_vjp(&c, &dout, dstate);
            std::env::set_var(FORM_VAR, "chunked");
            let what = format!("{d:?} chunked");
            let g = vjp_in_set_form(&c, dev, &dout, dstate).unwrap_or_else(|e| panic!("{what}: {e}"));
            std::env::remove_var(FORM_VAR);
            let auto = vjp_in_set_form(&c, dev, &dout, dstate).expect("auto");
            let mut pairs: Vec<(&str, &Array, &Array, &Array)> = named_grads(&g)
                .into_iter()
                .zip(named_grads(&r))
                .zip(named_grads(&auto))
                .map(|(((name, a), (_, b)), (_, x))| (name, a, b, x))
                .collect();
            if let (Some(a), Some(b), Some(x)) = (&g.dstate0, &r.dstate0, &auto.dstate0) {
                pairs.push(("dstate0", a, b, x));
            }
            assert_eq!(g.dstate0.is_some(), with_state, "{what}: dstate0 presence");
            for (name, a, b, x) in pairs {
                let scale = max_abs(b);
                let (fa, fb) = (f64s(a), f64s(b));
                let err = fa.iter().zip(&fb).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
                let norm = fb.iter().map(|y| y * y).sum::<f64>().sqrt();
                let rel = err / norm.max(f64::MIN_POSITIVE);
                eprintln!("{what}: {name} relative error {rel:.2e} (max |ref| {scale:.3e})");
                assert!(rel < 2e-2, "{what}: {name} relative error {rel}");
                check_close(a, b, 3e-2 * scale, 3e-2, &format!("{what}: {name}"));
                assert!(max_abs(a) > 0.0, "{what}: {name} is all zeros");
                // The automatic choice is the chunked form on CUDA (d.t >= 64); the CPU steps.
                if matches!(dev, Device::Cuda(_)) {
                    check_close(x, a, 0.0, 0.0, &format!("{d:?} auto: {name}"));
                } else {
                    check_close(x, b, 3e-2 * scale, 3e-2, &format!("{d:?} auto: {name}"));
                }
            }
            // A masked-out step gets no gradient.
            if let Some(m) = &c.mask {
                let keep = f64s(m);
                for (i, x) in f64s(&g.dbeta).iter().enumerate() {
                    if keep[i / d.hv] == 0.0 {
                        assert_eq!(*x, 0.0, "{d:?}: masked dbeta at {i}");
                    }
                }
            }
        }
    }
}

/// A [`make_case`] with scalar decays for the tests of the chunked forms: `extra >= 1` puts
/// exact zeros and negative values in the decays ([`zeros_and_negatives`]), `extra == 2`
/// also masks steps out ([`holes_mask`] with `holes_seed`).
fn chunk_case(
    d: Dims,
    dtype: DType,
    with_state: bool,
    seed: u64,
    extra: u8,
    holes_seed: u64,
) -> Case {
    let mut c = make_case(d, dtype, false, with_state, seed);
    if extra >= 1 {
        c.gamma = zeros_and_negatives(&c.gamma, d);
    }
    if extra == 2 {
        c.mask = Some(holes_mask(d.b, d.t, holes_seed));
    }
    c
}

/// Scalar decays `[B, T, Hv]` with exact zeros (every 37th step: a reset inside a 64-step
/// chunk) and negated values (every 23rd step), in the decays' dtype.
fn zeros_and_negatives(gamma: &Array, d: Dims) -> Array {
    let g: Vec<f64> = f64s(gamma)
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let t = i / d.hv % d.t;
            if t % 37 == 36 {
                0.0
            } else if t % 23 == 5 {
                -g
            } else {
                g
            }
        })
        .collect();
    arr(g, gamma.shape(), gamma.dtype())
}

/// Picks one input of a case.
type Field = fn(&mut Case) -> &mut Array;

/// The oracle's gradients against central differences of its own forward, in f64.
#[test]
fn oracle_vjp_matches_finite_differences() {
    let d = dims(1, 5, 1, 2, 3, 2);
    for per_key in [false, true] {
        let mut c = make_case(d, DType::F64, per_key, true, 70);
        c.state0 = c.state0.map(|s| s.astype(DType::F64).expect("cast"));
        c.mask = Some(Array::from_vec(vec![true, true, false, true, true], &[1, 5]).expect("m"));
        let (dout, dstate) = cotangents(d, 5);
        let (dout, dstate) = (
            dout.astype(DType::F64).expect("cast"),
            dstate.astype(DType::F64).expect("cast"),
        );
        let r = oracle_vjp(&c, &dout, Some(&dstate));
        let loss = |c: &Case| -> f64 {
            let (o, s) = oracle(c);
            let dot = |a: &Array, b: &Array| -> f64 {
                f64s(a).iter().zip(f64s(b)).map(|(x, y)| x * y).sum()
            };
            dot(&o, &dout) + dot(&s, &dstate)
        };
        let h = 1e-6;
        let fields: [(&str, Field, &Array); 6] = [
            ("q", |c| &mut c.q, &r.dq),
            ("k", |c| &mut c.k, &r.dk),
            ("v", |c| &mut c.v, &r.dv),
            ("gamma", |c| &mut c.gamma, &r.dgamma),
            ("beta", |c| &mut c.beta, &r.dbeta),
            (
                "state0",
                |c| c.state0.as_mut().expect("state"),
                r.dstate0.as_ref().expect("ds0"),
            ),
        ];
        for (name, field, grad) in fields {
            let g = f64s(grad);
            let x0 = f64s(field(&mut clone_case(&c)));
            for i in 0..x0.len() {
                let at = |delta: f64| {
                    let mut cc = clone_case(&c);
                    let a = field(&mut cc);
                    let mut x = x0.clone();
                    x[i] += delta;
                    *a = arr(x, a.shape(), DType::F64);
                    loss(&cc)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() <= 1e-6 + 1e-6 * fd.abs(),
                    "per-key {per_key}: d{name}[{i}] = {} but finite differences give {fd}",
                    g[i]
                );
            }
        }
    }
}

// ----- errors -----------------------------------------------------------------------------

fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

#[test]
fn error_messages() {
    let d = dims(2, 3, 2, 4, 8, 6);
    let c = make_case(d, DType::F32, false, true, 1);
    let z = |shape: &[usize]| Array::zeros(shape, DType::F32, &Device::Cpu).expect("zeros");
    let call = |q: &Array,
                k: &Array,
                v: &Array,
                g: &Array,
                b: &Array,
                s: Option<&Array>,
                m: Option<&Array>| {
        fast::gated_delta_update(q, k, v, g, b, s, m).expect_err("must fail")
    };
    let p = "[gated_delta_update]";
    assert_eq!(
        call(&z(&[2, 3, 8]), &c.k, &c.v, &c.gamma, &c.beta, None, None),
        invalid(&format!(
            "{p} q must be 4-D [B, T, Hk, Dk] but got shape (2,3,8)."
        ))
    );
    assert_eq!(
        call(&c.q, &z(&[2, 3, 2, 7]), &c.v, &c.gamma, &c.beta, None, None),
        invalid(&format!(
            "{p} k must have q's shape (2,3,2,8) [B, T, Hk, Dk] but got (2,3,2,7)."
        ))
    );
    assert_eq!(
        call(&c.q, &c.k, &z(&[2, 4, 4, 6]), &c.gamma, &c.beta, None, None),
        invalid(&format!(
            "{p} v must be 4-D [B, T, Hv, Dv] with B = 2 and T = 3 as in q but got shape \
             (2,4,4,6)."
        ))
    );
    assert_eq!(
        call(
            &c.q,
            &c.k,
            &z(&[2, 3, 3, 6]),
            &z(&[2, 3, 3]),
            &z(&[2, 3, 3]),
            None,
            None
        ),
        invalid(&format!(
            "{p} The number of value heads (Hv = 3) must be a multiple of the number of key \
             heads (Hk = 2)."
        ))
    );
    assert_eq!(
        call(&c.q, &c.k, &c.v, &z(&[2, 3, 4, 6]), &c.beta, None, None),
        invalid(&format!(
            "{p} gamma must have shape (2,3,4) [B, T, Hv] or (2,3,4,8) [B, T, Hv, Dk] but got \
             (2,3,4,6)."
        ))
    );
    assert_eq!(
        call(&c.q, &c.k, &c.v, &c.gamma, &z(&[2, 3, 4, 1]), None, None),
        invalid(&format!(
            "{p} beta must have shape (2,3,4) [B, T, Hv] but got (2,3,4,1)."
        ))
    );
    assert_eq!(
        call(
            &c.q,
            &c.k,
            &c.v,
            &c.gamma,
            &c.beta,
            Some(&z(&[2, 4, 8, 6])),
            None
        ),
        invalid(&format!(
            "{p} initial_state must have shape (2,4,6,8) [B, Hv, Dv, Dk] but got (2,4,8,6)."
        ))
    );
    assert_eq!(
        call(&c.q, &c.k, &c.v, &c.gamma, &c.beta, None, Some(&z(&[3, 2]))),
        invalid(&format!(
            "{p} mask must have shape (2,3) [B, T] but got (3,2)."
        ))
    );
    let (dout, dstate) = cotangents(d, 1);
    let e = vjp(&c, &Device::Cpu, &z(&[2, 3, 4, 5]), None).expect_err("bad d_out");
    assert_eq!(
        e,
        invalid(
            "[gated_delta_update_vjp] d_out shape (2,3,4,5) does not match the output shape \
             (2,3,4,6)."
        )
    );
    let e = vjp(&c, &Device::Cpu, &dout, Some(&z(&[2, 4, 8, 6]))).expect_err("bad d_state");
    assert_eq!(
        e,
        invalid(
            "[gated_delta_update_vjp] d_state shape (2,4,8,6) does not match the output shape \
             (2,4,6,8)."
        )
    );
    let ints = dout.astype(DType::I32).expect("cast");
    let e = vjp(&c, &Device::Cpu, &ints, Some(&dstate)).expect_err("int d_out");
    assert_eq!(
        e,
        invalid("[gated_delta_update_vjp] d_out must be floating but got int32.")
    );
}
