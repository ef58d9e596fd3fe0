//! The CUDA back end's interface in a build without the `cuda` feature: the same items as
//! `cuda/mod.rs`, none of which can be reached with a GPU array (no `Stream` or device buffer
//! can exist), each entry that could be called returning `Error::CudaUnavailable`.

use crate::error::{Error, Result};
use crate::Device;
use std::fmt;

/// The error every entry returns.
fn unavailable(what: &str) -> Error {
    Error::CudaUnavailable(format!(
        "{what}: this build of ferrofast has no CUDA back end (build with the `cuda` feature)"
    ))
}

/// A value that cannot exist: no stream or device buffer is ever made in this build.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Never {}

impl fmt::Debug for Never {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

/// A CUDA stream. In a build without the `cuda` feature none can be made:
/// [`Stream::new`] returns `Error::CudaUnavailable`.
#[derive(Clone, PartialEq, Eq)]
pub struct Stream {
    never: Never,
}

impl Stream {
    /// Creates a new stream on a CUDA device.
    ///
    /// # Errors
    /// Always `Error::CudaUnavailable` in this build.
    pub fn new(device: &Device) -> Result<Stream> {
        Err(unavailable(&format!("a stream on {device}")))
    }

    /// The device's default stream.
    ///
    /// # Errors
    /// Always `Error::CudaUnavailable` in this build.
    pub fn default_for(device: &Device) -> Result<Stream> {
        Stream::new(device)
    }

    /// A stream owned by another library.
    ///
    /// # Safety
    /// None needed in this build: no stream is made.
    ///
    /// # Errors
    /// Always `Error::CudaUnavailable` in this build.
    pub unsafe fn from_raw(device: &Device, raw: *mut std::ffi::c_void) -> Result<Stream> {
        let _ = raw;
        Stream::new(device)
    }

    /// The driver's handle of this stream.
    pub fn as_raw(&self) -> *mut std::ffi::c_void {
        match self.never {}
    }

    /// Makes work queued on this stream wait for the work queued on `other` so far.
    ///
    /// # Errors
    /// None in this build (no stream exists).
    pub fn wait_for(&self, other: &Stream) -> Result<()> {
        let _ = other;
        match self.never {}
    }

    /// The device this stream belongs to.
    pub fn device(&self) -> Device {
        match self.never {}
    }

    /// Blocks until all work queued on this stream has finished.
    ///
    /// # Errors
    /// None in this build (no stream exists).
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.never {}
    }
}

/// What [`crate::Array`] and [`crate::Device`] reach CUDA through.
pub(crate) mod storage {
    use super::{unavailable, Never, Stream};
    use crate::dtype::DType;
    use crate::error::Result;
    use crate::Array;

    /// The device buffer behind a GPU array: none exists in this build.
    #[derive(Debug)]
    pub(crate) struct Buffer {
        never: Never,
    }

    impl Buffer {
        pub(crate) fn dtype(&self) -> DType {
            match self.never {}
        }
        pub(crate) fn ordinal(&self) -> usize {
            match self.never {}
        }
        pub(crate) fn stream(&self) -> &Stream {
            match self.never {}
        }
        pub(crate) fn address(&self) -> u64 {
            match self.never {}
        }
    }

    /// # Safety
    /// None needed in this build: `stream` cannot exist.
    pub(crate) unsafe fn borrowed(
        stream: &Stream,
        _: u64,
        _: DType,
        _: usize,
        _: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Buffer> {
        match stream.never {}
    }

    pub(crate) fn copy_into(
        dst: &mut Buffer,
        _: usize,
        _: &[usize],
        _: &[isize],
        _: &Array,
    ) -> Result<()> {
        match dst.never {}
    }
    pub(crate) fn uninit(stream: &Stream, _: &[usize], _: DType) -> Result<Array> {
        match stream.never {}
    }
    pub(crate) fn copy_cast(_: &Array, _: DType, _: Option<&Stream>) -> Result<Array> {
        Err(unavailable("copying a GPU array"))
    }
    pub(crate) fn upload(_: &Array, _: &Stream) -> Result<Array> {
        Err(unavailable("uploading to a GPU"))
    }
    pub(crate) fn download(_: &Array) -> Result<Array> {
        Err(unavailable("downloading from a GPU"))
    }
    pub(crate) fn default_stream(ordinal: usize) -> Result<Stream> {
        Err(unavailable(&format!("cuda:{ordinal}")))
    }
    pub(crate) fn open(ordinal: usize) -> Result<()> {
        Err(unavailable(&format!("cuda:{ordinal} requested")))
    }
    pub(crate) fn device_count() -> usize {
        0
    }
    pub(crate) fn synchronize(ordinal: usize) -> Result<()> {
        open(ordinal)
    }
    pub(crate) fn release_cached_memory(ordinal: usize) -> Result<()> {
        open(ordinal)
    }
}

/// The op launchers: unreachable without a stream.
macro_rules! launcher {
    ($module:ident, $args:ty $(; $f:ident($fargs:ty) -> $ret:ty)*) => {
        pub(crate) mod $module {
            use crate::error::Result;
            use crate::Array;

            pub(crate) fn run(_: &$args, stream: &super::Stream) -> Result<Array> {
                match stream.never {}
            }
            $(
                pub(crate) fn $f(_: &$fargs, stream: &super::Stream) -> Result<$ret> {
                    match stream.never {}
                }
            )*
        }
    };
}
launcher!(norm, crate::ops::norm::NormArgs;
    vjp(crate::ops::norm::NormVjpArgs) -> (Array, Option<Array>, Option<Array>));
launcher!(rope, crate::ops::rope::RopeArgs);
/// The cross-entropy launchers: unreachable without a stream.
pub(crate) mod cross_entropy {
    use crate::error::Result;
    use crate::ops::cross_entropy::{CrossEntropyArgs, CrossEntropyVjpArgs};
    use crate::Array;

    pub(crate) fn run(_: &CrossEntropyArgs, stream: &super::Stream) -> Result<Array> {
        match stream.never {}
    }
    pub(crate) fn vjp(_: &CrossEntropyVjpArgs, stream: &super::Stream) -> Result<Array> {
        match stream.never {}
    }
    pub(crate) fn fused(_: &CrossEntropyArgs, stream: &super::Stream) -> Result<(Array, Array)> {
        match stream.never {}
    }
    pub(crate) fn fused_in_place(
        _: CrossEntropyArgs,
        stream: &super::Stream,
    ) -> Result<(Array, Array)> {
        match stream.never {}
    }
    /// # Safety
    /// Never runs (no stream exists).
    pub(crate) unsafe fn fused_in_place_lent(
        _: CrossEntropyArgs,
        stream: &super::Stream,
    ) -> Result<(Array, Array)> {
        match stream.never {}
    }
}
launcher!(sdpa, crate::ops::sdpa::SdpaArgs;
    run_with_lse(crate::ops::sdpa::SdpaArgs) -> (Array, Array);
    run_vjp(crate::ops::sdpa::SdpaVjpArgs) -> (Array, Array, Array, Option<Array>));

/// The `merge_attention_states` launchers: unreachable without a stream.
pub(crate) mod merge {
    use crate::error::Result;
    use crate::ops::merge::MergeArgs;
    use crate::Array;

    pub(crate) fn run(_: &MergeArgs, stream: &super::Stream) -> Result<(Array, Array)> {
        match stream.never {}
    }
    pub(crate) fn accumulate(
        _: Option<&Array>,
        _: &Array,
        stream: &super::Stream,
    ) -> Result<Array> {
        match stream.never {}
    }
}

/// The `gated_delta_update` launchers: unreachable without a stream.
pub(crate) mod gated_delta {
    use crate::error::Result;
    use crate::ops::gated_delta::{GatedDeltaArgs, GatedDeltaGrads, GatedDeltaVjpArgs};
    use crate::Array;

    pub(crate) fn run(_: &GatedDeltaArgs, stream: &super::Stream) -> Result<(Array, Array)> {
        match stream.never {}
    }
    pub(crate) fn vjp(_: &GatedDeltaVjpArgs, stream: &super::Stream) -> Result<GatedDeltaGrads> {
        match stream.never {}
    }
}

/// The test and benchmark hooks of [`crate::testing`].
pub(crate) mod hooks {
    use super::unavailable;
    use crate::error::Result;
    use crate::ops::sdpa::SdpaArgs;
    use crate::testing::KernelCheck;

    pub(crate) fn check_builtin_kernels(_: &str) -> Result<Vec<KernelCheck>> {
        Err(unavailable("compiling the CUDA kernels"))
    }
    pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
        Err(unavailable("NVRTC"))
    }
    pub(crate) fn poison_gpu_buffers(_: bool) {}
    pub(crate) fn attention_kernel(_: &SdpaArgs, ordinal: usize) -> Result<&'static str> {
        Err(unavailable(&format!("cuda:{ordinal}")))
    }
}
