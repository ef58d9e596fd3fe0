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

/// Runs `f` with a borrowing context on the first tensor's device and returns the arrays of
/// its ferrofast result as tensors; the tensors it borrows stay read-locked until then.
fn on<'t, R: IntoCandle>(
    first: &'t Tensor,
    f: impl FnOnce(&Borrowed<'t>) -> Result<R>,
) -> Result<R::Candle> {
    let b = Borrowed::new(first.device())?;
    f(&b)?.into_candle(&b)
}

/// A ferrofast result as candle tensors on the device of the call.
trait IntoCandle {
    /// The result with each array a tensor.
    type Candle;
    /// Converts each array.
    fn into_candle(self, b: &Borrowed<'_>) -> Result<Self::Candle>;
}

impl IntoCandle for ferrofast::Array {
    type Candle = Tensor;
    fn into_candle(self, b: &Borrowed<'_>) -> Result<Tensor> {
        b.tensor(self)
    }
}

impl IntoCandle for Option<ferrofast::Array> {
    type Candle = Option<Tensor>;
    fn into_candle(self, b: &Borrowed<'_>) -> Result<Option<Tensor>> {
        b.opt_tensor(self)
    }
}

/// [`IntoCandle`] for tuples of results, element by element.
macro_rules! into_candle_tuples {
    ($(($($t:ident),+)),+) => {$(
        impl<$($t: IntoCandle),+> IntoCandle for ($($t,)+) {
            type Candle = ($($t::Candle,)+);
            #[allow(non_snake_case)]
            fn into_candle(self, b: &Borrowed<'_>) -> Result<Self::Candle> {
                let ($($t,)+) = self;
                Ok(($($t.into_candle(b)?,)+))
            }
        }
    )+};
}

into_candle_tuples!((A, B), (A, B, C), (A, B, C, D));

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

/// Attention's forward arguments borrowed as arrays (the mask first, then `q`, `k`, `v` and
/// the sinks), for one of ferrofast's attention functions.
struct Attention<'t> {
    q: ferrofast::Array,
    k: ferrofast::Array,
    v: ferrofast::Array,
    mask: Mask<'t>,
    mask_array: Option<ferrofast::Array>,
    sinks: Option<ferrofast::Array>,
}

impl<'t> Attention<'t> {
    fn borrow(
        b: &Borrowed<'t>,
        (q, k, v): (&'t Tensor, &'t Tensor, &'t Tensor),
        mask: Mask<'t>,
        sinks: Option<&'t Tensor>,
    ) -> Result<Attention<'t>> {
        let mask_array = mask_array(b, mask)?;
        Ok(Attention {
            q: b.array(q)?,
            k: b.array(k)?,
            v: b.array(v)?,
            mask,
            mask_array,
            sinks: b.opt(sinks)?,
        })
    }

    /// Runs `f` (ferrofast's attention function, any further arguments bound) on the
    /// arguments.
    fn run<R>(
        &self,
        scale: f32,
        f: impl FnOnce(
            &ferrofast::Array,
            &ferrofast::Array,
            &ferrofast::Array,
            f32,
            fast::Mask<'_>,
            Option<&ferrofast::Array>,
        ) -> ferrofast::Result<R>,
    ) -> Result<R> {
        let mask = ff_mask(self.mask, self.mask_array.as_ref());
        f(&self.q, &self.k, &self.v, scale, mask, self.sinks.as_ref()).map_err(ff_err)
    }
}

/// The gated delta rule's forward arguments borrowed as arrays, in their order.
struct GatedDelta {
    q: ferrofast::Array,
    k: ferrofast::Array,
    v: ferrofast::Array,
    gamma: ferrofast::Array,
    beta: ferrofast::Array,
    initial_state: Option<ferrofast::Array>,
    mask: Option<ferrofast::Array>,
}

/// The tensors of the gated delta rule's forward (`q`, `k`, `v`, `gamma`, `beta`,
/// `initial_state`, `mask`).
type GatedDeltaTensors<'t> = (
    &'t Tensor,
    &'t Tensor,
    &'t Tensor,
    &'t Tensor,
    &'t Tensor,
    Option<&'t Tensor>,
    Option<&'t Tensor>,
);

impl GatedDelta {
    fn borrow<'t>(b: &Borrowed<'t>, tensors: GatedDeltaTensors<'t>) -> Result<GatedDelta> {
        let (q, k, v, gamma, beta, initial_state, mask) = tensors;
        Ok(GatedDelta {
            q: b.array(q)?,
            k: b.array(k)?,
            v: b.array(v)?,
            gamma: b.array(gamma)?,
            beta: b.array(beta)?,
            initial_state: b.opt(initial_state)?,
            mask: b.opt(mask)?,
        })
    }

    /// Runs `f` (ferrofast's gated delta function, any further arguments bound) on the
    /// arguments.
    #[allow(clippy::type_complexity)]
    fn run<R>(
        &self,
        f: impl FnOnce(
            &ferrofast::Array,
            &ferrofast::Array,
            &ferrofast::Array,
            &ferrofast::Array,
            &ferrofast::Array,
            Option<&ferrofast::Array>,
            Option<&ferrofast::Array>,
        ) -> ferrofast::Result<R>,
    ) -> Result<R> {
        let (s0, mask) = (self.initial_state.as_ref(), self.mask.as_ref());
        f(&self.q, &self.k, &self.v, &self.gamma, &self.beta, s0, mask).map_err(ff_err)
    }
}

impl IntoCandle for fast::GatedDeltaGrads {
    type Candle = GatedDeltaGrads;
    fn into_candle(self, b: &Borrowed<'_>) -> Result<GatedDeltaGrads> {
        Ok(GatedDeltaGrads {
            dq: b.tensor(self.dq)?,
            dk: b.tensor(self.dk)?,
            dv: b.tensor(self.dv)?,
            dgamma: b.tensor(self.dgamma)?,
            dbeta: b.tensor(self.dbeta)?,
            dstate0: b.opt_tensor(self.dstate0)?,
        })
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
        fast::rms_norm(&b.array(x)?, b.opt(weight)?.as_ref(), eps).map_err(ff_err)
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
        let (x, w) = (b.array(x)?, b.opt(weight)?);
        fast::rms_norm_vjp(&x, w.as_ref(), eps, &b.array(cotangent)?).map_err(ff_err)
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
        let (x, w, bias) = (b.array(x)?, b.opt(weight)?, b.opt(bias)?);
        fast::layer_norm(&x, w.as_ref(), bias.as_ref(), eps).map_err(ff_err)
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
        let (x, w, bias, g) = (
            b.array(x)?,
            b.opt(weight)?,
            b.opt(bias)?,
            b.array(cotangent)?,
        );
        fast::layer_norm_vjp(&x, w.as_ref(), bias.as_ref(), eps, &g).map_err(ff_err)
    })
}

/// Rope's `dims` as ferrofast takes it.
pub(crate) fn rope_dims(dims: usize) -> Result<i32> {
    i32::try_from(dims)
        .map_err(|_| candle_core::Error::Msg(format!("[rope] dims {dims} overflows i32")))
}

/// Runs `f` with `options` as ferrofast's rope options (the offset and freqs tensors
/// borrowed, in that order).
pub(crate) fn with_rope_options<'t, R>(
    b: &Borrowed<'t>,
    options: &RopeOptions<'t>,
    f: impl FnOnce(&fast::RopeOptions<'_>) -> Result<R>,
) -> Result<R> {
    let (int_offset, offset_array) = ff_offset(b, options.offset)?;
    let offset = match &offset_array {
        Some(a) => fast::RopeOffset::Array(a),
        None => fast::RopeOffset::Int(int_offset),
    };
    let freqs = b.opt(options.freqs)?;
    f(&fast::RopeOptions {
        traditional: options.traditional,
        base: options.base,
        scale: options.scale,
        offset,
        freqs: freqs.as_ref(),
    })
}

fn rope_impl(x: &Tensor, dims: usize, options: &RopeOptions<'_>, vjp: bool) -> Result<Tensor> {
    let dims = rope_dims(dims)?;
    on(x, |b| {
        with_rope_options(b, options, |opts| {
            let a = b.array(x)?;
            if vjp {
                fast::rope_vjp_with(&a, dims, opts)
            } else {
                fast::rope_with(&a, dims, opts)
            }
            .map_err(ff_err)
        })
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
        Attention::borrow(b, (q, k, v), mask, sinks)?.run(scale, fast::scaled_dot_product_attention)
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
        Attention::borrow(b, (q, k, v), mask, sinks)?
            .run(scale, fast::scaled_dot_product_attention_with_lse)
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
        let fwd = Attention::borrow(b, (q, k, v), mask, sinks)?;
        let (out, lse, d_out) = (b.array(out)?, b.array(lse)?, b.array(d_out)?);
        fwd.run(scale, |q, k, v, scale, mask, sinks| {
            fast::scaled_dot_product_attention_vjp(q, k, v, scale, mask, sinks, &out, &lse, &d_out)
        })
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
        let (oa, la, ob, lb) = (
            b.array(out_a)?,
            b.array(lse_a)?,
            b.array(out_b)?,
            b.array(lse_b)?,
        );
        fast::merge_attention_states(&oa, &la, &ob, &lb).map_err(ff_err)
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
        fast::cross_entropy_with(&b.array(logits)?, &b.array(targets)?, options).map_err(ff_err)
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
        let (x, t, g) = (b.array(logits)?, b.array(targets)?, b.array(cotangent)?);
        fast::cross_entropy_vjp(&x, &t, options, &g).map_err(ff_err)
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
        fast::cross_entropy_fused(&b.array(logits)?, &b.array(targets)?, options).map_err(ff_err)
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
    let tensors = (q, k, v, gamma, beta, initial_state, mask);
    on(q, |b| {
        GatedDelta::borrow(b, tensors)?.run(fast::gated_delta_update)
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
    let tensors = (q, k, v, gamma, beta, initial_state, mask);
    on(q, |b| {
        let fwd = GatedDelta::borrow(b, tensors)?;
        let (d_out, d_state) = (b.array(d_out)?, b.opt(d_state)?);
        fwd.run(|q, k, v, gamma, beta, s0, mask| {
            fast::gated_delta_update_vjp(q, k, v, gamma, beta, s0, mask, &d_out, d_state.as_ref())
        })
    })
}
