//! [`CrossEntropyArgs`]: a validated `cross_entropy` call, its backward
//! ([`CrossEntropyVjpArgs`]), and the public [`CrossEntropyOptions`] / [`Reduction`].
//!
//! Every back end computes one row of `V = logits.shape[-1]` logits `x` with target `t`
//! the same way (the oracle in f64, the kernels in f32):
//!
//! - `t` is the target as an `i64`; with `ignore_index = Some(i)` a row whose raw target is
//!   `i` is ignored: loss 0, gradient 0, not counted by the mean. Otherwise a negative `t`
//!   wraps to `t + V` (MLX's CPU and Metal paths); a target still outside `[0, V)` gives a
//!   NaN loss and a NaN gradient row, and nothing is read at it.
//! - `m = max(x)` (NaN entries ignored), `s = sum(exp(x - m))`, `lse = m + log(s)`, or
//!   `lse = m` when `m` is infinite (MLX's fused kernels); a NaN anywhere in the row makes the
//!   row's loss and gradient NaN.
//! - `loss = (1 - eps) * (lse - x[t]) + eps * (lse - mean(x)) + z * lse^2`, written as
//!   `(1 - eps) * (m - x[t]) + eps * (m - mean(x)) + log(s) + z * lse^2` so that the two
//!   large terms cancel before the logarithm is added (MLX's order for `eps = 0`).
//! - `dloss/dx[j] = (1 + 2 z lse) * exp(x[j] - lse) - eps / V - (1 - eps) * [j == t]`.

use crate::array::fmt_shape;
use crate::error::{Error, Result};
use crate::{Array, Device};

const OP: &str = "[cross_entropy]";

/// How the per-row losses of [`cross_entropy_with`](crate::fast::cross_entropy_with) are
/// combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// One float32 loss per row, of the targets' shape (MLX's only behaviour).
    #[default]
    None,
    /// The sum of every row's loss (ignored rows add 0): a 0-d float32 array.
    Sum,
    /// The sum divided by the number of rows that are not ignored (PyTorch's `mean` with
    /// `ignore_index`): a 0-d float32 array; NaN when every row is ignored (0 / 0).
    Mean,
}

/// Options of [`cross_entropy_with`](crate::fast::cross_entropy_with) beyond MLX's
/// `cross_entropy`. `Default` is MLX's behaviour: no ignored index, no smoothing, no z-loss,
/// one loss per row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows whose target equals this value (compared before negative targets wrap) get loss
    /// 0 and gradient 0 and are not counted by [`Reduction::Mean`]. PyTorch's default is
    /// `Some(-100)`; MLX has none.
    pub ignore_index: Option<i64>,
    /// Label smoothing `eps` in `[0, 1]`: the target distribution is `1 - eps` on the target
    /// plus `eps / V` on every class (PyTorch's `label_smoothing`).
    pub label_smoothing: f32,
    /// z-loss coefficient `z >= 0`: adds `z * lse^2` to each row's loss (PaLM's auxiliary
    /// loss that keeps the log-partition near 0).
    pub z_loss: f32,
    /// How the per-row losses are combined.
    pub reduction: Reduction,
}

/// A validated `cross_entropy` call.
#[derive(Clone, Debug)]
pub(crate) struct CrossEntropyArgs {
    /// Floating logits, at least 1-D, any strides.
    pub(crate) logits: Array,
    /// Integer targets of shape `logits.shape[:-1]`, any strides.
    pub(crate) targets: Array,
    /// The options, checked.
    pub(crate) opts: CrossEntropyOptions,
    /// Number of rows (`targets.size()`).
    pub(crate) rows: usize,
    /// Classes per row (`logits.shape[-1]`).
    pub(crate) vocab: usize,
    /// Where every input lives.
    pub(crate) device: Device,
}

impl CrossEntropyArgs {
    /// Validates a call in MLX's order with MLX's messages, then the options.
    ///
    /// # Errors
    /// `Error::InvalidArgument`: logits with no dimension; targets whose shape is not the
    /// logits' without the last axis; logits not floating; targets not integer (bool
    /// included); `label_smoothing` outside `[0, 1]` or `z_loss` negative or not finite.
    /// `Error::Device` when the two arrays live on different devices.
    pub(crate) fn new(
        logits: &Array,
        targets: &Array,
        opts: &CrossEntropyOptions,
    ) -> Result<CrossEntropyArgs> {
        if logits.ndim() == 0 {
            return Err(Error::invalid(format!(
                "{OP} logits must have at least 1 dimension but got input with 0 dimensions."
            )));
        }
        let lead = &logits.shape()[..logits.ndim() - 1];
        if targets.shape() != lead {
            return Err(Error::invalid(format!(
                "{OP} targets shape {} does not match logits shape {} with the last axis \
                 removed.",
                fmt_shape(targets.shape()),
                fmt_shape(logits.shape())
            )));
        }
        if !logits.dtype().is_floating() {
            return Err(Error::invalid(format!(
                "{OP} Received unsupported logits type {}.",
                logits.dtype()
            )));
        }
        if !targets.dtype().is_integer() {
            return Err(Error::invalid(format!(
                "{OP} targets must be integer class indices but got {}.",
                targets.dtype()
            )));
        }
        let eps = opts.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::invalid(format!(
                "{OP} label_smoothing must be in [0, 1] but got {eps}."
            )));
        }
        if !(opts.z_loss >= 0.0 && opts.z_loss.is_finite()) {
            return Err(Error::invalid(format!(
                "{OP} z_loss must be finite and non-negative but got {}.",
                opts.z_loss
            )));
        }
        let device = super::same_device(OP, &[("logits", logits), ("targets", targets)])?;
        Ok(CrossEntropyArgs {
            logits: logits.clone(),
            targets: targets.clone(),
            opts: *opts,
            rows: targets.size(),
            vocab: logits.shape()[logits.ndim() - 1],
            device,
        })
    }

    /// The shape of the loss: the targets' for [`Reduction::None`], `[]` otherwise.
    pub(crate) fn loss_shape(&self) -> Vec<usize> {
        match self.opts.reduction {
            Reduction::None => self.targets.shape().to_vec(),
            Reduction::Sum | Reduction::Mean => Vec::new(),
        }
    }

    /// The per-row scalars every back end needs, as f32.
    pub(crate) fn row_params(&self) -> RowParams {
        let eps = self.opts.label_smoothing;
        RowParams {
            ignore: self.opts.ignore_index,
            vocab: self.vocab,
            one_minus_eps: 1.0 - eps,
            eps,
            eps_over_v: if self.vocab == 0 {
                0.0
            } else {
                eps / self.vocab as f32
            },
            z: self.opts.z_loss,
        }
    }
}

/// The per-row constants of the loss and gradient formulas (module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowParams {
    /// The ignored target value, if any.
    pub(crate) ignore: Option<i64>,
    /// Classes per row.
    pub(crate) vocab: usize,
    /// `1 - eps`.
    pub(crate) one_minus_eps: f32,
    /// `eps` (label smoothing).
    pub(crate) eps: f32,
    /// `eps / V`.
    pub(crate) eps_over_v: f32,
    /// z-loss coefficient.
    pub(crate) z: f32,
}

/// What a row's raw target means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The row is ignored: loss 0, gradient 0.
    Ignored,
    /// A class in `[0, V)` (after wrapping a negative target).
    Class(usize),
    /// Outside `[0, V)` after wrapping: NaN loss and gradient.
    OutOfRange,
}

impl RowParams {
    /// Classifies a raw target.
    pub(crate) fn target(&self, raw: i64) -> Target {
        if self.ignore == Some(raw) {
            return Target::Ignored;
        }
        let v = self.vocab as i128;
        let t = if raw < 0 {
            i128::from(raw) + v
        } else {
            i128::from(raw)
        };
        if (0..v).contains(&t) {
            Target::Class(t as usize)
        } else {
            Target::OutOfRange
        }
    }
}

/// A validated `cross_entropy_vjp` call: the forward's arguments and the cotangent of its
/// (reduced) loss.
#[derive(Clone, Debug)]
pub(crate) struct CrossEntropyVjpArgs {
    /// The forward call.
    pub(crate) fwd: CrossEntropyArgs,
    /// The cotangent: the loss's shape ([`CrossEntropyArgs::loss_shape`]), any floating dtype
    /// and strides, on `fwd.device`.
    pub(crate) cotangent: Array,
}

impl CrossEntropyVjpArgs {
    /// Validates the cotangent of a validated forward call.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when the cotangent's shape is not the loss's (MLX's `vjp`
    /// text) or its dtype is not floating; `Error::Device` when it is on another device.
    pub(crate) fn new(fwd: CrossEntropyArgs, cotangent: &Array) -> Result<CrossEntropyVjpArgs> {
        let op = "[cross_entropy_vjp]";
        let first = ("logits", &fwd.logits);
        let cotangent = super::norm::check_cotangent(op, &fwd.loss_shape(), first, cotangent)?;
        Ok(CrossEntropyVjpArgs { fwd, cotangent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_wrap_ignore_and_fall_out_of_range() {
        let p = RowParams {
            ignore: Some(-100),
            vocab: 10,
            one_minus_eps: 1.0,
            eps: 0.0,
            eps_over_v: 0.0,
            z: 0.0,
        };
        assert_eq!(p.target(3), Target::Class(3));
        assert_eq!(p.target(-1), Target::Class(9));
        assert_eq!(p.target(-10), Target::Class(0));
        assert_eq!(p.target(-11), Target::OutOfRange);
        assert_eq!(p.target(10), Target::OutOfRange);
        assert_eq!(p.target(-100), Target::Ignored);
        assert_eq!(p.target(i64::MIN), Target::OutOfRange);
        assert_eq!(p.target(i64::MAX), Target::OutOfRange);
    }
}
