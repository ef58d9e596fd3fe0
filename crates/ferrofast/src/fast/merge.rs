//! `merge_attention_states`: combines two attention results over disjoint key sets, given
//! with their log-sum-exps, into the result over all the keys (the merge step of split-KV
//! and context-parallel attention).
//!
//! The call is validated into a `MergeArgs` (`ops/merge.rs`) and dispatched to the device
//! the inputs live on: `cpu/merge.rs` or `cuda/merge.rs`.

use super::{place, Place};
use crate::error::Result;
use crate::ops::merge::{MergeArgs, OP};
use crate::{Array, Stream};

with_on_form! {
    /// Merges two partial attention results, each over a disjoint set of the keys, into the
    /// result over the union: `(out, lse)` exactly as
    /// [`scaled_dot_product_attention_with_lse`](super::scaled_dot_product_attention_with_lse)
    /// would return it over all the keys (up to rounding).
    ///
    /// `out_a`, `out_b` are the parts' outputs `[B, H, T, D_v]` (one floating dtype, one
    /// shape); `lse_a`, `lse_b` their log-sum-exps `[B, H, T]`, float32 (float64 for float64
    /// outputs), as `scaled_dot_product_attention_with_lse` returns them. Per row, with
    /// `m = max(lse_a, lse_b)`, `w_a = exp(lse_a - m)`, `w_b = exp(lse_b - m)`:
    ///
    /// - `lse = m + ln(w_a + w_b)`, i.e. `logaddexp(lse_a, lse_b)` (float32 `[B, H, T]`,
    ///   float64 for float64 outputs);
    /// - `out = (w_a out_a + w_b out_b) / (w_a + w_b)`, computed in float32 (float64 for float64
    ///   outputs) and rounded once to the parts' dtype, returned row-major.
    ///
    /// Split the keys of one attention call into two parts (for example `k[..., :s, :]` and
    /// `k[..., s:, :]`, with the mask's columns split the same way and the sinks given to one
    /// part only), run `scaled_dot_product_attention_with_lse` on each and merge: the result is
    /// attention over all the keys. Merging is associative and commutative up to rounding, so
    /// any number of parts merges pairwise.
    ///
    /// Special values, consistent with attention's (`docs/architecture.md`, "Special values"):
    /// - a part with `lse = -inf` (its rows saw no key) contributes nothing: its output row is
    ///   never multiplied, so whatever it holds (NaN included) does not reach the result; the
    ///   same holds for a part whose `lse` is more than 87.3 below the other's (its weight
    ///   `e^(lse - m)` is then below float32's normal range and counts as exactly 0, as an
    ///   underflowed attention weight does);
    /// - both parts `-inf`: output 0, `lse = -inf` (attention's row that sees no key);
    /// - a NaN `lse` in either part makes the row NaN (output and `lse`); a `+inf` one (with no
    ///   NaN) makes the output row NaN (`inf / inf`, as a sink of `+inf` does in attention) and
    ///   `lse = +inf`;
    /// - a NaN or infinity in the output row of a part with non-zero weight reaches that column
    ///   as the arithmetic gives.
    ///
    /// Any strides are read in place (views such as `swapaxes`, slices along `T`, broadcast
    /// log-sum-exps); empty sizes give empty results. Inputs on a CUDA device (float32,
    /// float16, bfloat16) run there, on the stream that produced `out_a`.
    ///
    /// # Errors
    /// `Error::InvalidArgument` (prefix `[merge_attention_states] `): an output that is not
    /// 4-D; outputs of different shapes or dtypes; a non-floating output dtype; a log-sum-exp
    /// whose shape is not `[B, H, T]` of the outputs; a log-sum-exp that is not float32
    /// (float64 for float64 outputs). `Error::Device` for inputs on different devices.
    /// `Error::OutOfMemory` when the result does not fit. On a CUDA device:
    /// `Error::Unsupported` for float64 outputs; compile and driver errors.
    ///
    /// ```
    /// use ferrofast::{fast, Array, DType, Device};
    ///
    /// let q = Array::randn(&[1, 4, 8, 32], DType::F32, 0, &Device::Cpu)?;
    /// let k = Array::randn(&[1, 4, 24, 32], DType::F32, 1, &Device::Cpu)?;
    /// let v = Array::randn(&[1, 4, 24, 32], DType::F32, 2, &Device::Cpu)?;
    /// let (k1, k2) = (k.slice(&[0, 0, 0, 0], &[1, 4, 10, 32], &[1; 4])?, k.slice(&[0, 0, 10, 0], &[1, 4, 24, 32], &[1; 4])?);
    /// let (v1, v2) = (v.slice(&[0, 0, 0, 0], &[1, 4, 10, 32], &[1; 4])?, v.slice(&[0, 0, 10, 0], &[1, 4, 24, 32], &[1; 4])?);
    /// let none = fast::Mask::None;
    /// let (o1, l1) = fast::scaled_dot_product_attention_with_lse(&q, &k1, &v1, 0.2, none, None)?;
    /// let (o2, l2) = fast::scaled_dot_product_attention_with_lse(&q, &k2, &v2, 0.2, none, None)?;
    /// let (out, lse) = fast::merge_attention_states(&o1, &l1, &o2, &l2)?;
    /// let (full, full_lse) = fast::scaled_dot_product_attention_with_lse(&q, &k, &v, 0.2, none, None)?;
    /// let diff = out.to_vec::<f32>()?.iter().zip(full.to_vec::<f32>()?).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    /// assert!(diff < 1e-5);
    /// # Ok::<(), ferrofast::Error>(())
    /// ```
    pub fn merge_attention_states(
        out_a: &Array,
        lse_a: &Array,
        out_b: &Array,
        lse_b: &Array,
    ) -> Result<(Array, Array)>;

    /// [`merge_attention_states`] on an explicit CUDA stream (MLX's `stream=` argument): the
    /// work is queued on `stream` instead of the stream that produced `out_a`.
    ///
    /// # Errors
    /// As [`merge_attention_states`]; `Error::Device` when the inputs are not on `stream`'s
    /// device, or are on the CPU.
    pub fn merge_attention_states_on(stream: &Stream, ..);

    |stream| run(&MergeArgs::new(out_a, lse_a, out_b, lse_b)?, stream)
}

fn run(args: &MergeArgs, stream: Option<&Stream>) -> Result<(Array, Array)> {
    match place(OP, args.device, &args.out_a, stream)? {
        Place::Cpu => crate::cpu::merge::run(args),
        Place::Cuda(stream) => crate::cuda::merge::run(args, &stream),
    }
}

/// `acc + x` as a new row-major array of `x`'s shape, float32 (float64 for a float64 `x`),
/// where `x` lives (`x` alone, converted, when `acc` is `None`): the accumulation of
/// partial gradients that `crate::parallel` uses. `x` has any floating dtype and strides
/// (at most 4-D on a GPU); `acc` has the result's dtype and `x`'s shape, on `x`'s device.
///
/// # Errors
/// `Error::Device` for inputs on different devices; on a CUDA device
/// `Error::Unsupported` for float64; compile and driver errors.
pub(crate) fn accumulate(acc: Option<&Array>, x: &Array) -> Result<Array> {
    if let Some(a) = acc {
        crate::ops::same_device("[ring_attention]", &[("a gradient", x), ("its sum", a)])?;
    }
    match place("[ring_attention]", x.device(), x, None)? {
        Place::Cpu => crate::cpu::merge::accumulate(acc, x),
        Place::Cuda(stream) => crate::cuda::merge::accumulate(acc, x, &stream),
    }
}
