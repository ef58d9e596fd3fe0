//! [`SdpaArgs`]: a validated `scaled_dot_product_attention` call, and the public [`Mask`]
//! argument.

use crate::array::{broadcast_shapes, fmt_shape};
use crate::dtype::{promote_types, DType};
use crate::error::{Error, Result};
use crate::{Array, Device};

const OP: &str = "[scaled_dot_product_attention]";

/// The mask argument of [`scaled_dot_product_attention`](crate::fast::scaled_dot_product_attention) (MLX's `mask=`).
#[derive(Clone, Copy, Debug, Default)]
pub enum Mask<'a> {
    /// No mask: every query sees every key.
    #[default]
    None,
    /// Causal, aligned to the lower right: query `i` sees key `j` iff
    /// `j <= i + T_kv - T_q`. With `T_q > T_kv` the first `T_q - T_kv` queries see no key.
    Causal,
    /// An explicit mask of rank at most 4 that broadcasts to `[B, N_q, T_q, T_kv]` (one
    /// entry per query head: a mask made per key/value head must be repeated over each
    /// head's group of query heads, or have 1 head to be shared).
    /// A `bool` mask keeps the keys where it is `true`; any other dtype is added to the
    /// scores (it must promote to the output dtype, and is cast to it first).
    ///
    /// **Integer masks are additive, as in MLX**: an int32 or uint8 mask of 0 / 1 adds 0 or
    /// 1 to the scores, it does not select keys. Convert it with `astype(DType::Bool)` to
    /// keep the keys where it is 1 (or build an additive float mask of `0` and `-inf`).
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

/// A validated `scaled_dot_product_attention` call, in the form the kernels and the oracle
/// consume.
#[derive(Clone, Debug)]
pub(crate) struct SdpaArgs {
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
    /// Multiplies `q·k` (the sinks are not scaled).
    pub scale: f32,
    /// Where every input lives.
    pub device: Device,
    /// The dtypes of q, k and v as given, before the cast to `dtype` (a backward returns
    /// each gradient in its primal's dtype).
    pub primal_dtypes: [DType; 3],
    /// The sinks' dtype as given.
    pub sinks_dtype: Option<DType>,
}

fn cast(a: &Array, dtype: DType) -> Result<Array> {
    if a.dtype() == dtype {
        Ok(a.clone())
    } else {
        a.astype(dtype)
    }
}

/// MLX's `broadcast_to` check for the mask, with both of its messages, each followed by a
/// hint ([`mask_broadcast_hint`]).
fn check_mask_broadcast(mask: &[usize], target: &[usize; 4], n_kv: usize) -> Result<()> {
    let hint = || mask_broadcast_hint(mask, target, n_kv);
    let shape = broadcast_shapes(mask, target).map_err(|e| match e {
        Error::Shape(m) => Error::Shape(m + &hint()),
        other => other,
    })?;
    if shape != target {
        return Err(Error::Shape(format!(
            "Cannot broadcast array of shape {} into shape {}.{}",
            fmt_shape(mask),
            fmt_shape(target),
            hint()
        )));
    }
    Ok(())
}

/// What follows MLX's text when the mask does not broadcast: the mask's shape and the
/// scores' shape it must broadcast to, and, for a mask whose head axis has one entry per
/// key/value head in a grouped-query call, that masks are per query head.
fn mask_broadcast_hint(mask: &[usize], target: &[usize; 4], n_kv: usize) -> String {
    let mut hint = format!(
        " (scaled_dot_product_attention: the mask of shape {} does not broadcast to the \
         attention scores' shape [B, N_q, T_q, T_kv] = {}",
        fmt_shape(mask),
        fmt_shape(target)
    );
    let n_q = target[1];
    if mask.len() >= 3 && mask[mask.len() - 3] == n_kv && n_kv > 1 && n_kv != n_q {
        hint += &format!(
            "; its head axis has {n_kv} entries, one per key/value head, but masks are per \
             query head: repeat each entry over its {} query heads, or give the axis 1 entry \
             to share it",
            n_q / n_kv
        );
    }
    hint.push(')');
    hint
}

/// What follows MLX's head-count messages: where the heads are in the `[B, H, T, D]`
/// layout, and, when the shapes read as `[B, T, H, D]` would fit, how to view them so.
fn layout_hint(qs: &[usize], ks: &[usize], vs: &[usize]) -> String {
    let mut hint = format!(
        " (inputs are [B, H, T, D] with the heads on axis 1: N_q = {} from q {}, N_kv = {} \
         from keys {} and {} from values {}",
        qs[1],
        fmt_shape(qs),
        ks[1],
        fmt_shape(ks),
        vs[1],
        fmt_shape(vs)
    );
    let swapped_fits =
        ks[2] == vs[2] && ks[1] == vs[1] && ks[2] != 0 && qs[2].is_multiple_of(ks[2]);
    if swapped_fits {
        hint += &format!(
            "; read as [B, T, H, D] the shapes fit ({} query heads over {} key/value heads): \
             view q, k and v with swapaxes(1, 2), which copies nothing",
            qs[2], ks[2]
        );
    }
    hint.push(')');
    hint
}

/// Validates the arguments in the order MLX does (`mlx/fast.cpp`), with MLX's messages,
/// looking only at shapes and dtypes. Returns the output dtype.
fn validate(
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
             for values with n_heads {}.{}",
            ks[1],
            vs[1],
            layout_hint(qs, ks, vs)
        )));
    }
    // MLX divides by zero here when there are no kv heads; we report it as not a multiple.
    if (ks[1] == 0 && qs[1] != 0) || (ks[1] != 0 && qs[1] % ks[1] != 0) {
        return Err(Error::invalid(format!(
            "{OP} n_heads must be a multiple of n_kv_heads, found n_heads {} for n_kv_heads \
             {}.{}",
            qs[1],
            ks[1],
            layout_hint(qs, ks, vs)
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
                "{OP} Mask type must promote to output type {dtype}. (the mask is {}: cast it \
                 with astype({dtype}) first; a bool mask selects keys instead)",
                m.dtype()
            )));
        }
        check_mask_broadcast(m.shape(), &[qs[0], qs[1], qs[2], ks[2]], ks[1])?;
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

impl SdpaArgs {
    /// [`validate`]s the arguments, checks that every input lives on one device, then casts
    /// q, k, v (and an additive mask and the sinks) to the output dtype, as MLX does, and
    /// broadcasts the mask (a view).
    ///
    /// # Errors
    /// MLX's validation errors (see [`crate::fast::scaled_dot_product_attention`]);
    /// `Error::Device` for inputs on different devices.
    pub(crate) fn new(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
        sinks: Option<&Array>,
    ) -> Result<SdpaArgs> {
        let dtype = validate(q, k, v, mask, sinks)?;
        let mut inputs = vec![("q", q), ("k", k), ("v", v)];
        if let Mask::Array(m) = mask {
            inputs.push(("the mask", m));
        }
        if let Some(s) = sinks {
            inputs.push(("sinks", s));
        }
        let device = super::same_device(OP, &inputs)?;
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
        Ok(SdpaArgs {
            dtype,
            q: cast(q, dtype)?,
            k: cast(k, dtype)?,
            v: cast(v, dtype)?,
            causal,
            mask,
            sinks: sinks.map(|s| cast(s, dtype)).transpose()?,
            out_shape: [qs[0], qs[1], qs[2], vs[3]],
            scale,
            device,
            primal_dtypes: [q.dtype(), k.dtype(), v.dtype()],
            sinks_dtype: sinks.map(Array::dtype),
        })
    }
}

const VJP_OP: &str = "[scaled_dot_product_attention_vjp]";

/// A validated `scaled_dot_product_attention_vjp` call: the forward's arguments, the saved
/// output and log-sum-exp and the output's cotangent (each gradient takes its primal's dtype,
/// [`SdpaArgs::primal_dtypes`]).
#[derive(Clone, Debug)]
pub(crate) struct SdpaVjpArgs {
    /// The forward call (inputs cast to its dtype).
    pub fwd: SdpaArgs,
    /// The forward's output, `[B, N_q, T_q, D_v]` of the forward's dtype.
    pub out: Array,
    /// The forward's log-sum-exp, `[B, N_q, T_q]`: float32, or float64 for float64 calls.
    pub lse: Array,
    /// The cotangent of the output, `[B, N_q, T_q, D_v]` of the forward's dtype.
    pub d_out: Array,
}

/// Checks that `a` (named `name` in the message) has the attention output's shape `shape`.
///
/// # Errors
/// `Error::InvalidArgument` (prefix `[scaled_dot_product_attention_vjp] `) when it has not.
pub(crate) fn check_output_shape(name: &str, a: &Array, shape: &[usize; 4]) -> Result<()> {
    if a.shape() != shape {
        return Err(Error::invalid(format!(
            "{VJP_OP} {name} has shape {} but the attention output has shape {}.",
            fmt_shape(a.shape()),
            fmt_shape(shape)
        )));
    }
    Ok(())
}

/// The dtype of the log-sum-exp that the forward saves for a call of output dtype `dtype`.
pub(crate) fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl SdpaVjpArgs {
    /// Validates `out`, `lse` and `d_out` against the forward call `fwd` (validated by
    /// [`SdpaArgs::new`]): its output shape and dtype.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when `out` or `d_out` does not have the output's shape or is
    /// not floating, or `lse` is not `[B, N_q, T_q]` of [`lse_dtype`]; `Error::Device` when
    /// one lives elsewhere than the forward's inputs.
    pub(crate) fn new(
        fwd: SdpaArgs,
        out: &Array,
        lse: &Array,
        d_out: &Array,
    ) -> Result<SdpaVjpArgs> {
        let shape = fwd.out_shape;
        for (name, a) in [("out", out), ("d_out", d_out)] {
            check_output_shape(name, a, &shape)?;
            if !a.dtype().is_floating() {
                return Err(Error::invalid(format!(
                    "{VJP_OP} {name} must be floating but has type {}.",
                    a.dtype()
                )));
            }
        }
        let want = lse_dtype(fwd.dtype);
        if lse.shape() != &shape[..3] || lse.dtype() != want {
            return Err(Error::invalid(format!(
                "{VJP_OP} lse must be {want} of shape {} (the forward's log-sum-exp) but has \
                 type {} and shape {}.",
                fmt_shape(&shape[..3]),
                lse.dtype(),
                fmt_shape(lse.shape())
            )));
        }
        super::same_device(
            VJP_OP,
            &[("q", &fwd.q), ("out", out), ("lse", lse), ("d_out", d_out)],
        )?;
        Ok(SdpaVjpArgs {
            out: cast(out, fwd.dtype)?,
            lse: lse.clone(),
            d_out: cast(d_out, fwd.dtype)?,
            fwd,
        })
    }

    /// The gradients `(dq, dk, dv, dsinks)`, computed in the forward's dtype, each cast to
    /// its primal's dtype.
    #[allow(clippy::type_complexity)]
    pub(crate) fn to_primals(
        &self,
        (dq, dk, dv, ds): (Array, Array, Array, Option<Array>),
    ) -> Result<(Array, Array, Array, Option<Array>)> {
        let [q_dtype, k_dtype, v_dtype] = self.fwd.primal_dtypes;
        let sinks_dtype = self.fwd.sinks_dtype.unwrap_or(self.fwd.dtype);
        Ok((
            cast(&dq, q_dtype)?,
            cast(&dk, k_dtype)?,
            cast(&dv, v_dtype)?,
            ds.map(|s| cast(&s, sinks_dtype)).transpose()?,
        ))
    }
}
