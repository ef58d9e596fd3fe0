//! The ops of `ferrofast.fast` over [`Tensor`]s: positional arguments, validated by
//! ferrofast itself (MLX's checks and messages); keywords, defaults and the conversion of
//! NumPy / PyTorch arrays live in `ferrofast/fast.py`. Every kernel runs with the GIL
//! released.

use ferrofast::fast::{self, CrossEntropyOptions, Mask, Reduction, RopeOffset};
use ferrofast::Array;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::dlpack::Tensor;
use crate::errors::to_py;

type Res<T> = ferrofast::Result<T>;

fn arr(t: &Bound<'_, Tensor>) -> PyResult<Array> {
    t.get().array()
}

/// Runs `f` without the GIL and wraps the error.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Res<T> + Send) -> PyResult<T> {
    py.detach(f).map_err(to_py)
}

/// [`run`], with the result's arrays as [`Tensor`]s.
fn call<T: Wrap + Send>(py: Python<'_>, f: impl FnOnce() -> Res<T> + Send) -> PyResult<T::Py> {
    run(py, f).map(Wrap::wrap)
}

/// A positional argument of an op as Python passes it, turned (with the GIL held) into the
/// value the op borrows from while it runs without the GIL.
trait Arg {
    /// The argument, owned.
    type Owned: Lend + Send;
    /// Converts the argument (a `Tensor`'s array, rope's offset, attention's mask).
    fn owned(self) -> PyResult<Self::Owned>;
}

/// What an op takes from an owned argument: a reference to an array, or the value itself.
trait Lend {
    /// The argument as `ferrofast::fast` takes it.
    type Lent<'a>
    where
        Self: 'a;
    /// Borrows the argument for the call.
    fn lend(&self) -> Self::Lent<'_>;
}

/// A result of `ferrofast::fast` as Python gets it: each array as a [`Tensor`].
trait Wrap {
    /// The result for Python.
    type Py;
    /// Wraps each array.
    fn wrap(self) -> Self::Py;
}

impl Arg for &Bound<'_, Tensor> {
    type Owned = Array;
    fn owned(self) -> PyResult<Array> {
        arr(self)
    }
}

impl Arg for Option<&Bound<'_, Tensor>> {
    type Owned = Option<Array>;
    fn owned(self) -> PyResult<Option<Array>> {
        self.map(arr).transpose()
    }
}

impl Lend for Array {
    type Lent<'a> = &'a Array;
    fn lend(&self) -> &Array {
        self
    }
}

impl Lend for Option<Array> {
    type Lent<'a> = Option<&'a Array>;
    fn lend(&self) -> Option<&Array> {
        self.as_ref()
    }
}

impl Wrap for Array {
    type Py = Tensor;
    fn wrap(self) -> Tensor {
        Tensor::new(self)
    }
}

impl Wrap for Option<Array> {
    type Py = Option<Tensor>;
    fn wrap(self) -> Option<Tensor> {
        self.map(Tensor::new)
    }
}

/// [`Arg`] and [`Lend`] for arguments passed on as they are (numbers, flags).
macro_rules! plain_args {
    ($($t:ty),+) => {$(
        impl Arg for $t {
            type Owned = $t;
            fn owned(self) -> PyResult<$t> {
                Ok(self)
            }
        }
        impl Lend for $t {
            type Lent<'a> = $t;
            fn lend(&self) -> $t {
                *self
            }
        }
    )+};
}

plain_args!(f32, i32, bool, Option<f32>);

/// [`Wrap`] for tuples of results, element by element.
macro_rules! wrap_tuples {
    ($(($($t:ident),+)),+) => {$(
        impl<$($t: Wrap),+> Wrap for ($($t,)+) {
            type Py = ($($t::Py,)+);
            #[allow(non_snake_case)]
            fn wrap(self) -> Self::Py {
                let ($($t,)+) = self;
                ($($t.wrap(),)+)
            }
        }
    )+};
}

wrap_tuples!((A, B), (A, B, C), (A, B, C, D));

/// The gradients of `gated_delta_update`: `(dq, dk, dv, dgamma, dbeta, dstate0 | None)`.
type GatedDeltaGradsPy = (Tensor, Tensor, Tensor, Tensor, Tensor, Option<Tensor>);

impl Wrap for fast::GatedDeltaGrads {
    type Py = GatedDeltaGradsPy;
    fn wrap(self) -> GatedDeltaGradsPy {
        (
            self.dq.wrap(),
            self.dk.wrap(),
            self.dv.wrap(),
            self.dgamma.wrap(),
            self.dbeta.wrap(),
            self.dstate0.wrap(),
        )
    }
}

/// The offset argument of rope: an int, or an integer array.
enum Offset {
    Int(i64),
    Array(Array),
}

/// Rope's offset, the one op argument that Python passes as any object.
impl Arg for &Bound<'_, PyAny> {
    type Owned = Offset;
    fn owned(self) -> PyResult<Offset> {
        if let Ok(t) = self.cast::<Tensor>() {
            return Ok(Offset::Array(arr(t)?));
        }
        self.extract::<i64>()
            .map(Offset::Int)
            .map_err(|_| PyValueError::new_err("[rope] offset must be an int or an integer array."))
    }
}

impl Lend for Offset {
    type Lent<'a> = RopeOffset<'a>;
    fn lend(&self) -> RopeOffset<'_> {
        match self {
            Offset::Int(v) => RopeOffset::Int(*v),
            Offset::Array(a) => RopeOffset::Array(a),
        }
    }
}

/// The mask argument: None, `"causal"` (any other string is MLX's error), or an array.
enum MaskIn {
    None,
    Causal,
    Array(Array),
}

/// Attention's mask, the one op argument that Python passes as any object or None.
impl Arg for Option<&Bound<'_, PyAny>> {
    type Owned = MaskIn;
    fn owned(self) -> PyResult<MaskIn> {
        let Some(mask) = self else {
            return Ok(MaskIn::None);
        };
        if let Ok(t) = mask.cast::<Tensor>() {
            return Ok(MaskIn::Array(arr(t)?));
        }
        let s: String = mask.extract().map_err(|_| {
            PyValueError::new_err(
                "[scaled_dot_product_attention] mask must be None, 'causal' or an array.",
            )
        })?;
        match Mask::parse(&s).map_err(to_py)? {
            Mask::Causal => Ok(MaskIn::Causal),
            _ => Ok(MaskIn::None),
        }
    }
}

impl Lend for MaskIn {
    type Lent<'a> = Mask<'a>;
    fn lend(&self) -> Mask<'_> {
        match self {
            MaskIn::None => Mask::None,
            MaskIn::Causal => Mask::Causal,
            MaskIn::Array(a) => Mask::Array(a),
        }
    }
}

/// One `#[pyfunction]` per `fn name(args) -> Out;`, taking the positional arguments of
/// `ferrofast::fast::name` in its order: each converted with the GIL held, in that order
/// ([`Arg`]), the op run without the GIL, its arrays wrapped ([`Wrap`]).
macro_rules! ops {
    ($($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),+ $(,)?) -> $out:ty;)+) => {$(
        $(#[$attr])*
        #[pyfunction]
        #[pyo3(signature = ($($arg),+))]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        pub fn $name(py: Python<'_>, $($arg: $ty),+) -> PyResult<$out> {
            $(let $arg = Arg::owned($arg)?;)+
            call(py, move || fast::$name($(Lend::lend(&$arg)),+))
        }
    )+};
}

ops! {
    /// `rms_norm(x, weight, eps)`.
    fn rms_norm(x: &Bound<'_, Tensor>, weight: Option<&Bound<'_, Tensor>>, eps: f32) -> Tensor;

    /// `rms_norm_vjp(x, weight, eps, cotangent) -> (dx, dweight | None)`.
    fn rms_norm_vjp(x: &Bound<'_, Tensor>, weight: Option<&Bound<'_, Tensor>>, eps: f32,
        cotangent: &Bound<'_, Tensor>) -> (Tensor, Option<Tensor>);

    /// `layer_norm(x, weight, bias, eps)`.
    fn layer_norm(x: &Bound<'_, Tensor>, weight: Option<&Bound<'_, Tensor>>,
        bias: Option<&Bound<'_, Tensor>>, eps: f32) -> Tensor;

    /// `layer_norm_vjp(x, weight, bias, eps, cotangent) -> (dx, dweight | None, dbias | None)`.
    fn layer_norm_vjp(x: &Bound<'_, Tensor>, weight: Option<&Bound<'_, Tensor>>,
        bias: Option<&Bound<'_, Tensor>>, eps: f32, cotangent: &Bound<'_, Tensor>)
        -> (Tensor, Option<Tensor>, Option<Tensor>);

    /// `rope(a, dims, traditional, base, scale, offset, freqs)`.
    fn rope(a: &Bound<'_, Tensor>, dims: i32, traditional: bool, base: Option<f32>, scale: f32,
        offset: &Bound<'_, PyAny>, freqs: Option<&Bound<'_, Tensor>>) -> Tensor;

    /// `rope_vjp(cotangent, dims, traditional, base, scale, offset, freqs)`.
    fn rope_vjp(cotangent: &Bound<'_, Tensor>, dims: i32, traditional: bool, base: Option<f32>,
        scale: f32, offset: &Bound<'_, PyAny>, freqs: Option<&Bound<'_, Tensor>>) -> Tensor;

    /// `scaled_dot_product_attention(q, k, v, scale, mask, sinks)`.
    fn scaled_dot_product_attention(q: &Bound<'_, Tensor>, k: &Bound<'_, Tensor>,
        v: &Bound<'_, Tensor>, scale: f32, mask: Option<&Bound<'_, PyAny>>,
        sinks: Option<&Bound<'_, Tensor>>) -> Tensor;

    /// `scaled_dot_product_attention_with_lse(q, k, v, scale, mask, sinks) -> (out, lse)`.
    fn scaled_dot_product_attention_with_lse(q: &Bound<'_, Tensor>, k: &Bound<'_, Tensor>,
        v: &Bound<'_, Tensor>, scale: f32, mask: Option<&Bound<'_, PyAny>>,
        sinks: Option<&Bound<'_, Tensor>>) -> (Tensor, Tensor);

    /// `scaled_dot_product_attention_vjp(q, k, v, scale, mask, sinks, out, lse, d_out)
    /// -> (dq, dk, dv, dsinks | None)`.
    fn scaled_dot_product_attention_vjp(q: &Bound<'_, Tensor>, k: &Bound<'_, Tensor>,
        v: &Bound<'_, Tensor>, scale: f32, mask: Option<&Bound<'_, PyAny>>,
        sinks: Option<&Bound<'_, Tensor>>, out: &Bound<'_, Tensor>, lse: &Bound<'_, Tensor>,
        d_out: &Bound<'_, Tensor>) -> (Tensor, Tensor, Tensor, Option<Tensor>);

    /// `merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)`: two attention
    /// results over disjoint key sets, with their log-sum-exps, merged into the result over
    /// all the keys (`fast::merge_attention_states`, whose checks and messages it keeps).
    fn merge_attention_states(out_a: &Bound<'_, Tensor>, lse_a: &Bound<'_, Tensor>,
        out_b: &Bound<'_, Tensor>, lse_b: &Bound<'_, Tensor>) -> (Tensor, Tensor);

    /// `gated_delta_update(q, k, v, gamma, beta, initial_state, mask) -> (out, state)`.
    fn gated_delta_update(q: &Bound<'_, Tensor>, k: &Bound<'_, Tensor>, v: &Bound<'_, Tensor>,
        gamma: &Bound<'_, Tensor>, beta: &Bound<'_, Tensor>,
        initial_state: Option<&Bound<'_, Tensor>>, mask: Option<&Bound<'_, Tensor>>)
        -> (Tensor, Tensor);

    /// `gated_delta_update_vjp(q, k, v, gamma, beta, initial_state, mask, d_out, d_state)
    /// -> (dq, dk, dv, dgamma, dbeta, dstate0 | None)`.
    fn gated_delta_update_vjp(q: &Bound<'_, Tensor>, k: &Bound<'_, Tensor>,
        v: &Bound<'_, Tensor>, gamma: &Bound<'_, Tensor>, beta: &Bound<'_, Tensor>,
        initial_state: Option<&Bound<'_, Tensor>>, mask: Option<&Bound<'_, Tensor>>,
        d_out: &Bound<'_, Tensor>, d_state: Option<&Bound<'_, Tensor>>) -> GatedDeltaGradsPy;
}

// ----- cross_entropy -------------------------------------------------------------------------

fn ce_options(
    ignore_index: Option<i64>,
    label_smoothing: f32,
    z_loss: f32,
    reduction: &str,
) -> PyResult<CrossEntropyOptions> {
    let reduction = match reduction {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => {
            return Err(PyValueError::new_err(format!(
                "[cross_entropy] reduction must be 'none', 'sum' or 'mean' but got '{other}'."
            )))
        }
    };
    Ok(CrossEntropyOptions {
        ignore_index,
        label_smoothing,
        z_loss,
        reduction,
    })
}

/// One `#[pyfunction]` per cross-entropy op: its arrays, then the options as four positional
/// arguments (`ignore_index, label_smoothing, z_loss, reduction`), checked ([`ce_options`])
/// before `body` runs with them as `opts`.
macro_rules! cross_entropy_ops {
    ($($(#[$attr:meta])* fn $name:ident($py:ident, $($arg:ident),+; $opts:ident) -> $out:ty
        $body:block)+) => {$(
        $(#[$attr])*
        #[pyfunction]
        #[pyo3(signature = ($($arg,)+ ignore_index, label_smoothing, z_loss, reduction))]
        #[allow(clippy::too_many_arguments)]
        pub fn $name(
            $py: Python<'_>,
            $($arg: &Bound<'_, Tensor>,)+
            ignore_index: Option<i64>,
            label_smoothing: f32,
            z_loss: f32,
            reduction: &str,
        ) -> PyResult<$out> {
            let $opts = ce_options(ignore_index, label_smoothing, z_loss, reduction)?;
            $body
        }
    )+};
}

cross_entropy_ops! {
    /// `cross_entropy_with(logits, targets, ignore_index, label_smoothing, z_loss, reduction)`
    /// (MLX's `cross_entropy` is the defaults: `None, 0.0, 0.0, "none"`).
    fn cross_entropy_with(py, logits, targets; opts) -> Tensor {
        let (x, t) = (arr(logits)?, arr(targets)?);
        call(py, move || fast::cross_entropy_with(&x, &t, &opts))
    }

    /// `cross_entropy_vjp(logits, targets, cotangent, ignore_index, label_smoothing, z_loss,
    /// reduction) -> dlogits`.
    fn cross_entropy_vjp(py, logits, targets, cotangent; opts) -> Tensor {
        let (x, t, g) = (arr(logits)?, arr(targets)?, arr(cotangent)?);
        call(py, move || fast::cross_entropy_vjp(&x, &t, &opts, &g))
    }

    /// `cross_entropy_fused(logits, targets, ignore_index, label_smoothing, z_loss, reduction)
    /// -> (loss, dlogits)`.
    fn cross_entropy_fused(py, logits, targets; opts) -> (Tensor, Tensor) {
        let (x, t) = (arr(logits)?, arr(targets)?);
        call(py, move || fast::cross_entropy_fused(&x, &t, &opts))
    }

    /// `cross_entropy_fused_in_place(logits, targets, ignore_index, label_smoothing, z_loss,
    /// reduction) -> loss`: writes `dlogits` over the logits' memory (see
    /// `fast::cross_entropy_fused_in_place_external`). `logits` must be a `Tensor` whose memory
    /// may be written ([`Tensor::writable`]: a result, or a producer's memory shared without a
    /// copy and not exported read-only); the `Tensor` gives its array up to the call and is
    /// empty afterwards. `ferrofast/fast.py` makes one for the call from a NumPy array, a
    /// PyTorch tensor or a CuPy array whose writability and address it checked.
    fn cross_entropy_fused_in_place(py, logits, targets; opts) -> Tensor {
        if !logits.get().writable() {
            return Err(PyValueError::new_err(
                "[cross_entropy] The in-place pass writes the logits, but they are read-only or \
                 were copied on the way in (a read-only or misaligned array).",
            ));
        }
        let t = arr(targets)?;
        let x = logits.get().take()?;
        let (loss, _dx) = run(py, move || {
            // SAFETY: the logits' memory may be written (`Tensor::writable`: ferrofast's own
            // buffer, or a producer's memory shared without a copy and not exported read-only),
            // and the caller lends it for this call: the Python API (`fast.py`) documents that
            // nobody else reads or writes the logits during the call, as for every input, and
            // refuses producers whose arrays are immutable (JAX). On a GPU the write is queued
            // on the producer's current stream, where its later work is ordered after it.
            unsafe { fast::cross_entropy_fused_in_place_external(x, &t, &opts) }
        })?;
        Ok(loss.wrap())
    }
}
