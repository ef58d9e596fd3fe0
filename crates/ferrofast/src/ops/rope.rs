//! [`RopeArgs`]: a validated `rope` call, and the public [`RopeOffset`] and [`RopeOptions`]
//! arguments.

use crate::array::{fmt_shape, host_pool};
use crate::{Array, DType, Device, Error, Result};

/// The position offset of [`rope`](crate::fast::rope): a plain integer, or an integer array holding either one
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

/// The optional arguments of [`rope`](crate::fast::rope), for
/// [`rope_with`](crate::fast::rope_with).
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

/// Where the rotation frequencies come from, as validated.
#[derive(Clone, Debug)]
pub(crate) enum RopeFreqs {
    /// `inv_freq_i = base^(-i / (dims/2))`.
    Base(f32),
    /// `inv_freq_i = 1 / periods[i]`; the values as given (the kernels round them to their
    /// compute precision).
    Periods(Vec<f64>),
    /// The periods as a row-major float32 array of length `dims / 2` (offset 0) on the GPU
    /// that holds the input: a `freqs` array that lives there, cast there (MLX rounds the
    /// periods to float32 too) and never read on the host.
    Device(Array),
}

/// Position offsets, as validated and converted (MLX's int32 casts applied).
#[derive(Clone, Debug)]
pub(crate) enum RopeOffsets {
    /// One offset for every batch example.
    Scalar(i64),
    /// One offset per batch example (length `B`, `B != 1`).
    PerBatch(Vec<i64>),
    /// One offset per batch example, as a row-major int64 array of length `B` (offset 0) on
    /// the GPU that holds the input: an offset array that lives there, converted there with
    /// MLX's int32 rule and never read on the host (reading it would wait for the GPU).
    Device(Array),
}

impl RopeOffsets {
    /// The offset of batch example `b` of host offsets; [`RopeOffsets::Device`] offsets are
    /// first brought over with [`RopeOffsets::to_host`] (this returns 0 for them).
    pub(crate) fn get(&self, b: usize) -> i64 {
        match self {
            RopeOffsets::Scalar(v) => *v,
            RopeOffsets::PerBatch(v) => v.get(b).copied().unwrap_or(0),
            RopeOffsets::Device(_) => 0,
        }
    }

    /// The offsets with their values on the host (a copy from the GPU for
    /// [`RopeOffsets::Device`], which waits for the work producing them).
    ///
    /// # Errors
    /// GPU read errors.
    pub(crate) fn to_host(&self) -> Result<RopeOffsets> {
        match self {
            RopeOffsets::Device(o) => Ok(RopeOffsets::PerBatch(o.to_vec::<i64>()?)),
            host => Ok(host.clone()),
        }
    }
}

/// A validated `rope` call: what every back end (and the reference) computes from. The
/// output has `x`'s shape and dtype.
#[derive(Clone, Debug)]
pub(crate) struct RopeArgs {
    /// The input, at least 3-D, floating, any strides.
    pub(crate) x: Array,
    /// Where `x` lives (the offset and `freqs` values are read to the host).
    pub(crate) device: Device,
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

impl RopeArgs {
    /// Validates a `rope` call on `a` with `dims` and `options` in MLX's order with MLX's
    /// messages and reads the offset and `freqs` values.
    ///
    /// # Errors
    /// `Error::InvalidArgument` with MLX's texts (see [`crate::fast::rope`]).
    pub(crate) fn new(a: &Array, dims: i32, options: &RopeOptions<'_>) -> Result<RopeArgs> {
        let (base, offset, freqs) = (options.base, options.offset, options.freqs);
        // MLX checks base and freqs before anything else (spec §4.2).
        match (base, freqs) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "[rope] Only one of base or freqs can have a value.",
                ))
            }
            (None, None) => {
                return Err(Error::invalid("[rope] Neither base nor freqs has a value."))
            }
            _ => {}
        }
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
        if let RopeOffset::Array(o) = offset {
            check_offsets(o, batch)?;
        }
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
        // Every check has passed: read the values (which can only fail for memory).
        let freqs = match (base, freqs) {
            (_, Some(f)) if f.device() == a.device() && !a.device().is_cpu() => {
                let c = f.astype(DType::F32)?;
                RopeFreqs::Device(if c.is_contiguous() && c.offset() == 0 {
                    c
                } else {
                    c.copy()?
                })
            }
            (_, Some(f)) => RopeFreqs::Periods(f.to_f64_vec()?),
            (Some(b), None) => RopeFreqs::Base(b),
            (None, None) => {
                return Err(Error::invalid("[rope] Neither base nor freqs has a value."))
            }
        };
        let offsets = match offset {
            RopeOffset::Int(v) => RopeOffsets::Scalar(v),
            RopeOffset::Array(o) if o.device() == a.device() && !a.device().is_cpu() => {
                RopeOffsets::Device(device_offsets(o, batch)?)
            }
            RopeOffset::Array(o) => read_offsets(o)?,
        };
        Ok(RopeArgs {
            x: a.clone(),
            device: a.device(),
            dims,
            traditional: options.traditional,
            scale: options.scale,
            freqs,
            offsets,
        })
    }
}

/// Checks an offset array: rank, size, dtype, in MLX's order.
fn check_offsets(o: &Array, batch: usize) -> Result<()> {
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
    match o.dtype() {
        DType::I32 | DType::U32 | DType::U8 | DType::I64 => Ok(()),
        other => Err(Error::invalid(format!(
            "[rope] offset must be an integer but got type {other}."
        ))),
    }
}

/// An offset array that passed [`check_offsets`] and lives on the GPU, as
/// [`RopeOffsets::Device`] needs it: converted there with MLX's rule (4-byte integers kept,
/// every other integer type cast to int32), widened to int64 and broadcast to `batch`
/// elements, in a new row-major buffer.
fn device_offsets(o: &Array, batch: usize) -> Result<Array> {
    let wide = match o.dtype() {
        DType::I64 => o.astype(DType::I32)?.astype(DType::I64)?,
        DType::I32 | DType::U32 | DType::U8 => o.astype(DType::I64)?,
        other => {
            return Err(Error::invalid(format!(
                "[rope] offset must be an integer but got type {other}."
            )))
        }
    };
    // `wide` is a new row-major buffer: a size-`batch` one serves as it is.
    let flat = wide.reshape(&[wide.size()])?;
    if flat.size() == batch {
        Ok(flat)
    } else {
        flat.broadcast_to(&[batch])?.copy()
    }
}

/// Reads the values of an offset array that passed [`check_offsets`].
fn read_offsets(o: &Array) -> Result<RopeOffsets> {
    // MLX keeps 4-byte integers and casts every other integer dtype to int32.
    let values: Vec<i64> = match o.dtype() {
        DType::I32 => host_pool::map(&o.to_vec::<i32>()?, i64::from)?,
        DType::U32 => host_pool::map(&o.to_vec::<u32>()?, i64::from)?,
        DType::U8 => host_pool::map(&o.to_vec::<u8>()?, i64::from)?,
        DType::I64 => host_pool::map(&o.to_vec::<i64>()?, |v| i64::from(v as i32))?,
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
