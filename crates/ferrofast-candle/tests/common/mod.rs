//! Test bodies shared by the CPU suite (`tests/cpu.rs`, run in CI) and the CUDA suite
//! (`tests/cuda.rs`, built with the `cuda` feature and run on the GPU machine): each checks
//! ferrofast's op on candle tensors of one device against candle's own composition of the
//! same math (values, and for the `custom` ops the gradients candle's autograd gives).

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, D};
use ferrofast_candle as ffc;
use ffc::custom;

/// Deterministic values in [-1, 1) (a 64-bit LCG), never all zero.
pub fn rand(shape: &[usize], seed: u64, dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(dev))
        .expect("random tensor")
}

/// The largest absolute difference, in f32.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    av.iter()
        .zip(&bv)
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// The largest absolute value.
pub fn max_abs(a: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    a.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .fold(0.0, |m, x| m.max(x.abs()))
}

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// candle's RMS norm (differentiable composition).
fn rms_ref(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let x32 = x.to_dtype(DType::F32).unwrap();
    let ms = x32.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let y = x32
        .broadcast_div(&(ms + eps as f64).unwrap().sqrt().unwrap())
        .unwrap();
    y.to_dtype(x.dtype()).unwrap().broadcast_mul(w).unwrap()
}

pub fn rms_norm(dev: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        let x = rand(&[3, 5, 256], 1, dtype, dev);
        let w = rand(&[256], 2, dtype, dev);
        let got = ffc::rms_norm(&x, Some(&w), 1e-5).unwrap();
        let want = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_diff(&got, &want);
        assert!(d < tol(dtype) * 4.0, "rms_norm {dtype:?}: {d}");
        // A strided input (the transpose of a [256, 15] tensor) is read in place.
        let xt = rand(&[256, 15], 3, dtype, dev).t().unwrap();
        let got = ffc::rms_norm(&xt, Some(&w), 1e-5).unwrap();
        let want = candle_nn::ops::rms_norm_slow(&xt.contiguous().unwrap(), &w, 1e-5).unwrap();
        assert!(max_diff(&got, &want) < tol(dtype) * 4.0);
    }
}

pub fn layer_norm(dev: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        let x = rand(&[4, 7, 192], 4, dtype, dev);
        let w = rand(&[192], 5, dtype, dev);
        let b = rand(&[192], 6, dtype, dev);
        let got = ffc::layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap();
        let want = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < tol(dtype) * 4.0, "layer_norm {dtype:?}: {d}");
    }
}

/// cos / sin tables of rope for positions `offset..offset + t`, `dims / 2` frequencies.
fn rope_tables(t: usize, dims: usize, offset: usize, dev: &Device) -> (Tensor, Tensor) {
    let half = dims / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for i in 0..half {
            let inv = 10000f64.powf(-(2.0 * i as f64) / dims as f64);
            let angle = (offset + p) as f64 * inv;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (
        Tensor::from_vec(cos, (t, half), dev).unwrap(),
        Tensor::from_vec(sin, (t, half), dev).unwrap(),
    )
}

pub fn rope(dev: &Device) {
    let (b, h, t, d) = (2, 4, 9, 64);
    for traditional in [false, true] {
        let x = rand(&[b, h, t, d], 7, DType::F32, dev);
        let opts = ffc::RopeOptions {
            traditional,
            offset: ffc::Offset::Int(5),
            ..Default::default()
        };
        let got = ffc::rope(&x, d, &opts).unwrap();
        let (cos, sin) = rope_tables(t, d, 5, dev);
        let want = if traditional {
            candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin).unwrap()
        } else {
            candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap()
        };
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "rope traditional={traditional}: {diff}");
        // The inverse rotation undoes it.
        let back = ffc::rope_vjp(&got, d, &opts).unwrap();
        assert!(max_diff(&back, &x) < 1e-5);
    }
    // Per-example offsets as a tensor: example 1 at position 3 matches an int offset of 3.
    let x = rand(&[2, 2, 4, 32], 8, DType::F32, dev);
    let offsets = Tensor::new(&[0i32, 3], dev).unwrap();
    let per = ffc::rope(
        &x,
        32,
        &ffc::RopeOptions {
            offset: ffc::Offset::Tensor(&offsets),
            ..Default::default()
        },
    )
    .unwrap();
    let one = ffc::rope(
        &x.narrow(0, 1, 1).unwrap(),
        32,
        &ffc::RopeOptions {
            offset: ffc::Offset::Int(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(max_diff(&per.narrow(0, 1, 1).unwrap(), &one) < 1e-6);
}

/// candle's attention: K / V repeated per query group, softmax in f32.
fn attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    additive: Option<&Tensor>,
) -> Tensor {
    let (_, hq, tq, _) = q.dims4().unwrap();
    let (_, hk, tk, _) = k.dims4().unwrap();
    let rep = hq / hk;
    let expand = |t: &Tensor| -> Tensor {
        let (b, h, s, d) = t.dims4().unwrap();
        t.unsqueeze(2)
            .unwrap()
            .expand((b, h, rep, s, d))
            .unwrap()
            .reshape((b, h * rep, s, d))
            .unwrap()
    };
    let q32 = q.to_dtype(DType::F32).unwrap();
    let k32 = expand(&k.to_dtype(DType::F32).unwrap());
    let v32 = expand(&v.to_dtype(DType::F32).unwrap());
    let mut s =
        (q32.matmul(&k32.t().unwrap().contiguous().unwrap()).unwrap() * scale as f64).unwrap();
    if let Some(m) = additive {
        s = s.broadcast_add(&m.to_dtype(DType::F32).unwrap()).unwrap();
    }
    let _ = (tq, tk);
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    p.matmul(&v32.contiguous().unwrap())
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap()
}

/// An additive causal mask aligned to the lower right, `[T_q, T_kv]`.
fn causal_additive(tq: usize, tk: usize, dev: &Device) -> Tensor {
    let v: Vec<f32> = (0..tq)
        .flat_map(|i| {
            (0..tk).map(move |j| {
                if j <= i + tk - tq {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(v, (tq, tk), dev).unwrap()
}

pub fn attention(dev: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        let (b, hq, hk, tq, tk, d) = (2, 8, 2, 33, 47, 64);
        let q = rand(&[b, hq, tq, d], 10, dtype, dev);
        // K and V come from a [B, T, H, D] projection, transposed: read in place.
        let k = rand(&[b, tk, hk, d], 11, dtype, dev)
            .transpose(1, 2)
            .unwrap();
        let v = rand(&[b, tk, hk, d], 12, dtype, dev)
            .transpose(1, 2)
            .unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let t = tol(dtype) * 2.0;

        let got =
            ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::None, None).unwrap();
        let want = attention_ref(&q, &k, &v, scale, None);
        let diff = max_diff(&got, &want);
        assert!(diff < t, "attention {dtype:?}: {diff}");

        let got =
            ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::Causal, None).unwrap();
        let cm = causal_additive(tq, tk, dev);
        let want = attention_ref(&q, &k, &v, scale, Some(&cm));
        let diff = max_diff(&got, &want);
        assert!(diff < t, "causal attention {dtype:?}: {diff}");

        // The same causal mask as a u8 boolean mask (non-zero keeps, whatever the byte), and
        // as an additive one.
        let keep = (cm.eq(0f32).unwrap() * 7.0).unwrap();
        let got =
            ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::Bool(&keep), None)
                .unwrap();
        assert!(max_diff(&got, &want) < t);
        let got =
            custom::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::Bool(&keep), None)
                .unwrap();
        assert!(max_diff(&got, &want) < t);
        let add = cm.to_dtype(dtype).unwrap();
        let got =
            ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::Additive(&add), None)
                .unwrap();
        assert!(max_diff(&got, &want) < t);
    }
}

pub fn attention_decode_and_lse(dev: &Device) {
    let (b, hq, hk, tk, d) = (1, 16, 4, 300, 128);
    let dtype = DType::BF16;
    let q = rand(&[b, hq, 1, d], 20, dtype, dev);
    let k = rand(&[b, hk, tk, d], 21, dtype, dev);
    let v = rand(&[b, hk, tk, d], 22, dtype, dev);
    let scale = 1.0 / (d as f32).sqrt();
    let got = ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::None, None).unwrap();
    let want = attention_ref(&q, &k, &v, scale, None);
    assert!(max_diff(&got, &want) < 2e-2);
    let (out, lse) =
        ffc::scaled_dot_product_attention_with_lse(&q, &k, &v, scale, ffc::Mask::None, None)
            .unwrap();
    assert!(max_diff(&out, &want) < 2e-2);
    assert_eq!(lse.dims(), &[b, hq, 1]);
    assert_eq!(lse.dtype(), DType::F32);
    // lse = log(sum(exp(scale * q k^T))) per query head.
    let q32 = q.to_dtype(DType::F32).unwrap();
    let k32 = k
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap()
        .expand((b, hk, hq / hk, tk, d))
        .unwrap()
        .reshape((b, hq, tk, d))
        .unwrap();
    let s = (q32.matmul(&k32.t().unwrap().contiguous().unwrap()).unwrap() * scale as f64).unwrap();
    let want_lse = s.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();
    assert!(max_diff(&lse, &want_lse) < 1e-3);
}

pub fn sinks(dev: &Device) {
    let (b, h, t, d) = (1, 4, 16, 64);
    let q = rand(&[b, h, t, d], 30, DType::F32, dev);
    let k = rand(&[b, h, t, d], 31, DType::F32, dev);
    let v = rand(&[b, h, t, d], 32, DType::F32, dev);
    let sinks = rand(&[h], 33, DType::F32, dev);
    let scale = 0.125;
    let got = ffc::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::None, Some(&sinks))
        .unwrap();
    // A sink is a key with logit `sinks[h]` and a zero value: append it.
    let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale as f64).unwrap();
    let sink_col = sinks
        .reshape((1, h, 1, 1))
        .unwrap()
        .expand((b, h, t, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    let s = Tensor::cat(&[&s, &sink_col], 3).unwrap();
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    let p = p.narrow(3, 0, t).unwrap().contiguous().unwrap();
    let want = p.matmul(&v).unwrap();
    assert!(max_diff(&got, &want) < 1e-5);
}

/// candle's merge of two attention parts: `m = max(lse_a, lse_b)`, `w = exp(lse - m)`,
/// `out = (w_a out_a + w_b out_b) / (w_a + w_b)` in f32 (rounded to the parts' dtype),
/// `lse = m + log(w_a + w_b)`. Rows with finite log-sum-exps only.
fn merge_ref(oa: &Tensor, la: &Tensor, ob: &Tensor, lb: &Tensor) -> (Tensor, Tensor) {
    let m = la.maximum(lb).unwrap();
    let wa = la.sub(&m).unwrap().exp().unwrap();
    let wb = lb.sub(&m).unwrap().exp().unwrap();
    let total = (&wa + &wb).unwrap();
    let lse = (&m + total.log().unwrap()).unwrap();
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let num = (f32_of(oa).broadcast_mul(&wa.unsqueeze(3).unwrap()).unwrap()
        + f32_of(ob).broadcast_mul(&wb.unsqueeze(3).unwrap()).unwrap())
    .unwrap();
    let out = num.broadcast_div(&total.unsqueeze(3).unwrap()).unwrap();
    (out.to_dtype(oa.dtype()).unwrap(), lse)
}

pub fn merge_attention_states(dev: &Device) {
    let (b, h, t, dv) = (2, 3, 5, 24);
    for dtype in [DType::F32, DType::BF16] {
        // Log-sum-exps in [-3, 3): weights over e^6.
        let oa = rand(&[b, h, t, dv], 90, dtype, dev);
        let ob = rand(&[b, h, t, dv], 91, dtype, dev);
        let la = (rand(&[b, h, t], 92, DType::F32, dev) * 3.0).unwrap();
        let lb = (rand(&[b, h, t], 93, DType::F32, dev) * 3.0).unwrap();
        let (out, lse) = ffc::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(out.dims(), &[b, h, t, dv]);
        assert_eq!(lse.dtype(), DType::F32);
        assert_eq!(lse.dims(), &[b, h, t]);
        let (want, want_lse) = merge_ref(&oa, &la, &ob, &lb);
        let d = max_diff(&out, &want);
        assert!(d < tol(dtype) * 4.0, "merge {dtype:?}: {d}");
        let d = max_diff(&lse, &want_lse);
        assert!(d < 1e-5, "merge lse {dtype:?}: {d}");

        // A strided part ([B, T, H, D] memory seen as [B, H, T, D]) is read in place.
        let obt = rand(&[b, t, h, dv], 94, dtype, dev)
            .transpose(1, 2)
            .unwrap();
        let (out, _) = ffc::merge_attention_states(&oa, &la, &obt, &lb).unwrap();
        let (want, _) = merge_ref(&oa, &la, &obt.contiguous().unwrap(), &lb);
        assert!(
            max_diff(&out, &want) < tol(dtype) * 4.0,
            "strided {dtype:?}"
        );

        // Attention over all the keys = the merge of attention over two halves of them.
        let (hq, hk, tq, tk, d) = (4, 2, 7, 29, 32);
        let q = rand(&[1, hq, tq, d], 95, dtype, dev);
        let k = rand(&[1, hk, tk, d], 96, dtype, dev);
        let v = rand(&[1, hk, tk, dv], 97, dtype, dev);
        let split = 12;
        let scale = 0.2;
        let part = |lo: usize, n: usize| {
            ffc::scaled_dot_product_attention_with_lse(
                &q,
                &k.narrow(2, lo, n).unwrap(),
                &v.narrow(2, lo, n).unwrap(),
                scale,
                ffc::Mask::None,
                None,
            )
            .unwrap()
        };
        let (o1, l1) = part(0, split);
        let (o2, l2) = part(split, tk - split);
        let (out, lse) = ffc::merge_attention_states(&o1, &l1, &o2, &l2).unwrap();
        let want = attention_ref(&q, &k, &v, scale, None);
        let dd = max_diff(&out, &want);
        assert!(dd < tol(dtype) * 2.0, "split attention {dtype:?}: {dd}");
        // Its log-sum-exp is the one over all the keys.
        let (_, full_lse) =
            ffc::scaled_dot_product_attention_with_lse(&q, &k, &v, scale, ffc::Mask::None, None)
                .unwrap();
        let dd = max_diff(&lse, &full_lse);
        assert!(dd < 2e-5, "split attention lse {dtype:?}: {dd}");
    }

    // A part whose row saw no key (lse -inf) contributes nothing, even a NaN output row;
    // both parts -inf give 0 and -inf.
    let oa = rand(&[1, 1, 3, 4], 98, DType::F32, &Device::Cpu);
    let ob = rand(&[1, 1, 3, 4], 99, DType::F32, dev);
    let mut oa_v = oa.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    oa_v[..4].fill(f32::NAN);
    let oa = Tensor::from_vec(oa_v, (1, 1, 3, 4), dev).unwrap();
    let ninf = f32::NEG_INFINITY;
    let la = Tensor::from_vec(vec![ninf, ninf, 0.5], (1, 1, 3), dev).unwrap();
    let lb = Tensor::from_vec(vec![0.25, ninf, -1.0], (1, 1, 3), dev).unwrap();
    let (out, lse) = ffc::merge_attention_states(&oa, &la, &ob, &lb).unwrap();
    let out = out.to_device(&Device::Cpu).unwrap();
    let row = |x: &Tensor, r: usize| x.get(0).unwrap().get(0).unwrap().get(r).unwrap();
    let ob_cpu = ob.to_device(&Device::Cpu).unwrap();
    assert_eq!(max_diff(&row(&out, 0), &row(&ob_cpu, 0)), 0.0);
    assert_eq!(row(&out, 1).to_vec1::<f32>().unwrap(), vec![0.0; 4]);
    let l = lse.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(l[0], 0.25);
    assert_eq!(l[1], ninf);
    assert!(l[2].is_finite() && l[2] > 0.5, "{l:?}");

    // ferrofast's checks come through: a log-sum-exp that is not f32.
    let la16 = la.to_dtype(DType::BF16).unwrap();
    let e = ffc::merge_attention_states(&oa, &la16, &ob, &lb)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[merge_attention_states] lse_a must have type float32"),
        "{e}"
    );
}

pub fn cross_entropy(dev: &Device) {
    let (rows, vocab) = (37, 1000);
    for dtype in [DType::F32, DType::BF16] {
        let logits = (rand(&[rows, vocab], 40, DType::F32, dev) * 4.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let targets: Vec<i64> = (0..rows).map(|i| ((i * 7919) % vocab) as i64).collect();
        let targets = Tensor::from_vec(targets, rows, dev).unwrap();
        let got = ffc::cross_entropy(&logits, &targets, &Default::default()).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let lsm =
            candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32).unwrap(), D::Minus1).unwrap();
        let want = lsm
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-3, "cross_entropy {dtype:?}: {diff}");
        // Mean reduction.
        let opts = ffc::CrossEntropyOptions {
            reduction: ffc::Reduction::Mean,
            ..Default::default()
        };
        let mean = ffc::cross_entropy(&logits, &targets, &opts).unwrap();
        let want_mean = want.mean_all().unwrap();
        assert!(max_diff(&mean, &want_mean) < 1e-4);
        // The fused training step gives the same loss and the softmax-minus-one-hot gradient.
        let (loss, dlogits) =
            ffc::cross_entropy_fused(&logits, &targets, &Default::default()).unwrap();
        assert!(max_diff(&loss, &want) < 1e-3);
        let onehot = candle_nn::encoding::one_hot(targets.clone(), vocab, 1f32, 0f32).unwrap();
        let want_d = (lsm.exp().unwrap() - onehot).unwrap();
        assert_eq!(dlogits.dtype(), dtype);
        assert!(max_diff(&dlogits, &want_d) < tol(dtype) * 2.0);
    }
}

pub fn gated_delta(dev: &Device) {
    let (b, t, hk, hv, dk, dv) = (1, 20, 2, 4, 32, 16);
    let q = rand(&[b, t, hk, dk], 50, DType::F32, dev);
    let k = (rand(&[b, t, hk, dk], 51, DType::F32, dev) * 0.2).unwrap();
    let v = rand(&[b, t, hv, dv], 52, DType::F32, dev);
    let gamma = ((rand(&[b, t, hv], 53, DType::F32, dev) * 0.1).unwrap() + 0.85).unwrap();
    let beta = ((rand(&[b, t, hv], 54, DType::F32, dev) * 0.3).unwrap() + 0.5).unwrap();
    let (out, state) = ffc::gated_delta_update(&q, &k, &v, &gamma, &beta, None, None).unwrap();
    assert_eq!(out.dims(), &[b, t, hv, dv]);
    assert_eq!(state.dims(), &[b, hv, dv, dk]);
    // The recurrence, step by step with candle: S = g S; S += beta (v - S k) k^T; o = S q.
    let rep = hv / hk;
    let mut s = Tensor::zeros((b, hv, dv, dk), DType::F32, dev).unwrap();
    let mut outs = Vec::new();
    for step in 0..t {
        let pick = |x: &Tensor| x.narrow(1, step, 1).unwrap().squeeze(1).unwrap();
        let expand = |x: Tensor| -> Tensor {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, hk, rep, dk))
                .unwrap()
                .reshape((b, hv, dk))
                .unwrap()
        };
        let qt = expand(pick(&q));
        let kt = expand(pick(&k));
        let vt = pick(&v);
        let gt = pick(&gamma).reshape((b, hv, 1, 1)).unwrap();
        let bt = pick(&beta).reshape((b, hv, 1)).unwrap();
        s = s.broadcast_mul(&gt).unwrap();
        let sk = s
            .matmul(&kt.unsqueeze(3).unwrap())
            .unwrap()
            .squeeze(3)
            .unwrap();
        let delta = (vt - sk).unwrap().broadcast_mul(&bt).unwrap();
        s = (s + delta
            .unsqueeze(3)
            .unwrap()
            .matmul(&kt.unsqueeze(2).unwrap())
            .unwrap())
        .unwrap();
        outs.push(
            s.matmul(&qt.unsqueeze(3).unwrap())
                .unwrap()
                .squeeze(3)
                .unwrap(),
        );
    }
    let want = Tensor::stack(&outs, 1).unwrap();
    assert!(max_diff(&out, &want) < 1e-4, "{}", max_diff(&out, &want));
    assert!(max_diff(&state, &s) < 1e-4);
}

/// `sum(out * r)` for a fixed random `r`: a scalar loss whose gradient is `r`.
fn weighted_sum(out: &Tensor, seed: u64) -> (Tensor, Tensor) {
    let r = rand(out.dims(), seed, DType::F32, out.device());
    let loss = out
        .to_dtype(DType::F32)
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap();
    (loss, r)
}

pub fn autograd(dev: &Device) {
    // RMS norm and layer norm: gradients of x and the weight (and bias).
    let x = candle_core::Var::from_tensor(&rand(&[6, 128], 60, DType::F32, dev)).unwrap();
    let w = candle_core::Var::from_tensor(&rand(&[128], 61, DType::F32, dev)).unwrap();
    let bias = candle_core::Var::from_tensor(&rand(&[128], 62, DType::F32, dev)).unwrap();
    let (loss, _) = weighted_sum(&custom::rms_norm(&x, Some(&w), 1e-5).unwrap(), 63);
    let g = loss.backward().unwrap();
    let (loss_ref, _) = weighted_sum(&candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap(), 63);
    let g_ref = loss_ref.backward().unwrap();
    for var in [&x, &w] {
        let d = max_diff(g.get(var).unwrap(), g_ref.get(var).unwrap());
        assert!(d < 1e-4, "rms_norm gradient: {d}");
    }
    let (loss, _) = weighted_sum(
        &custom::layer_norm(&x, Some(&w), Some(&bias), 1e-5).unwrap(),
        64,
    );
    let g = loss.backward().unwrap();
    let (loss_ref, _) = weighted_sum(
        &candle_nn::ops::layer_norm_slow(&x, &w, &bias, 1e-5).unwrap(),
        64,
    );
    let g_ref = loss_ref.backward().unwrap();
    for var in [&x, &w, &bias] {
        let d = max_diff(g.get(var).unwrap(), g_ref.get(var).unwrap());
        assert!(d < 1e-4, "layer_norm gradient: {d}");
    }
    // Without a weight (one input) and with a weight only (two inputs).
    let ones = Tensor::ones(128, DType::F32, dev).unwrap();
    let zeros = Tensor::zeros(128, DType::F32, dev).unwrap();
    let (loss, _) = weighted_sum(&custom::rms_norm(&x, None, 1e-5).unwrap(), 65);
    let g = loss.backward().unwrap();
    let (loss_ref, _) = weighted_sum(&candle_nn::ops::rms_norm_slow(&x, &ones, 1e-5).unwrap(), 65);
    let d = max_diff(
        g.get(&x).unwrap(),
        loss_ref.backward().unwrap().get(&x).unwrap(),
    );
    assert!(d < 1e-4, "rms_norm gradient without a weight: {d}");
    let (loss, _) = weighted_sum(&custom::layer_norm(&x, Some(&w), None, 1e-5).unwrap(), 66);
    let g = loss.backward().unwrap();
    let (loss_ref, _) = weighted_sum(
        &candle_nn::ops::layer_norm_slow(&x, &w, &zeros, 1e-5).unwrap(),
        66,
    );
    let g_ref = loss_ref.backward().unwrap();
    for var in [&x, &w] {
        let d = max_diff(g.get(var).unwrap(), g_ref.get(var).unwrap());
        assert!(d < 1e-4, "layer_norm gradient without a bias: {d}");
    }

    // Rope.
    let xr = candle_core::Var::from_tensor(&rand(&[1, 2, 8, 32], 65, DType::F32, dev)).unwrap();
    let opts = ffc::RopeOptions {
        offset: ffc::Offset::Int(2),
        ..Default::default()
    };
    let (loss, _) = weighted_sum(&custom::rope(&xr, 32, &opts).unwrap(), 66);
    let g = loss.backward().unwrap();
    let (cos, sin) = rope_tables(8, 32, 2, dev);
    let (loss_ref, _) = weighted_sum(
        &candle_nn::rotary_emb::rope_slow(&xr, &cos, &sin).unwrap(),
        66,
    );
    let g_ref = loss_ref.backward().unwrap();
    assert!(max_diff(g.get(&xr).unwrap(), g_ref.get(&xr).unwrap()) < 1e-5);

    // Attention, causal, GQA: gradients of q, k and v.
    let (b, hq, hk, t, d) = (1, 4, 2, 24, 32);
    let q = candle_core::Var::from_tensor(&rand(&[b, hq, t, d], 67, DType::F32, dev)).unwrap();
    let k = candle_core::Var::from_tensor(&rand(&[b, hk, t, d], 68, DType::F32, dev)).unwrap();
    let v = candle_core::Var::from_tensor(&rand(&[b, hk, t, d], 69, DType::F32, dev)).unwrap();
    let scale = 0.2;
    let out =
        custom::scaled_dot_product_attention(&q, &k, &v, scale, ffc::Mask::Causal, None).unwrap();
    let (loss, _) = weighted_sum(&out, 70);
    let g = loss.backward().unwrap();
    let cm = causal_additive(t, t, dev);
    let (loss_ref, _) = weighted_sum(&attention_ref(&q, &k, &v, scale, Some(&cm)), 70);
    let g_ref = loss_ref.backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let want = g_ref
            .get(var)
            .unwrap_or_else(|| panic!("no reference d{name}"));
        let dd = max_diff(g.get(var).unwrap(), want);
        assert!(dd < 1e-4, "attention d{name}: {dd}");
        assert!(max_abs(g.get(var).unwrap()) > 1e-3);
    }

    // Cross-entropy (mean): gradient of the logits.
    let logits =
        candle_core::Var::from_tensor(&(rand(&[9, 50], 71, DType::F32, dev) * 3.0).unwrap())
            .unwrap();
    let targets = Tensor::new(&[1u32, 5, 49, 0, 7, 7, 20, 33, 2], dev).unwrap();
    let opts = ffc::CrossEntropyOptions {
        reduction: ffc::Reduction::Mean,
        ..Default::default()
    };
    let loss = custom::cross_entropy(&logits, &targets, &opts).unwrap();
    let g = loss.backward().unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let loss_ref = lsm
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    assert!(max_diff(&loss, &loss_ref) < 1e-5);
    let g_ref = loss_ref.backward().unwrap();
    assert!(max_diff(g.get(&logits).unwrap(), g_ref.get(&logits).unwrap()) < 1e-6);
}

pub fn errors(dev: &Device) {
    // MLX's messages come through as the error's text.
    let x = rand(&[2, 8], 80, DType::F32, dev);
    let w = rand(&[7], 81, DType::F32, dev);
    let e = ffc::rms_norm(&x, Some(&w), 1e-5).unwrap_err().to_string();
    assert!(e.contains("[rms_norm]"), "{e}");
    let q = rand(&[1, 3, 4, 16], 82, DType::F32, dev);
    let k = rand(&[1, 2, 4, 16], 83, DType::F32, dev);
    let e = ffc::scaled_dot_product_attention(&q, &k, &k, 1.0, ffc::Mask::None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[scaled_dot_product_attention]"), "{e}");
    // A dtype ferrofast lacks is refused with a hint.
    // (made on the CPU: candle has no CUDA cast to i16)
    let xi = rand(&[2, 8], 80, DType::F32, &Device::Cpu)
        .to_dtype(DType::I16)
        .unwrap();
    let e = ffc::rms_norm(&xi, None, 1e-5).unwrap_err().to_string();
    assert!(e.contains("to_dtype"), "{e}");
    // A float mask passed as boolean is refused.
    let m = rand(&[4, 4], 84, DType::F32, dev);
    let e = ffc::scaled_dot_product_attention(&q, &q, &q, 1.0, ffc::Mask::Bool(&m), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("u8"), "{e}");
}
