//! DLPack exchange: ferrofast arrays in and out of Python without copying.
//!
//! In: a `dltensor_versioned` (DLPack 1.x) or legacy `dltensor` capsule from a producer's
//! `__dlpack__` is consumed (renamed `used_...`) and its memory wrapped with
//! [`Array::from_external`]; the producer's deleter runs, with the GIL held, when the last
//! array viewing that memory is dropped. Dtypes ferrofast holds natively are shared as they
//! are; `bool` and the integer widths ferrofast has no type for (int8, int16, uint16, uint64)
//! are converted into a new buffer, as is memory not aligned to its element size.
//!
//! Out: `Tensor.__dlpack__` hands a result's host buffer to the consumer inside a capsule
//! that owns the `Array`; the consumer's deleter drops it.

use std::ffi::{c_void, CStr};
use std::sync::Mutex;

use ferrofast::{Array, DType, Device};
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::to_py;

// ----- the DLPack ABI (dlpack.h, version 1.0) ----------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_CUDA_HOST: i32 = 3;

const KDL_INT: u8 = 0;
const KDL_UINT: u8 = 1;
const KDL_FLOAT: u8 = 2;
const KDL_BFLOAT: u8 = 4;
const KDL_BOOL: u8 = 6;

/// `DLPACK_FLAG_BITMASK_READ_ONLY`: the consumer must not write the memory.
const FLAG_READ_ONLY: u64 = 1 << 0;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`: the exported memory is a copy made for this export.
const FLAG_IS_COPIED: u64 = 1 << 1;

const NAME_LEGACY: &CStr = c"dltensor";
const USED_LEGACY: &CStr = c"used_dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";
const USED_VERSIONED: &CStr = c"used_dltensor_versioned";

// ----- the Python-visible array ------------------------------------------------------------

/// A ferrofast array seen from Python: an op's input (wrapping a producer's memory) or its
/// result, exported once through `__dlpack__` (the export moves the array into the capsule,
/// so the consumer may write to it).
#[pyclass(frozen, module = "ferrofast._native", name = "Tensor")]
pub struct Tensor {
    array: Mutex<Option<Array>>,
    /// Whether writing the array's elements reaches memory its holder may write: a result
    /// (ferrofast's own buffer), or a producer's memory shared without a copy and not
    /// exported read-only. Only the in-place passes (`ops::cross_entropy_fused_in_place`)
    /// look at it; every other op only reads its inputs.
    writable: bool,
}

impl Tensor {
    /// Wraps an array ferrofast made (a result).
    pub fn new(array: Array) -> Tensor {
        Tensor {
            array: Mutex::new(Some(array)),
            writable: true,
        }
    }

    /// Wraps an imported array; `writable` as [`import_access`] tells.
    fn imported(array: Array, writable: bool) -> Tensor {
        Tensor {
            array: Mutex::new(Some(array)),
            writable,
        }
    }

    /// Whether an in-place pass may write the array's elements: see the field's doc.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Runs `f` on the array, or fails once it was exported.
    fn with<R>(&self, f: impl FnOnce(&mut Array) -> PyResult<R>) -> PyResult<R> {
        let mut guard = self
            .array
            .lock()
            .map_err(|_| PyRuntimeError::new_err("ferrofast Tensor lock poisoned"))?;
        match guard.as_mut() {
            Some(a) => f(a),
            None => Err(PyBufferError::new_err(
                "this ferrofast result was already exported through __dlpack__ (each result \
                 exports once; keep the array its consumer returned)",
            )),
        }
    }

    /// A clone of the array (a view of the same buffer), for an op to read.
    pub fn array(&self) -> PyResult<Array> {
        self.with(|a| Ok(a.clone()))
    }

    /// Moves the array out (the `Tensor` is empty afterwards), for a call that must hold the
    /// only handle on it.
    pub fn take(&self) -> PyResult<Array> {
        let mut guard = self
            .array
            .lock()
            .map_err(|_| PyRuntimeError::new_err("ferrofast Tensor lock poisoned"))?;
        guard.take().ok_or_else(|| {
            PyBufferError::new_err("this ferrofast result was already exported through __dlpack__")
        })
    }
}

#[pymethods]
impl Tensor {
    /// The dimensions.
    #[getter]
    fn shape(&self) -> PyResult<Vec<usize>> {
        self.with(|a| Ok(a.shape().to_vec()))
    }

    /// Strides in elements.
    #[getter]
    fn strides(&self) -> PyResult<Vec<isize>> {
        self.with(|a| Ok(a.strides().to_vec()))
    }

    /// MLX's dtype name (`"float32"`, `"bfloat16"`, ...).
    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        self.with(|a| Ok(a.dtype().name()))
    }

    /// Address of the first element, in host memory or on the GPU (what a DLPack export
    /// hands out when no copy is needed); for an input, the producer's own address.
    #[getter]
    fn data_ptr(&self) -> PyResult<usize> {
        self.with(|a| {
            let p = match a.cuda_ptr() {
                Some(p) => usize::try_from(p).ok(),
                None => a.host_ptr().map(|p| p as usize),
            };
            p.ok_or_else(|| PyValueError::new_err("the array's address is not available"))
        })
    }

    /// Where the data lives: `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> PyResult<String> {
        self.with(|a| Ok(a.device().to_string()))
    }

    /// The CUDA stream (`CUstream` as an int) whose work produces a GPU array; `None` on the
    /// CPU.
    #[getter]
    fn stream(&self) -> PyResult<Option<usize>> {
        self.with(|a| Ok(a.stream().map(|s| s.as_raw() as usize)))
    }

    /// The DLPack producer protocol. `max_version >= (1, 0)` gives a `dltensor_versioned`
    /// capsule, else a legacy `dltensor` one. The buffer is handed over without a copy when
    /// this result holds it alone (every op result does); `copy=True` always copies,
    /// `copy=False` refuses to. `dl_device` must be where the data lives. For a GPU array,
    /// `stream` is the consumer's stream (DLPack's convention: `None` or 1 the legacy default
    /// stream, 2 the per-thread default stream, -1 no ordering, else a `CUstream`): it is made
    /// to wait, on the GPU, for the work producing the array; host memory ignores it.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<&Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let here = self.with(|a| Ok(dl_device_of(a)))?;
        if let Some((kind, id)) = dl_device {
            if (kind, id) != here {
                return Err(PyBufferError::new_err(format!(
                    "this ferrofast result lives on DLPack device {here:?}; cannot export to \
                     device ({kind}, {id})"
                )));
            }
        }
        let consumer =
            match stream {
                None => None,
                Some(s) => Some(s.extract::<i64>().map_err(|_| {
                    PyValueError::new_err("__dlpack__: stream must be an int or None")
                })?),
            };
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        let array = self.take()?;
        let consumer = match array.device() {
            Device::Cpu => None,
            device => consumer_stream(&device, consumer)?,
        };
        export(py, array, versioned, copy, false, consumer)
    }

    /// `(device_type, device_id)` of the data: `(1, 0)` for the CPU, `(2, N)` for CUDA
    /// device N.
    fn __dlpack_device__(&self) -> PyResult<(i32, i32)> {
        self.with(|a| Ok(dl_device_of(a)))
    }

    /// As `__dlpack__`, but a bfloat16 array is labelled uint16 (same bits), for consumers
    /// without a bfloat16 type (NumPy: view the result as `ml_dtypes.bfloat16`).
    #[pyo3(signature = (*, max_version=None))]
    fn _dlpack_bits(&self, py: Python<'_>, max_version: Option<(u32, u32)>) -> PyResult<Py<PyAny>> {
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        export(py, self.take()?, versioned, None, true, None)
    }

    fn __repr__(&self) -> PyResult<String> {
        self.with(|a| {
            Ok(format!(
                "ferrofast._native.Tensor(shape={:?}, dtype={})",
                a.shape(),
                a.dtype()
            ))
        })
    }
}

// ----- import --------------------------------------------------------------------------

/// A consumed DLPack tensor: calls its producer's deleter, with the GIL held (NumPy's and
/// PyTorch's deleters touch Python objects), when dropped.
struct Imported {
    managed: *mut c_void,
    versioned: bool,
}

// SAFETY: `managed` is only used once, by `Drop`, which takes the GIL before calling the
// producer's deleter; DLPack allows the deleter to be called from any thread.
unsafe impl Send for Imported {}
// SAFETY: no method reads `managed` through a shared reference.
unsafe impl Sync for Imported {}

impl Drop for Imported {
    fn drop(&mut self) {
        let managed = self.managed;
        let versioned = self.versioned;
        Python::attach(|_| {
            // SAFETY: `managed` is the capsule's DLManagedTensor(Versioned), which this value
            // took over when it renamed the capsule `used_...`; DLPack makes the consumer
            // call the deleter exactly once, which happens here, after every array reading
            // the memory is gone (this is the `from_external` owner).
            unsafe {
                if versioned {
                    let m = managed.cast::<DLManagedTensorVersioned>();
                    if let Some(deleter) = (*m).deleter {
                        deleter(m);
                    }
                } else {
                    let m = managed.cast::<DLManagedTensor>();
                    if let Some(deleter) = (*m).deleter {
                        deleter(m);
                    }
                }
            }
        });
    }
}

/// How a DLPack dtype becomes a ferrofast one.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Shared as it is (copied only when misaligned).
    Direct(DType),
    /// Bytes read as `!= 0` into a new bool buffer (a bool array is never shared: any byte
    /// but 0 or 1 would be an invalid `bool`).
    Bool,
    /// int8, widened into a new int32 buffer.
    I8,
    /// int16, widened into a new int32 buffer.
    I16,
    /// uint16, widened into a new int32 buffer.
    U16,
    /// uint64, into a new int64 buffer (values past `i64::MAX` saturate).
    U64,
}

fn source_of(dt: DLDataType, bf16_from_u16: bool) -> PyResult<Source> {
    if dt.lanes != 1 {
        return Err(PyValueError::new_err(format!(
            "ferrofast accepts scalar element types only; got a DLPack dtype with {} lanes",
            dt.lanes
        )));
    }
    Ok(match (dt.code, dt.bits) {
        (KDL_FLOAT, 16) => Source::Direct(DType::F16),
        (KDL_FLOAT, 32) => Source::Direct(DType::F32),
        (KDL_FLOAT, 64) => Source::Direct(DType::F64),
        (KDL_BFLOAT, 16) => Source::Direct(DType::BF16),
        (KDL_UINT, 16) if bf16_from_u16 => Source::Direct(DType::BF16),
        (KDL_INT, 32) => Source::Direct(DType::I32),
        (KDL_INT, 64) => Source::Direct(DType::I64),
        (KDL_UINT, 32) => Source::Direct(DType::U32),
        (KDL_UINT, 8) => Source::Direct(DType::U8),
        (KDL_BOOL, 8) => Source::Bool,
        (KDL_INT, 8) => Source::I8,
        (KDL_INT, 16) => Source::I16,
        (KDL_UINT, 16) => Source::U16,
        (KDL_UINT, 64) => Source::U64,
        (code, bits) => {
            let kind = match code {
                KDL_INT => "int",
                KDL_UINT => "uint",
                KDL_FLOAT => "float",
                KDL_BFLOAT => "bfloat",
                5 => "complex",
                KDL_BOOL => "bool",
                _ => "code",
            };
            return Err(PyValueError::new_err(format!(
                "ferrofast does not handle the DLPack dtype {kind}{bits} (type code {code}); \
                 floating inputs may be float16, bfloat16, float32 or float64"
            )));
        }
    })
}

/// The array behind a DLPack capsule, consuming it. Host memory is shared (no copy) for
/// float16/bfloat16/float32/float64, int32/int64/uint32/uint8 data aligned to its element
/// size; bool and other integer widths are converted into a new buffer. With
/// `bf16_from_u16`, uint16 data is read as bfloat16 bits (NumPy arrays of `ml_dtypes`'
/// bfloat16, exported as uint16 views).
///
/// CUDA memory (DLPack device type 2) is always shared: the dtypes above and bool (one byte,
/// 0 or 1, as every producer writes it) aligned to the element size; other integer widths
/// and unaligned data are refused with a `ValueError` (the capsule is then not consumed).
/// The array is produced on `stream`, the `CUstream` (an int; 0 or `None` the legacy
/// default stream) the producer was asked to make the data ready on, so ferrofast's work
/// on it is queued there and its results are allocated there.
pub fn import(
    capsule: &Bound<'_, PyAny>,
    bf16_from_u16: bool,
    stream: Option<usize>,
) -> PyResult<Array> {
    import_access(capsule, bf16_from_u16, stream).map(|(a, _)| a)
}

/// [`import`], and whether the array views the producer's memory itself (no copy was made)
/// and the producer did not export it read-only (DLPack 1.x's `READ_ONLY` flag; a legacy
/// capsule cannot say, and producers of legacy capsules that cannot flag read-only memory,
/// such as older NumPy, refuse to export it).
fn import_access(
    capsule: &Bound<'_, PyAny>,
    bf16_from_u16: bool,
    stream: Option<usize>,
) -> PyResult<(Array, bool)> {
    let obj = capsule.as_ptr();
    // SAFETY: `obj` is a live object (borrowed through `capsule`) and the GIL is held;
    // `PyCapsule_IsValid` accepts any object and sets no error.
    let versioned = unsafe {
        if ffi::PyCapsule_IsValid(obj, NAME_VERSIONED.as_ptr()) == 1 {
            true
        } else if ffi::PyCapsule_IsValid(obj, NAME_LEGACY.as_ptr()) == 1 {
            false
        } else {
            return Err(PyValueError::new_err(
                "expected an unconsumed DLPack capsule ('dltensor' or 'dltensor_versioned'), \
                 as returned by an array's __dlpack__()",
            ));
        }
    };
    let name = if versioned {
        NAME_VERSIONED
    } else {
        NAME_LEGACY
    };
    // SAFETY: as above; the capsule is valid under `name` (checked just before).
    let managed = unsafe { ffi::PyCapsule_GetPointer(obj, name.as_ptr()) };
    if managed.is_null() {
        return Err(PyErr::take(capsule.py())
            .unwrap_or_else(|| PyValueError::new_err("DLPack capsule holds a null pointer")));
    }
    // SAFETY: DLPack's contract for a capsule of this name: it points at a live
    // DLManagedTensorVersioned / DLManagedTensor owned by the capsule until consumed.
    let (tensor, version, read_only) = unsafe {
        if versioned {
            let m = &*managed.cast::<DLManagedTensorVersioned>();
            (&m.dl_tensor, Some(m.version), m.flags & FLAG_READ_ONLY != 0)
        } else {
            let m = &*managed.cast::<DLManagedTensor>();
            (&m.dl_tensor, None, false)
        }
    };
    if let Some(v) = version {
        if v.major != 1 {
            return Err(PyBufferError::new_err(format!(
                "DLPack version {}.{} is not supported (ferrofast reads 1.x)",
                v.major, v.minor
            )));
        }
    }
    let cuda = match tensor.device.device_type {
        KDL_CPU | KDL_CUDA_HOST => None,
        KDL_CUDA => Some(usize::try_from(tensor.device.device_id).map_err(|_| {
            PyValueError::new_err(format!(
                "DLPack tensor on CUDA device {}",
                tensor.device.device_id
            ))
        })?),
        other => {
            return Err(PyValueError::new_err(format!(
                "ferrofast takes host (CPU) and CUDA arrays; got DLPack device type {other}"
            )))
        }
    };
    let source = source_of(tensor.dtype, bf16_from_u16)?;
    let ndim = usize::try_from(tensor.ndim)
        .map_err(|_| PyValueError::new_err("DLPack tensor with a negative ndim"))?;
    let shape_raw: &[i64] = if ndim == 0 {
        &[]
    } else if tensor.shape.is_null() {
        return Err(PyValueError::new_err("DLPack tensor without a shape"));
    } else {
        // SAFETY: DLPack: `shape` points at `ndim` values, valid while the tensor lives.
        unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }
    };
    let shape = shape_raw
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| PyValueError::new_err("DLPack tensor with a negative dimension"))?;
    let strides: Vec<isize> = if ndim == 0 {
        Vec::new()
    } else if tensor.strides.is_null() {
        // Legacy producers may leave row-major strides out.
        let mut s = vec![0isize; ndim];
        let mut acc = 1isize;
        for (st, &d) in s.iter_mut().zip(&shape).rev() {
            *st = acc;
            acc = acc.saturating_mul(isize::try_from(d.max(1)).unwrap_or(isize::MAX));
        }
        s
    } else {
        // SAFETY: DLPack: non-null `strides` points at `ndim` values.
        let raw = unsafe { std::slice::from_raw_parts(tensor.strides, ndim) };
        raw.iter()
            .map(|&s| isize::try_from(s))
            .collect::<Result<Vec<isize>, _>>()
            .map_err(|_| PyValueError::new_err("DLPack stride out of range"))?
    };
    let byte_offset = usize::try_from(tensor.byte_offset)
        .map_err(|_| PyValueError::new_err("DLPack byte_offset out of range"))?;
    let data = tensor
        .data
        .cast::<u8>()
        .cast_const()
        .wrapping_add(byte_offset);

    // Take ownership: from here on the producer's deleter is ours to call (by `Imported`).
    let size = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let aligned = |dtype: DType| (data as usize).is_multiple_of(dtype.size());
    let on_gpu = match cuda {
        None => None,
        Some(ordinal) => {
            let dtype = match source {
                Source::Direct(d) => d,
                Source::Bool => DType::Bool,
                other => {
                    let name = match other {
                        Source::I8 => "int8",
                        Source::I16 => "int16",
                        Source::U16 => "uint16",
                        _ => "uint64",
                    };
                    return Err(PyValueError::new_err(format!(
                        "ferrofast reads CUDA arrays in place and has no {name} type: \
                         convert it first (to int32, or to bool for a mask)"
                    )));
                }
            };
            if !aligned(dtype) && size != Some(0) {
                return Err(PyValueError::new_err(format!(
                    "a CUDA array at {data:p} is not aligned to its {}-byte elements: pass a \
                     contiguous copy",
                    dtype.size()
                )));
            }
            let device = Device::cuda(ordinal).map_err(to_py)?;
            let raw = stream.unwrap_or(0) as *mut c_void;
            // SAFETY: the producer was asked (its `__dlpack__(stream=...)`) to make the data
            // ready on this stream of its device, so it is a live stream of the primary
            // context that the producer's memory is used on; it outlives the arrays made on
            // it as long as the caller keeps using it (the current stream of PyTorch, CuPy).
            let stream = unsafe { ferrofast::Stream::from_raw(&device, raw) }.map_err(to_py)?;
            Some((dtype, stream))
        }
    };

    let used = if versioned {
        USED_VERSIONED
    } else {
        USED_LEGACY
    };
    // SAFETY: `obj` is a live capsule; the name is a static C string, as the API requires.
    if unsafe { ffi::PyCapsule_SetName(obj, used.as_ptr()) } != 0 {
        return Err(PyErr::take(capsule.py())
            .unwrap_or_else(|| PyValueError::new_err("could not consume the DLPack capsule")));
    }
    let owner = Imported { managed, versioned };

    if let Some((dtype, stream)) = on_gpu {
        // SAFETY: DLPack's contract: the producer keeps the memory (a device allocation of
        // `dtype` elements in the shape and strides given) valid and unwritten until its
        // deleter runs, which `owner` does once the last array over it is dropped; the
        // memory was made ready on `stream`, where ferrofast's reads are queued. (Written
        // only where the caller lends it: `ops::cross_entropy_fused_in_place`.)
        return unsafe {
            Array::from_cuda_external(
                data as u64,
                &shape,
                &strides,
                dtype,
                &stream,
                Box::new(owner),
            )
        }
        .map(|a| (a, !read_only))
        .map_err(to_py);
    }
    let copied = match source {
        Source::Direct(dtype) if aligned(dtype) || size == Some(0) => {
            // SAFETY: DLPack's contract: `data` plus the strides (in elements) address
            // `shape`'s elements of this dtype inside the producer's allocation, valid and
            // initialised until the deleter runs, which `owner` calls only when the last
            // array over this memory is dropped. Every bit pattern is a valid value of the
            // direct dtypes (bool is never shared, see `Source::Bool`). ferrofast never
            // writes to it, except where the caller lends it for writing
            // (`ops::cross_entropy_fused_in_place`, with its own contract); the Python API
            // asks callers not to write to an input while a call reading it runs (as any
            // DLPack consumer must).
            return unsafe { Array::from_external(data, &shape, &strides, dtype, Box::new(owner)) }
                .map(|a| (a, !read_only))
                .map_err(to_py);
        }
        Source::Direct(dtype) => gather_direct(data, &shape, &strides, dtype),
        Source::Bool => gather(data, &shape, &strides, |b: u8| b != 0),
        Source::I8 => gather(data, &shape, &strides, |v: i8| i32::from(v)),
        Source::I16 => gather(data, &shape, &strides, |v: i16| i32::from(v)),
        Source::U16 => gather(data, &shape, &strides, |v: u16| i32::from(v)),
        Source::U64 => gather(data, &shape, &strides, |v: u64| {
            i64::try_from(v).unwrap_or(i64::MAX)
        }),
    };
    // `owner` (not moved into the array) is dropped here: the copy no longer needs it.
    // Writing the copy would not reach the producer's memory.
    copied.map(|a| (a, false))
}

/// A row-major copy of possibly unaligned memory of a dtype ferrofast holds.
fn gather_direct(
    data: *const u8,
    shape: &[usize],
    strides: &[isize],
    dtype: DType,
) -> PyResult<Array> {
    match dtype {
        DType::F16 => gather(data, shape, strides, |v: ferrofast::f16| v),
        DType::BF16 => gather(data, shape, strides, |v: ferrofast::bf16| v),
        DType::F32 => gather(data, shape, strides, |v: f32| v),
        DType::F64 => gather(data, shape, strides, |v: f64| v),
        DType::I32 => gather(data, shape, strides, |v: i32| v),
        DType::I64 => gather(data, shape, strides, |v: i64| v),
        DType::U32 => gather(data, shape, strides, |v: u32| v),
        DType::U8 => gather(data, shape, strides, |v: u8| v),
        DType::Bool => gather(data, shape, strides, |b: u8| b != 0),
    }
}

/// Reads every element (`S`, possibly unaligned, at `data + sum(idx * strides)` elements),
/// converts it with `f` and returns a new row-major array.
fn gather<S: Copy, D: ferrofast::Element>(
    data: *const u8,
    shape: &[usize],
    strides: &[isize],
    f: impl Fn(S) -> D,
) -> PyResult<Array> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| PyValueError::new_err("DLPack tensor too large"))?;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| pyo3::exceptions::PyMemoryError::new_err("cannot allocate the copy"))?;
    if n > 0 {
        let item = std::mem::size_of::<S>() as isize;
        let mut idx = vec![0usize; shape.len()];
        loop {
            let mut off = 0isize;
            for (&i, &s) in idx.iter().zip(strides) {
                off += i as isize * s;
            }
            // SAFETY: DLPack's contract: every index inside `shape` addresses a readable
            // element of `S`'s size at `data + off * size`; `read_unaligned` needs no
            // alignment, and `S` is a plain integer or float type, valid for every bit
            // pattern. The producer's memory is alive: its owner is dropped after this copy.
            let v = unsafe {
                data.wrapping_offset(off * item)
                    .cast::<S>()
                    .read_unaligned()
            };
            out.push(f(v));
            // Odometer over the axes, last fastest.
            let mut ax = shape.len();
            loop {
                if ax == 0 {
                    return Array::from_vec(out, shape).map_err(to_py);
                }
                ax -= 1;
                idx[ax] += 1;
                if idx[ax] < shape[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
    }
    Array::from_vec(out, shape).map_err(to_py)
}

// ----- export --------------------------------------------------------------------------

/// What an exported capsule keeps alive: the array and the shape / strides DLTensor points at.
struct ExportCtx {
    _array: Array,
    _shape: Vec<i64>,
    _strides: Vec<i64>,
}

fn dl_dtype(dtype: DType, bits_as_uint: bool) -> DLDataType {
    let (code, bits) = match dtype {
        DType::Bool => (KDL_BOOL, 8),
        DType::U8 => (KDL_UINT, 8),
        DType::U32 => (KDL_UINT, 32),
        DType::I32 => (KDL_INT, 32),
        DType::I64 => (KDL_INT, 64),
        DType::F16 => (KDL_FLOAT, 16),
        DType::BF16 if bits_as_uint => (KDL_UINT, 16),
        DType::BF16 => (KDL_BFLOAT, 16),
        DType::F32 => (KDL_FLOAT, 32),
        DType::F64 => (KDL_FLOAT, 64),
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

/// The deleter of a versioned tensor `export` made: frees it and drops the array it kept.
///
/// # Safety
/// `m` is null or a pointer `export` returned in a versioned capsule, not yet deleted; called
/// at most once per tensor (DLPack's contract for deleters).
unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    if m.is_null() {
        return;
    }
    // SAFETY: `m` and its `manager_ctx` were made by `Box::into_raw` in `export`, and DLPack
    // calls the deleter once; dropping the array needs no GIL.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx.cast::<ExportCtx>()));
    }
}

/// The deleter of a legacy tensor `export` made: frees it and drops the array it kept.
///
/// # Safety
/// As [`delete_versioned`], for a legacy capsule's tensor.
unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    if m.is_null() {
        return;
    }
    // SAFETY: as in `delete_versioned`.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx.cast::<ExportCtx>()));
    }
}

/// Frees an exported tensor nobody consumed (the capsule still has its original name).
///
/// # Safety
/// Called by Python, with the GIL held, on a capsule `export` made (as its destructor).
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the GIL held on a capsule `export` made; a consumer that
    // took the tensor renamed the capsule, so `PyCapsule_IsValid` fails and nothing is freed
    // twice. The pointer under each name is the matching managed-tensor type.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr())
                .cast::<DLManagedTensorVersioned>();
            if let Some(deleter) = m.as_ref().and_then(|r| r.deleter) {
                deleter(m);
            }
        } else if ffi::PyCapsule_IsValid(capsule, NAME_LEGACY.as_ptr()) == 1 {
            let m =
                ffi::PyCapsule_GetPointer(capsule, NAME_LEGACY.as_ptr()).cast::<DLManagedTensor>();
            if let Some(deleter) = m.as_ref().and_then(|r| r.deleter) {
                deleter(m);
            }
        }
    }
}

/// Moves `array` into a new DLPack capsule pointing at its host buffer. The buffer is
/// shared when the array holds it alone (then the consumer may write to it), else copied
/// (`copy = Some(false)` refuses that; `Some(true)` always copies).
/// The address of `array`'s first element for a consumer that may write it, where `array`
/// holds its buffer alone (host or GPU).
fn writable_ptr(array: &mut Array) -> Option<*mut c_void> {
    match array.device() {
        Device::Cpu => array.host_ptr_mut().map(|p| p.cast::<c_void>()),
        Device::Cuda(_) => array
            .cuda_ptr_mut()
            .and_then(|p| usize::try_from(p).ok())
            .map(|p| p as *mut c_void),
    }
}

/// DLPack's `(device_type, device_id)` of an array.
fn dl_device_of(a: &Array) -> (i32, i32) {
    match a.device() {
        Device::Cpu => (KDL_CPU, 0),
        Device::Cuda(i) => (KDL_CUDA, i32::try_from(i).unwrap_or(i32::MAX)),
    }
}

/// The stream a DLPack `stream` argument names on `device` (`None` for -1: no ordering):
/// `None` and 1 are the legacy default stream, 2 the per-thread default stream, anything
/// else a `CUstream` of the consumer's.
fn consumer_stream(device: &Device, stream: Option<i64>) -> PyResult<Option<ferrofast::Stream>> {
    let raw: usize = match stream {
        Some(-1) => return Ok(None),
        // The legacy default stream, named as producers name it (the null handle), so that
        // a result taken on the stream it was made on needs no wait.
        None | Some(1) => 0,
        Some(0) => {
            return Err(PyValueError::new_err(
                "__dlpack__: stream 0 is ambiguous for CUDA (DLPack): pass 1 for the legacy \
                 default stream or 2 for the per-thread one",
            ))
        }
        Some(s) => usize::try_from(s)
            .map_err(|_| PyValueError::new_err(format!("__dlpack__: invalid stream {s}")))?,
    };
    // SAFETY: the DLPack protocol: the consumer names a live stream of its device's primary
    // context (or a special handle), alive for this call, which is as long as the wrapper
    // lives (it is dropped before returning; only an event wait is queued on it).
    unsafe { ferrofast::Stream::from_raw(device, raw as *mut c_void) }
        .map(Some)
        .map_err(to_py)
}

fn export(
    py: Python<'_>,
    array: Array,
    versioned: bool,
    copy: Option<bool>,
    bits_as_uint: bool,
    consumer: Option<ferrofast::Stream>,
) -> PyResult<Py<PyAny>> {
    let mut array = if copy == Some(true) {
        py.detach(|| array.copy()).map_err(to_py)?
    } else {
        array
    };
    let mut copied = copy == Some(true);
    let data = match writable_ptr(&mut array) {
        Some(p) => p,
        None if copy == Some(false) => {
            return Err(PyBufferError::new_err(
                "copy=False, but this array shares its buffer and can only be exported as a \
                 copy",
            ))
        }
        None => {
            array = py.detach(|| array.copy()).map_err(to_py)?;
            copied = true;
            writable_ptr(&mut array).ok_or_else(|| {
                PyRuntimeError::new_err("internal: a fresh copy does not own its buffer")
            })?
        }
    };
    if let (Some(c), Some(producer)) = (consumer, array.stream()) {
        // The consumer's stream waits for the work writing the buffer (the op, and the copy
        // just made, if any).
        py.detach(|| c.wait_for(&producer)).map_err(to_py)?;
    }
    let (device_type, device_id) = dl_device_of(&array);
    let to_i64 = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    let mut shape: Vec<i64> = array.shape().iter().map(|&d| to_i64(d)).collect();
    let mut strides: Vec<i64> = array.strides().iter().map(|&s| s as i64).collect();
    let ndim = i32::try_from(shape.len())
        .map_err(|_| PyValueError::new_err("too many dimensions to export"))?;
    let tensor = DLTensor {
        data,
        device: DLDevice {
            device_type,
            device_id,
        },
        ndim,
        dtype: dl_dtype(array.dtype(), bits_as_uint),
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let ctx = Box::into_raw(Box::new(ExportCtx {
        _array: array,
        _shape: shape,
        _strides: strides,
    }))
    .cast::<c_void>();
    let (ptr, name): (*mut c_void, &CStr) = if versioned {
        let m = Box::new(DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: ctx,
            deleter: Some(delete_versioned),
            flags: if copied { FLAG_IS_COPIED } else { 0 },
            dl_tensor: tensor,
        });
        (Box::into_raw(m).cast(), NAME_VERSIONED)
    } else {
        let m = Box::new(DLManagedTensor {
            dl_tensor: tensor,
            manager_ctx: ctx,
            deleter: Some(delete_legacy),
        });
        (Box::into_raw(m).cast(), NAME_LEGACY)
    };
    // SAFETY: `ptr` is non-null, the name a static C string and the destructor frees the
    // tensor only while the capsule keeps its unconsumed name.
    let capsule = unsafe { ffi::PyCapsule_New(ptr, name.as_ptr(), Some(capsule_destructor)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so the tensor is still ours to free, once.
        unsafe {
            if versioned {
                delete_versioned(ptr.cast());
            } else {
                delete_legacy(ptr.cast());
            }
        }
        return Err(
            PyErr::take(py).unwrap_or_else(|| PyRuntimeError::new_err("PyCapsule_New failed"))
        );
    }
    // SAFETY: `capsule` is a new (owned) reference, checked non-null above.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// Wraps a producer's capsule as a [`Tensor`] (consuming it); see [`import`].
#[pyfunction]
#[pyo3(signature = (capsule, bf16_from_u16=false, stream=None))]
pub fn from_dlpack(
    capsule: &Bound<'_, PyAny>,
    bf16_from_u16: bool,
    stream: Option<usize>,
) -> PyResult<Tensor> {
    import_access(capsule, bf16_from_u16, stream).map(|(a, writable)| Tensor::imported(a, writable))
}
