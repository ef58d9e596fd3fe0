//! Device buffers behind GPU arrays, and copies between host and device.

use super::runtime::{self, driver_error, guarded, CudaDevice, Stream};
use crate::array::{dispatch_dtype, CpuData};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::Array;
use cudarc::driver::{sys, CudaSlice, DevicePtr};
use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Whether new buffers are filled with 0xFF bytes before a kernel writes them.
fn poison_flag() -> &'static AtomicBool {
    static FLAG: OnceLock<AtomicBool> = OnceLock::new();
    FLAG.get_or_init(|| {
        let on = std::env::var_os("FERROFAST_POISON_GPU_BUFFERS").is_some_and(|v| v != "0");
        AtomicBool::new(on)
    })
}

/// Debugging aid: while enabled, every GPU buffer ferrofast allocates for an op's output is
/// filled with 0xFF bytes (NaN for the float types) before the kernel runs, so elements a
/// kernel fails to write show up as NaN instead of as stale memory. Off by default; the
/// environment variable `FERROFAST_POISON_GPU_BUFFERS=1` turns it on at start. Costs one
/// memset per output.
pub fn poison_gpu_buffers(enabled: bool) {
    poison_flag().store(enabled, Ordering::Relaxed);
}

/// The elements of one GPU array: a device allocation (ferrofast's own, or memory borrowed
/// from another library), its dtype and length, and the stream that produced it (ops on the
/// array run there).
pub(crate) struct CudaBuffer {
    /// Freed on drop when ferrofast allocated it; leaked (handed back untouched) when it is
    /// borrowed (`owner` is set).
    data: ManuallyDrop<CudaSlice<u8>>,
    dtype: DType,
    len: usize,
    /// Device address of the first byte, for alignment decisions.
    address: u64,
    stream: Stream,
    device: Arc<CudaDevice>,
    /// Keeps borrowed memory valid (see [`CudaBuffer::borrowed`]); dropped after the buffer.
    owner: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // SAFETY: `data` is taken once, here, and never used again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.owner.is_some() {
            // Borrowed memory is its owner's to free: give the pointer up (cudarc first makes
            // the stream wait for the buffer's pending reads and writes).
            let _ = data.leak();
        } else {
            drop(data);
        }
    }
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBuffer(cuda:{}, {} x {})",
            self.device.ordinal(),
            self.len,
            self.dtype
        )
    }
}

impl CudaBuffer {
    /// Allocates `len` elements of `dtype` on `stream` (stream-ordered allocation where the
    /// device supports it). The contents are unspecified (0xFF bytes while poisoning is on).
    pub(crate) fn alloc(
        device: &Arc<CudaDevice>,
        stream: &Stream,
        dtype: DType,
        len: usize,
    ) -> Result<CudaBuffer> {
        let fill = poison_flag().load(Ordering::Relaxed).then_some(0xFF);
        CudaBuffer::alloc_filled(device, stream, dtype, len, fill)
    }

    /// [`CudaBuffer::alloc`] with every byte set to 0 (queued on `stream`): a scratch that
    /// kernels add into.
    pub(crate) fn alloc_zeroed(
        device: &Arc<CudaDevice>,
        stream: &Stream,
        dtype: DType,
        len: usize,
    ) -> Result<CudaBuffer> {
        CudaBuffer::alloc_filled(device, stream, dtype, len, Some(0))
    }

    /// The allocation of [`CudaBuffer::alloc`], every byte then set to `fill` (one memset
    /// queued on `stream`) when given.
    fn alloc_filled(
        device: &Arc<CudaDevice>,
        stream: &Stream,
        dtype: DType,
        len: usize,
        fill: Option<u8>,
    ) -> Result<CudaBuffer> {
        let bytes = len
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::Shape(format!("{len} elements of {dtype} overflow usize")))?;
        // A zero-byte stream-ordered allocation is an error in the driver; keep one byte.
        let bytes = bytes.max(1);
        let cu = stream.cuda();
        let attempt = || {
            // SAFETY: the memory is uninitialised bytes; every reader of a buffer reads only
            // elements a kernel or copy has written (or the 0xFF poison).
            unsafe { cu.alloc::<u8>(bytes) }
        };
        let failed = |e| {
            driver_error(
                &format!("allocating {bytes} bytes on cuda:{}", device.ordinal()),
                e,
            )
        };
        let mut data = guarded("allocating GPU memory", || match attempt() {
            Ok(d) => Ok(d),
            // The pool keeps freed memory for reuse; when that memory is what stands in the
            // way, hand it back and try once more.
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                device.release_cached_memory()?;
                attempt().map_err(failed)
            }
            Err(e) => Err(failed(e)),
        })?;
        if let Some(byte) = fill {
            let (ptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut data, cu);
            // SAFETY: `ptr` is the start of this live allocation of `bytes` bytes, made on
            // this stream.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, cu.cu_stream()) }
                .map_err(|e| driver_error("filling a new GPU buffer", e))?;
        }
        let address = {
            let (ptr, _record) = data.device_ptr(cu);
            ptr
        };
        Ok(CudaBuffer {
            data: ManuallyDrop::new(data),
            dtype,
            len,
            address,
            stream: stream.clone(),
            device: Arc::clone(device),
            owner: None,
        })
    }

    /// Device memory owned by another library, `len` elements of `dtype` from `address`, read
    /// on `stream`; `owner` is dropped after the last use of the buffer and never freed by
    /// ferrofast.
    ///
    /// # Safety
    /// As [`crate::Array::from_cuda_external`]: `address` starts a live device allocation of
    /// `stream`'s device holding `len` valid elements of `dtype`, which stays valid, and
    /// unwritten by anyone else, until `owner` is dropped and the work queued on `stream`
    /// before that has finished.
    pub(crate) unsafe fn borrowed(
        stream: &Stream,
        address: u64,
        dtype: DType,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<CudaBuffer> {
        let device = runtime::device(stream.ordinal())?;
        let bytes = len
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::Shape(format!("{len} elements of {dtype} overflow usize")))?;
        let cu = stream.cuda();
        let data = guarded("borrowing device memory", || {
            // SAFETY: the caller's contract: `address` starts `bytes` valid bytes on this
            // device. The slice is never freed by cudarc: `Drop` leaks it because `owner` is set.
            Ok(unsafe { cu.upgrade_device_ptr::<u8>(address, bytes) })
        })?;
        Ok(CudaBuffer {
            data: ManuallyDrop::new(data),
            dtype,
            len,
            address,
            stream: stream.clone(),
            device,
            owner: Some(owner),
        })
    }

    /// Whether the memory is borrowed from another library (never overwritten by an in-place
    /// op, never freed by ferrofast).
    pub(crate) fn is_borrowed(&self) -> bool {
        self.owner.is_some()
    }

    /// Gives the allocation up without freeing it: its device address, its size in bytes
    /// (at least one) and the stream that produced it. The caller owns the memory from then
    /// on. Only for ferrofast's own buffers (`None` for borrowed memory, which its owner
    /// frees). The buffer must not be used after this: dropping it then leaks the memory.
    pub(crate) fn release(&mut self) -> Option<(u64, usize, Stream)> {
        if self.is_borrowed() {
            return None;
        }
        let bytes = self.data.len();
        let stream = self.stream.clone();
        let address = self.address;
        // `Drop` leaks the slice of a buffer that has an owner (cudarc makes the stream wait
        // for the buffer's pending reads and writes first), so the memory outlives it.
        self.owner = Some(Box::new(()));
        Some((address, bytes, stream))
    }

    /// The device address of the first element.
    pub(crate) fn address(&self) -> u64 {
        self.address
    }

    /// Element type.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The stream that produced the data.
    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The device the data lives on.
    pub(crate) fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    /// The device the buffer lives on.
    pub(crate) fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The allocation, for kernel arguments (cudarc orders streams through its events).
    pub(crate) fn slice(&self) -> &CudaSlice<u8> {
        &self.data
    }

    /// The allocation, for the kernel that writes it.
    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.data
    }

    /// True if the address of element `offset` is a multiple of `align` bytes.
    pub(crate) fn is_aligned(&self, offset: usize, align: usize) -> bool {
        let byte = self.address + (offset * self.dtype.size()) as u64;
        byte.is_multiple_of(align as u64)
    }

    /// Uploads host elements into a new buffer on `stream`.
    pub(crate) fn upload<T: Element>(
        device: &Arc<CudaDevice>,
        stream: &Stream,
        host: &[T],
    ) -> Result<CudaBuffer> {
        let mut buf = CudaBuffer::alloc(device, stream, T::DTYPE, host.len())?;
        if !host.is_empty() {
            // SAFETY: every Element type is plain data without padding (bool is one byte
            // holding 0 or 1), so its memory is a valid byte slice of the same extent.
            let bytes = unsafe {
                std::slice::from_raw_parts(host.as_ptr().cast::<u8>(), std::mem::size_of_val(host))
            };
            let cu = stream.cuda();
            guarded("copying to the GPU", || {
                cu.memcpy_htod(bytes, &mut *buf.data)
                    .map_err(|e| driver_error("copying to the GPU", e))
            })?;
        }
        Ok(buf)
    }

    /// Copies elements `[offset, offset + len)` back to the host (waits for the producing
    /// stream and any stream still writing the buffer).
    pub(crate) fn download(&self, offset: usize, len: usize) -> Result<CpuData> {
        let size = self.dtype.size();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::Cuda(format!(
                    "download of elements {offset}..{} out of a buffer of {}",
                    offset.saturating_add(len),
                    self.len
                ))
            })?;
        let bytes = if len == 0 {
            Vec::new()
        } else {
            let cu = self.stream.cuda();
            let view = self
                .data
                .try_slice(offset * size..end * size)
                .ok_or_else(|| Error::Cuda("download range outside the allocation".into()))?;
            let bytes = guarded("copying from the GPU", || {
                cu.clone_dtoh(&view)
                    .map_err(|e| driver_error("copying from the GPU", e))
            })?;
            self.stream.synchronize()?;
            bytes
        };
        Ok(dispatch_dtype!(self.dtype, T => bytes_to_data::<T>(&bytes)))
    }
}

/// Uploads a CPU array to `stream`'s device as a row-major GPU array produced on `stream`.
pub(crate) fn upload(host: &Array, stream: &Stream) -> Result<Array> {
    let device = runtime::device(stream.ordinal())?;
    let host = host.contiguous()?;
    if host.size() == 0 {
        let buf = CudaBuffer::alloc(&device, stream, host.dtype(), 0)?;
        return Array::from_cuda_buffer(buf, host.shape());
    }
    let buf = dispatch_dtype!(host.dtype(), T => {
        let elements = host.contiguous_slice::<T>()?.ok_or_else(|| {
            Error::Device("upload expects an array on the CPU".to_string())
        })?;
        CudaBuffer::upload(&device, stream, elements)?
    });
    Array::from_cuda_buffer(buf, host.shape())
}

/// Copies a GPU array to the host as a row-major CPU array (waits for the work producing
/// it).
pub(crate) fn download(a: &Array) -> Result<Array> {
    let c = if a.is_contiguous() {
        a.clone()
    } else {
        super::copy::copy_cast(a, a.dtype(), None)?
    };
    let buf = c
        .cuda_buffer()
        .ok_or_else(|| Error::Device("download expects an array on a CUDA device".into()))?;
    let data = buf.download(c.offset(), c.size())?;
    Array::from_cpu_data(data, c.shape())
}

/// Rebuilds typed host data from the bytes of a download.
fn bytes_to_data<T: Element>(bytes: &[u8]) -> CpuData {
    let n = bytes.len() / std::mem::size_of::<T>();
    if T::DTYPE == DType::Bool {
        // Any nonzero byte is true: a byte that is neither 0 nor 1 must never become a Rust
        // bool.
        let v: Vec<bool> = bytes.iter().map(|&b| b != 0).collect();
        return CpuData::Bool(v);
    }
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: T is a non-bool Element (an integer or float type), for which every bit
    // pattern is valid; `v` has room for n elements and `bytes` holds n * size_of::<T>().
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            v.as_mut_ptr().cast::<u8>(),
            n * std::mem::size_of::<T>(),
        );
        v.set_len(n);
    }
    T::wrap(v)
}
