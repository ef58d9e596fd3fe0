//! `rope`: rotary positional embedding (MLX `mx.fast.rope`), forward.
//!
//! The front end validates the arguments in MLX's order with MLX's messages, reads the offset
//! (and `freqs`) values into a `RopeArgs`, and dispatches on the input's device.

use super::{place, Place};
use crate::ops::rope::RopeArgs;
pub use crate::ops::rope::{RopeOffset, RopeOptions};
use crate::{Array, Result, Stream};

/// Validates a call on `x` with the options `o` and `scale` in place of `o.scale`.
fn with_options(x: &Array, dims: i32, o: &RopeOptions<'_>, scale: f32) -> Result<RopeArgs> {
    RopeArgs::new(x, dims, &RopeOptions { scale, ..*o })
}

with_on_form! {
    /// Rotary positional embedding, MLX's `mx.fast.rope(a, dims, traditional=, base=, scale=,
    /// offset=, freqs=)`.
    ///
    /// `a` has at least 3 dimensions, read as `(B, *, T, D)`: positions run along axis -2, axis 0
    /// is the batch (for per-example offsets) and every axis in between is a head axis. For pair
    /// `i < dims / 2` at position `t` of batch example `b` the angle is
    /// `theta = scale * (t + offset_b) * inv_freq_i` with `inv_freq_i = base^(-i / (dims/2))`, or
    /// `1 / freqs[i]` when `freqs` (periods) is given. The pair `(x1, x2)` — `(x[2i], x[2i+1])`
    /// when `traditional`, else `(x[i], x[i + dims/2])` — becomes
    /// `(x1 cos - x2 sin, x1 sin + x2 cos)`. Features `dims..D` pass through bit for bit. The
    /// result is row-major, of `a`'s shape and dtype; `a` may have any strides (it is read in
    /// place, never copied).
    ///
    /// Precision: as in MLX's fused GPU kernels, the angle, its cosine and sine and the rotation
    /// are computed in `f32` and each output is rounded once to the input dtype (MLX's CPU
    /// fallback rounds cos/sin to the input dtype first, so for `f16`/`bf16` this is more
    /// accurate than MLX on the CPU). `f64` inputs are computed entirely in `f64`, with `freqs`
    /// kept at full precision; for other inputs `freqs` is rounded to `f32` first, as MLX does.
    ///
    /// # Errors
    /// `Error::InvalidArgument` with MLX's text, checked in MLX's order: both or neither of
    /// `base` and `freqs` are given; `a` has fewer than 3 dimensions or is not floating; an
    /// offset array has more than one dimension, a size other than 1 or `B`, or a non-integer
    /// dtype; `dims` is not positive, odd, or larger than `D`; `freqs` is not 1-D of size
    /// `dims / 2`. `Error::OutOfMemory` when the offset or `freqs` values (read after every
    /// check) or the output do not fit in memory.
    /// `Error::Unsupported` for f64 inputs on a CUDA device; compile and driver errors there.
    pub fn rope(
        a: &Array,
        dims: i32,
        traditional: bool,
        base: Option<f32>,
        scale: f32,
        offset: RopeOffset<'_>,
        freqs: Option<&Array>,
    ) -> Result<Array>;

    /// [`rope`] on an explicit CUDA stream (MLX's `stream=` argument): the work is queued on
    /// `stream` instead of the stream that produced `a`.
    ///
    /// # Errors
    /// As [`rope`]; `Error::Device` when `a` is not on `stream`'s device.
    pub fn rope_on(stream: &Stream, ..);

    |stream| {
        let options = RopeOptions { traditional, base, scale, offset, freqs };
        run(&RopeArgs::new(a, dims, &options)?, stream)
    }
}

fn run(args: &RopeArgs, stream: Option<&Stream>) -> Result<Array> {
    match place("[rope]", args.device, &args.x, stream)? {
        Place::Cpu => crate::cpu::rope::run(args),
        Place::Cuda(stream) => crate::cuda::rope::run(args, &stream),
    }
}

with_on_form! {
    /// The backward pass of [`rope`] (MLX's `RoPE::vjp`): the gradient with respect to `a`
    /// given the `cotangent` of `rope`'s output, called with the same `dims`, `traditional`,
    /// `base`, `scale`, `offset` and `freqs` as the forward.
    ///
    /// The rotation is orthogonal, so the gradient is the inverse rotation of the cotangent:
    /// each pair `(g1, g2)` becomes `(g1 cos + g2 sin, g2 cos - g1 sin)` with the forward's
    /// angles, and features `dims..D` pass through. This is exactly [`rope`] with `-scale`, with
    /// the same kernels, precision and layouts. The result has the cotangent's shape and dtype
    /// (which are `a`'s for the cotangent of `rope(a, ...)`). There is no gradient for the
    /// offset or `freqs`: see [`rope_vjp_check_targets`].
    ///
    /// # Errors
    /// As [`rope`], with `cotangent` in the place of `a`.
    pub fn rope_vjp(
        cotangent: &Array,
        dims: i32,
        traditional: bool,
        base: Option<f32>,
        scale: f32,
        offset: RopeOffset<'_>,
        freqs: Option<&Array>,
    ) -> Result<Array>;

    /// [`rope_vjp`] on an explicit CUDA stream.
    ///
    /// # Errors
    /// As [`rope_vjp`]; `Error::Device` when `cotangent` is not on `stream`'s device.
    pub fn rope_vjp_on(stream: &Stream, ..);

    |stream| {
        let options = RopeOptions { traditional, base, scale, offset, freqs };
        run(&with_options(cotangent, dims, &options, -scale)?, stream)
    }
}

/// [`rope_vjp`] with the forward's optional arguments gathered in a [`RopeOptions`].
///
/// # Errors
/// As [`rope_vjp`].
pub fn rope_vjp_with(cotangent: &Array, dims: i32, options: &RopeOptions<'_>) -> Result<Array> {
    let args = with_options(cotangent, dims, options, -options.scale)?;
    run(&args, None)
}

/// For autodiff front ends: succeeds when only `a`'s gradient is asked of `rope`, and fails
/// with MLX's error when the offset's or `freqs`'s gradient is asked (the fused rope has
/// none, as in MLX).
///
/// # Errors
/// `Error::InvalidArgument("[RoPE::vjp] vjp for offset or frequencies not supported")` when
/// `wrt_offset` or `wrt_freqs`.
pub fn rope_vjp_check_targets(wrt_offset: bool, wrt_freqs: bool) -> Result<()> {
    if wrt_offset || wrt_freqs {
        return Err(crate::Error::invalid(
            "[RoPE::vjp] vjp for offset or frequencies not supported",
        ));
    }
    Ok(())
}

/// [`rope`] with its optional arguments gathered in a [`RopeOptions`].
///
/// ```
/// use ferrofast::{fast, Array, DType, Device};
///
/// let x = Array::randn(&[1, 8, 16, 64], DType::F32, 0, &Device::Cpu)?;
/// let y = fast::rope_with(&x, 64, &fast::RopeOptions { offset: 5.into(), ..Default::default() })?;
/// assert_eq!(y.shape(), x.shape());
/// # Ok::<(), ferrofast::Error>(())
/// ```
///
/// # Errors
/// As [`rope`].
pub fn rope_with(a: &Array, dims: i32, options: &RopeOptions<'_>) -> Result<Array> {
    run(&with_options(a, dims, options, options.scale)?, None)
}
