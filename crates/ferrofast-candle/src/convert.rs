//! Moving data between candle tensors and ferrofast arrays: inputs are borrowed (a ferrofast
//! `Array` over the tensor's own memory, any strides), outputs are handed over (the array's
//! host vector or device allocation becomes the tensor's storage). Nothing is copied except
//! where a layout forces it (see the crate documentation).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use ferrofast::{Array, DType};

use crate::{ff_err, Result};

/// The ferrofast dtype of a candle dtype (the ones both libraries have).
pub(crate) fn to_ff_dtype(d: candle_core::DType) -> Result<DType> {
    Ok(match d {
        candle_core::DType::U8 => DType::U8,
        candle_core::DType::U32 => DType::U32,
        candle_core::DType::I32 => DType::I32,
        candle_core::DType::I64 => DType::I64,
        candle_core::DType::F16 => DType::F16,
        candle_core::DType::BF16 => DType::BF16,
        candle_core::DType::F32 => DType::F32,
        candle_core::DType::F64 => DType::F64,
        other => {
            return Err(candle_core::Error::Msg(format!(
                "[ferrofast-candle] ferrofast has no {other:?} dtype (it takes u8, u32, i32, i64, \
                 f16, bf16, f32 and f64 tensors); convert the tensor with to_dtype first"
            )))
        }
    })
}

/// candle's layout as ferrofast's (shape, strides in elements, offset in elements).
fn layout_parts(layout: &Layout) -> Result<(Vec<usize>, Vec<isize>)> {
    let strides = layout
        .stride()
        .iter()
        .map(|&s| {
            isize::try_from(s).map_err(|_| {
                candle_core::Error::Msg(format!("[ferrofast-candle] stride {s} overflows isize"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((layout.dims().to_vec(), strides))
}

/// The start of a host vector and its dtype.
fn cpu_base(storage: &CpuStorage) -> Result<(*const u8, usize, DType)> {
    let (ptr, len, dtype) = match storage {
        CpuStorage::U8(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::U8),
        CpuStorage::U32(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::U32),
        CpuStorage::I32(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::I32),
        CpuStorage::I64(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::I64),
        CpuStorage::F16(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::F16),
        CpuStorage::BF16(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::BF16),
        CpuStorage::F32(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::F32),
        CpuStorage::F64(v) => (v.as_ptr().cast::<u8>(), v.len(), DType::F64),
        other => {
            to_ff_dtype(other.dtype())?;
            return Err(candle_core::Error::Msg(
                "[ferrofast-candle] unsupported dtype".into(),
            ));
        }
    };
    Ok((ptr, len, dtype))
}

/// Checks that every element `layout` addresses lies inside a buffer of `len` elements
/// (candle's layouts are non-negative strides from `start_offset`).
fn check_span(layout: &Layout, len: usize) -> Result<()> {
    let dims = layout.dims();
    if dims.contains(&0) {
        return Ok(());
    }
    let mut last = layout.start_offset();
    for (&d, &s) in dims.iter().zip(layout.stride()) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or_else(|| candle_core::Error::Msg("[ferrofast-candle] layout overflows".into()))?;
    }
    if last >= len {
        return Err(candle_core::Error::Msg(format!(
            "[ferrofast-candle] the layout reaches element {last} of a buffer of {len}"
        )));
    }
    Ok(())
}

/// A ferrofast array over a candle host buffer, without copying.
///
/// # Safety
/// The returned array (and every array or view made from it) must be dropped before
/// `storage` is dropped or written; `owner` is dropped with the last of them.
pub(crate) unsafe fn borrow_cpu(
    storage: &CpuStorage,
    layout: &Layout,
    owner: Box<dyn std::any::Any + Send + Sync>,
) -> Result<Array> {
    let (base, len, dtype) = cpu_base(storage)?;
    check_span(layout, len)?;
    let (shape, strides) = layout_parts(layout)?;
    let first = base.wrapping_add(layout.start_offset() * dtype.size());
    // SAFETY: `check_span` showed every addressed element lies inside the vector, whose
    // elements are initialised values of `dtype`; the caller keeps it alive and unwritten
    // while the array lives.
    unsafe { Array::from_external(first, &shape, &strides, dtype, owner) }.map_err(ff_err)
}

/// A ferrofast result as candle host storage: the array's own vector when it is the only
/// handle on it (an op's output), a copy otherwise.
pub(crate) fn into_cpu_storage(a: Array) -> Result<(CpuStorage, Shape)> {
    let shape = Shape::from(a.shape());
    let storage = match a.dtype() {
        DType::Bool => {
            let a = a.astype(DType::U8).map_err(ff_err)?;
            CpuStorage::U8(a.into_vec::<u8>().map_err(ff_err)?)
        }
        DType::U8 => CpuStorage::U8(a.into_vec().map_err(ff_err)?),
        DType::U32 => CpuStorage::U32(a.into_vec().map_err(ff_err)?),
        DType::I32 => CpuStorage::I32(a.into_vec().map_err(ff_err)?),
        DType::I64 => CpuStorage::I64(a.into_vec().map_err(ff_err)?),
        DType::F16 => CpuStorage::F16(a.into_vec().map_err(ff_err)?),
        DType::BF16 => CpuStorage::BF16(a.into_vec().map_err(ff_err)?),
        DType::F32 => CpuStorage::F32(a.into_vec().map_err(ff_err)?),
        DType::F64 => CpuStorage::F64(a.into_vec().map_err(ff_err)?),
    };
    Ok((storage, shape))
}

/// Inputs borrowed from tensors for one call. Each tensor's storage stays read-locked
/// until the `Borrowed` is dropped (as candle's own ops lock their inputs), so nothing
/// writes it in place while ferrofast reads it; every array made here, and every result
/// that could share their memory, must be gone (converted to a tensor) by then.
pub(crate) struct Borrowed<'t> {
    /// The device the inputs live on.
    pub(crate) device: candle_core::Device,
    guards: std::cell::RefCell<Vec<candle_core::StorageRef<'t>>>,
    #[cfg(feature = "cuda")]
    stream: Option<ferrofast::Stream>,
}

impl<'t> Borrowed<'t> {
    /// Prepares to borrow tensors of `device`.
    pub(crate) fn new(device: &candle_core::Device) -> Result<Borrowed<'t>> {
        match device {
            candle_core::Device::Cpu => Ok(Borrowed {
                device: device.clone(),
                guards: Default::default(),
                #[cfg(feature = "cuda")]
                stream: None,
            }),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(dev) => Ok(Borrowed {
                device: device.clone(),
                guards: Default::default(),
                stream: Some(cuda::stream_of(dev)?),
            }),
            other => Err(candle_core::Error::Msg(format!(
                "[ferrofast-candle] tensors on {:?} are not supported (CPU{} only)",
                other.location(),
                if cfg!(feature = "cuda") {
                    " and CUDA"
                } else {
                    "; CUDA with the `cuda` feature"
                }
            ))),
        }
    }

    fn check_device(&self, t: &Tensor) -> Result<()> {
        if t.device().same_device(&self.device) {
            Ok(())
        } else {
            Err(candle_core::Error::DeviceMismatchBinaryOp {
                lhs: self.device.location(),
                rhs: t.device().location(),
                op: "ferrofast",
            })
        }
    }

    /// An array over `storage` laid out as `layout`, kept alive by `owner`.
    ///
    /// # Safety
    /// Nobody writes the storage while the array lives, and the memory outlives it.
    unsafe fn over(
        &self,
        storage: &Storage,
        layout: &Layout,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Array> {
        match storage {
            // SAFETY: the caller's contract.
            Storage::Cpu(s) => unsafe { borrow_cpu(s, layout, owner) },
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let stream = self.stream.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("[ferrofast-candle] no stream for a CUDA tensor".into())
                })?;
                // SAFETY: the caller's contract; device memory is also freed by candle on
                // its stream, the one ferrofast's work is queued on.
                unsafe { cuda::borrow(s, layout, stream, owner) }
            }
            _ => Err(candle_core::Error::Msg(
                "[ferrofast-candle] only CPU and CUDA tensors are supported".into(),
            )),
        }
    }

    /// A ferrofast array over `t`'s memory; `t` stays read-locked while `self` lives.
    pub(crate) fn array(&self, t: &'t Tensor) -> Result<Array> {
        self.check_device(t)?;
        let (guard, layout) = t.storage_and_layout();
        // SAFETY: the read lock, kept in `self.guards` until `self` is dropped, keeps
        // writers out; the array holds a clone of `t`, so the memory outlives it.
        let a = unsafe { self.over(&guard, layout, Box::new(t.clone())) }?;
        self.guards.borrow_mut().push(guard);
        Ok(a)
    }

    /// A ferrofast array over a tensor this call made itself (nobody else can write it).
    pub(crate) fn private(&self, t: Tensor) -> Result<Array> {
        self.check_device(&t)?;
        let (guard, layout) = t.storage_and_layout();
        // SAFETY: `t` is private to the call: only this array reads it; the array owns a
        // clone of it.
        unsafe { self.over(&guard, layout, Box::new(t.clone())) }
    }

    /// `t` borrowed, if given.
    pub(crate) fn opt(&self, t: Option<&'t Tensor>) -> Result<Option<Array>> {
        t.map(|t| self.array(t)).transpose()
    }

    /// A ferrofast result as a tensor on this call's device.
    pub(crate) fn tensor(&self, a: Array) -> Result<Tensor> {
        to_tensor(a, &self.device)
    }

    /// An optional result (a gradient of an optional input) as a tensor.
    pub(crate) fn opt_tensor(&self, a: Option<Array>) -> Result<Option<Tensor>> {
        a.map(|a| self.tensor(a)).transpose()
    }
}

/// A ferrofast result as a candle tensor on `device` (no autograd history), without copying
/// when the array is the only handle on its buffer.
pub(crate) fn to_tensor(a: Array, device: &candle_core::Device) -> Result<Tensor> {
    let (storage, shape) = match device {
        candle_core::Device::Cpu => {
            let host = a.to_device(&ferrofast::Device::Cpu).map_err(ff_err)?;
            let (s, shape) = into_cpu_storage(host)?;
            (Storage::Cpu(s), shape)
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            let (s, shape) = cuda::into_storage(a, dev)?;
            (Storage::Cuda(s), shape)
        }
        other => {
            return Err(candle_core::Error::Msg(format!(
                "[ferrofast-candle] tensors on {:?} are not supported",
                other.location()
            )))
        }
    };
    Ok(Tensor::from_storage(
        storage,
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    //! CUDA tensors: candle's device memory and stream, shared with ferrofast.

    use super::{check_span, layout_parts, to_ff_dtype};
    use crate::{ff_err, Result};
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
    use candle_core::cuda_backend::CudaStorageSlice;
    use candle_core::{CudaDevice, CudaStorage, DeviceLocation, Layout, Shape};
    use ferrofast::{Array, DType, Stream};

    /// The device ordinal of a candle CUDA device.
    pub(crate) fn ordinal(dev: &CudaDevice) -> usize {
        match dev.location() {
            DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        }
    }

    /// candle's stream for `dev` as a ferrofast stream: ferrofast's work and allocations go
    /// where candle's go, in the device's primary context, with no synchronisation.
    pub(crate) fn stream_of(dev: &CudaDevice) -> Result<Stream> {
        let raw = dev.cuda_stream().cu_stream();
        // SAFETY: candle's stream belongs to the primary context of its device (cudarc's
        // `CudaContext::new` retains it), and candle keeps it alive while the device (which
        // every tensor and result on it holds) lives.
        unsafe { Stream::from_raw(&ferrofast::Device::Cuda(ordinal(dev)), raw.cast()) }
            .map_err(ff_err)
    }

    /// A ferrofast array over a candle CUDA buffer, without copying.
    ///
    /// # Safety
    /// `owner` keeps the memory alive until the array and its views are gone, and nobody
    /// writes it meanwhile; `stream` is candle's stream of the storage's device.
    pub(crate) unsafe fn borrow(
        storage: &CudaStorage,
        layout: &Layout,
        stream: &Stream,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Array> {
        let cu = storage.device.cuda_stream();
        macro_rules! base {
            ($s:expr) => {{
                let (ptr, _read) = $s.device_ptr(&cu);
                (ptr, $s.len())
            }};
        }
        let (base, len) = match &storage.slice {
            CudaStorageSlice::U8(s) => base!(s),
            CudaStorageSlice::U32(s) => base!(s),
            CudaStorageSlice::I32(s) => base!(s),
            CudaStorageSlice::I64(s) => base!(s),
            CudaStorageSlice::F16(s) => base!(s),
            CudaStorageSlice::BF16(s) => base!(s),
            CudaStorageSlice::F32(s) => base!(s),
            CudaStorageSlice::F64(s) => base!(s),
            _ => {
                to_ff_dtype(storage.dtype())?;
                return Err(candle_core::Error::Msg(
                    "[ferrofast-candle] unsupported dtype".into(),
                ));
            }
        };
        let dtype = to_ff_dtype(storage.dtype())?;
        check_span(layout, len)?;
        let (shape, strides) = layout_parts(layout)?;
        let first = base + (layout.start_offset() * dtype.size()) as u64;
        // SAFETY: every addressed element lies inside the slice (`check_span`), an
        // allocation of the storage's device in its primary context, made on `stream`'s
        // stream; the caller keeps it alive and unwritten.
        unsafe { Array::from_cuda_external(first, &shape, &strides, dtype, stream, owner) }
            .map_err(ff_err)
    }

    /// Wraps `n` elements of `T` at `address` as candle storage that owns (and frees) them.
    ///
    /// # Safety
    /// `address` is a live allocation of at least `n` elements of `T` in the primary context
    /// of `dev`'s device, from the stream-ordered allocator, owned by nobody else.
    unsafe fn wrap<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        dev: &CudaDevice,
        address: u64,
        n: usize,
    ) -> CudaStorage {
        // SAFETY: the caller's contract.
        let slice = unsafe { dev.cuda_stream().upgrade_device_ptr::<T>(address, n) };
        CudaStorage::wrap_cuda_slice(slice, dev.clone())
    }

    /// A ferrofast GPU result as candle storage on `dev`: the array's own allocation when it
    /// is the only handle on it (an op's output), else a fresh copy's; candle frees it.
    pub(crate) fn into_storage(a: Array, dev: &CudaDevice) -> Result<(CudaStorage, Shape)> {
        let a = match a.device() {
            ferrofast::Device::Cuda(o) if o == ordinal(dev) => a,
            _ => a.to_stream(&stream_of(dev)?).map_err(ff_err)?,
        };
        let a = if a.dtype() == DType::Bool {
            a.astype(DType::U8).map_err(ff_err)?
        } else {
            a
        };
        let shape = Shape::from(a.shape());
        let (n, dtype) = (a.size(), a.dtype());
        let alloc = a.into_cuda_allocation().map_err(ff_err)?;
        // candle reads the result on its own stream: order it after ferrofast's writes.
        let candle = stream_of(dev)?;
        candle.wait_for(&alloc.stream).map_err(ff_err)?;
        let address = alloc.address;
        // SAFETY: `into_cuda_allocation` hands over a live stream-ordered allocation of the
        // primary context, at least `n` elements of `dtype`; nobody else owns it now.
        let storage = unsafe {
            match dtype {
                DType::Bool | DType::U8 => wrap::<u8>(dev, address, n),
                DType::U32 => wrap::<u32>(dev, address, n),
                DType::I32 => wrap::<i32>(dev, address, n),
                DType::I64 => wrap::<i64>(dev, address, n),
                DType::F16 => wrap::<ferrofast::f16>(dev, address, n),
                DType::BF16 => wrap::<ferrofast::bf16>(dev, address, n),
                DType::F32 => wrap::<f32>(dev, address, n),
                DType::F64 => wrap::<f64>(dev, address, n),
            }
        };
        Ok((storage, shape))
    }
}
