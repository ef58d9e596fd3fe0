//! ferrofast's `Error` as Python exceptions.

use pyo3::exceptions::{PyMemoryError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// The exception for a ferrofast error, carrying its message unchanged (MLX's text for
/// argument errors):
///
/// - `InvalidArgument`, `Shape`, `DTypeMismatch`, `Device` (arguments on different devices
///   or a stream that does not fit them): `ValueError`, as MLX raises for bad arguments;
/// - `OutOfMemory`: `MemoryError`;
/// - `Unsupported` (valid, but this build or device cannot run it): `NotImplementedError`;
/// - `CudaUnavailable`, `Cuda`, `Compile` (driver and NVRTC failures): `RuntimeError`.
pub fn to_py(e: ferrofast::Error) -> PyErr {
    use ferrofast::Error as E;
    let msg = e.to_string();
    match e {
        E::InvalidArgument(_) | E::Shape(_) | E::DTypeMismatch { .. } | E::Device(_) => {
            PyValueError::new_err(msg)
        }
        E::OutOfMemory(_) => PyMemoryError::new_err(msg),
        E::Unsupported(_) => PyNotImplementedError::new_err(msg),
        E::CudaUnavailable(_) | E::Cuda(_) | E::Compile(_) => PyRuntimeError::new_err(msg),
    }
}
