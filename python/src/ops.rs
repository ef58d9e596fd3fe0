//! The ops of `ferrofast.fast` over [`Tensor`]s: positional arguments, validated by
//! ferrofast itself (MLX's checks and messages); keywords, defaults and the conversion of
//! NumPy / PyTorch arrays live in `ferrofast/fast.py`. Every kernel runs with the GIL
//! released.

use ferrofast::fast::{self, CrossEntropyOptions, Mask, Reduction, RopeOffset};
use ferrofast::Array;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::dlpack::Tensor;
use crate::errors::to_py;

type Res<T> = ferrofast::Result<T>;

fn arr(t: &Bound<'_, Tensor>) -> PyResult<Array> {
    t.get().array()
}

fn opt(t: Option<&Bound<'_, Tensor>>) -> PyResult<Option<Array>> {
    t.map(arr).transpose()
}

/// Runs `f` without the GIL and wraps the error.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Res<T> + Send) -> PyResult<T> {
    py.detach(f).map_err(to_py)
}

fn wrap(a: Array) -> Tensor {
    Tensor::new(a)
}

fn wrap_opt(a: Option<Array>) -> Option<Tensor> {
    a.map(Tensor::new)
}

// ----- rms_norm / layer_norm -----------------------------------------------------------------

/// `rms_norm(x, weight, eps)`.
#[pyfunction]
#[pyo3(signature = (x, weight, eps))]
pub fn rms_norm(
    py: Python<'_>,
    x: &Bound<'_, Tensor>,
    weight: Option<&Bound<'_, Tensor>>,
    eps: f32,
) -> PyResult<Tensor> {
    let (x, w) = (arr(x)?, opt(weight)?);
    run(py, move || fast::rms_norm(&x, w.as_ref(), eps)).map(wrap)
}

/// `rms_norm_vjp(x, weight, eps, cotangent) -> (dx, dweight | None)`.
#[pyfunction]
#[pyo3(signature = (x, weight, eps, cotangent))]
pub fn rms_norm_vjp(
    py: Python<'_>,
    x: &Bound<'_, Tensor>,
    weight: Option<&Bound<'_, Tensor>>,
    eps: f32,
    cotangent: &Bound<'_, Tensor>,
) -> PyResult<(Tensor, Option<Tensor>)> {
    let (x, w, g) = (arr(x)?, opt(weight)?, arr(cotangent)?);
    let (dx, dw) = run(py, move || fast::rms_norm_vjp(&x, w.as_ref(), eps, &g))?;
    Ok((wrap(dx), wrap_opt(dw)))
}

/// `layer_norm(x, weight, bias, eps)`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps))]
pub fn layer_norm(
    py: Python<'_>,
    x: &Bound<'_, Tensor>,
    weight: Option<&Bound<'_, Tensor>>,
    bias: Option<&Bound<'_, Tensor>>,
    eps: f32,
) -> PyResult<Tensor> {
    let (x, w, b) = (arr(x)?, opt(weight)?, opt(bias)?);
    run(py, move || {
        fast::layer_norm(&x, w.as_ref(), b.as_ref(), eps)
    })
    .map(wrap)
}

/// `layer_norm_vjp(x, weight, bias, eps, cotangent) -> (dx, dweight | None, dbias | None)`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps, cotangent))]
pub fn layer_norm_vjp(
    py: Python<'_>,
    x: &Bound<'_, Tensor>,
    weight: Option<&Bound<'_, Tensor>>,
    bias: Option<&Bound<'_, Tensor>>,
    eps: f32,
    cotangent: &Bound<'_, Tensor>,
) -> PyResult<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let (x, w, b, g) = (arr(x)?, opt(weight)?, opt(bias)?, arr(cotangent)?);
    let (dx, dw, db) = run(py, move || {
        fast::layer_norm_vjp(&x, w.as_ref(), b.as_ref(), eps, &g)
    })?;
    Ok((wrap(dx), wrap_opt(dw), wrap_opt(db)))
}

// ----- rope ------------------------------------------------------------------------------

/// The offset argument of rope: an int, or an integer array.
enum Offset {
    Int(i64),
    Array(Array),
}

impl Offset {
    fn from_py(offset: &Bound<'_, PyAny>) -> PyResult<Offset> {
        if let Ok(t) = offset.cast::<Tensor>() {
            return Ok(Offset::Array(arr(t)?));
        }
        offset
            .extract::<i64>()
            .map(Offset::Int)
            .map_err(|_| PyValueError::new_err("[rope] offset must be an int or an integer array."))
    }

    fn as_rope(&self) -> RopeOffset<'_> {
        match self {
            Offset::Int(v) => RopeOffset::Int(*v),
            Offset::Array(a) => RopeOffset::Array(a),
        }
    }
}

/// `rope(a, dims, traditional, base, scale, offset, freqs)`.
#[pyfunction]
#[pyo3(signature = (a, dims, traditional, base, scale, offset, freqs))]
#[allow(clippy::too_many_arguments)]
pub fn rope(
    py: Python<'_>,
    a: &Bound<'_, Tensor>,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: &Bound<'_, PyAny>,
    freqs: Option<&Bound<'_, Tensor>>,
) -> PyResult<Tensor> {
    let (a, offset, freqs) = (arr(a)?, Offset::from_py(offset)?, opt(freqs)?);
    run(py, move || {
        fast::rope(
            &a,
            dims,
            traditional,
            base,
            scale,
            offset.as_rope(),
            freqs.as_ref(),
        )
    })
    .map(wrap)
}

/// `rope_vjp(cotangent, dims, traditional, base, scale, offset, freqs)`.
#[pyfunction]
#[pyo3(signature = (cotangent, dims, traditional, base, scale, offset, freqs))]
#[allow(clippy::too_many_arguments)]
pub fn rope_vjp(
    py: Python<'_>,
    cotangent: &Bound<'_, Tensor>,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: &Bound<'_, PyAny>,
    freqs: Option<&Bound<'_, Tensor>>,
) -> PyResult<Tensor> {
    let (g, offset, freqs) = (arr(cotangent)?, Offset::from_py(offset)?, opt(freqs)?);
    run(py, move || {
        fast::rope_vjp(
            &g,
            dims,
            traditional,
            base,
            scale,
            offset.as_rope(),
            freqs.as_ref(),
        )
    })
    .map(wrap)
}

// ----- attention ---------------------------------------------------------------------------

/// The mask argument: None, `"causal"` (any other string is MLX's error), or an array.
enum MaskIn {
    None,
    Causal,
    Array(Array),
}

impl MaskIn {
    fn from_py(mask: Option<&Bound<'_, PyAny>>) -> PyResult<MaskIn> {
        let Some(mask) = mask else {
            return Ok(MaskIn::None);
        };
        if let Ok(t) = mask.cast::<Tensor>() {
            return Ok(MaskIn::Array(arr(t)?));
        }
        let s: String = mask.extract().map_err(|_| {
            PyValueError::new_err(
                "[scaled_dot_product_attention] mask must be None, 'causal' or an array.",
            )
        })?;
        match Mask::parse(&s).map_err(to_py)? {
            Mask::Causal => Ok(MaskIn::Causal),
            _ => Ok(MaskIn::None),
        }
    }

    fn as_mask(&self) -> Mask<'_> {
        match self {
            MaskIn::None => Mask::None,
            MaskIn::Causal => Mask::Causal,
            MaskIn::Array(a) => Mask::Array(a),
        }
    }
}

/// `scaled_dot_product_attention(q, k, v, scale, mask, sinks)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, scale, mask, sinks))]
pub fn scaled_dot_product_attention(
    py: Python<'_>,
    q: &Bound<'_, Tensor>,
    k: &Bound<'_, Tensor>,
    v: &Bound<'_, Tensor>,
    scale: f32,
    mask: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, Tensor>>,
) -> PyResult<Tensor> {
    let (q, k, v) = (arr(q)?, arr(k)?, arr(v)?);
    let (mask, sinks) = (MaskIn::from_py(mask)?, opt(sinks)?);
    run(py, move || {
        fast::scaled_dot_product_attention(&q, &k, &v, scale, mask.as_mask(), sinks.as_ref())
    })
    .map(wrap)
}

/// `scaled_dot_product_attention_with_lse(q, k, v, scale, mask, sinks) -> (out, lse)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, scale, mask, sinks))]
pub fn scaled_dot_product_attention_with_lse(
    py: Python<'_>,
    q: &Bound<'_, Tensor>,
    k: &Bound<'_, Tensor>,
    v: &Bound<'_, Tensor>,
    scale: f32,
    mask: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, Tensor>>,
) -> PyResult<(Tensor, Tensor)> {
    let (q, k, v) = (arr(q)?, arr(k)?, arr(v)?);
    let (mask, sinks) = (MaskIn::from_py(mask)?, opt(sinks)?);
    let (out, lse) = run(py, move || {
        fast::scaled_dot_product_attention_with_lse(
            &q,
            &k,
            &v,
            scale,
            mask.as_mask(),
            sinks.as_ref(),
        )
    })?;
    Ok((wrap(out), wrap(lse)))
}

/// `scaled_dot_product_attention_vjp(q, k, v, scale, mask, sinks, out, lse, d_out)
/// -> (dq, dk, dv, dsinks | None)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, scale, mask, sinks, out, lse, d_out))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn scaled_dot_product_attention_vjp(
    py: Python<'_>,
    q: &Bound<'_, Tensor>,
    k: &Bound<'_, Tensor>,
    v: &Bound<'_, Tensor>,
    scale: f32,
    mask: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, Tensor>>,
    out: &Bound<'_, Tensor>,
    lse: &Bound<'_, Tensor>,
    d_out: &Bound<'_, Tensor>,
) -> PyResult<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let (q, k, v) = (arr(q)?, arr(k)?, arr(v)?);
    let (mask, sinks) = (MaskIn::from_py(mask)?, opt(sinks)?);
    let (out, lse, d_out) = (arr(out)?, arr(lse)?, arr(d_out)?);
    let (dq, dk, dv, ds) = run(py, move || {
        fast::scaled_dot_product_attention_vjp(
            &q,
            &k,
            &v,
            scale,
            mask.as_mask(),
            sinks.as_ref(),
            &out,
            &lse,
            &d_out,
        )
    })?;
    Ok((wrap(dq), wrap(dk), wrap(dv), wrap_opt(ds)))
}

// ----- merge_attention_states ----------------------------------------------------------------

/// `merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)`: two attention results
/// over disjoint key sets, with their log-sum-exps, merged into the result over all the keys
/// (`fast::merge_attention_states`, whose checks and messages it keeps).
#[pyfunction]
#[pyo3(signature = (out_a, lse_a, out_b, lse_b))]
pub fn merge_attention_states(
    py: Python<'_>,
    out_a: &Bound<'_, Tensor>,
    lse_a: &Bound<'_, Tensor>,
    out_b: &Bound<'_, Tensor>,
    lse_b: &Bound<'_, Tensor>,
) -> PyResult<(Tensor, Tensor)> {
    let (oa, la, ob, lb) = (arr(out_a)?, arr(lse_a)?, arr(out_b)?, arr(lse_b)?);
    let (out, lse) = run(py, move || fast::merge_attention_states(&oa, &la, &ob, &lb))?;
    Ok((wrap(out), wrap(lse)))
}

// ----- cross_entropy -------------------------------------------------------------------------

fn ce_options(
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<CrossEntropyOptions> {
    let reduction = match reduction {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => {
            return Err(PyValueError::new_err(format!(
                "[cross_entropy] reduction must be 'none', 'sum' or 'mean' but got '{other}'."
            )))
        }
    };
    Ok(CrossEntropyOptions {
        ignore_index,
        label_smoothing,
        z_loss,
        reduction,
    })
}

/// `cross_entropy_with(logits, targets, ignore_index, label_smoothing, z_loss, reduction)`
/// (MLX's `cross_entropy` is the defaults: `None, 0.0, 0.0, "none"`).
#[pyfunction]
#[pyo3(signature = (logits, targets, ignore_index, label_smoothing, z_loss, reduction))]
pub fn cross_entropy_with(
    py: Python<'_>,
    logits: &Bound<'_, Tensor>,
    targets: &Bound<'_, Tensor>,
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<Tensor> {
    let opts = ce_options(ignore_index, label_smoothing, z_loss, reduction)?;
    let (x, t) = (arr(logits)?, arr(targets)?);
    run(py, move || fast::cross_entropy_with(&x, &t, &opts)).map(wrap)
}

/// `cross_entropy_vjp(logits, targets, cotangent, ignore_index, label_smoothing, z_loss,
/// reduction) -> dlogits`.
#[pyfunction]
#[pyo3(signature = (logits, targets, cotangent, ignore_index, label_smoothing, z_loss, reduction))]
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_vjp(
    py: Python<'_>,
    logits: &Bound<'_, Tensor>,
    targets: &Bound<'_, Tensor>,
    cotangent: &Bound<'_, Tensor>,
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<Tensor> {
    let opts = ce_options(ignore_index, label_smoothing, z_loss, reduction)?;
    let (x, t, g) = (arr(logits)?, arr(targets)?, arr(cotangent)?);
    run(py, move || fast::cross_entropy_vjp(&x, &t, &opts, &g)).map(wrap)
}

/// `cross_entropy_fused(logits, targets, ignore_index, label_smoothing, z_loss, reduction)
/// -> (loss, dlogits)`.
#[pyfunction]
#[pyo3(signature = (logits, targets, ignore_index, label_smoothing, z_loss, reduction))]
pub fn cross_entropy_fused(
    py: Python<'_>,
    logits: &Bound<'_, Tensor>,
    targets: &Bound<'_, Tensor>,
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<(Tensor, Tensor)> {
    let opts = ce_options(ignore_index, label_smoothing, z_loss, reduction)?;
    let (x, t) = (arr(logits)?, arr(targets)?);
    let (loss, dx) = run(py, move || fast::cross_entropy_fused(&x, &t, &opts))?;
    Ok((wrap(loss), wrap(dx)))
}

/// `cross_entropy_fused_in_place(logits, targets, ignore_index, label_smoothing, z_loss,
/// reduction) -> loss`: writes `dlogits` over the logits' memory (see
/// `fast::cross_entropy_fused_in_place_external`). `logits` must be a `Tensor` whose memory
/// may be written ([`Tensor::writable`]: a result, or a producer's memory shared without a
/// copy and not exported read-only); the `Tensor` gives its array up to the call and is
/// empty afterwards. `ferrofast/fast.py` makes one for the call from a NumPy array, a
/// PyTorch tensor or a CuPy array whose writability and address it checked.
#[pyfunction]
#[pyo3(signature = (logits, targets, ignore_index, label_smoothing, z_loss, reduction))]
pub fn cross_entropy_fused_in_place(
    py: Python<'_>,
    logits: &Bound<'_, Tensor>,
    targets: &Bound<'_, Tensor>,
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<Tensor> {
    let opts = ce_options(ignore_index, label_smoothing, z_loss, reduction)?;
    if !logits.get().writable() {
        return Err(PyValueError::new_err(
            "[cross_entropy] The in-place pass writes the logits, but they are read-only or \
             were copied on the way in (a read-only or misaligned array).",
        ));
    }
    let t = arr(targets)?;
    let x = logits.get().take()?;
    let (loss, _dx) = run(py, move || {
        // SAFETY: the logits' memory may be written (`Tensor::writable`: ferrofast's own
        // buffer, or a producer's memory shared without a copy and not exported read-only),
        // and the caller lends it for this call: the Python API (`fast.py`) documents that
        // nobody else reads or writes the logits during the call, as for every input, and
        // refuses producers whose arrays are immutable (JAX). On a GPU the write is queued
        // on the producer's current stream, where its later work is ordered after it.
        unsafe { fast::cross_entropy_fused_in_place_external(x, &t, &opts) }
    })?;
    Ok(wrap(loss))
}

// ----- gated_delta_update --------------------------------------------------------------------

/// `gated_delta_update(q, k, v, gamma, beta, initial_state, mask) -> (out, state)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, gamma, beta, initial_state, mask))]
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update(
    py: Python<'_>,
    q: &Bound<'_, Tensor>,
    k: &Bound<'_, Tensor>,
    v: &Bound<'_, Tensor>,
    gamma: &Bound<'_, Tensor>,
    beta: &Bound<'_, Tensor>,
    initial_state: Option<&Bound<'_, Tensor>>,
    mask: Option<&Bound<'_, Tensor>>,
) -> PyResult<(Tensor, Tensor)> {
    let (q, k, v, g, b) = (arr(q)?, arr(k)?, arr(v)?, arr(gamma)?, arr(beta)?);
    let (s0, m) = (opt(initial_state)?, opt(mask)?);
    let (out, state) = run(py, move || {
        fast::gated_delta_update(&q, &k, &v, &g, &b, s0.as_ref(), m.as_ref())
    })?;
    Ok((wrap(out), wrap(state)))
}

/// The gradients of `gated_delta_update`: `(dq, dk, dv, dgamma, dbeta, dstate0 | None)`.
type GatedDeltaGradsPy = (Tensor, Tensor, Tensor, Tensor, Tensor, Option<Tensor>);

/// `gated_delta_update_vjp(q, k, v, gamma, beta, initial_state, mask, d_out, d_state)
/// -> (dq, dk, dv, dgamma, dbeta, dstate0 | None)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, gamma, beta, initial_state, mask, d_out, d_state))]
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update_vjp(
    py: Python<'_>,
    q: &Bound<'_, Tensor>,
    k: &Bound<'_, Tensor>,
    v: &Bound<'_, Tensor>,
    gamma: &Bound<'_, Tensor>,
    beta: &Bound<'_, Tensor>,
    initial_state: Option<&Bound<'_, Tensor>>,
    mask: Option<&Bound<'_, Tensor>>,
    d_out: &Bound<'_, Tensor>,
    d_state: Option<&Bound<'_, Tensor>>,
) -> PyResult<GatedDeltaGradsPy> {
    let (q, k, v, g, b) = (arr(q)?, arr(k)?, arr(v)?, arr(gamma)?, arr(beta)?);
    let (s0, m, dout, ds) = (opt(initial_state)?, opt(mask)?, arr(d_out)?, opt(d_state)?);
    let grads = run(py, move || {
        fast::gated_delta_update_vjp(
            &q,
            &k,
            &v,
            &g,
            &b,
            s0.as_ref(),
            m.as_ref(),
            &dout,
            ds.as_ref(),
        )
    })?;
    Ok((
        wrap(grads.dq),
        wrap(grads.dk),
        wrap(grads.dv),
        wrap(grads.dgamma),
        wrap(grads.dbeta),
        wrap_opt(grads.dstate0),
    ))
}
