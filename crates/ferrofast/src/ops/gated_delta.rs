//! [`GatedDeltaArgs`]: a validated `gated_delta_update` call, and its backward
//! ([`GatedDeltaVjpArgs`]).
//!
//! The recurrence (MLX's definition, spec §7.1), per batch `b` and value head `h` (key head
//! `h / (Hv / Hk)`), with the state `S` a `[Dv, Dk]` float32 matrix, for each step `t`:
//!
//! ```text
//! A     = S * g_t                 g_t a scalar, or a [Dk] vector scaling S's columns
//! kv    = A k_t                   [Dv]
//! delta = (v_t - kv) * beta_t     [Dv]
//! S'    = A + delta k_t^T
//! S     = mask_t ? S' : S         (a masked-out step leaves the state alone)
//! o_t   = mask_t ? S q_t : 0      [Dv]
//! ```
//!
//! Every back end computes it in float32 (the state is float32 whatever the inputs' dtype)
//! and rounds `out` once to the output dtype. MLX validates nothing here; every shape and
//! dtype is checked below with messages in MLX's style.

use crate::array::fmt_shape;
use crate::dtype::{promote_types, DType};
use crate::error::{Error, Result};
use crate::{Array, Device};

const OP: &str = "[gated_delta_update]";
const VJP: &str = "[gated_delta_update_vjp]";

/// A validated `gated_delta_update` call.
#[derive(Clone, Debug)]
pub(crate) struct GatedDeltaArgs {
    /// `[B, T, Hk, Dk]`, any dtype (read as float32), any strides.
    pub(crate) q: Array,
    /// `[B, T, Hk, Dk]`.
    pub(crate) k: Array,
    /// `[B, T, Hv, Dv]`.
    pub(crate) v: Array,
    /// `[B, T, Hv]`, or `[B, T, Hv, Dk]` when [`Self::per_key_gamma`]; linear decay.
    pub(crate) gamma: Array,
    /// `[B, T, Hv]`.
    pub(crate) beta: Array,
    /// `[B, Hv, Dv, Dk]` (read as float32); `None` starts from zeros.
    pub(crate) state0: Option<Array>,
    /// `[B, T]` (nonzero = the step is taken); `None` takes every step.
    pub(crate) mask: Option<Array>,
    /// Batch size.
    pub(crate) b: usize,
    /// Steps.
    pub(crate) t: usize,
    /// Key (and query) heads.
    pub(crate) hk: usize,
    /// Value heads, a multiple of `hk`.
    pub(crate) hv: usize,
    /// Key (and query) head size.
    pub(crate) dk: usize,
    /// Value head size.
    pub(crate) dv: usize,
    /// Whether `gamma` has a decay per key dimension (`[B, T, Hv, Dk]`).
    pub(crate) per_key_gamma: bool,
    /// `promote(q, k)`, promoted with float32 when that is not floating (MLX's rule).
    pub(crate) out_dtype: DType,
    /// Where every input lives.
    pub(crate) device: Device,
}

impl GatedDeltaArgs {
    /// Validates a call: ranks, then each shape against `q`'s and `v`'s sizes, then the head
    /// ratio, then the devices.
    ///
    /// # Errors
    /// `Error::InvalidArgument` naming the argument, its expected and actual shape;
    /// `Error::Device` when the inputs live on different devices.
    pub(crate) fn new(
        q: &Array,
        k: &Array,
        v: &Array,
        gamma: &Array,
        beta: &Array,
        state0: Option<&Array>,
        mask: Option<&Array>,
    ) -> Result<GatedDeltaArgs> {
        if q.ndim() != 4 {
            return Err(Error::invalid(format!(
                "{OP} q must be 4-D [B, T, Hk, Dk] but got shape {}.",
                fmt_shape(q.shape())
            )));
        }
        let (b, t, hk, dk) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        if k.shape() != q.shape() {
            return Err(Error::invalid(format!(
                "{OP} k must have q's shape {} [B, T, Hk, Dk] but got {}.",
                fmt_shape(q.shape()),
                fmt_shape(k.shape())
            )));
        }
        if v.ndim() != 4 || v.shape()[..2] != [b, t] {
            return Err(Error::invalid(format!(
                "{OP} v must be 4-D [B, T, Hv, Dv] with B = {b} and T = {t} as in q but got \
                 shape {}.",
                fmt_shape(v.shape())
            )));
        }
        let (hv, dv) = (v.shape()[2], v.shape()[3]);
        let heads_ok = if hk == 0 { hv == 0 } else { hv % hk == 0 };
        if !heads_ok {
            return Err(Error::invalid(format!(
                "{OP} The number of value heads (Hv = {hv}) must be a multiple of the number \
                 of key heads (Hk = {hk})."
            )));
        }
        let per_key_gamma = match gamma.shape() {
            s if s == [b, t, hv] => false,
            s if s == [b, t, hv, dk] => true,
            s => {
                return Err(Error::invalid(format!(
                    "{OP} gamma must have shape {} [B, T, Hv] or {} [B, T, Hv, Dk] but got {}.",
                    fmt_shape(&[b, t, hv]),
                    fmt_shape(&[b, t, hv, dk]),
                    fmt_shape(s)
                )))
            }
        };
        check_shape("beta", beta, &[b, t, hv], "[B, T, Hv]")?;
        if let Some(s) = state0 {
            check_shape("initial_state", s, &[b, hv, dv, dk], "[B, Hv, Dv, Dk]")?;
        }
        if let Some(m) = mask {
            check_shape("mask", m, &[b, t], "[B, T]")?;
        }
        let mut inputs = vec![
            ("q", q),
            ("k", k),
            ("v", v),
            ("gamma", gamma),
            ("beta", beta),
        ];
        if let Some(s) = state0 {
            inputs.push(("initial_state", s));
        }
        if let Some(m) = mask {
            inputs.push(("mask", m));
        }
        let device = super::same_device(OP, &inputs)?;
        let qk = promote_types(q.dtype(), k.dtype());
        let out_dtype = if qk.is_floating() {
            qk
        } else {
            promote_types(qk, DType::F32)
        };
        Ok(GatedDeltaArgs {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            state0: state0.cloned(),
            mask: mask.cloned(),
            b,
            t,
            hk,
            hv,
            dk,
            dv,
            per_key_gamma,
            out_dtype,
            device,
        })
    }

    /// `[B, T, Hv, Dv]`.
    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [self.b, self.t, self.hv, self.dv]
    }

    /// `[B, Hv, Dv, Dk]`.
    pub(crate) fn state_shape(&self) -> [usize; 4] {
        [self.b, self.hv, self.dv, self.dk]
    }

    /// Value heads per key head (`Hv / Hk`; 1 when there are no heads).
    pub(crate) fn group(&self) -> usize {
        self.hv.checked_div(self.hk).unwrap_or(1)
    }

    /// Whether the chunked form of the forward applies: a scalar decay per step (a decay
    /// per key dimension stays on the sequential form on every device).
    pub(crate) fn chunkable(&self) -> bool {
        !self.per_key_gamma
    }
}

/// The environment variable that picks the form of the `gated_delta_update` forward:
/// `sequential`, or `chunked` (wherever [`GatedDeltaArgs::chunkable`] and the device's
/// kernels allow it); unset or anything else lets each back end choose.
pub(crate) const FORM_KNOB: &str = "FERROFAST_GATED_DELTA_KERNEL";

/// The form [`FORM_KNOB`] asks for, read at every call (for measurements and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// The back end chooses.
    Auto,
    /// The step-by-step recurrence.
    Sequential,
    /// The chunked (WY) form where it applies.
    Chunked,
}

impl Form {
    /// The form the environment asks for now.
    pub(crate) fn from_env() -> Form {
        match std::env::var(FORM_KNOB) {
            Ok(v) if v.trim().eq_ignore_ascii_case("sequential") => Form::Sequential,
            Ok(v) if v.trim().eq_ignore_ascii_case("chunked") => Form::Chunked,
            _ => Form::Auto,
        }
    }
}

/// Checks that the input `name` has the shape `want` (`axes` names its axes in the message).
///
/// # Errors
/// `Error::InvalidArgument` (`[gated_delta_update] {name} must have shape ...`) when not.
fn check_shape(name: &str, a: &Array, want: &[usize], axes: &str) -> Result<()> {
    if a.shape() != want {
        return Err(Error::invalid(format!(
            "{OP} {name} must have shape {} {axes} but got {}.",
            fmt_shape(want),
            fmt_shape(a.shape())
        )));
    }
    Ok(())
}

/// A validated `gated_delta_update_vjp` call: the forward's arguments and the cotangents.
#[derive(Clone, Debug)]
pub(crate) struct GatedDeltaVjpArgs {
    /// The forward call.
    pub(crate) fwd: GatedDeltaArgs,
    /// The cotangent of `out`, `[B, T, Hv, Dv]`, floating.
    pub(crate) d_out: Array,
    /// The cotangent of the final state, `[B, Hv, Dv, Dk]`, floating; `None` is zeros.
    pub(crate) d_state: Option<Array>,
}

impl GatedDeltaVjpArgs {
    /// Checks the cotangents against the forward's output and state.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when a cotangent's shape is not its output's or it is not
    /// floating; `Error::Device` when it lives elsewhere.
    pub(crate) fn new(
        fwd: GatedDeltaArgs,
        d_out: &Array,
        d_state: Option<&Array>,
    ) -> Result<GatedDeltaVjpArgs> {
        let check = |name: &str, a: &Array, shape: &[usize]| -> Result<()> {
            if a.shape() != shape {
                return Err(Error::invalid(format!(
                    "{VJP} {name} shape {} does not match the output shape {}.",
                    fmt_shape(a.shape()),
                    fmt_shape(shape)
                )));
            }
            if !a.dtype().is_floating() {
                return Err(Error::invalid(format!(
                    "{VJP} {name} must be floating but got {}.",
                    a.dtype()
                )));
            }
            if a.device() != fwd.device {
                return Err(Error::Device(format!(
                    "{VJP} the inputs are on {} but {name} is on {}; move every input to one \
                     device.",
                    fwd.device,
                    a.device()
                )));
            }
            Ok(())
        };
        check("d_out", d_out, &fwd.out_shape())?;
        if let Some(s) = d_state {
            check("d_state", s, &fwd.state_shape())?;
        }
        Ok(GatedDeltaVjpArgs {
            fwd,
            d_out: d_out.clone(),
            d_state: d_state.cloned(),
        })
    }
}

impl GatedDeltaVjpArgs {
    /// True when no output depends on any input (no step, no value head, an empty state):
    /// the back ends then return [`trivial_grads`](Self::trivial_grads) without a kernel.
    pub(crate) fn is_trivial(&self) -> bool {
        let a = &self.fwd;
        a.t == 0 || a.b * a.hv == 0 || a.dv == 0 || a.dk == 0
    }

    /// The gradients of a trivial call: zeros of each primal's shape and dtype on the inputs'
    /// device, and the final state's gradient passed through as `dstate0` (float32, made by
    /// `to_f32`, which runs on the back end's stream); zeros when it was not given.
    pub(crate) fn trivial_grads(
        &self,
        to_f32: impl Fn(&Array) -> Result<Array>,
    ) -> Result<GatedDeltaGrads> {
        let a = &self.fwd;
        let zeros = |like: &Array, dtype: DType| Array::zeros(like.shape(), dtype, &a.device);
        let dstate0 = match (&a.state0, &self.d_state) {
            (Some(_), Some(d)) => Some(to_f32(d)?),
            (Some(s), None) => Some(zeros(s, DType::F32)?),
            (None, _) => None,
        };
        Ok(GatedDeltaGrads {
            dq: zeros(&a.q, a.q.dtype())?,
            dk: zeros(&a.k, a.k.dtype())?,
            dv: zeros(&a.v, a.v.dtype())?,
            dgamma: zeros(&a.gamma, a.gamma.dtype())?,
            dbeta: zeros(&a.beta, a.beta.dtype())?,
            dstate0,
        })
    }
}

/// The gradients of [`gated_delta_update_vjp`](crate::fast::gated_delta_update_vjp), each of
/// its primal's shape.
#[derive(Clone, Debug)]
pub struct GatedDeltaGrads {
    /// `[B, T, Hk, Dk]` in `q`'s dtype (summed over the value heads sharing a key head).
    pub dq: Array,
    /// `[B, T, Hk, Dk]` in `k`'s dtype (summed over the value heads sharing a key head).
    pub dk: Array,
    /// `[B, T, Hv, Dv]` in `v`'s dtype.
    pub dv: Array,
    /// `gamma`'s shape (`[B, T, Hv]` or `[B, T, Hv, Dk]`) and dtype.
    pub dgamma: Array,
    /// `[B, T, Hv]` in `beta`'s dtype.
    pub dbeta: Array,
    /// `[B, Hv, Dv, Dk]` float32 when an initial state was given; `None` otherwise.
    pub dstate0: Option<Array>,
}
