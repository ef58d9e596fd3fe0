//! `rope`: rotary positional embedding (MLX `mx.fast.rope`), forward.
//!
//! The front end validates the arguments in MLX's order with MLX's messages, reads the offset
//! (and `freqs`) values into a [`RopePlan`], and dispatches on the input's device.

use crate::array::fmt_shape;
use crate::{Array, DType, Device, Error, Result};

/// The position offset of [`rope`]: a plain integer, or an integer array holding either one
/// value (0-d or one element) or one value per batch example (1-D of length `B`).
///
/// `Int` plays the part of a Python `int`: its value is used exactly. Array offsets follow
/// MLX: `int32` and `uint32` values are used as they are, every other integer dtype is first
/// cast to `int32` (as a C cast, so `int64` values outside the `int32` range wrap).
#[derive(Clone, Copy, Debug)]
pub enum RopeOffset<'a> {
    /// One offset shared by every batch example.
    Int(i64),
    /// An integer array of size 1 (shared) or of size `B` (one per batch example).
    Array(&'a Array),
}

impl From<i64> for RopeOffset<'_> {
    fn from(v: i64) -> Self {
        RopeOffset::Int(v)
    }
}

impl From<i32> for RopeOffset<'_> {
    fn from(v: i32) -> Self {
        RopeOffset::Int(i64::from(v))
    }
}

impl<'a> From<&'a Array> for RopeOffset<'a> {
    fn from(a: &'a Array) -> Self {
        RopeOffset::Array(a)
    }
}

/// The optional arguments of [`rope`], for [`rope_with`].
///
/// `Default` gives MLX's usual call: half-split pairs, `base = 10000`, `scale = 1`,
/// `offset = 0`, no `freqs`. To pass `freqs`, also set `base: None` (MLX rejects both).
#[derive(Clone, Copy, Debug)]
pub struct RopeOptions<'a> {
    /// Rotate adjacent pairs `(2i, 2i+1)` instead of the half-split pairs `(i, i + dims/2)`.
    pub traditional: bool,
    /// Base of the geometric frequencies; exclusive with `freqs`.
    pub base: Option<f32>,
    /// Multiplies every position.
    pub scale: f32,
    /// Position of the first token (see [`RopeOffset`]).
    pub offset: RopeOffset<'a>,
    /// Periods, one per rotated pair (1-D of length `dims / 2`); exclusive with `base`.
    pub freqs: Option<&'a Array>,
}

impl Default for RopeOptions<'_> {
    fn default() -> Self {
        RopeOptions {
            traditional: false,
            base: Some(10000.0),
            scale: 1.0,
            offset: RopeOffset::Int(0),
            freqs: None,
        }
    }
}

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
/// `Error::InvalidArgument` with MLX's text, checked in MLX's order: `a` has fewer than 3
/// dimensions or is not floating; an offset array has more than one dimension, a size other
/// than 1 or `B`, or a non-integer dtype; `dims` is not positive, odd, or larger than `D`;
/// `freqs` is not 1-D of size `dims / 2`; both or neither of `base` and `freqs` are given.
/// `Error::Unsupported` for f64 inputs on a CUDA device.
pub fn rope(
    a: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
) -> Result<Array> {
    let plan = rope_plan(a, dims, traditional, base, scale, offset, freqs)?;
    match a.device() {
        Device::Cpu => crate::cpu::rope::rope(a, &plan),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => rope_cuda(a, &plan),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(i) => Err(Error::CudaUnavailable(format!(
            "[rope] the input is on cuda:{i} but this build has no CUDA back end"
        ))),
    }
}

/// Runs a validated plan on the GPU (f32, f16, bf16; f64 is `Error::Unsupported`).
#[cfg(feature = "cuda")]
fn rope_cuda(a: &Array, plan: &RopePlan) -> Result<Array> {
    let periods: Vec<f32>;
    let freqs = match &plan.freqs {
        RopeFreqs::Base(b) => crate::cuda::RopeFreqs::Base(*b),
        RopeFreqs::Periods(p) => {
            periods = p.iter().map(|&v| v as f32).collect();
            crate::cuda::RopeFreqs::Periods(&periods)
        }
    };
    let offsets = match &plan.offsets {
        RopeOffsets::Scalar(v) => crate::cuda::RopeOffsets::Scalar(*v),
        RopeOffsets::PerBatch(v) => crate::cuda::RopeOffsets::PerBatch(v),
    };
    crate::cuda::rope(a, plan.dims, plan.traditional, freqs, plan.scale, offsets)
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
    rope(
        a,
        dims,
        options.traditional,
        options.base,
        options.scale,
        options.offset,
        options.freqs,
    )
}

/// Where the rotation frequencies come from, as validated.
#[derive(Clone, Debug)]
pub(crate) enum RopeFreqs {
    /// `inv_freq_i = base^(-i / (dims/2))`.
    Base(f32),
    /// `inv_freq_i = 1 / periods[i]`; the values as given (the kernels round them to their
    /// compute precision).
    Periods(Vec<f64>),
}

/// Position offsets, as validated and converted (MLX's int32 casts applied).
#[derive(Clone, Debug)]
pub(crate) enum RopeOffsets {
    /// One offset for every batch example.
    Scalar(i64),
    /// One offset per batch example (length `B`, `B != 1`).
    PerBatch(Vec<i64>),
}

impl RopeOffsets {
    /// The offset of batch example `b`.
    pub(crate) fn get(&self, b: usize) -> i64 {
        match self {
            RopeOffsets::Scalar(v) => *v,
            RopeOffsets::PerBatch(v) => v.get(b).copied().unwrap_or(0),
        }
    }
}

/// A validated `rope` call: what every back end (and the reference) computes from.
#[derive(Clone, Debug)]
pub(crate) struct RopePlan {
    /// Number of rotated features (even, `2 <= dims <= D`).
    pub(crate) dims: usize,
    /// Adjacent pairs instead of half-split pairs.
    pub(crate) traditional: bool,
    /// Position multiplier.
    pub(crate) scale: f32,
    /// Frequency source.
    pub(crate) freqs: RopeFreqs,
    /// Offsets.
    pub(crate) offsets: RopeOffsets,
}

/// Validates a `rope` call in MLX's order with MLX's messages and reads the offset and
/// `freqs` values.
pub(crate) fn rope_plan(
    a: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
) -> Result<RopePlan> {
    if a.ndim() < 3 {
        return Err(Error::invalid(format!(
            "[rope] Input must have at least 3 dimensions but got input with {} dimensions.",
            a.ndim()
        )));
    }
    if !a.dtype().is_floating() {
        return Err(Error::invalid(format!(
            "[rope] Input must be a floating type but got {}.",
            a.dtype()
        )));
    }
    let batch = a.shape()[0];
    let offsets = match offset {
        RopeOffset::Int(v) => RopeOffsets::Scalar(v),
        RopeOffset::Array(o) => read_offsets(o, batch)?,
    };
    let last = a.shape()[a.ndim() - 1];
    if dims <= 0 {
        return Err(Error::invalid(format!(
            "[rope] dims must be positive but got {dims}."
        )));
    }
    if dims % 2 != 0 {
        return Err(Error::invalid(format!(
            "[rope] dims must be even but got {dims}."
        )));
    }
    let dims = dims as usize;
    if dims > last {
        return Err(Error::invalid(format!(
            "[rope] dims must not exceed the input's last dimension ({last}) but got {dims}."
        )));
    }
    if let Some(f) = freqs {
        if f.ndim() != 1 || f.shape()[0] != dims / 2 {
            return Err(Error::invalid(format!(
                "[rope] freqs must be one dimensional with size {} but got shape {}.",
                dims / 2,
                fmt_shape(f.shape())
            )));
        }
    }
    let freqs = match (base, freqs) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "[rope] Only one of base or freqs can have a value.",
            ))
        }
        (None, None) => return Err(Error::invalid("[rope] Neither base nor freqs has a value.")),
        (Some(b), None) => RopeFreqs::Base(b),
        (None, Some(f)) => RopeFreqs::Periods(f.to_f64_vec()?),
    };
    Ok(RopePlan {
        dims,
        traditional,
        scale,
        freqs,
        offsets,
    })
}

/// Checks an offset array (rank, size, dtype, in MLX's order) and reads its values.
fn read_offsets(o: &Array, batch: usize) -> Result<RopeOffsets> {
    if o.ndim() > 1 {
        return Err(Error::invalid(format!(
            "[rope] offset must have at most one dimension but has shape {}.",
            fmt_shape(o.shape())
        )));
    }
    if o.size() != 1 && o.size() != batch {
        return Err(Error::invalid(format!(
            "[rope] offset must be a scalar or vector with {batch} elements but has shape {}.",
            fmt_shape(o.shape())
        )));
    }
    // MLX keeps 4-byte integers and casts every other integer dtype to int32.
    let values: Vec<i64> = match o.dtype() {
        DType::I32 => o.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        DType::U32 => o.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => o.to_vec::<u8>()?.into_iter().map(i64::from).collect(),
        DType::I64 => o
            .to_vec::<i64>()?
            .into_iter()
            .map(|v| i64::from(v as i32))
            .collect(),
        other => {
            return Err(Error::invalid(format!(
                "[rope] offset must be an integer but got type {other}."
            )))
        }
    };
    Ok(match values.as_slice() {
        [v] => RopeOffsets::Scalar(*v),
        _ => RopeOffsets::PerBatch(values),
    })
}
