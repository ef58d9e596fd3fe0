//! The CUDA back end (feature `cuda`): driver and NVRTC loading, contexts and streams
//! (`runtime`), run-time compilation of the `.cu` kernels to CUBIN with in-memory and on-disk
//! caches (`jit`), device buffers behind [`Array`] (`memory`, reached through [`storage`]),
//! and one launcher per op, each taking the op's validated argument type (`crate::ops`).
//!
//! Nothing here links against CUDA: cudarc loads `libcuda` and `libnvrtc` at run time, after
//! `runtime` has checked they exist (cudarc panics on a missing library), so the crate
//! builds and its CPU paths work on machines without CUDA. Without the `cuda` feature,
//! `stub.rs` takes this module's place with the same interface, every entry returning
//! `Error::CudaUnavailable`.

pub(crate) mod copy;
pub(crate) mod cross_entropy;
pub(crate) mod gated_delta;
pub(crate) mod jit;
pub(crate) mod memory;
pub(crate) mod merge;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod runtime;
pub(crate) mod sdpa;

pub use runtime::Stream;

/// Every built-in kernel file with the instantiations its launcher can ask for: what the
/// compile check ([`jit::check_builtin_kernels`]) compiles. A new launcher adds its entry
/// here.
pub(crate) fn registry() -> Vec<jit::Registered> {
    let mut all = vec![
        copy::REGISTERED,
        cross_entropy::REGISTERED,
        gated_delta::REGISTERED,
        gated_delta::REGISTERED_CHUNKED,
        merge::REGISTERED,
        norm::REGISTERED,
        rope::REGISTERED,
    ];
    all.extend(sdpa::kernel_files());
    all
}

/// The interface [`Array`] and [`Device`](crate::Device) reach CUDA through: moving and
/// converting device data, and the devices themselves.
pub(crate) mod storage {
    use super::{copy, memory, runtime, Stream};
    use crate::dtype::DType;
    use crate::error::Result;
    use crate::Array;

    /// The device buffer behind a GPU array.
    pub(crate) type Buffer = memory::CudaBuffer;

    /// A row-major copy of the GPU array `a` converted to `dtype`, on `stream` (the stream
    /// that produced `a` when `None`).
    pub(crate) fn copy_cast(a: &Array, dtype: DType, stream: Option<&Stream>) -> Result<Array> {
        copy::copy_cast(a, dtype, stream)
    }

    /// Writes the GPU array `src` (of `dst`'s dtype and the view's shape) into the view
    /// (`offset`, `shape`, `strides`) of `dst` on `dst`'s stream; the view's elements are
    /// distinct (see [`copy::copy_into`]).
    pub(crate) fn copy_into(
        dst: &mut Buffer,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
        src: &Array,
    ) -> Result<()> {
        copy::copy_into(dst, offset, shape, strides, src)
    }

    /// A row-major array of `shape` and `dtype` on `stream`'s device, produced on `stream`,
    /// whose elements are unspecified (0xFF bytes while buffer poisoning is on).
    pub(crate) fn uninit(stream: &Stream, shape: &[usize], dtype: DType) -> Result<Array> {
        let device = runtime::device(stream.ordinal())?;
        let n = crate::array::checked_layout(shape, dtype)?;
        let buf = memory::CudaBuffer::alloc(&device, stream, dtype, n)?;
        Array::from_cuda_buffer(buf, shape)
    }

    /// A row-major host array uploaded to `stream`'s device, produced on `stream`.
    pub(crate) fn upload(host: &Array, stream: &Stream) -> Result<Array> {
        memory::upload(host, stream)
    }

    /// A GPU array copied to the host (waits for the work producing it).
    pub(crate) fn download(a: &Array) -> Result<Array> {
        memory::download(a)
    }

    /// Device memory borrowed from another library (see [`memory::CudaBuffer::borrowed`]).
    ///
    /// # Safety
    /// As [`crate::Array::from_cuda_external`].
    pub(crate) unsafe fn borrowed(
        stream: &Stream,
        address: u64,
        dtype: DType,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Buffer> {
        // SAFETY: forwarded contract.
        unsafe { memory::CudaBuffer::borrowed(stream, address, dtype, len, owner) }
    }

    /// The device's default stream.
    pub(crate) fn default_stream(ordinal: usize) -> Result<Stream> {
        Ok(runtime::device(ordinal)?.default_stream().clone())
    }

    /// Checks that CUDA device `ordinal` can be used.
    pub(crate) fn open(ordinal: usize) -> Result<()> {
        runtime::device(ordinal).map(|_| ())
    }

    /// Usable CUDA devices (0 without a driver).
    pub(crate) fn device_count() -> usize {
        runtime::device_count().unwrap_or(0)
    }

    /// Waits for all work queued on device `ordinal`.
    pub(crate) fn synchronize(ordinal: usize) -> Result<()> {
        runtime::synchronize_device(ordinal)
    }

    /// Returns the memory the device's pool keeps to the driver.
    pub(crate) fn release_cached_memory(ordinal: usize) -> Result<()> {
        runtime::device(ordinal)?.release_cached_memory()
    }
}

/// The test and benchmark hooks of [`crate::testing`].
pub(crate) mod hooks {
    pub(crate) use super::jit::{check_builtin_kernels, nvrtc_version};
    pub(crate) use super::memory::poison_gpu_buffers;
    use crate::error::Result;
    use crate::ops::sdpa::SdpaArgs;

    /// The name of the attention kernel a validated call on CUDA device `ordinal` gets.
    pub(crate) fn attention_kernel(args: &SdpaArgs, ordinal: usize) -> Result<&'static str> {
        use super::sdpa::Kernel;
        Ok(match super::sdpa::selected_kernel(args, ordinal)? {
            Kernel::DecodeMma => "decode_mma",
            Kernel::DecodeSimt => "decode_simt",
            Kernel::PrefillSm90 => "prefill_sm90",
            Kernel::PrefillMma => "prefill_mma",
            Kernel::General => "general",
        })
    }
}
