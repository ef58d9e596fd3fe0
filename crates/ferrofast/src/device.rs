//! Devices: where an array's data lives and where ops on it run.

use crate::cuda::storage;
use crate::error::Result;
use std::fmt;

/// A compute device. [`Device::Cpu`] always exists; CUDA devices exist when the crate is
/// built with the `cuda` feature and a driver and GPU are present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU; work runs on a shared rayon pool.
    #[default]
    Cpu,
    /// CUDA device with the given ordinal.
    Cuda(usize),
}

impl Device {
    /// The CPU device.
    pub fn cpu() -> Device {
        Device::Cpu
    }

    /// True for [`Device::Cpu`].
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// True for [`Device::Cuda`].
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The CUDA device with `ordinal`, after checking it exists (its context is created
    /// here, once per process).
    ///
    /// # Errors
    /// `Error::CudaUnavailable` when the crate was built without the `cuda` feature, the
    /// driver library cannot be loaded (the message lists where it was looked for) or there
    /// is no GPU; `Error::Device` when `ordinal` is not below the device count; driver errors
    /// while creating the context.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        storage::open(ordinal)?;
        Ok(Device::Cuda(ordinal))
    }

    /// Number of usable CUDA devices: 0 without the `cuda` feature, a driver or a GPU.
    pub fn cuda_device_count() -> usize {
        storage::device_count()
    }

    /// Blocks until all work queued on the device (every stream) has finished. A no-op for
    /// the CPU, whose work is synchronous.
    ///
    /// # Errors
    /// The error of failed asynchronous GPU work; as [`Device::cuda`] for a CUDA device that
    /// cannot be reached.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => storage::synchronize(*i),
        }
    }

    /// Waits for all work on the device, then hands the GPU memory that ferrofast's pool
    /// holds for reuse (freed arrays' memory) back to the driver, so other processes and
    /// libraries can have it. Freed memory is otherwise kept: allocating it again is far
    /// cheaper than mapping fresh pages. An allocation that runs out of memory does this by
    /// itself before it retries once. A no-op for the CPU.
    ///
    /// # Errors
    /// The error of failed asynchronous GPU work; as [`Device::cuda`] for a CUDA device that
    /// cannot be reached.
    pub fn release_cached_memory(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => storage::release_cached_memory(*i),
        }
    }

    /// The device's default stream, where uploads and ops go unless another
    /// [`Stream`](crate::Stream) is named.
    ///
    /// # Errors
    /// `Error::Device` for the CPU; as [`Device::cuda`] otherwise.
    pub fn default_stream(&self) -> Result<crate::Stream> {
        crate::Stream::default_for(self)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
