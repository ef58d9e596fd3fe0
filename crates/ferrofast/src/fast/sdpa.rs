//! `scaled_dot_product_attention`: MLX's fused attention, `softmax(scale * q k^T + mask) v`,
//! with grouped-query heads, causal and array masks and attention sinks.
//!
//! This file validates the arguments in MLX's order with MLX's messages, works out the output
//! dtype and shape, and dispatches to the device the inputs live on. The CPU kernel is in
//! `cpu/sdpa.rs`; the float64 oracle in `reference/sdpa.rs` shares the validation below.

use crate::array::{broadcast_shapes, fmt_shape};
use crate::dtype::{promote_types, DType};
use crate::error::{Error, Result};
use crate::Array;

const OP: &str = "[scaled_dot_product_attention]";

/// The mask argument of [`scaled_dot_product_attention`] (MLX's `mask=`).
#[derive(Clone, Copy, Debug, Default)]
pub enum Mask<'a> {
    /// No mask: every query sees every key.
    #[default]
    None,
    /// Causal, aligned to the lower right: query `i` sees key `j` iff
    /// `j <= i + T_kv - T_q`. With `T_q > T_kv` the first `T_q - T_kv` queries see no key.
    Causal,
    /// An explicit mask of rank at most 4 that broadcasts to `[B, N_q, T_q, T_kv]`.
    /// A `bool` mask keeps the keys where it is `true`; any other dtype is added to the
    /// scores (it must promote to the output dtype, and is cast to it first).
    Array(&'a Array),
}

impl Mask<'_> {
    /// Parses MLX's string form of the mask: `"causal"` is the only accepted string.
    ///
    /// # Errors
    /// `Error::InvalidArgument` with MLX's text
    /// `[scaled_dot_product_attention] invalid mask option '{s}'. Must be 'causal', or an array.`
    /// for any other string.
    pub fn parse(s: &str) -> Result<Mask<'static>> {
        if s == "causal" {
            Ok(Mask::Causal)
        } else {
            Err(Error::invalid(format!(
                "{OP} invalid mask option '{s}'. Must be 'causal', or an array."
            )))
        }
    }
}

impl<'a> From<&'a Array> for Mask<'a> {
    fn from(mask: &'a Array) -> Mask<'a> {
        Mask::Array(mask)
    }
}

/// Arguments that passed validation, in the form the kernels and the oracle consume.
pub(crate) struct Checked {
    /// Output dtype: `result_type(q, k, v)`; q, k and v below already have it.
    pub dtype: DType,
    pub q: Array,
    pub k: Array,
    pub v: Array,
    pub causal: bool,
    /// The array mask broadcast (as a stride-0 view, never a copy) to
    /// `[B, N_q, T_q, T_kv]`: `bool`, or `dtype` for an additive mask.
    pub mask: Option<Array>,
    /// Sinks as `(N_q,)` values of `dtype`.
    pub sinks: Option<Array>,
    /// `[B, N_q, T_q, D_v]`.
    pub out_shape: [usize; 4],
}

fn cast(a: &Array, dtype: DType) -> Result<Array> {
    if a.dtype() == dtype {
        Ok(a.clone())
    } else {
        a.astype(dtype)
    }
}

/// MLX's `broadcast_to` check for the mask, with both of its messages.
fn check_mask_broadcast(mask: &[usize], target: &[usize]) -> Result<()> {
    let shape = broadcast_shapes(mask, target)?;
    if shape != target {
        return Err(Error::Shape(format!(
            "Cannot broadcast array of shape {} into shape {}.",
            fmt_shape(mask),
            fmt_shape(target)
        )));
    }
    Ok(())
}

/// Validates the arguments in the order MLX does (`mlx/fast.cpp`), with MLX's messages,
/// looking only at shapes and dtypes. Returns the output dtype.
pub(crate) fn validate(
    q: &Array,
    k: &Array,
    v: &Array,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<DType> {
    for t in [q, k, v] {
        if t.ndim() != 4 {
            return Err(Error::invalid(format!(
                "{OP} input with shape {} expected to be rank 4",
                fmt_shape(t.shape())
            )));
        }
    }
    if let Mask::Array(m) = mask {
        if m.ndim() > 4 {
            return Err(Error::invalid(format!(
                "{OP} the mask with shape {} expected to have at most rank 4.",
                fmt_shape(m.shape())
            )));
        }
    }
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    for t in [ks, vs] {
        if t[0] != qs[0] {
            return Err(Error::invalid(format!(
                "{OP} mismatching batch dimension for input with shape {}.",
                fmt_shape(t)
            )));
        }
    }
    if qs[3] != ks[3] {
        return Err(Error::invalid(format!(
            "{OP} query, keys expected to have matching last dimension; found query shape {} \
             for keys shape {}.",
            fmt_shape(qs),
            fmt_shape(ks)
        )));
    }
    if ks[1] != vs[1] {
        return Err(Error::invalid(format!(
            "{OP} keys, values expected to have matching n_kv_heads; found keys with n_heads {} \
             for values with n_heads {}.",
            ks[1], vs[1]
        )));
    }
    // MLX divides by zero here when there are no kv heads; we report it as not a multiple.
    if (ks[1] == 0 && qs[1] != 0) || (ks[1] != 0 && qs[1] % ks[1] != 0) {
        return Err(Error::invalid(format!(
            "{OP} n_heads must be a multiple of n_kv_heads, found n_heads {} for n_kv_heads {}.",
            qs[1], ks[1]
        )));
    }
    let dtype = promote_types(promote_types(q.dtype(), k.dtype()), v.dtype());
    if !dtype.is_floating() {
        return Err(Error::invalid(format!(
            "{OP} Received unsupported type {dtype}."
        )));
    }
    if let Mask::Array(m) = mask {
        if promote_types(m.dtype(), dtype) != dtype {
            return Err(Error::invalid(format!(
                "{OP} Mask type must promote to output type {dtype}."
            )));
        }
        check_mask_broadcast(m.shape(), &[qs[0], qs[1], qs[2], ks[2]])?;
    }
    if let Some(s) = sinks {
        if promote_types(s.dtype(), dtype) != dtype {
            return Err(Error::invalid(format!(
                "{OP} Type of sinks must promote to output type {dtype}."
            )));
        }
        if s.ndim() != 1 || s.shape()[0] != qs[1] {
            return Err(Error::invalid(format!(
                "{OP} Received invalid shape for sinks {}.",
                fmt_shape(s.shape())
            )));
        }
    }
    // MLX reports this one from inside its matmul; we say plainly what is wrong.
    if ks[2] != vs[2] {
        return Err(Error::invalid(format!(
            "{OP} keys and values expected to have the same sequence length; found keys shape {} \
             for values shape {}.",
            fmt_shape(ks),
            fmt_shape(vs)
        )));
    }
    Ok(dtype)
}

/// [`validate`]s the arguments, then casts q, k, v (and an additive mask and the sinks) to
/// the output dtype, as MLX does, and broadcasts the mask (a view).
pub(crate) fn check(
    q: &Array,
    k: &Array,
    v: &Array,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Checked> {
    let dtype = validate(q, k, v, mask, sinks)?;
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let (causal, mask) = match mask {
        Mask::None => (false, None),
        Mask::Causal => (true, None),
        Mask::Array(m) if m.dtype() == DType::Bool => {
            (false, Some(m.broadcast_to(&[qs[0], qs[1], qs[2], ks[2]])?))
        }
        Mask::Array(m) => (
            false,
            Some(cast(m, dtype)?.broadcast_to(&[qs[0], qs[1], qs[2], ks[2]])?),
        ),
    };
    Ok(Checked {
        dtype,
        q: cast(q, dtype)?,
        k: cast(k, dtype)?,
        v: cast(v, dtype)?,
        causal,
        mask,
        sinks: sinks.map(|s| cast(s, dtype)).transpose()?,
        out_shape: [qs[0], qs[1], qs[2], vs[3]],
    })
}

/// Scaled dot-product attention (MLX's `mx.fast.scaled_dot_product_attention`):
/// `out = softmax(scale * q k^T + mask) v`, per batch and query head.
///
/// Shapes: `q` is `[B, N_q, T_q, D]`, `k` is `[B, N_kv, T_kv, D]`, `v` is
/// `[B, N_kv, T_kv, D_v]`; the output is `[B, N_q, T_q, D_v]` of dtype
/// `result_type(q, k, v)`, which must be floating. `N_q` must be a multiple of `N_kv`:
/// query head `h` uses key/value head `h / (N_q / N_kv)` (grouped-query and multi-query
/// attention without repeating k and v). `D_v` may differ from `D` and `T_q` from `T_kv`.
///
/// - `scale` multiplies `q·k` (in float32; float64 inputs compute in float64).
/// - `mask`: see [`Mask`]. Causal masks align to the lower right. Array masks broadcast to
///   `[B, N_q, T_q, T_kv]` without being copied.
/// - `sinks`: optional `(N_q,)` logits, one per query head, that join each row's softmax as
///   an extra column and then are dropped: they absorb probability mass but contribute no
///   value. They are raw logits, not multiplied by `scale`.
///
/// Numerics: inputs are widened to float32 (float64 stays float64); scores, the softmax and
/// the accumulation of `P v` run in that precision, and the result is rounded once to the
/// output dtype.
///
/// Edge cases (documented choices):
/// - A query row that sees no key at all (every key masked by a `false` bool entry, a `-inf`
///   additive entry, or causality when `T_q > T_kv`) outputs **0** (plus nothing from a sink).
///   This matches MLX's GPU vector kernels; MLX's CPU fallback instead gives the mean of `v`
///   for bool and causal masks and NaN for an all `-inf` additive row.
/// - `T_kv == 0` gives zeros of the output shape.
/// - Inputs on a CUDA device run there (f32, f16, bf16), on the stream that produced `q`;
///   k, v, the mask and the sinks may come from other streams of the same device.
/// - Any strides are read in place (for example `[B, T, H, D]` memory viewed as
///   `[B, H, T, D]` with `swapaxes(1, 2)`); inputs of another dtype than the output are cast
///   first, as MLX does. (On a GPU, the decode kernel copies k or v first when their feature
///   axis is strided or their rows are not 16-byte aligned.)
///
/// # Errors
/// `Error::InvalidArgument` with MLX's messages (prefix `[scaled_dot_product_attention] `):
/// q, k or v not rank 4; mask of rank above 4; batch sizes that differ; `D` of q and k that
/// differ; k and v with different head counts; `N_q` not a multiple of `N_kv`; a
/// non-floating result type; an additive mask or sinks whose dtype does not promote to the
/// output dtype; sinks not of shape `(N_q,)`; k and v with different sequence lengths.
/// `Error::Shape` with MLX's `broadcast_to` texts when the mask does not broadcast to
/// `[B, N_q, T_q, T_kv]`. `Error::Device` for inputs on different devices;
/// `Error::Unsupported` for a float64 result on a CUDA device.
///
/// ```
/// use ferrofast::{fast, Array, DType, Device};
///
/// // Eight query heads over two key/value heads, causal.
/// let q = Array::randn(&[1, 8, 16, 64], DType::F32, 0, &Device::Cpu)?;
/// let k = Array::randn(&[1, 2, 16, 64], DType::F32, 1, &Device::Cpu)?;
/// let v = Array::randn(&[1, 2, 16, 64], DType::F32, 2, &Device::Cpu)?;
/// let out = fast::scaled_dot_product_attention(&q, &k, &v, 0.125, fast::Mask::Causal, None)?;
/// assert_eq!(out.shape(), &[1, 8, 16, 64]);
/// # Ok::<(), ferrofast::Error>(())
/// ```
pub fn scaled_dot_product_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    let dtype = validate(q, k, v, mask, sinks)?;
    let mut inputs = vec![("q", q), ("k", k), ("v", v)];
    if let Mask::Array(m) = mask {
        inputs.push(("the mask", m));
    }
    if let Some(s) = sinks {
        inputs.push(("sinks", s));
    }
    let device = q.device();
    if let Some((name, a)) = inputs.iter().find(|(_, a)| a.device() != device) {
        return Err(Error::Device(format!(
            "{OP} q is on {device} but {name} is on {}; move every input to one device.",
            a.device()
        )));
    }
    match device {
        crate::Device::Cpu => {
            crate::cpu::sdpa::scaled_dot_product_attention(&check(q, k, v, mask, sinks)?, scale)
        }
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            if dtype == DType::F64 {
                return Err(Error::Unsupported(format!(
                    "{OP} the CUDA kernels take float32, float16 and bfloat16, not float64; \
                     compute float64 on the CPU."
                )));
            }
            let c = check(q, k, v, mask, sinks)?;
            let stream =
                c.q.stream()
                    .ok_or_else(|| Error::Device(format!("{OP} q left the GPU")))?;
            crate::cuda::sdpa::scaled_dot_product_attention(&c, scale, &stream)
        }
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda(i) => {
            let _ = dtype;
            Err(Error::CudaUnavailable(format!(
                "{OP} inputs are on cuda:{i} but this build has no CUDA back end"
            )))
        }
    }
}
