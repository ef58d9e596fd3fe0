//! `scaled_dot_product_attention`: MLX's fused attention, `softmax(scale * q k^T + mask) v`,
//! with grouped-query heads, causal and array masks and attention sinks.
//!
//! The call is validated into an `SdpaArgs` (`ops/sdpa.rs`: MLX's order and messages, the
//! output dtype and shape) and dispatched to the device the inputs live on: `cpu/sdpa.rs`
//! or `cuda/sdpa/`.

use super::{place, Place};
use crate::error::Result;
pub use crate::ops::sdpa::Mask;
use crate::ops::sdpa::{SdpaArgs, SdpaVjpArgs};
use crate::{Array, Stream};

const OP: &str = "[scaled_dot_product_attention]";

with_on_form! {
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
    ///   `[B, N_q, T_q, T_kv]` without being copied: one entry per *query* head (a mask made
    ///   per key/value head must be repeated over each group of query heads).
    ///
    ///   **Integer masks are additive, as in MLX.** Only a `bool` mask selects keys; a mask
    ///   of any other dtype is added to the scores, so an int32 or uint8 mask of 0 / 1 adds 0
    ///   or 1 and hides nothing. Make such a mask `astype(DType::Bool)` to keep the keys where
    ///   it is 1, or use an additive float mask of `0` and `-inf`.
    /// - `sinks`: optional `(N_q,)` logits, one per query head, that join each row's softmax as
    ///   an extra column and then are dropped: they absorb probability mass but contribute no
    ///   value. They are raw logits, not multiplied by `scale`.
    ///
    /// Numerics: scores `scale * q·k` are accumulated in float32 (float64 inputs compute in
    /// float64), the softmax runs in float32 with an online (flash) rescaling, `P v` is
    /// accumulated in float32 and the result is rounded once to the output dtype. The
    /// probabilities `P` multiply `v` in float32 on the CPU and on the GPU's SIMT kernels (f32
    /// inputs, head dims without a tensor-core kernel); on the GPU's tensor-core kernels (f16 /
    /// bf16 decode and prefill) `P` is rounded to the input dtype before `P v`, as
    /// FlashAttention does.
    ///
    /// Edge cases (documented choices):
    /// - A query row that sees no key at all (every key masked by a `false` bool entry, a `-inf`
    ///   additive entry, or causality when `T_q > T_kv`) outputs **0** (plus nothing from a sink).
    ///   This matches MLX's GPU vector kernels; MLX's CPU fallback instead gives the mean of `v`
    ///   for bool and causal masks and NaN for an all `-inf` additive row.
    /// - NaN propagates as in MLX's definition: a NaN in a query row, the scale, a visible key,
    ///   an additive mask entry or a sink (or a sink of `+inf`) makes the rows it reaches NaN,
    ///   never 0. A key hidden by a `false` bool entry or causality, or whose weight is exactly
    ///   0 (an additive `-inf`, or underflow), contributes nothing whatever its key and value
    ///   rows hold (unlike MLX's fallback, where `0 * NaN` poisons the row). The full table is
    ///   in `docs/architecture.md` ("Special values").
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
    /// `[B, N_q, T_q, T_kv]`. Some messages go on after MLX's text with a hint in parentheses:
    /// the head-count errors give every input's shape, say that heads are axis 1 of
    /// `[B, H, T, D]` and, when the shapes read as `[B, T, H, D]` would fit, to view them with
    /// `swapaxes(1, 2)`; the mask-broadcast errors name the mask's shape and the scores' shape
    /// (and say that masks are per query head when the mask has one head per key/value head);
    /// a mask dtype that does not promote names the mask's dtype and the `astype` to make.
    /// `Error::OutOfMemory` when the output or the working tiles do not fit in memory.
    /// `Error::Device` for inputs on different devices; `Error::Unsupported` for a float64
    /// result on a CUDA device.
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
    ) -> Result<Array>;

    /// [`scaled_dot_product_attention`] on an explicit CUDA stream (MLX's `stream=`
    /// argument): the work is queued on `stream` instead of the stream that produced `q`;
    /// inputs produced on other streams of the same device are waited for on the GPU.
    ///
    /// # Errors
    /// As [`scaled_dot_product_attention`]; `Error::Device` when the inputs are not on
    /// `stream`'s device.
    pub fn scaled_dot_product_attention_on(stream: &Stream, ..);

    |stream| run(&SdpaArgs::new(q, k, v, scale, mask, sinks)?, stream)
}

fn run(args: &SdpaArgs, stream: Option<&Stream>) -> Result<Array> {
    match place(OP, args.device, &args.q, stream)? {
        Place::Cpu => crate::cpu::sdpa::run(args),
        Place::Cuda(stream) => crate::cuda::sdpa::run(args, &stream),
    }
}

with_on_form! {
    /// [`scaled_dot_product_attention`] that also returns the softmax's log-sum-exp, the
    /// forward of training: `(out, lse)` with `lse[b, h, i] = ln(sum_j exp(s_j) + exp(sink_h))`
    /// over the row's visible scores `s_j = scale * q_i·k_j + mask` (natural log), of shape
    /// `[B, N_q, T_q]` and dtype float32 (float64 for a float64 call). A row that sees no key
    /// and has no sink has `lse = -inf` (and output 0). `out` is what
    /// [`scaled_dot_product_attention`] gives for the same call, computed by the same kernels
    /// where they can write the log-sum-exp (on a GPU, the SIMT and `mma.sync` kernels; see
    /// `docs/architecture.md`).
    ///
    /// # Errors
    /// As [`scaled_dot_product_attention`].
    pub fn scaled_dot_product_attention_with_lse(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
        sinks: Option<&Array>,
    ) -> Result<(Array, Array)>;

    /// [`scaled_dot_product_attention_with_lse`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`scaled_dot_product_attention_with_lse`]; `Error::Device` when the inputs are not
    /// on `stream`'s device.
    pub fn scaled_dot_product_attention_with_lse_on(stream: &Stream, ..);

    |stream| run_with_lse(&SdpaArgs::new(q, k, v, scale, mask, sinks)?, stream)
}

fn run_with_lse(args: &SdpaArgs, stream: Option<&Stream>) -> Result<(Array, Array)> {
    match place(OP, args.device, &args.q, stream)? {
        Place::Cpu => crate::cpu::sdpa::run_with_lse(args),
        Place::Cuda(stream) => crate::cuda::sdpa::run_with_lse(args, &stream),
    }
}

with_on_form! {
    /// The backward pass of [`scaled_dot_product_attention`]: `(dq, dk, dv, dsinks)` given the
    /// forward's inputs, its output `out` and log-sum-exp `lse` (from
    /// [`scaled_dot_product_attention_with_lse`]) and the output's cotangent `d_out`.
    ///
    /// With `P = exp(scale * q k^T + mask - lse)` and `delta = rowsum(d_out * out)`:
    /// `dv = P^T d_out`, `dS = P * (d_out v^T - delta)`, `dq = scale * dS k`,
    /// `dk = scale * dS^T q`, and for each head's sink `dsink = -sum P_sink * delta` over the
    /// head's rows (`P_sink = exp(sink - lse)`). Grouped-query heads sum their `dk` and `dv`
    /// into their kv head (k and v are never repeated). Causal and array masks hide what they
    /// hid in the forward; there is no gradient for the mask (see
    /// [`scaled_dot_product_attention_vjp_check_targets`]). Rows that saw nothing get no
    /// gradient.
    ///
    /// Each gradient has its primal's shape and dtype (`dsinks` only with sinks); the
    /// arithmetic runs as in the forward: float32 (float64 for float64 calls), products of
    /// the inputs in the call's dtype. Results are deterministic (the same call gives the same
    /// bits, whatever the number of threads) except on Hopper GPUs at f16 / bf16 with
    /// `D = D_v = 128`: there the fused kernel sums `dq`'s f32 partials with atomic bulk
    /// reductions whose order varies, so `dq` can differ in its last bits between runs;
    /// `FERROFAST_DETERMINISTIC=1` in the environment selects the bit-reproducible two-pass
    /// kernels instead (slower).
    ///
    /// # Errors
    /// The forward's errors for the forward's arguments; `Error::InvalidArgument` when `out` or
    /// `d_out` does not have the output's shape `[B, N_q, T_q, D_v]` or is not floating, or
    /// `lse` is not `[B, N_q, T_q]` float32 (float64 for a float64 call); `Error::Device` for
    /// inputs on different devices.
        #[allow(clippy::type_complexity)]
    pub fn scaled_dot_product_attention_vjp(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
        sinks: Option<&Array>,
        out: &Array,
        lse: &Array,
        d_out: &Array,
    ) -> Result<(Array, Array, Array, Option<Array>)>;

    /// [`scaled_dot_product_attention_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`scaled_dot_product_attention_vjp`]; `Error::Device` when the inputs are not on
    /// `stream`'s device.
    #[allow(clippy::type_complexity)]
    pub fn scaled_dot_product_attention_vjp_on(stream: &Stream, ..);

    |stream| {
        let fwd = SdpaArgs::new(q, k, v, scale, mask, sinks)?;
        run_vjp(&SdpaVjpArgs::new(fwd, out, lse, d_out)?, stream)
    }
}

#[allow(clippy::type_complexity)]
fn run_vjp(
    args: &SdpaVjpArgs,
    stream: Option<&Stream>,
) -> Result<(Array, Array, Array, Option<Array>)> {
    match place(OP, args.fwd.device, &args.fwd.q, stream)? {
        Place::Cpu => crate::cpu::sdpa::vjp::run(args),
        Place::Cuda(stream) => crate::cuda::sdpa::run_vjp(args, &stream),
    }
}

/// For autodiff front ends: succeeds unless the mask's gradient is asked, which fails with
/// MLX's error (the sinks have a gradient here, unlike in MLX).
///
/// # Errors
/// `Error::InvalidArgument("[scale_dot_product_attention] Does not support VJP with respect
/// to mask or attention sinks.")` (MLX's text) when `wrt_mask`.
pub fn scaled_dot_product_attention_vjp_check_targets(wrt_mask: bool) -> Result<()> {
    if wrt_mask {
        return Err(crate::Error::invalid(
            "[scale_dot_product_attention] Does not support VJP with respect  to mask or \
             attention sinks.",
        ));
    }
    Ok(())
}
