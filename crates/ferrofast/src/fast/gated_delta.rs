//! `gated_delta_update`: the gated delta rule recurrence of linear-attention layers
//! (Gated DeltaNet, Qwen3-Next), MLX's `mx.fast.gated_delta_update`, and its backward.
//!
//! The call is validated into a `GatedDeltaArgs` (`ops/gated_delta.rs`: shapes, dtypes, the
//! recurrence) and dispatched to where the inputs live (`cpu/gated_delta.rs`,
//! `cuda/gated_delta.rs`).

use super::{place, Place};
use crate::error::Result;
pub use crate::ops::gated_delta::GatedDeltaGrads;
use crate::ops::gated_delta::{GatedDeltaArgs, GatedDeltaVjpArgs};
use crate::{Array, Stream};

const OP: &str = "[gated_delta_update]";

with_on_form! {
    /// The gated delta rule over `T` steps, MLX's `mx.fast.gated_delta_update`: returns
    /// `(out, state)`.
    ///
    /// Shapes: `q`, `k` `[B, T, Hk, Dk]`; `v` `[B, T, Hv, Dv]` with `Hv` a multiple of `Hk`
    /// (value head `j` uses key head `j / (Hv / Hk)`); `gamma` `[B, T, Hv]`, or `[B, T, Hv, Dk]`
    /// for a decay per key dimension, in linear space (not log); `beta` `[B, T, Hv]`;
    /// `initial_state` `[B, Hv, Dv, Dk]` (Dv before Dk), zeros when `None`; `mask` `[B, T]`
    /// (nonzero = the step is taken), every step when `None`.
    ///
    /// Per batch and value head, with the state `S` (`[Dv, Dk]`, float32), for each step `t`:
    /// `A = S * gamma_t` (a scalar, or per column), `delta = (v_t - A k_t) * beta_t`,
    /// `S = A + delta k_t^T`, `out_t = S q_t`. A masked-out step leaves `S` unchanged and has
    /// `out_t = 0`. No scaling is applied to `q` (the caller scales).
    ///
    /// - `out`: `[B, T, Hv, Dv]` in `promote(q, k)` (promoted with float32 when that is not
    ///   floating; `v`'s dtype does not count, MLX's rule). `state`: `[B, Hv, Dv, Dk]` float32,
    ///   the state after the last step.
    /// - Every input may have any dtype and strides; the arithmetic is float32 (the state stays
    ///   float32 between steps), `out` is rounded once. One exception, for speed: on a CUDA
    ///   device, bf16 `q`, `k`, `v` with a scalar decay, `Dk` and `Dv` of 64 or 128 and at least
    ///   64 steps run the chunked (WY) form on tensor cores, whose products take bf16 operands
    ///   (the state and per-chunk intermediates rounded to bf16) with float32 sums: `out` and
    ///   the state then agree with the float32 recurrence to bf16 precision relative to their
    ///   scale (about 4e-3 of their largest magnitude in the tests). The environment variable
    ///   `FERROFAST_GATED_DELTA_KERNEL=sequential` keeps every call on the step-by-step form.
    /// - Special values: NaN or infinity in an input propagates through the state to every later
    ///   output of its head, as the recurrence defines; a masked-out step reads nothing of its
    ///   inputs' values.
    ///
    /// # Errors
    /// `Error::InvalidArgument` naming the argument, its expected and actual shape (MLX checks
    /// nothing; these are ferrofast's): `q` not 4-D; `k` not of `q`'s shape; `v` not 4-D with
    /// `q`'s `B` and `T`; `Hv` not a multiple of `Hk`; `gamma`, `beta`, `initial_state` or `mask`
    /// of another shape. `Error::Device` when the inputs live on different devices.
    /// `Error::OutOfMemory` when the buffers cannot be had. On a CUDA device:
    /// `Error::Unsupported` for key heads past 256 (`Dk > 256`; the CPU takes any size) or sizes
    /// past the kernels' 32-bit limits.
    pub fn gated_delta_update(
        q: &Array,
        k: &Array,
        v: &Array,
        gamma: &Array,
        beta: &Array,
        initial_state: Option<&Array>,
        mask: Option<&Array>,
    ) -> Result<(Array, Array)>;

    /// [`gated_delta_update`] on an explicit CUDA stream (MLX's `stream=` argument).
    ///
    /// # Errors
    /// As [`gated_delta_update`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn gated_delta_update_on(stream: &Stream, ..);

    |stream| {
        let args = GatedDeltaArgs::new(q, k, v, gamma, beta, initial_state, mask)?;
        run(&args, stream)
    }
}

with_on_form! {
    /// The backward pass of [`gated_delta_update`]: given the cotangent `d_out` of `out`
    /// (`[B, T, Hv, Dv]`) and optionally `d_state` of the final state (`[B, Hv, Dv, Dk]`, zeros
    /// when `None`), returns the gradients of every primal ([`GatedDeltaGrads`]): `dq`, `dk`
    /// (summed over the value heads that share a key head), `dv`, `dgamma` (of `gamma`'s shape:
    /// per key dimension or not), `dbeta`, each in its primal's dtype, and `dstate0` (float32)
    /// when `initial_state` is given. Masked-out steps get zero gradients.
    ///
    /// The forward is recomputed, not saved: states are checkpointed every `~sqrt(T)` steps and
    /// each chunk's states recomputed from its checkpoint while walking the steps backwards, so
    /// memory grows with `sqrt(T)` states per head in flight. float32 arithmetic; deterministic
    /// (the group sums of `dq` / `dk` are added in head order). On CUDA, where the forward takes
    /// its chunked form (bf16 q / k / v, a scalar decay, `Dk` and `Dv` of 64 or 128, from 64
    /// steps; `FERROFAST_GATED_DELTA_KERNEL` forces a form), so does the backward: the state is
    /// kept at every 64-step chunk's start (workspace about `150 KiB` a chunk and head at
    /// `D = 128`) and the products take bf16 operands with f32 sums, so the gradients are as
    /// precise as bf16 inputs allow (about `3e-3` relative to their norm), deterministic too.
    ///
    /// # Errors
    /// The forward's errors, then `Error::InvalidArgument` when a cotangent's shape is not its
    /// output's or it is not floating; `Error::Device` when one lives elsewhere.
    pub fn gated_delta_update_vjp(
        q: &Array,
        k: &Array,
        v: &Array,
        gamma: &Array,
        beta: &Array,
        initial_state: Option<&Array>,
        mask: Option<&Array>,
        d_out: &Array,
        d_state: Option<&Array>,
    ) -> Result<GatedDeltaGrads>;

    /// [`gated_delta_update_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`gated_delta_update_vjp`]; `Error::Device` when the inputs are not on `stream`'s
    /// device.
    pub fn gated_delta_update_vjp_on(stream: &Stream, ..);

    |stream| {
        let fwd = GatedDeltaArgs::new(q, k, v, gamma, beta, initial_state, mask)?;
        run_vjp(&GatedDeltaVjpArgs::new(fwd, d_out, d_state)?, stream)
    }
}

fn run(args: &GatedDeltaArgs, stream: Option<&Stream>) -> Result<(Array, Array)> {
    match place(OP, args.device, &args.q, stream)? {
        Place::Cpu => crate::cpu::gated_delta::run(args),
        Place::Cuda(stream) => crate::cuda::gated_delta::run(args, &stream),
    }
}

fn run_vjp(args: &GatedDeltaVjpArgs, stream: Option<&Stream>) -> Result<GatedDeltaGrads> {
    match place(
        "[gated_delta_update_vjp]",
        args.fwd.device,
        &args.fwd.q,
        stream,
    )? {
        Place::Cpu => crate::cpu::gated_delta::vjp(args),
        Place::Cuda(stream) => crate::cuda::gated_delta::vjp(args, &stream),
    }
}
