//! The ops as candle `CustomOp`s, so candle's autograd (`Tensor::backward`) runs
//! ferrofast's backward passes. Apply them with candle's `apply_op1` / `apply_op2` /
//! `apply_op3`, or with the functions here, which do that.
//!
//! Each op value is meant for one application: [`ScaledDotProductAttention`] keeps the
//! log-sum-exp of its forward for its backward.

use std::sync::{Mutex, MutexGuard};

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor,
};
use ferrofast::{fast, Array};

use crate::convert::{borrow_cpu, into_cpu_storage, to_tensor, Borrowed};
use crate::ops::{self, Mask, Offset, RopeOptions};
use crate::{ff_err, CrossEntropyOptions, Result};

/// The forward pass of a custom op over its inputs borrowed as arrays (one per tensor, in
/// `apply_op*` order) on the candle device they live on.
trait Forward {
    /// The op's name in candle's graph.
    const NAME: &'static str;
    fn forward(&self, inputs: &[Array], device: &candle_core::Device) -> Result<Array>;
}

/// Runs `f` over host storages borrowed as arrays and returns its result as host storage.
fn cpu_run(
    inputs: &[(&CpuStorage, &Layout)],
    f: impl FnOnce(&[Array], &candle_core::Device) -> Result<Array>,
) -> Result<(CpuStorage, Shape)> {
    let arrays = inputs
        .iter()
        // SAFETY: the arrays are dropped at the end of this function, while candle holds
        // the storages (read-locked) for the call; the result is converted before that
        // (`into_cpu_storage` copies a result that shares an input's memory).
        .map(|(s, l)| unsafe { borrow_cpu(s, l, Box::new(())) })
        .collect::<Result<Vec<_>>>()?;
    let out = f(&arrays, &candle_core::Device::Cpu)?;
    into_cpu_storage(out)
}

/// Runs `f` over device storages borrowed as arrays, on candle's stream, and returns its
/// result as device storage.
#[cfg(feature = "cuda")]
fn cuda_run(
    inputs: &[(&CudaStorage, &Layout)],
    f: impl FnOnce(&[Array], &candle_core::Device) -> Result<Array>,
) -> Result<(CudaStorage, Shape)> {
    use crate::convert::cuda;
    let dev = &inputs
        .first()
        .ok_or_else(|| candle_core::Error::Msg("[ferrofast-candle] no input".into()))?
        .0
        .device;
    let stream = cuda::stream_of(dev)?;
    let arrays = inputs
        .iter()
        // SAFETY: candle holds the storages for the call and frees device memory on its
        // stream, the one the work is queued on; nothing writes them meanwhile.
        .map(|(s, l)| unsafe { cuda::borrow(s, l, &stream, Box::new(())) })
        .collect::<Result<Vec<_>>>()?;
    let out = f(&arrays, &candle_core::Device::Cuda(dev.clone()))?;
    cuda::into_storage(out, dev)
}

#[cfg(not(feature = "cuda"))]
fn cuda_run(
    _inputs: &[(&CudaStorage, &Layout)],
    _f: impl FnOnce(&[Array], &candle_core::Device) -> Result<Array>,
) -> Result<(CudaStorage, Shape)> {
    Err(candle_core::Error::Msg(
        "[ferrofast-candle] built without the `cuda` feature".into(),
    ))
}

/// `name`, `cpu_fwd` and `cuda_fwd` of a `CustomOp1/2/3` impl (one storage / layout pair
/// per input), all running the type's [`Forward`].
macro_rules! forward_methods {
    ($($s:ident, $l:ident);+) => {
        fn name(&self) -> &'static str {
            <Self as Forward>::NAME
        }
        fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
            cpu_run(&[$(($s, $l)),+], |a, d| Forward::forward(self, a, d))
        }
        fn cuda_fwd(&self, $($s: &CudaStorage, $l: &Layout),+) -> Result<(CudaStorage, Shape)> {
            cuda_run(&[$(($s, $l)),+], |a, d| Forward::forward(self, a, d))
        }
    };
}

fn arg(arrays: &[Array], i: usize) -> Result<&Array> {
    arrays
        .get(i)
        .ok_or_else(|| candle_core::Error::Msg("[ferrofast-candle] missing input".into()))
}

// ----- RMS norm ---------------------------------------------------------------------------

/// RMS norm with its backward pass: `CustomOp1` on `x` alone (no weight) and `CustomOp2`
/// on `(x, weight)`. See [`crate::rms_norm`] for the math.
#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    /// Added to the mean square.
    pub eps: f32,
}

impl Forward for RmsNorm {
    const NAME: &'static str = "ferrofast-rms-norm";
    fn forward(&self, a: &[Array], _device: &candle_core::Device) -> Result<Array> {
        fast::rms_norm(arg(a, 0)?, a.get(1), self.eps).map_err(ff_err)
    }
}

impl CustomOp1 for RmsNorm {
    forward_methods!(s, l);
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(ops::rms_norm_vjp(x, None, self.eps, grad)?.0))
    }
}

impl CustomOp2 for RmsNorm {
    forward_methods!(s1, l1; s2, l2);
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = ops::rms_norm_vjp(x, Some(weight), self.eps, grad)?;
        Ok((Some(dx), dw))
    }
}

/// [`crate::rms_norm`] recorded for candle's autograd.
///
/// # Errors
/// As [`crate::rms_norm`].
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    match weight {
        Some(w) => x.apply_op2(w, RmsNorm { eps }),
        None => x.apply_op1(RmsNorm { eps }),
    }
}

// ----- layer norm -------------------------------------------------------------------------

/// Layer norm with its backward pass: `CustomOp1` on `x`, `CustomOp2` on `(x, weight)`,
/// `CustomOp3` on `(x, weight, bias)`. See [`crate::layer_norm`].
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    /// Added to the variance.
    pub eps: f32,
}

impl Forward for LayerNorm {
    const NAME: &'static str = "ferrofast-layer-norm";
    fn forward(&self, a: &[Array], _device: &candle_core::Device) -> Result<Array> {
        fast::layer_norm(arg(a, 0)?, a.get(1), a.get(2), self.eps).map_err(ff_err)
    }
}

impl CustomOp1 for LayerNorm {
    forward_methods!(s, l);
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(ops::layer_norm_vjp(x, None, None, self.eps, grad)?.0))
    }
}

impl CustomOp2 for LayerNorm {
    forward_methods!(s1, l1; s2, l2);
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = ops::layer_norm_vjp(x, Some(weight), None, self.eps, grad)?;
        Ok((Some(dx), dw))
    }
}

impl CustomOp3 for LayerNorm {
    forward_methods!(s1, l1; s2, l2; s3, l3);
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = ops::layer_norm_vjp(x, Some(weight), Some(bias), self.eps, grad)?;
        Ok((Some(dx), dw, db))
    }
}

/// [`crate::layer_norm`] recorded for candle's autograd. A bias without a weight is
/// refused (pass a weight of ones).
///
/// # Errors
/// As [`crate::layer_norm`].
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let op = LayerNorm { eps };
    match (weight, bias) {
        (Some(w), Some(b)) => x.apply_op3(w, b, op),
        (Some(w), None) => x.apply_op2(w, op),
        (None, None) => x.apply_op1(op),
        (None, Some(_)) => Err(candle_core::Error::Msg(
            "[ferrofast-candle] layer_norm with a bias and no weight: pass a weight of ones".into(),
        )),
    }
}

// ----- rope -------------------------------------------------------------------------------

/// The position offset an op keeps.
#[derive(Clone, Debug)]
pub enum OwnedOffset {
    /// One offset for every batch example.
    Int(i64),
    /// An integer tensor of size 1 or `B`.
    Tensor(Tensor),
}

/// Rope with its backward pass (`CustomOp1` on `x`; no gradient for the offset or freqs,
/// which are fields). See [`crate::rope`].
#[derive(Clone, Debug)]
pub struct Rope {
    /// Leading features of each row that are rotated.
    pub dims: usize,
    /// Adjacent pairs instead of half-split pairs.
    pub traditional: bool,
    /// Frequency base (exclusive with `freqs`).
    pub base: Option<f32>,
    /// Multiplies every position.
    pub scale: f32,
    /// Position of the first token.
    pub offset: OwnedOffset,
    /// Periods, one per rotated pair (exclusive with `base`).
    pub freqs: Option<Tensor>,
}

impl Forward for Rope {
    const NAME: &'static str = "ferrofast-rope";
    fn forward(&self, a: &[Array], device: &candle_core::Device) -> Result<Array> {
        let b = Borrowed::new(device)?;
        let dims = ops::rope_dims(self.dims)?;
        ops::with_rope_options(&b, &self.options(), |opts| {
            fast::rope_with(arg(a, 0)?, dims, opts).map_err(ff_err)
        })
    }
}

impl Rope {
    /// The op's options, borrowing its offset and freqs.
    fn options(&self) -> RopeOptions<'_> {
        let offset = match &self.offset {
            OwnedOffset::Int(v) => Offset::Int(*v),
            OwnedOffset::Tensor(t) => Offset::Tensor(t),
        };
        RopeOptions {
            traditional: self.traditional,
            base: self.base,
            scale: self.scale,
            offset,
            freqs: self.freqs.as_ref(),
        }
    }
}

impl CustomOp1 for Rope {
    forward_methods!(s, l);
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(ops::rope_vjp(grad, self.dims, &self.options())?))
    }
}

/// [`crate::rope`] recorded for candle's autograd.
///
/// # Errors
/// As [`crate::rope`].
pub fn rope(x: &Tensor, dims: usize, options: &RopeOptions<'_>) -> Result<Tensor> {
    x.apply_op1(Rope {
        dims,
        traditional: options.traditional,
        base: options.base,
        scale: options.scale,
        offset: match options.offset {
            Offset::Int(v) => OwnedOffset::Int(v),
            Offset::Tensor(t) => OwnedOffset::Tensor(t.clone()),
        },
        freqs: options.freqs.cloned(),
    })
}

// ----- attention --------------------------------------------------------------------------

/// The mask an attention op keeps.
#[derive(Clone, Debug, Default)]
pub enum OwnedMask {
    /// No mask.
    #[default]
    None,
    /// Causal, lower right.
    Causal,
    /// A `u8` tensor; non-zero keeps the key.
    Bool(Tensor),
    /// Added to the scores.
    Additive(Tensor),
}

impl OwnedMask {
    fn as_mask(&self) -> Mask<'_> {
        match self {
            OwnedMask::None => Mask::None,
            OwnedMask::Causal => Mask::Causal,
            OwnedMask::Bool(t) => Mask::Bool(t),
            OwnedMask::Additive(t) => Mask::Additive(t),
        }
    }
}

/// Attention with its backward pass: `CustomOp3` on `(q, k, v)`; the mask and sinks are
/// fields and get no gradient here (the sinks' gradient is in
/// [`crate::scaled_dot_product_attention_vjp`]). The forward also computes the log-sum-exp
/// and keeps it for the backward, so apply each value once. See
/// [`crate::scaled_dot_product_attention`].
#[derive(Debug)]
pub struct ScaledDotProductAttention {
    /// Multiplies the scores.
    pub scale: f32,
    /// The mask.
    pub mask: OwnedMask,
    /// Per-head sink logits `[N_q]`, or none.
    pub sinks: Option<Tensor>,
    lse: Mutex<Option<Tensor>>,
}

impl ScaledDotProductAttention {
    /// An attention op with the given scale, mask and sinks.
    pub fn new(scale: f32, mask: OwnedMask, sinks: Option<Tensor>) -> Self {
        ScaledDotProductAttention {
            scale,
            mask,
            sinks,
            lse: Mutex::new(None),
        }
    }

    /// The log-sum-exp the forward keeps for the backward.
    fn kept_lse(&self) -> Result<MutexGuard<'_, Option<Tensor>>> {
        self.lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("[ferrofast-candle] poisoned lock".into()))
    }
}

impl Forward for ScaledDotProductAttention {
    const NAME: &'static str = "ferrofast-scaled-dot-product-attention";
    fn forward(&self, a: &[Array], device: &candle_core::Device) -> Result<Array> {
        let b = Borrowed::new(device)?;
        let mask_array = ops::mask_array(&b, self.mask.as_mask())?;
        let mask = ops::ff_mask(self.mask.as_mask(), mask_array.as_ref());
        let sinks = self.sinks.as_ref().map(|t| b.array(t)).transpose()?;
        let (out, lse) = fast::scaled_dot_product_attention_with_lse(
            arg(a, 0)?,
            arg(a, 1)?,
            arg(a, 2)?,
            self.scale,
            mask,
            sinks.as_ref(),
        )
        .map_err(ff_err)?;
        let lse = to_tensor(lse, device)?;
        *self.kept_lse()? = Some(lse);
        Ok(out)
    }
}

impl CustomOp3 for ScaledDotProductAttention {
    forward_methods!(s1, l1; s2, l2; s3, l3);
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self.kept_lse()?.clone();
        let lse = match kept {
            Some(lse) => lse,
            // Not run through the forward here (an op built by hand): recompute it.
            None => {
                ops::scaled_dot_product_attention_with_lse(
                    q,
                    k,
                    v,
                    self.scale,
                    self.mask.as_mask(),
                    self.sinks.as_ref(),
                )?
                .1
            }
        };
        let (dq, dk, dv, _) = ops::scaled_dot_product_attention_vjp(
            q,
            k,
            v,
            self.scale,
            self.mask.as_mask(),
            self.sinks.as_ref(),
            res,
            &lse,
            grad,
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`crate::scaled_dot_product_attention`] recorded for candle's autograd (gradients for
/// `q`, `k` and `v`).
///
/// # Errors
/// As [`crate::scaled_dot_product_attention`].
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Mask<'_>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = match mask {
        Mask::None => OwnedMask::None,
        Mask::Causal => OwnedMask::Causal,
        Mask::Bool(t) => OwnedMask::Bool(t.clone()),
        Mask::Additive(t) => OwnedMask::Additive(t.clone()),
    };
    q.apply_op3(
        k,
        v,
        ScaledDotProductAttention::new(scale, mask, sinks.cloned()),
    )
}

// ----- cross-entropy ----------------------------------------------------------------------

/// Cross-entropy with its backward pass: `CustomOp2` on `(logits, targets)` (no gradient
/// for the integer targets). See [`crate::cross_entropy`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropy {
    /// Ignore index, label smoothing, z-loss and reduction.
    pub options: CrossEntropyOptions,
}

impl Forward for CrossEntropy {
    const NAME: &'static str = "ferrofast-cross-entropy";
    fn forward(&self, a: &[Array], _device: &candle_core::Device) -> Result<Array> {
        fast::cross_entropy_with(arg(a, 0)?, arg(a, 1)?, &self.options).map_err(ff_err)
    }
}

impl CustomOp2 for CrossEntropy {
    forward_methods!(s1, l1; s2, l2);
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = ops::cross_entropy_vjp(logits, targets, &self.options, grad)?;
        Ok((Some(d), None))
    }
}

/// [`crate::cross_entropy`] recorded for candle's autograd (gradient for the logits).
///
/// # Errors
/// As [`crate::cross_entropy`].
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    logits.apply_op2(targets, CrossEntropy { options: *options })
}
