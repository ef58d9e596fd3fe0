//! Every ferrofast op as a plain function on candle tensors (no autograd history on the
//! results; the [`crate::custom`] ops record it).

use candle_core::Tensor;
use ferrofast::fast;

use crate::convert::Borrowed;
use crate::{ff_err, CrossEntropyOptions, Result};

/// The mask of [`scaled_dot_product_attention`], as MLX's `mask=` argument.
#[derive(Clone, Copy, Debug, Default)]
pub enum Mask<'a> {
    /// No mask: every query sees every key.
    #[default]
    None,
    /// Causal, aligned to the lower right: query `i` sees key `j` iff `j <= i + T_kv - T_q`.
    Causal,
    /// A boolean mask (candle has no bool dtype: a `u8` tensor, where a non-zero byte keeps
    /// the key) that broadcasts to `[B, N_q, T_q, T_kv]`.
    Bool(&'a Tensor),
    /// An additive mask of a floating dtype that promotes to the output's, broadcasting to
    /// `[B, N_q, T_q, T_kv]` (as MLX, an integer tensor here is added too).
    Additive(&'a Tensor),
}

/// The position offset of [`rope`]: one for every batch example, or a 1-D integer tensor
/// of size 1 or `B` (one per example, as a paged decode batch needs).
#[derive(Clone, Copy, Debug)]
pub enum Offset<'a> {
    /// One offset shared by every batch example.
    Int(i64),
    /// An integer tensor of size 1 or `B`.
    Tensor(&'a Tensor),
}

impl From<i64> for Offset<'_> {
    fn from(v: i64) -> Self {
        Offset::Int(v)
    }
}

impl From<usize> for Offset<'_> {
    fn from(v: usize) -> Self {
        Offset::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl<'a> From<&'a Tensor> for Offset<'a> {
    fn from(t: &'a Tensor) -> Self {
        Offset::Tensor(t)
    }
}

/// The options of [`rope`] beyond `dims` (MLX's keyword arguments), with MLX's defaults.
#[derive(Clone, Copy, Debug)]
pub struct RopeOptions<'a> {
    /// Rotate adjacent pairs `(2i, 2i+1)` instead of the half-split pairs `(i, i + dims/2)`.
    pub traditional: bool,
    /// Base of the geometric frequencies; exclusive with `freqs`.
    pub base: Option<f32>,
    /// Multiplies every position.
    pub scale: f32,
    /// Position of the first token.
    pub offset: Offset<'a>,
    /// Periods, one per rotated pair (1-D of length `dims / 2`); exclusive with `base`.
    pub freqs: Option<&'a Tensor>,
}

impl Default for RopeOptions<'_> {
    fn default() -> Self {
        RopeOptions {
            traditional: false,
            base: Some(10000.0),
            scale: 1.0,
            offset: Offset::Int(0),
            freqs: None,
        }
    }
}

/// Runs `f` with a borrowing context on the first tensor's device; the tensors it borrows
/// stay read-locked until `f` returns.
fn on<'t, R>(first: &'t Tensor, f: impl FnOnce(&Borrowed<'t>) -> Result<R>) -> Result<R> {
    let b = Borrowed::new(first.device())?;
    f(&b)
}

/// A `u8` tensor as a ferrofast bool mask (non-zero keeps the key).
fn bool_mask<'t>(b: &Borrowed<'t>, t: &'t Tensor) -> Result<ferrofast::Array> {
    if t.dtype() != candle_core::DType::U8 {
        return Err(candle_core::Error::Msg(format!(
            "[ferrofast-candle] a boolean attention mask is a u8 tensor (non-zero keeps the \
             key), got {:?}; an additive mask is Mask::Additive",
            t.dtype()
        )));
    }
    // One cast: non-zero bytes become `true`.
    b.array(t)?.astype(ferrofast::DType::Bool).map_err(ff_err)
}

/// A borrowed mask as ferrofast's, with the array it borrows (kept alive by the caller).
pub(crate) fn mask_array<'t>(b: &Borrowed<'t>, mask: Mask<'t>) -> Result<Option<ferrofast::Array>> {
    Ok(match mask {
        Mask::None | Mask::Causal => None,
        Mask::Bool(t) => Some(bool_mask(b, t)?),
        Mask::Additive(t) => Some(b.array(t)?),
    })
}

pub(crate) fn ff_mask<'a>(mask: Mask<'_>, array: Option<&'a ferrofast::Array>) -> fast::Mask<'a> {
    match (mask, array) {
        (Mask::Causal, _) => fast::Mask::Causal,
        (_, Some(a)) => fast::Mask::Array(a),
        _ => fast::Mask::None,
    }
}

fn ff_offset<'t>(b: &Borrowed<'t>, offset: Offset<'t>) -> Result<(i64, Option<ferrofast::Array>)> {
    Ok(match offset {
        Offset::Int(v) => (v, None),
        Offset::Tensor(t) => (0, Some(b.array(t)?)),
    })
}

/// RMS normalisation over the last axis, MLX's `mx.fast.rms_norm(x, weight, eps)`:
/// `x / sqrt(mean(x²) + eps) * weight`, accumulated in float32, in `x`'s dtype (promoted
/// with the weight's).
///
/// # Errors
/// MLX's messages for bad shapes or dtypes (as `ferrofast::fast::rms_norm`); tensors on
/// different devices; dtypes ferrofast lacks.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    on(x, |b| {
        let out = fast::rms_norm(&b.array(x)?, b.opt(weight)?.as_ref(), eps).map_err(ff_err)?;
        b.tensor(out)
    })
}

/// The backward pass of [`rms_norm`]: `(dx, dweight)` for the cotangent of its output;
/// `dweight` is `None` without a weight.
///
/// # Errors
/// As [`rms_norm`], and a cotangent whose shape is not the output's.
pub fn rms_norm_vjp(
    x: &Tensor,
    weight: Option<&Tensor>,
    eps: f32,
    cotangent: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    on(x, |b| {
        let (dx, dw) = fast::rms_norm_vjp(
            &b.array(x)?,
            b.opt(weight)?.as_ref(),
            eps,
            &b.array(cotangent)?,
        )
        .map_err(ff_err)?;
        Ok((b.tensor(dx)?, b.opt_tensor(dw)?))
    })
}

/// Layer normalisation over the last axis, MLX's `mx.fast.layer_norm(x, weight, bias, eps)`.
///
/// # Errors
/// As [`rms_norm`].
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    on(x, |b| {
        let out = fast::layer_norm(
            &b.array(x)?,
            b.opt(weight)?.as_ref(),
            b.opt(bias)?.as_ref(),
            eps,
        )
        .map_err(ff_err)?;
        b.tensor(out)
    })
}

/// The gradients of [`layer_norm`]: `(dx, dweight, dbias)`.
pub type LayerNormGrads = (Tensor, Option<Tensor>, Option<Tensor>);

/// The backward pass of [`layer_norm`]: `(dx, dweight, dbias)`; an absent weight or bias
/// gives `None`.
///
/// # Errors
/// As [`rms_norm_vjp`].
pub fn layer_norm_vjp(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    cotangent: &Tensor,
) -> Result<LayerNormGrads> {
    on(x, |b| {
        let (dx, dw, db) = fast::layer_norm_vjp(
            &b.array(x)?,
            b.opt(weight)?.as_ref(),
            b.opt(bias)?.as_ref(),
            eps,
            &b.array(cotangent)?,
        )
        .map_err(ff_err)?;
        Ok((b.tensor(dx)?, b.opt_tensor(dw)?, b.opt_tensor(db)?))
    })
}

fn rope_impl(x: &Tensor, dims: usize, options: &RopeOptions<'_>, vjp: bool) -> Result<Tensor> {
    let dims = i32::try_from(dims)
        .map_err(|_| candle_core::Error::Msg(format!("[rope] dims {dims} overflows i32")))?;
    on(x, |b| {
        let (int_offset, offset_array) = ff_offset(b, options.offset)?;
        let offset = match &offset_array {
            Some(a) => fast::RopeOffset::Array(a),
            None => fast::RopeOffset::Int(int_offset),
        };
        let freqs = b.opt(options.freqs)?;
        let opts = fast::RopeOptions {
            traditional: options.traditional,
            base: options.base,
            scale: options.scale,
            offset,
            freqs: freqs.as_ref(),
        };
        let a = b.array(x)?;
        let out = if vjp {
            fast::rope_vjp_with(&a, dims, &opts)
        } else {
            fast::rope_with(&a, dims, &opts)
        }
        .map_err(ff_err)?;
        b.tensor(out)
    })
}

/// Rotary positional embedding, MLX's `mx.fast.rope(x, dims, ...)`, over `x` of shape
/// `[..., T, D]` (rotating the first `dims` features of each row; position `offset + t`).
///
/// # Errors
/// MLX's messages (as `ferrofast::fast::rope`).
pub fn rope(x: &Tensor, dims: usize, options: &RopeOptions<'_>) -> Result<Tensor> {
    rope_impl(x, dims, options, false)
}

/// The backward pass of [`rope`] (the inverse rotation of the cotangent, same options).
///
/// # Errors
/// As [`rope`].
pub fn rope_vjp(cotangent: &Tensor, dims: usize, options: &RopeOptions<'_>) -> Result<Tensor> {
    rope_impl(cotangent, dims, options, true)
}

/// Scaled dot-product attention, MLX's `mx.fast.scaled_dot_product_attention(q, k, v,
/// scale, mask, sinks)`: `q` is `[B, N_q, T_q, D]`, `k` `[B, N_kv, T_kv, D]`, `v`
/// `[B, N_kv, T_kv, D_v]` (`N_q` a multiple of `N_kv`: grouped-query attention without
/// repeating K / V), `sinks` optional `[N_q]`. The result is `[B, N_q, T_q, D_v]` in `q`'s
/// dtype. Strided tensors (a transposed `[B, T, N, D]` projection, a KV-cache slice) are
/// read in place.
///
/// # Errors
/// MLX's messages (as `ferrofast::fast::scaled_dot_product_attention`); a `Mask::Bool`
/// tensor that is not `u8`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    on(q, |b| {
        let m = mask_array(b, mask)?;
        let out = fast::scaled_dot_product_attention(
            &b.array(q)?,
            &b.array(k)?,
            &b.array(v)?,
            scale,
            ff_mask(mask, m.as_ref()),
            b.opt(sinks)?.as_ref(),
        )
        .map_err(ff_err)?;
        b.tensor(out)
    })
}

/// [`scaled_dot_product_attention`] that also returns the log-sum-exp of each query's
/// scaled scores (float32 `[B, N_q, T_q]`), which the backward pass takes.
///
/// # Errors
/// As [`scaled_dot_product_attention`].
pub fn scaled_dot_product_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    on(q, |b| {
        let m = mask_array(b, mask)?;
        let (out, lse) = fast::scaled_dot_product_attention_with_lse(
            &b.array(q)?,
            &b.array(k)?,
            &b.array(v)?,
            scale,
            ff_mask(mask, m.as_ref()),
            b.opt(sinks)?.as_ref(),
        )
        .map_err(ff_err)?;
        Ok((b.tensor(out)?, b.tensor(lse)?))
    })
}

/// The gradients of [`scaled_dot_product_attention`]: `(dq, dk, dv, dsinks)`.
pub type AttentionGrads = (Tensor, Tensor, Tensor, Option<Tensor>);

/// The backward pass of [`scaled_dot_product_attention`]: given the forward's inputs, its
/// output and log-sum-exp ([`scaled_dot_product_attention_with_lse`]) and the output's
/// cotangent, `(dq, dk, dv, dsinks)` in the inputs' dtypes (dk / dv summed over each query
/// group; `dsinks` when sinks were given). Deterministic.
///
/// # Errors
/// As [`scaled_dot_product_attention`]; `out`, `lse` or `d_out` of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn scaled_dot_product_attention_vjp(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Tensor>,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
) -> Result<AttentionGrads> {
    on(q, |b| {
        let m = mask_array(b, mask)?;
        let (dq, dk, dv, ds) = fast::scaled_dot_product_attention_vjp(
            &b.array(q)?,
            &b.array(k)?,
            &b.array(v)?,
            scale,
            ff_mask(mask, m.as_ref()),
            b.opt(sinks)?.as_ref(),
            &b.array(out)?,
            &b.array(lse)?,
            &b.array(d_out)?,
        )
        .map_err(ff_err)?;
        Ok((
            b.tensor(dq)?,
            b.tensor(dk)?,
            b.tensor(dv)?,
            b.opt_tensor(ds)?,
        ))
    })
}

/// Merges two attention results over disjoint sets of the keys into the result over all
/// of them (`ferrofast::fast::merge_attention_states`; the merge step of split-KV and
/// context-parallel attention): `(out, lse)` as [`scaled_dot_product_attention_with_lse`]
/// returns it over the union of the keys, up to rounding.
///
/// `out_a`, `out_b` are the parts' outputs `[B, N_q, T_q, D_v]` (one floating dtype, one
/// shape); `lse_a`, `lse_b` their log-sum-exps `[B, N_q, T_q]`, `f32` (`f64` for `f64`
/// outputs), as [`scaled_dot_product_attention_with_lse`] returns them. Per row, with
/// `m = max(lse_a, lse_b)` and `w = exp(lse - m)`: `lse = logaddexp(lse_a, lse_b)` and
/// `out = (w_a out_a + w_b out_b) / (w_a + w_b)`, computed in `f32` (`f64` for `f64`) and
/// rounded once to the parts' dtype. A part with `lse = -inf` (its rows saw no key)
/// contributes nothing, its output row never read; both parts `-inf` give 0 and `-inf`; a
/// NaN `lse` makes the row NaN. Strided tensors are read in place.
///
/// # Errors
/// ferrofast's messages (prefix `[merge_attention_states] `) for outputs that are not 4-D
/// or differ in shape or dtype, a non-floating dtype, and log-sum-exps of the wrong shape
/// or dtype; tensors on different devices; `f64` on a GPU; dtypes ferrofast lacks.
pub fn merge_attention_states(
    out_a: &Tensor,
    lse_a: &Tensor,
    out_b: &Tensor,
    lse_b: &Tensor,
) -> Result<(Tensor, Tensor)> {
    on(out_a, |b| {
        let (out, lse) = fast::merge_attention_states(
            &b.array(out_a)?,
            &b.array(lse_a)?,
            &b.array(out_b)?,
            &b.array(lse_b)?,
        )
        .map_err(ff_err)?;
        Ok((b.tensor(out)?, b.tensor(lse)?))
    })
}

/// Cross-entropy of `logits` `[..., V]` against integer `targets` `[...]`, MLX's
/// `mx.fast.cross_entropy` with ferrofast's options (ignore index, label smoothing,
/// z-loss, reduction; the defaults are MLX's behaviour): float32 losses of `targets`' shape,
/// or a scalar for a sum / mean reduction. Out-of-range targets give NaN.
///
/// # Errors
/// MLX's messages (as `ferrofast::fast::cross_entropy_with`).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    on(logits, |b| {
        let out = fast::cross_entropy_with(&b.array(logits)?, &b.array(targets)?, options)
            .map_err(ff_err)?;
        b.tensor(out)
    })
}

/// The backward pass of [`cross_entropy`]: `dlogits` in the logits' dtype for the
/// cotangent of the loss (its shape, or a scalar for a reduction).
///
/// # Errors
/// As [`cross_entropy`]; a cotangent of the wrong shape.
pub fn cross_entropy_vjp(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    cotangent: &Tensor,
) -> Result<Tensor> {
    on(logits, |b| {
        let out = fast::cross_entropy_vjp(
            &b.array(logits)?,
            &b.array(targets)?,
            options,
            &b.array(cotangent)?,
        )
        .map_err(ff_err)?;
        b.tensor(out)
    })
}

/// The training step of [`cross_entropy`]: loss and `dlogits` (for a cotangent of ones, or
/// of `1 / count` for a mean) from one pass over the logits.
///
/// # Errors
/// As [`cross_entropy`].
pub fn cross_entropy_fused(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<(Tensor, Tensor)> {
    on(logits, |b| {
        let (loss, d) = fast::cross_entropy_fused(&b.array(logits)?, &b.array(targets)?, options)
            .map_err(ff_err)?;
        Ok((b.tensor(loss)?, b.tensor(d)?))
    })
}

/// The gated delta rule, MLX's `gated_delta_update(q, k, v, gamma, beta, initial_state,
/// mask)`: `q`, `k` `[B, T, Hk, Dk]`, `v` `[B, T, Hv, Dv]`, `gamma` `[B, T, Hv]` (or
/// `[B, T, Hv, Dk]`), `beta` `[B, T, Hv]`, `initial_state` `[B, Hv, Dv, Dk]` float32,
/// `mask` `[B, T]`. Returns `(out [B, T, Hv, Dv], state [B, Hv, Dv, Dk] float32)`.
///
/// # Errors
/// ferrofast's shape and dtype messages (as `ferrofast::fast::gated_delta_update`).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    on(q, |b| {
        let (out, state) = fast::gated_delta_update(
            &b.array(q)?,
            &b.array(k)?,
            &b.array(v)?,
            &b.array(gamma)?,
            &b.array(beta)?,
            b.opt(initial_state)?.as_ref(),
            b.opt(mask)?.as_ref(),
        )
        .map_err(ff_err)?;
        Ok((b.tensor(out)?, b.tensor(state)?))
    })
}

/// The gradients of [`gated_delta_update`], each in its primal's dtype and shape.
#[derive(Debug, Clone)]
pub struct GatedDeltaGrads {
    /// Gradient of `q`.
    pub dq: Tensor,
    /// Gradient of `k`.
    pub dk: Tensor,
    /// Gradient of `v`.
    pub dv: Tensor,
    /// Gradient of `gamma`.
    pub dgamma: Tensor,
    /// Gradient of `beta`.
    pub dbeta: Tensor,
    /// Gradient of the initial state, when one was given.
    pub dstate0: Option<Tensor>,
}

/// The backward pass of [`gated_delta_update`] for the cotangents of `out` and (optionally)
/// of the final state.
///
/// # Errors
/// As [`gated_delta_update`]; cotangents of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_update_vjp(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    mask: Option<&Tensor>,
    d_out: &Tensor,
    d_state: Option<&Tensor>,
) -> Result<GatedDeltaGrads> {
    on(q, |b| {
        let g = fast::gated_delta_update_vjp(
            &b.array(q)?,
            &b.array(k)?,
            &b.array(v)?,
            &b.array(gamma)?,
            &b.array(beta)?,
            b.opt(initial_state)?.as_ref(),
            b.opt(mask)?.as_ref(),
            &b.array(d_out)?,
            b.opt(d_state)?.as_ref(),
        )
        .map_err(ff_err)?;
        Ok(GatedDeltaGrads {
            dq: b.tensor(g.dq)?,
            dk: b.tensor(g.dk)?,
            dv: b.tensor(g.dv)?,
            dgamma: b.tensor(g.dgamma)?,
            dbeta: b.tensor(g.dbeta)?,
            dstate0: b.opt_tensor(g.dstate0)?,
        })
    })
}
