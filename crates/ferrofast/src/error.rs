//! The crate's error type.

use std::fmt;

/// Everything that can go wrong in ferrofast. No public function panics on bad input: it
/// returns one of these.
///
/// `Display` prints the message alone. For argument errors this is MLX's own text (for
/// example `[rms_norm] Input must have at least 1 dimension but got input with 0 dimensions.`)
/// so users of MLX recognise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument is invalid: wrong rank, shape, dtype or value (MLX's `ValueError`).
    InvalidArgument(String),
    /// Shapes cannot be broadcast together, or a reshape/view does not fit the data.
    Shape(String),
    /// The requested dtype does not match the data (e.g. `to_vec::<f32>()` on an f16 array).
    DTypeMismatch {
        /// The array's dtype.
        expected: crate::DType,
        /// The dtype that was asked for.
        got: crate::DType,
    },
    /// Inputs live on different devices, or the operation is not available on this device.
    Device(String),
    /// CUDA was asked for but the driver or NVRTC library is missing, or there is no device.
    /// The message says what was searched.
    CudaUnavailable(String),
    /// A CUDA driver call failed (launch, copy, synchronisation).
    Cuda(String),
    /// Device memory is exhausted.
    OutOfMemory(String),
    /// NVRTC rejected a kernel; carries the compiler log.
    Compile(String),
    /// The operation is valid but this build or device cannot run it; says what would.
    Unsupported(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m)
            | Error::Shape(m)
            | Error::Device(m)
            | Error::CudaUnavailable(m)
            | Error::Cuda(m)
            | Error::OutOfMemory(m)
            | Error::Compile(m)
            | Error::Unsupported(m) => f.write_str(m),
            Error::DTypeMismatch { expected, got } => write!(
                f,
                "array has dtype {expected} but {got} was requested; use astype({got}) first"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
