//! `cross_entropy`: softmax cross-entropy over the last axis against integer class targets
//! (MLX `mx.fast.cross_entropy`), with ignored rows, label smoothing, z-loss and reductions
//! as options, its backward, and a fused forward + backward pass for training.
//!
//! The call is validated into a `CrossEntropyArgs` (`ops/cross_entropy.rs`: MLX's order and
//! messages, the per-row formulas) and dispatched to where the inputs live:
//! `cpu/cross_entropy.rs` or `cuda/cross_entropy.rs`.

use super::{place, Place};
use crate::array::fmt_shape;
use crate::error::{Error, Result};
use crate::ops::cross_entropy::{CrossEntropyArgs, CrossEntropyVjpArgs};
pub use crate::ops::cross_entropy::{CrossEntropyOptions, Reduction};
use crate::{Array, DType, Stream};

const OP: &str = "[cross_entropy]";

with_on_form! {
    /// Softmax cross-entropy over the last axis, MLX's `mx.fast.cross_entropy`:
    /// `loss[r] = logsumexp(logits[r, :]) - logits[r, targets[r]]`.
    ///
    /// - `logits`: any floating dtype (f32, f16, bf16; f64 on the CPU), at least 1-D, any
    ///   strides (transposed, stepped, broadcast). `targets`: any integer dtype (u8, u32, i32,
    ///   i64), of shape `logits.shape[:-1]` exactly (no broadcasting), any strides.
    /// - Output: float32 of `targets`' shape (a 0-d array for 1-D logits).
    /// - Numerics: the maximum and the sum of exponentials are computed in f32 (f64 for f64
    ///   logits) in one pass over each row, and the loss as `(max - x[t]) + log(sum)`, so the two
    ///   large terms cancel first, as in MLX's fused GPU kernels. (MLX's CPU path computes in the
    ///   logits' dtype, which for bf16 is about 1e-1 off; this is within f32 rounding of the
    ///   exact value on every device.)
    /// - Targets: a negative target `t` wraps to `t + V`, as MLX's CPU and Metal paths do
    ///   (`V = logits.shape[-1]`); a target still outside `[0, V)` gives a NaN loss (MLX leaves it
    ///   undefined and may read out of bounds; nothing here reads at it). Targets are not cast to
    ///   int32 first, so an int64 target beyond the int32 range is out of range rather than
    ///   wrapped modulo 2^32 as in MLX.
    /// - Special values: a NaN logit makes its row's loss NaN; a row whose maximum is infinite
    ///   gets `max - x[t]` (MLX's fused kernels).
    ///
    /// # Errors
    /// `Error::InvalidArgument` with MLX's message, checked in MLX's order: `logits` has no
    /// dimension; `targets.shape()` is not `logits.shape()` without its last axis; `logits` is
    /// not floating; `targets` is not integer (bool included). `Error::Device` when the two live
    /// on different devices. On a CUDA device: `Error::Unsupported` for f64 logits; compile and
    /// driver errors.
    pub fn cross_entropy(logits: &Array, targets: &Array) -> Result<Array>;

    /// [`cross_entropy`] on an explicit CUDA stream (MLX's `stream=` argument).
    ///
    /// # Errors
    /// As [`cross_entropy`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn cross_entropy_on(stream: &Stream, ..);

    |stream| {
        let args = CrossEntropyArgs::new(logits, targets, &CrossEntropyOptions::default())?;
        run(&args, stream)
    }
}

with_on_form! {
    /// [`cross_entropy`] with the options of [`CrossEntropyOptions`] (their `Default` is MLX's
    /// behaviour):
    ///
    /// - `ignore_index`: rows whose raw target equals it get loss 0 (and gradient 0 in the
    ///   backward passes) and are left out of the mean.
    /// - `label_smoothing = eps`: `loss = (1 - eps) (lse - x[t]) + eps (lse - mean(x))`, the
    ///   cross-entropy against `(1 - eps) onehot(t) + eps / V` (PyTorch's definition).
    /// - `z_loss = z`: adds `z * lse^2` per row.
    /// - `reduction`: [`Reduction::None`] returns the per-row losses (targets' shape);
    ///   [`Reduction::Sum`] / [`Reduction::Mean`] a 0-d float32 array, the mean dividing by the
    ///   rows that are not ignored (NaN when all are). The reduction adds the per-row losses
    ///   (written by the same single pass over the logits) in a fixed order: deterministic, and no
    ///   extra pass over the logits.
    ///
    /// # Errors
    /// As [`cross_entropy`], then `Error::InvalidArgument` when `label_smoothing` is outside
    /// `[0, 1]` or `z_loss` is negative or not finite.
    pub fn cross_entropy_with(
        logits: &Array,
        targets: &Array,
        opts: &CrossEntropyOptions,
    ) -> Result<Array>;

    /// [`cross_entropy_with`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`cross_entropy_with`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn cross_entropy_with_on(stream: &Stream, ..);

    |stream| run(&CrossEntropyArgs::new(logits, targets, opts)?, stream)
}

with_on_form! {
    /// The backward pass of [`cross_entropy_with`] (MLX's `CrossEntropy::vjp`): given the
    /// `cotangent` of the loss (the targets' shape for [`Reduction::None`], 0-d otherwise),
    /// returns `dlogits` in the logits' dtype and shape:
    /// `dlogits[r, j] = g_r * ((1 + 2 z lse_r) softmax(x_r)[j] - eps / V - (1 - eps) [j == t_r])`,
    /// with `g_r` the cotangent (per row; for `Sum` the scalar; for `Mean` the scalar divided by
    /// the number of rows not ignored). Ignored rows get 0; rows with an out-of-range target or a
    /// NaN logit get NaN.
    ///
    /// The row statistics are recomputed (MLX saves the forward's loss instead): one read of
    /// each row for them and a second, mostly from cache, to write the gradient. f32 arithmetic
    /// (f64 for f64 logits), one rounding to the logits' dtype. For training, prefer
    /// [`cross_entropy_fused`], which also returns the loss.
    ///
    /// # Errors
    /// The forward's errors (see [`cross_entropy_with`]), then `Error::InvalidArgument` when the
    /// cotangent's shape is not the loss's (`[cross_entropy_vjp] Output shape (..) does not match
    /// cotangent shape (..).`) or it is not floating; `Error::Device` when it lives elsewhere.
    pub fn cross_entropy_vjp(
        logits: &Array,
        targets: &Array,
        opts: &CrossEntropyOptions,
        cotangent: &Array,
    ) -> Result<Array>;

    /// [`cross_entropy_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`cross_entropy_vjp`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn cross_entropy_vjp_on(stream: &Stream, ..);

    |stream| {
        let fwd = CrossEntropyArgs::new(logits, targets, opts)?;
        run_vjp(&CrossEntropyVjpArgs::new(fwd, cotangent)?, stream)
    }
}

with_on_form! {
    /// The training step's loss and gradient in one pass: `(loss, dlogits)` where `loss` is
    /// [`cross_entropy_with`]'s result and `dlogits` the gradient of that (reduced) loss, i.e.
    /// [`cross_entropy_vjp`] with the cotangent implied: 1 per row for [`Reduction::None`] and
    /// [`Reduction::Sum`], `1 / n_valid` per row for [`Reduction::Mean`].
    ///
    /// Each row of logits is read once from memory for its statistics and the loss, and the
    /// gradient is written from the same pass: on the CPU the second read of the row comes from
    /// cache; on a GPU the row stays in registers when it fits (up to 32768 f16 / bf16 or 16384
    /// f32 logits a row) and is read a second time otherwise (mostly from L2). For
    /// `Reduction::Mean` the count of rows not ignored is taken from the targets first (a pass
    /// over the targets only).
    ///
    /// # Errors
    /// As [`cross_entropy_with`].
    pub fn cross_entropy_fused(
        logits: &Array,
        targets: &Array,
        opts: &CrossEntropyOptions,
    ) -> Result<(Array, Array)>;

    /// [`cross_entropy_fused`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`cross_entropy_fused`]; `Error::Device` when the inputs are not on `stream`'s device.
    pub fn cross_entropy_fused_on(stream: &Stream, ..);

    |stream| run_fused(&CrossEntropyArgs::new(logits, targets, opts)?, stream)
}

with_on_form! {
    /// [`cross_entropy_fused`] writing `dlogits` over the logits: the training step without a
    /// second buffer the size of the logits (at a 128k vocabulary the logits are the largest
    /// tensor of a step). Takes `logits` by value; when it is the only handle on its buffer
    /// (no clone or view of it is alive), row-major from the buffer's start, of f32 / f16 /
    /// bf16, and in ferrofast's own memory (CPU or CUDA), the returned `dlogits` is that same
    /// buffer, overwritten with the gradient. Any other logits (a view, a shared buffer, f64,
    /// memory from [`Array::from_external`]) get a new buffer, exactly as
    /// [`cross_entropy_fused`] (the results are the same either way; `dlogits.host_ptr()`
    /// tells a CPU caller which happened). Memory another library lends for writing:
    /// [`cross_entropy_fused_in_place_external`].
    ///
    /// # Errors
    /// As [`cross_entropy_with`]. On an error the logits are dropped.
    pub fn cross_entropy_fused_in_place(
        logits: Array,
        targets: &Array,
        opts: &CrossEntropyOptions,
    ) -> Result<(Array, Array)>;

    /// [`cross_entropy_fused_in_place`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`cross_entropy_fused_in_place`]; `Error::Device` when the inputs are not on
    /// `stream`'s device.
    pub fn cross_entropy_fused_in_place_on(stream: &Stream, ..);

    |stream| run_fused_in_place(logits, targets, opts, stream)
}

/// [`cross_entropy_fused_in_place`] for logits in memory another library lends for writing
/// (a NumPy array or PyTorch tensor wrapped with [`Array::from_external`] or
/// [`Array::from_cuda_external`]): `dlogits` is written over the logits' elements, in the
/// lender's memory, and returned as `logits` itself, beside the loss. The gradient is the
/// bits [`cross_entropy_fused`] gives.
///
/// The row passes write each row's gradient over its logits in the lender's memory (on the
/// CPU on the calling thread's pool, on a GPU queued on the logits' stream), as
/// [`cross_entropy_fused_in_place`] does for ferrofast's own buffers: no buffer the size of
/// the logits is allocated. f64 logits are refused (below).
///
/// # Safety
/// When `logits` views borrowed memory, its producer lends it for writing for this call:
/// the memory is writable, and nobody else reads or writes the logits' elements from the
/// call's start until it returns (on a GPU: until the work this call queues on the logits'
/// stream has finished; work queued on that stream afterwards is ordered after it). This
/// lifts, for these elements and this call, the "nobody writes" clause of the constructors'
/// contracts from the other side: ferrofast writes them here and nowhere else.
///
/// # Errors
/// As [`cross_entropy_with`] (MLX's checks first); then `Error::InvalidArgument` when the
/// logits are not float32, float16 or bfloat16, not row-major contiguous (strided,
/// transposed or broadcast views: pass a contiguous copy and read its gradient there), or
/// share their buffer with another array (a clone or view would see the write). On an
/// error the logits are dropped unchanged.
pub unsafe fn cross_entropy_fused_in_place_external(
    logits: Array,
    targets: &Array,
    opts: &CrossEntropyOptions,
) -> Result<(Array, Array)> {
    // MLX's checks first; then `args` holds the only handle this function had.
    let args = CrossEntropyArgs::new(&logits, targets, opts)?;
    drop(logits);
    let x = &args.logits;
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::invalid(format!(
            "{OP} The in-place pass writes float32, float16 or bfloat16 logits, not {dtype}."
        )));
    }
    if !x.is_contiguous() {
        return Err(Error::invalid(format!(
            "{OP} The in-place pass needs row-major contiguous logits, got shape {} with \
             strides {:?}.",
            fmt_shape(x.shape()),
            x.strides()
        )));
    }
    if !x.is_sole_handle() {
        return Err(Error::invalid(format!(
            "{OP} The in-place pass needs the only handle on the logits' buffer; another \
             array shares it."
        )));
    }
    // SAFETY: the caller lends the logits' memory for writing for this call (this
    // function's contract); `args` holds the only handle on it (checked above), row-major
    // contiguous.
    unsafe {
        match place(OP, args.device, &args.logits, None)? {
            Place::Cpu => crate::cpu::cross_entropy::fused_in_place_lent(args),
            Place::Cuda(stream) => crate::cuda::cross_entropy::fused_in_place_lent(args, &stream),
        }
    }
}

/// For autodiff front ends: succeeds when only the logits' gradient is asked of
/// [`cross_entropy`], and fails with MLX's GPU error when the targets' gradient is asked.
///
/// # Errors
/// `Error::InvalidArgument("[cross_entropy] Cannot differentiate with respect to the
/// targets.")` when `wrt_targets`.
pub fn cross_entropy_vjp_check_targets(wrt_targets: bool) -> Result<()> {
    if wrt_targets {
        return Err(Error::invalid(format!(
            "{OP} Cannot differentiate with respect to the targets."
        )));
    }
    Ok(())
}

fn run(args: &CrossEntropyArgs, stream: Option<&Stream>) -> Result<Array> {
    match place(OP, args.device, &args.logits, stream)? {
        Place::Cpu => crate::cpu::cross_entropy::run(args),
        Place::Cuda(stream) => crate::cuda::cross_entropy::run(args, &stream),
    }
}

fn run_vjp(args: &CrossEntropyVjpArgs, stream: Option<&Stream>) -> Result<Array> {
    match place(
        "[cross_entropy_vjp]",
        args.fwd.device,
        &args.fwd.logits,
        stream,
    )? {
        Place::Cpu => crate::cpu::cross_entropy::vjp(args),
        Place::Cuda(stream) => crate::cuda::cross_entropy::vjp(args, &stream),
    }
}

/// Validates, then drops the caller's handle on the logits so that the Args hold the only
/// one (the back ends reuse the buffer only then).
fn run_fused_in_place(
    logits: Array,
    targets: &Array,
    opts: &CrossEntropyOptions,
    stream: Option<&Stream>,
) -> Result<(Array, Array)> {
    let args = CrossEntropyArgs::new(&logits, targets, opts)?;
    drop(logits);
    match place(OP, args.device, &args.logits, stream)? {
        Place::Cpu => crate::cpu::cross_entropy::fused_in_place(args),
        Place::Cuda(stream) => crate::cuda::cross_entropy::fused_in_place(args, &stream),
    }
}

fn run_fused(args: &CrossEntropyArgs, stream: Option<&Stream>) -> Result<(Array, Array)> {
    match place(OP, args.device, &args.logits, stream)? {
        Place::Cpu => crate::cpu::cross_entropy::fused(args),
        Place::Cuda(stream) => crate::cuda::cross_entropy::fused(args, &stream),
    }
}
