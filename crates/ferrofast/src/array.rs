//! `Array`: an n-dimensional, strided, reference-counted view of typed data on one device.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::Device;
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;

mod slice_update;
#[cfg(feature = "cuda")]
pub(crate) use slice_update::collapse2;
pub(crate) use slice_update::next_index;

/// Calls a generic expression with `$t` set to the Rust type of a runtime [`DType`].
macro_rules! dispatch_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        $crate::array::dispatch_dtype!(@arms $dtype, $t => $body;
            Bool: bool, U8: u8, U32: u32, I32: i32, I64: i64, F16: half::f16,
            BF16: half::bf16, F32: f32, F64: f64)
    };
    // One arm per dtype, `$body` under `type $t = ` its Rust type.
    (@arms $dtype:expr, $t:ident => $body:expr; $($variant:ident: $ty:ty),+) => {
        match $dtype {
            $(DType::$variant => {
                type $t = $ty;
                $body
            })+
        }
    };
}
pub(crate) use dispatch_dtype;

/// Host storage: one typed vector per dtype, so every access is safe and aligned.
#[derive(Debug)]
#[doc(hidden)]
pub enum CpuData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Runs `$body` with `$v` bound to the typed vector inside a [`CpuData`].
macro_rules! with_cpu_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            CpuData::Bool($v) => $body,
            CpuData::U8($v) => $body,
            CpuData::U32($v) => $body,
            CpuData::I32($v) => $body,
            CpuData::I64($v) => $body,
            CpuData::F16($v) => $body,
            CpuData::BF16($v) => $body,
            CpuData::F32($v) => $body,
            CpuData::F64($v) => $body,
        }
    };
}

impl CpuData {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuData::Bool(_) => DType::Bool,
            CpuData::U8(_) => DType::U8,
            CpuData::U32(_) => DType::U32,
            CpuData::I32(_) => DType::I32,
            CpuData::I64(_) => DType::I64,
            CpuData::F16(_) => DType::F16,
            CpuData::BF16(_) => DType::BF16,
            CpuData::F32(_) => DType::F32,
            CpuData::F64(_) => DType::F64,
        }
    }

    fn len(&self) -> usize {
        with_cpu_data!(self, v => v.len())
    }

    /// A vector of `n` copies of `value` converted to `dtype`.
    fn filled(dtype: DType, n: usize, value: f64) -> Result<CpuData> {
        fn fill<T: Element>(n: usize, value: f64) -> Result<CpuData> {
            Ok(T::wrap(host_pool::take_filled(n, T::from_f64(value))?))
        }
        dispatch_dtype!(dtype, T => fill::<T>(n, value))
    }
}

/// Where an array's elements live.
#[derive(Debug)]
pub(crate) enum Storage {
    /// Host memory; `Recycle::Pool` when ferrofast allocated it (a kernel's output), which
    /// goes back to the host pool when dropped; `Recycle::Never` for a vector the user
    /// handed in ([`Array::from_vec`]), which is freed as any `Vec`.
    Cpu(CpuData, Recycle),
    /// A device buffer, its device and the stream that produced it (only the CUDA back end
    /// makes one).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Cuda(crate::cuda::storage::Buffer),
    /// Host memory owned outside ferrofast (see [`Array::from_external`]); never given to
    /// the host pool, and never written except through [`Array::lent_host_slice_mut`] under
    /// its caller's lending contract.
    External(ExternalBuffer),
}

/// Host memory borrowed from another library (a NumPy array, a PyTorch tensor, ...), kept
/// valid by `owner` for as long as this value lives. Made only by [`Array::from_external`],
/// whose contract guarantees that `ptr` addresses `len` initialised, aligned, valid elements
/// of `dtype` that nobody writes while the owner is held (but [`Array::lent_host_slice_mut`], where
/// its caller lends them for writing).
pub(crate) struct ExternalBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    dtype: DType,
    /// Dropped after the array's last view: releases the memory to its producer.
    _owner: Box<dyn std::any::Any + Send + Sync>,
}

// SAFETY: ferrofast reads the memory through shared slices (`cpu_buffer`), and
// `from_external`'s contract makes it immutable and valid while `_owner` lives; `_owner`
// itself is `Send + Sync`. So sharing or moving the buffer between threads is as safe as
// sharing a `&[T]`. The one write, `Array::lent_host_slice_mut`, goes through `&mut` to the only
// handle on the storage (`Arc::get_mut`), so no shared slice of it exists meanwhile, and
// its caller's contract lends the memory for writing.
unsafe impl Send for ExternalBuffer {}
// SAFETY: as for `Send` above: the memory is read-only for its whole life here.
unsafe impl Sync for ExternalBuffer {}

impl std::fmt::Debug for ExternalBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// Whether a host buffer goes back to the host pool when its last array is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recycle {
    /// Allocated by ferrofast: kept for reuse.
    Pool,
    /// Handed in by the user: freed.
    Never,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Storage::Cpu(data, Recycle::Pool) = self {
            host_pool::give(std::mem::replace(data, CpuData::U8(Vec::new())));
        }
    }
}

/// Host buffers recycled between arrays, as MLX's and PyTorch's allocators do: a fresh
/// multi-megabyte buffer costs a page fault per 4 KiB on first touch, more than a
/// memory-bound kernel spends reading and writing it. A dropped kernel output of at least
/// [`host_pool::MIN_BYTES`] is kept and handed to the next output of the same dtype and
/// size class (sizes within a quarter of a power of two share a class; fresh buffers get
/// their class's capacity, so a slightly larger request reuses them). At most
/// [`host_pool::MAX_BUFFERS`] buffers and [`host_pool::MAX_BYTES`] bytes are kept; the
/// oldest go first. Vectors the user hands in ([`Array::from_vec`]) are never kept.
pub(crate) mod host_pool {
    use super::CpuData;
    use crate::dtype::Element;
    use crate::error::{Error, Result};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Smaller buffers are cheap to allocate and not kept. Buffers from here up are not:
    /// glibc serves them from the top of its heap or from `mmap` and returns them to the
    /// system on free, so an op called in a loop on a few rows would page-fault its whole
    /// output on every call (a 100 KiB layer_norm output measured 3x slower that way).
    pub(crate) const MIN_BYTES: usize = 16 << 10;
    /// At most this many bytes are kept in all (by capacity).
    pub(crate) const MAX_BYTES: usize = 256 << 20;
    /// At most this many buffers are kept.
    pub(crate) const MAX_BUFFERS: usize = 32;

    struct Pool {
        /// Oldest first.
        buffers: VecDeque<CpuData>,
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        buffers: VecDeque::new(),
        bytes: 0,
    });

    fn capacity_of(d: &CpuData) -> usize {
        with_cpu_data!(d, v => v.capacity())
    }

    fn bytes_of(d: &CpuData) -> usize {
        capacity_of(d).saturating_mul(d.dtype().size())
    }

    /// The size class of `n` elements: `n` rounded up to a quarter of the power of two
    /// below it (at most 25% more), the capacity fresh pooled buffers get.
    pub(crate) fn class(n: usize) -> usize {
        if n <= 4 {
            return n;
        }
        let step = (1usize << (usize::BITS - 1 - n.leading_zeros())) / 4;
        n.div_ceil(step).saturating_mul(step)
    }

    /// Keeps `data` for reuse if it is large enough, evicting the oldest buffers to stay
    /// within the bounds; drops it if it alone exceeds them.
    pub(crate) fn give(data: CpuData) {
        let bytes = bytes_of(&data);
        if !(MIN_BYTES..=MAX_BYTES).contains(&bytes) {
            return;
        }
        let evicted: Vec<CpuData> = match POOL.lock() {
            Ok(mut pool) => {
                let mut out = Vec::new();
                while pool.buffers.len() >= MAX_BUFFERS || pool.bytes + bytes > MAX_BYTES {
                    match pool.buffers.pop_front() {
                        Some(old) => {
                            pool.bytes -= bytes_of(&old);
                            out.push(old);
                        }
                        None => break,
                    }
                }
                pool.bytes += bytes;
                pool.buffers.push_back(data);
                out
            }
            Err(_) => return,
        };
        // Freed outside the lock.
        drop(evicted);
    }

    /// Frees every kept buffer.
    pub(crate) fn clear() {
        let buffers = match POOL.lock() {
            Ok(mut pool) => {
                pool.bytes = 0;
                std::mem::take(&mut pool.buffers)
            }
            Err(_) => return,
        };
        drop(buffers);
    }

    /// `(buffers, bytes)` kept now.
    pub(crate) fn stats() -> (usize, usize) {
        POOL.lock()
            .map(|p| (p.buffers.len(), p.bytes))
            .unwrap_or((0, 0))
    }

    /// A kept buffer of `T` whose capacity is in `n`'s size class and at least `n` (the
    /// most recently kept first), or `None`.
    fn take_vec<T: Element>(n: usize) -> Option<Vec<T>> {
        if n == 0 {
            return None;
        }
        let want = class(n);
        let mut pool = POOL.lock().ok()?;
        let i = pool.buffers.iter().rposition(|d| {
            let cap = capacity_of(d);
            d.dtype() == T::DTYPE && cap >= n && class(cap) == want
        })?;
        let data = pool.buffers.remove(i)?;
        pool.bytes -= bytes_of(&data);
        drop(pool);
        let mut data = data;
        T::take_vec(&mut data)
    }

    /// A buffer of exactly `n` elements whose contents are unspecified (the caller writes
    /// every element), or `None` when none is pooled.
    pub(crate) fn take<T: Element>(n: usize) -> Option<Vec<T>> {
        let mut v = take_vec::<T>(n)?;
        // The kept elements are initialised; any beyond them are made so.
        v.resize(n, T::from_f64(0.0));
        Some(v)
    }

    /// An empty vector with room for at least `n` elements: a pooled buffer of `n`'s size
    /// class when one is kept, else fresh memory of the class's capacity, never zeroed (a
    /// zeroed allocation is a memset, an extra pass on one thread). The caller fills
    /// `spare_capacity_mut()[..n]`, then sets the length.
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn take_uninit<T: Element>(n: usize) -> Result<Vec<T>> {
        match take_vec::<T>(n) {
            Some(mut out) => {
                out.clear();
                Ok(out)
            }
            None => with_capacity::<T>(pooled_capacity::<T>(n)),
        }
    }

    /// The capacity a fresh buffer of `n` elements of `T` gets: its size class when it is
    /// large enough to be kept, else `n`.
    fn pooled_capacity<T>(n: usize) -> usize {
        if n.saturating_mul(std::mem::size_of::<T>()) >= MIN_BYTES {
            class(n)
        } else {
            n
        }
    }

    /// A vector of `n` copies of `value`: a pooled buffer when one of that size is kept,
    /// else fresh memory.
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn take_filled<T: Element>(n: usize, value: T) -> Result<Vec<T>> {
        let mut out = take_uninit::<T>(n)?;
        out.resize(n, value);
        Ok(out)
    }

    /// A buffer of exactly `n` elements whose contents are unspecified (the caller writes
    /// every element before reading any): a pooled buffer when one of that size is kept,
    /// else fresh zeroed memory (which the system maps lazily, unlike a filled vector).
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn take_or_zeroed<T: Element>(n: usize) -> Result<Vec<T>> {
        if let Some(out) = take::<T>(n) {
            return Ok(out);
        }
        let cap = pooled_capacity::<T>(n);
        let layout = std::alloc::Layout::array::<T>(cap).map_err(|_| out_of_memory::<T>(cap))?;
        if layout.size() == 0 {
            return Ok(Vec::new());
        }
        check_physical::<T>(cap)?;
        // SAFETY: the layout's size is not zero (checked above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
        if ptr.is_null() {
            return Err(out_of_memory::<T>(cap));
        }
        // SAFETY: `ptr` comes from the global allocator with `T`'s alignment and the size of
        // `cap` elements, so `cap` is the capacity; all bytes being zero (a valid value of
        // every `Element` type: 0, 0.0 or `false`), the first `n <= cap` are initialised.
        Ok(unsafe { Vec::from_raw_parts(ptr, n, cap) })
    }

    /// The host's physical memory in bytes (Linux: `MemTotal` of `/proc/meminfo`), read once;
    /// `None` where it is not known.
    fn physical_memory() -> Option<u64> {
        static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        *TOTAL.get_or_init(|| {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
    }

    /// Refuses one buffer larger than the host's physical memory: a system that overcommits
    /// would grant it and kill the process when it is written.
    fn check_physical<T>(n: usize) -> Result<()> {
        let bytes = (n as u128) * (std::mem::size_of::<T>() as u128);
        match physical_memory() {
            Some(total) if bytes > u128::from(total) => Err(Error::OutOfMemory(format!(
                "cannot allocate {bytes} bytes on the host: more than its {total} bytes of \
                 memory"
            ))),
            _ => Ok(()),
        }
    }

    /// The error for `n` elements of `T` that cannot be allocated on the host.
    pub(crate) fn out_of_memory<T>(n: usize) -> Error {
        let each = std::mem::size_of::<T>();
        match n.checked_mul(each) {
            Some(bytes) => Error::OutOfMemory(format!(
                "cannot allocate {bytes} bytes on the host ({n} elements of {each} bytes)"
            )),
            None => Error::OutOfMemory(format!(
                "cannot allocate {n} elements of {each} bytes on the host: the byte size \
                 overflows the address space"
            )),
        }
    }

    /// An empty vector with room for `n` elements, allocated fallibly (never from the pool:
    /// for scratch space and small tables).
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn with_capacity<T>(n: usize) -> Result<Vec<T>> {
        check_physical::<T>(n)?;
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| out_of_memory::<T>(n))?;
        Ok(out)
    }

    /// `vec![value; n]`, allocated fallibly.
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn filled<T: Clone>(n: usize, value: T) -> Result<Vec<T>> {
        let mut out = with_capacity::<T>(n)?;
        out.resize(n, value);
        Ok(out)
    }

    /// `src.iter().map(f).collect()`, allocated fallibly.
    ///
    /// # Errors
    /// `Error::OutOfMemory` naming the size when the memory cannot be had.
    pub(crate) fn map<S: Copy, D>(src: &[S], f: impl FnMut(S) -> D) -> Result<Vec<D>> {
        let mut out = with_capacity::<D>(src.len())?;
        out.extend(src.iter().copied().map(f));
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::class;

        #[test]
        fn size_classes_round_up_by_at_most_a_quarter() {
            assert_eq!(class(0), 0);
            assert_eq!(class(3), 3);
            assert_eq!(class(1000), 1024);
            assert_eq!(class(1024), 1024);
            assert_eq!(class(1025), 1280);
            assert_eq!(class(4096 + 1), 5120);
            for n in (5..200_000).step_by(37) {
                let c = class(n);
                assert!(c >= n && c - n <= n / 4 + 1, "class({n}) = {c}");
                assert_eq!(class(c), c, "a class is its own class ({n})");
            }
        }
    }
}

/// Device memory handed over by [`Array::into_cuda_allocation`]: the receiver owns it and
/// frees it once (`cuMemFreeAsync` on a stream ordered after `stream`, or `cuMemFree`).
/// Dropping this value does not free it.
#[derive(Debug)]
pub struct CudaAllocation {
    /// Device address of the first element; the elements follow row-major.
    pub address: u64,
    /// Size of the allocation in bytes: at least the array's bytes, and at least 1.
    pub bytes: usize,
    /// The stream on which the work that writes the elements is queued.
    pub stream: crate::Stream,
}

/// An n-dimensional array: shape, strides (in elements, may be negative or zero), offset
/// (in elements) and dtype over a reference-counted buffer on one [`Device`].
///
/// Arrays are immutable values. Views ([`slice`](Array::slice),
/// [`transpose`](Array::transpose), [`swapaxes`](Array::swapaxes),
/// [`broadcast_to`](Array::broadcast_to), [`reshape`](Array::reshape) of contiguous data)
/// share the buffer: cloning an `Array` or taking a view never copies elements.
/// [`contiguous`](Array::contiguous) copies only when the layout is not row-major already.
///
/// `Display` prints the elements as NumPy does (all of them up to 1000, else the first and
/// last three along the last two axes and the first and last one along the others) with the
/// shape, dtype and device; `Debug` adds the strides and offset. A view prints its own
/// elements; a GPU array copies only the printed ones.
#[derive(Clone)]
pub struct Array {
    shape: Vec<usize>,
    strides: Vec<isize>,
    offset: usize,
    dtype: DType,
    storage: Arc<Storage>,
}

/// Row-major strides for `shape`.
pub(crate) fn row_major_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d.max(1) as isize;
    }
    strides
}

/// The extent of memory an externally owned array addresses: `len` elements from the
/// lowest-addressed one, the element at index `(0, ..., 0)` `offset` elements in.
struct Span {
    len: usize,
    offset: usize,
    what: &'static str,
    shape: String,
    strides: String,
}

impl Span {
    /// Checks `shape`, `strides` and the address `addr` of element `(0, ..., 0)` of an
    /// external buffer of `dtype` for the constructor `what`.
    fn of(
        what: &'static str,
        addr: usize,
        shape: &[usize],
        strides: &[isize],
        dtype: DType,
    ) -> Result<Span> {
        if strides.len() != shape.len() {
            return Err(Error::invalid(format!(
                "[{what}] {} strides given for a shape of {} dimensions.",
                strides.len(),
                shape.len()
            )));
        }
        let size = checked_layout(shape, dtype)?;
        let itemsize = dtype.size();
        let mut span = Span {
            len: 0,
            offset: 0,
            what,
            shape: fmt_shape(shape),
            strides: format!("{strides:?}"),
        };
        if size == 0 {
            return Ok(span);
        }
        // The lowest (`lo <= 0`) and highest (`hi >= 0`) element offsets addressed.
        let (mut lo, mut hi) = (0isize, 0isize);
        for (&d, &s) in shape.iter().zip(strides) {
            let reach = isize::try_from(d - 1)
                .ok()
                .and_then(|d| d.checked_mul(s))
                .ok_or_else(|| span.overflow())?;
            if reach < 0 {
                lo = lo.checked_add(reach).ok_or_else(|| span.overflow())?;
            } else {
                hi = hi.checked_add(reach).ok_or_else(|| span.overflow())?;
            }
        }
        if addr == 0 || !addr.is_multiple_of(itemsize) {
            return Err(Error::invalid(format!(
                "[{what}] the data address {addr:#x} is null or not aligned to the \
                 {itemsize}-byte elements of {dtype}."
            )));
        }
        let len = hi
            .checked_sub(lo)
            .and_then(|n| n.checked_add(1))
            .filter(|n| n.checked_mul(itemsize as isize).is_some())
            .ok_or_else(|| span.overflow())?;
        let below = lo.unsigned_abs();
        if below.checked_mul(itemsize).is_none_or(|b| b > addr) {
            return Err(span.overflow());
        }
        span.len = len as usize;
        span.offset = below;
        Ok(span)
    }

    fn overflow(&self) -> Error {
        Error::invalid(format!(
            "[{}] the strides {} of shape {} address more memory than fits in isize.",
            self.what, self.strides, self.shape
        ))
    }
}

/// Formats a shape the way MLX's messages do: `(2,3,4)`.
pub fn fmt_shape(shape: &[usize]) -> String {
    let inner: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("({})", inner.join(","))
}

/// Frees the host buffers ferrofast keeps for reuse after kernel outputs are dropped (at
/// most 32 buffers and 256 MiB, the oldest evicted first; see [`host_cache_stats`]). Later
/// ops allocate afresh.
pub fn clear_host_cache() {
    host_pool::clear();
}

/// `(buffers, bytes)` the host cache holds now: at most 32 buffers and 256 MiB of capacity.
/// Kernel outputs of 16 KiB and more go there when dropped, vectors given to
/// [`Array::from_vec`] never do.
pub fn host_cache_stats() -> (usize, usize) {
    host_pool::stats()
}

/// MLX's `broadcast_shapes`: numpy rules, aligned from the right.
///
/// # Errors
/// `Error::Shape` with MLX's text when two dimensions differ and neither is 1.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::Shape(format!(
                "[broadcast_shapes] Shapes {} and {} cannot be broadcast.",
                fmt_shape(a),
                fmt_shape(b)
            )));
        };
    }
    Ok(out)
}

/// The element count of `shape`, or `Error::Shape` naming the shape when the count does not
/// fit in `isize` (no buffer or view can have that many elements).
pub(crate) fn checked_size(shape: &[usize]) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| isize::try_from(n).is_ok())
        .ok_or_else(|| {
            Error::Shape(format!(
                "shape {} has more elements than memory can address",
                fmt_shape(shape)
            ))
        })
}

/// The element count of `shape` at `dtype`, or `Error::Shape` naming the shape when the count
/// or its size in bytes does not fit in `isize`. Every [`Array`] satisfies this, so its
/// [`size`](Array::size) and [`nbytes`](Array::nbytes) never overflow.
pub(crate) fn checked_layout(shape: &[usize], dtype: DType) -> Result<usize> {
    let n = checked_size(shape)?;
    match n.checked_mul(dtype.size()).map(isize::try_from) {
        Some(Ok(_)) => Ok(n),
        _ => Err(Error::Shape(format!(
            "shape {} of {dtype} has more bytes than memory can address ({n} elements of {} \
             bytes)",
            fmt_shape(shape),
            dtype.size()
        ))),
    }
}

/// Normalises a possibly negative axis against `ndim`.
pub(crate) fn normalize_axis(axis: isize, ndim: usize) -> Result<usize> {
    let n = ndim as isize;
    let a = if axis < 0 { axis + n } else { axis };
    if a < 0 || a >= n {
        return Err(Error::invalid(format!(
            "axis {axis} is out of bounds for array with {ndim} dimensions."
        )));
    }
    Ok(a as usize)
}

/// A counter-based generator: element `i` of seed `s` is a pure function of `(s, i)`, so
/// arrays fill in parallel and come out identical on every machine.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit_uniform(seed: u64, i: u64) -> f64 {
    let bits = splitmix64(splitmix64(seed) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
    // 53 random bits, in (0, 1): never exactly 0 so `ln` below is finite.
    ((bits >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

fn standard_normal(seed: u64, i: u64) -> f64 {
    // Box-Muller on two independent uniforms drawn for this element.
    let u1 = unit_uniform(seed, 2 * i);
    let u2 = unit_uniform(seed, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn generate<T: Element>(n: usize, f: impl Fn(u64) -> f64 + Sync) -> Result<CpuData> {
    let mut v = host_pool::take_filled(n, T::from_f64(0.0))?;
    v.par_chunks_mut(1 << 14)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c << 14) as u64;
            for (j, x) in chunk.iter_mut().enumerate() {
                *x = T::from_f64(f(base + j as u64));
            }
        });
    Ok(T::wrap(v))
}

impl Array {
    // ----- construction -------------------------------------------------------------------

    fn from_storage(storage: Storage, shape: &[usize]) -> Array {
        let dtype = match &storage {
            Storage::Cpu(d, _) => d.dtype(),
            Storage::Cuda(b) => b.dtype(),
            Storage::External(e) => e.dtype,
        };
        Array {
            shape: shape.to_vec(),
            strides: row_major_strides(shape),
            offset: 0,
            dtype,
            storage: Arc::new(storage),
        }
    }

    /// Wraps host data produced by a kernel (its buffer goes back to the host pool when
    /// dropped); `data.len()` must equal the shape's size.
    pub(crate) fn from_cpu_data(data: CpuData, shape: &[usize]) -> Result<Array> {
        Array::wrap_cpu_data(data, shape, Recycle::Pool)
    }

    /// A kernel's output vector as a row-major array of `shape` (recycled when dropped).
    pub(crate) fn from_kernel_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Array> {
        Array::wrap_cpu_data(T::wrap(data), shape, Recycle::Pool)
    }

    fn wrap_cpu_data(data: CpuData, shape: &[usize], recycle: Recycle) -> Result<Array> {
        let size = checked_layout(shape, data.dtype())?;
        if data.len() != size {
            return Err(Error::Shape(format!(
                "cannot make an array of shape {} from {} elements",
                fmt_shape(shape),
                data.len()
            )));
        }
        Ok(Array::from_storage(Storage::Cpu(data, recycle), shape))
    }

    /// Takes ownership of `data` as a row-major array of `shape` on the CPU (no copy). The
    /// vector is freed when the last array over it is dropped (it never joins the host
    /// pool of [`clear_host_cache`]).
    ///
    /// # Errors
    /// `Error::Shape` if `data.len()` is not the product of `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Array> {
        Array::wrap_cpu_data(T::wrap(data), shape, Recycle::Never)
    }

    /// Copies `data` into a row-major array of `shape` on the CPU.
    ///
    /// # Errors
    /// `Error::Shape` if `data.len()` is not the product of `shape`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Array> {
        let mut copy = host_pool::with_capacity::<T>(data.len())?;
        copy.extend_from_slice(data);
        Array::from_kernel_vec(copy, shape)
    }

    /// A CPU array over memory ferrofast does not own (a NumPy array's or a PyTorch
    /// tensor's buffer, received through DLPack), without copying it. `ptr` is the address
    /// of the element at index `(0, ..., 0)`; element `idx` lives `sum(idx[k] * strides[k])`
    /// elements further (strides in elements: negative, zero and non-contiguous strides are
    /// allowed). `owner` keeps the memory alive: it is dropped, on whichever thread drops the
    /// last array or view sharing this buffer, once ferrofast no longer reads the memory.
    /// Ops read such an array like any other and never write to it; the memory never enters
    /// the host buffer pool.
    ///
    /// # Safety
    /// Until `owner` is dropped:
    /// - the span from the lowest- to the highest-addressed element the shape and strides
    ///   reach lies inside one live allocation, and every element in it (the gaps between
    ///   strided elements included) is initialised and a valid value of `dtype` (for
    ///   [`DType::Bool`], every byte is 0 or 1);
    /// - nobody writes to that span (ferrofast reads it from other threads, through shared
    ///   slices).
    ///
    /// # Errors
    /// `Error::InvalidArgument` when `strides` and `shape` differ in length, `ptr` is null or
    /// not aligned to the element size while the array has elements, or the addressed span
    /// does not fit in `isize` bytes; `Error::Shape` when the shape's size overflows. On error
    /// `owner` is dropped at once.
    pub unsafe fn from_external(
        ptr: *const u8,
        shape: &[usize],
        strides: &[isize],
        dtype: DType,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Array> {
        let span = Span::of("from_external", ptr as usize, shape, strides, dtype)?;
        let base = if span.len == 0 {
            // No element is ever read: an aligned dangling pointer (8 bytes covers every
            // dtype's alignment) makes the empty slice valid.
            std::ptr::NonNull::<u64>::dangling().cast::<u8>()
        } else {
            // `wrapping_offset` is plain address arithmetic; by the contract the result is
            // the lowest-addressed element, inside the allocation.
            let base = ptr
                .wrapping_offset(-((span.offset * dtype.size()) as isize))
                .cast_mut();
            std::ptr::NonNull::new(base).ok_or_else(|| span.overflow())?
        };
        let storage = Storage::External(ExternalBuffer {
            ptr: base,
            len: span.len,
            dtype,
            _owner: owner,
        });
        Ok(Array {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset: span.offset,
            dtype,
            storage: Arc::new(storage),
        })
    }

    /// A GPU array over device memory ferrofast does not own (a PyTorch CUDA tensor's, a
    /// CuPy or JAX array's, received through DLPack, or any `cudaMalloc`ed buffer), without
    /// copying it. `address` is the device address of the element at index `(0, ..., 0)`;
    /// element `idx` lives `sum(idx[k] * strides[k])` elements further (strides in elements:
    /// negative, zero and non-contiguous strides are allowed). The array is produced on
    /// `stream` (often [`Stream::from_raw`](crate::Stream::from_raw) over the owner's
    /// stream), so ops that take it run there unless told otherwise. `owner` keeps the memory
    /// alive: it is dropped, on whichever thread drops the last array or view sharing this
    /// buffer; ferrofast never frees the memory and never writes to it (in-place ops give
    /// such an array a new buffer).
    ///
    /// # Safety
    /// Until `owner` is dropped *and* the GPU work queued before then on `stream` (and on
    /// any stream an op was told to use for this array) has finished:
    /// - the span from the lowest- to the highest-addressed element the shape and strides
    ///   reach lies inside one live device allocation of `stream`'s device, made in its
    ///   primary context (the one PyTorch, CuPy and JAX use), and every element in it is a
    ///   valid value of `dtype` (for [`DType::Bool`], every byte is 0 or 1);
    /// - nobody writes to that span.
    ///
    /// An owner that returns the memory to an allocator ordered on `stream` (PyTorch's
    /// caching allocator for a tensor used on its current stream) meets the second part.
    ///
    /// ferrofast orders its own work on `stream` after the owner's, by queueing it there. An
    /// op told to run on another stream `other` (an `_on(other, ...)` form) is not ordered
    /// after the owner's pending writes: call `other.wait_for(&stream)` first, and
    /// `stream.wait_for(&other)` before the owner may reuse the memory.
    ///
    /// # Errors
    /// As [`Array::from_external`] (`address` 0 or unaligned is `Error::InvalidArgument`);
    /// `Error::CudaUnavailable` in a build without the `cuda` feature. On error `owner` is
    /// dropped at once.
    pub unsafe fn from_cuda_external(
        address: u64,
        shape: &[usize],
        strides: &[isize],
        dtype: DType,
        stream: &crate::Stream,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Array> {
        let addr = usize::try_from(address).map_err(|_| {
            Error::invalid(format!(
                "[from_cuda_external] the device address {address:#x} does not fit in usize."
            ))
        })?;
        let span = Span::of("from_cuda_external", addr, shape, strides, dtype)?;
        let base = if span.len == 0 {
            address
        } else {
            address
                .checked_sub((span.offset * dtype.size()) as u64)
                .ok_or_else(|| span.overflow())?
        };
        // SAFETY: the caller's contract, for the span computed above.
        let buffer =
            unsafe { crate::cuda::storage::borrowed(stream, base, dtype, span.len, owner)? };
        Ok(Array {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset: span.offset,
            dtype,
            storage: Arc::new(Storage::Cuda(buffer)),
        })
    }

    /// A 0-dimensional array holding `value`, on the CPU.
    pub fn scalar<T: Element>(value: T) -> Array {
        Array::from_storage(Storage::Cpu(T::wrap(vec![value]), Recycle::Never), &[])
    }

    /// An array of `shape` filled with `value` converted to `dtype` (as a C cast would).
    ///
    /// # Errors
    /// `Error::Shape` when the shape's element or byte count overflows the address space,
    /// `Error::OutOfMemory` when the host cannot hold it; device errors if `device` is
    /// unavailable.
    pub fn full(shape: &[usize], value: f64, dtype: DType, device: &Device) -> Result<Array> {
        let n = checked_layout(shape, dtype)?;
        Array::from_cpu_data(CpuData::filled(dtype, n, value)?, shape)?.to_device(device)
    }

    /// An array of zeros.
    ///
    /// # Errors
    /// As [`Array::full`].
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Array> {
        Array::full(shape, 0.0, dtype, device)
    }

    /// An array of ones.
    ///
    /// # Errors
    /// As [`Array::full`].
    pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Array> {
        Array::full(shape, 1.0, dtype, device)
    }

    /// Standard normal samples, deterministic in `seed` (the same seed gives the same array on
    /// every machine and thread count). Values are drawn in f64 and rounded to `dtype`.
    ///
    /// # Errors
    /// `Error::InvalidArgument` for a non-floating dtype; as [`Array::full`] otherwise.
    pub fn randn(shape: &[usize], dtype: DType, seed: u64, device: &Device) -> Result<Array> {
        if !dtype.is_floating() {
            return Err(Error::invalid(format!(
                "[randn] Can only generate floating point values but got {dtype}."
            )));
        }
        let n = checked_layout(shape, dtype)?;
        let data = dispatch_dtype!(dtype, T => generate::<T>(n, |i| standard_normal(seed, i))?);
        Array::from_cpu_data(data, shape)?.to_device(device)
    }

    /// Uniform samples in `[low, high)`, deterministic in `seed`, drawn in f64 and converted
    /// to `dtype` (integers truncate toward zero).
    ///
    /// # Errors
    /// `Error::InvalidArgument` if `!(low <= high)`; as [`Array::full`] otherwise.
    pub fn uniform(
        shape: &[usize],
        low: f64,
        high: f64,
        dtype: DType,
        seed: u64,
        device: &Device,
    ) -> Result<Array> {
        if low.is_nan() || high.is_nan() || low > high {
            return Err(Error::invalid(format!(
                "[uniform] low ({low}) must not exceed high ({high})."
            )));
        }
        let n = checked_layout(shape, dtype)?;
        let data = dispatch_dtype!(dtype, T => generate::<T>(n, |i| {
            low + (high - low) * unit_uniform(seed, i)
        })?);
        Array::from_cpu_data(data, shape)?.to_device(device)
    }

    // ----- accessors ----------------------------------------------------------------------

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements, one per dimension (zero for broadcast axes, negative for
    /// reversed slices).
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }

    /// Offset of the first element into the underlying buffer, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements. Never overflows: every constructor and view checks that the
    /// element count and its byte size fit in `isize` (a view that would not is an
    /// `Error::Shape`).
    pub fn size(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes the logical elements occupy (`size * dtype.size()`; for a broadcast view more
    /// than its buffer holds). Never overflows, as [`size`](Array::size).
    pub fn nbytes(&self) -> usize {
        self.size().saturating_mul(self.dtype.size())
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(..) | Storage::External(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    /// Dimension `axis` (negative counts from the end).
    ///
    /// # Errors
    /// `Error::InvalidArgument` if the axis is out of range.
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.shape[normalize_axis(axis, self.ndim())?])
    }

    /// True if the elements are laid out row-major with no gaps from `offset` on (strides of
    /// size-1 axes are ignored; an empty array is contiguous).
    pub fn is_contiguous(&self) -> bool {
        if self.size() == 0 {
            return true;
        }
        let mut expected = 1isize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d == 1 {
                continue;
            }
            if s != expected {
                return false;
            }
            expected *= d as isize;
        }
        true
    }

    /// True if both arrays view the same buffer.
    pub fn shares_buffer_with(&self, other: &Array) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// The address of this array's first element (the one at [`offset`](Array::offset)) when
    /// it lives on the CPU, in a buffer of ferrofast's or in memory from
    /// [`Array::from_external`]; `None` for a GPU array. Element `idx` lives
    /// `sum(idx[k] * strides[k]) * dtype().size()` bytes after it. Only for reading, and only
    /// while `self` (or a clone or view of it) lives; to write, see
    /// [`host_ptr_mut`](Array::host_ptr_mut).
    pub fn host_ptr(&self) -> Option<*const u8> {
        let byte_offset = self.offset.checked_mul(self.dtype.size())?;
        let base: *const u8 = match &*self.storage {
            Storage::Cpu(data, _) => with_cpu_data!(data, v => v.as_ptr().cast::<u8>()),
            Storage::External(e) => e.ptr.as_ptr().cast_const(),
            Storage::Cuda(_) => return None,
        };
        Some(base.wrapping_add(byte_offset))
    }

    /// The address of this array's first element (the one at [`offset`](Array::offset)) for
    /// reading and writing, when the array lives on the CPU in a buffer ferrofast allocated
    /// and no other `Array` shares that buffer; `None` otherwise (a GPU array, memory from
    /// [`Array::from_external`], or a buffer another array or view also holds:
    /// [`copy`](Array::copy) gives one that qualifies). This is how the buffer is lent to
    /// another library without copying (DLPack export).
    ///
    /// Element `idx` lives `sum(idx[k] * strides[k]) * dtype().size()` bytes after the
    /// pointer. The pointer stays valid while `self` lives (moving `self` does not move the
    /// buffer). Reading and writing through it is sound as long as no clone or view of
    /// `self` is made meanwhile (those would read the buffer while it may be written) and
    /// every value written is valid for the dtype (for `Bool`, 0 or 1): once `self` is
    /// dropped, the buffer may serve as another array's storage.
    pub fn host_ptr_mut(&mut self) -> Option<*mut u8> {
        let byte_offset = self.offset.checked_mul(self.dtype.size())?;
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(data, _) => {
                let base: *mut u8 = with_cpu_data!(data, v => v.as_mut_ptr().cast::<u8>());
                Some(base.wrapping_add(byte_offset))
            }
            Storage::Cuda(_) | Storage::External(_) => None,
        }
    }

    /// Whether this array is the only handle on its buffer, row-major from the buffer's first
    /// element and covering all of it: a kernel may then overwrite the buffer and hand it back
    /// as its result (the in-place training passes). False for memory from
    /// [`Array::from_external`], which its producer owns.
    pub(crate) fn owns_whole_buffer(&self) -> bool {
        if Arc::strong_count(&self.storage) != 1 || Arc::weak_count(&self.storage) != 0 {
            return false;
        }
        if self.offset != 0 || !self.is_contiguous() {
            return false;
        }
        match &*self.storage {
            Storage::Cpu(d, _) => d.len() == self.size(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.len() == self.size() && !b.is_borrowed(),
            #[cfg(not(feature = "cuda"))]
            Storage::Cuda(_) => false,
            Storage::External(_) => false,
        }
    }

    /// Whether this handle is the only one on its buffer (no clone, view or op result shares
    /// it), whoever owns the memory.
    pub(crate) fn is_sole_handle(&self) -> bool {
        Arc::strong_count(&self.storage) == 1 && Arc::weak_count(&self.storage) == 0
    }

    /// The elements of a row-major contiguous array in ferrofast's own host buffer, as a
    /// mutable slice, when this is the only handle on the buffer and the dtype is `T`'s;
    /// `None` otherwise (borrowed or GPU memory, a strided view, another handle alive,
    /// another dtype). The in-place passes write their results there.
    pub(crate) fn host_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        if self.dtype != T::DTYPE || !self.is_contiguous() {
            return None;
        }
        let (offset, n) = (self.offset, self.size());
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(data, _) => T::slice_mut(data)?.get_mut(offset..offset.checked_add(n)?),
            Storage::External(_) | Storage::Cuda(_) => None,
        }
    }

    /// [`host_slice_mut`](Array::host_slice_mut), and for memory borrowed through
    /// [`Array::from_external`] the same slice over the lender's memory.
    ///
    /// # Safety
    /// For borrowed memory, its producer lends it for writing for as long as the slice
    /// lives: it is writable, and nobody else reads or writes these elements meanwhile.
    /// Values of `T` written through the slice are valid values of the dtype.
    pub(crate) unsafe fn lent_host_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        if !matches!(&*self.storage, Storage::External(_)) {
            return self.host_slice_mut();
        }
        if self.dtype != T::DTYPE || !self.is_contiguous() {
            return None;
        }
        let (offset, n) = (self.offset, self.size());
        match Arc::get_mut(&mut self.storage)? {
            Storage::External(e) => {
                if n == 0 {
                    return Some(&mut []);
                }
                // SAFETY: the array is row-major contiguous, so its `n` elements from
                // `offset` lie inside the span `from_external` was given (its contract: one
                // live allocation, initialised, valid values of the dtype, aligned to the
                // element size as `from_external` checked); `Arc::get_mut` succeeded, so no
                // other handle reads them through a shared slice while `&mut self` is
                // borrowed by the returned slice; the caller's contract lends them for
                // writing.
                Some(unsafe {
                    std::slice::from_raw_parts_mut(e.ptr.as_ptr().cast::<T>().add(offset), n)
                })
            }
            Storage::Cpu(..) | Storage::Cuda(_) => None,
        }
    }

    /// The host buffer as a vector when [`owns_whole_buffer`](Array::owns_whole_buffer)
    /// holds and the dtype is `T`'s; `Err(self)` otherwise.
    pub(crate) fn into_host_vec<T: Element>(mut self) -> std::result::Result<Vec<T>, Array> {
        if self.dtype != T::DTYPE || !self.owns_whole_buffer() {
            return Err(self);
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(d, _)) => match T::take_vec(d) {
                Some(v) => Ok(v),
                None => Err(self),
            },
            _ => Err(self),
        }
    }

    /// The whole host buffer as `&[T]` (kernels index it with `offset` and `strides`).
    pub(crate) fn cpu_buffer<T: Element>(&self) -> Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(d, _) => T::slice(d).ok_or(Error::DTypeMismatch {
                expected: self.dtype,
                got: T::DTYPE,
            }),
            Storage::External(e) if e.dtype == T::DTYPE => {
                // SAFETY: `from_external`'s contract: `ptr` addresses `len` initialised,
                // aligned, valid elements of `e.dtype`, which is `T`'s dtype (checked just
                // above), immutable and alive while the storage (which owns the owner) lives;
                // the slice borrows `self`, so it cannot outlive the storage.
                Ok(unsafe { std::slice::from_raw_parts(e.ptr.as_ptr().cast::<T>(), e.len) })
            }
            Storage::External(e) => Err(Error::DTypeMismatch {
                expected: e.dtype,
                got: T::DTYPE,
            }),
            Storage::Cuda(b) => Err(Error::Device(format!(
                "the array is on cuda:{}; a CPU kernel needs it on the CPU \
                 (to_device(&Device::Cpu))",
                b.ordinal()
            ))),
        }
    }

    /// The device buffer of a GPU array (`None` on the CPU).
    pub(crate) fn cuda_buffer(&self) -> Option<&crate::cuda::storage::Buffer> {
        match &*self.storage {
            Storage::Cuda(b) => Some(b),
            Storage::Cpu(..) | Storage::External(_) => None,
        }
    }

    /// Wraps a device buffer produced by a kernel as a row-major array of `shape`.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda_buffer(
        buffer: crate::cuda::storage::Buffer,
        shape: &[usize],
    ) -> Result<Array> {
        let size = checked_size(shape)?;
        if buffer.len() != size {
            return Err(Error::Shape(format!(
                "cannot make an array of shape {} from {} elements",
                fmt_shape(shape),
                buffer.len()
            )));
        }
        Ok(Array::from_storage(Storage::Cuda(buffer), shape))
    }

    /// The device address of this GPU array's first element (the one at
    /// [`offset`](Array::offset)); `None` on the CPU. Element `idx` lives
    /// `sum(idx[k] * strides[k]) * dtype().size()` bytes further. This is how a result is
    /// lent to another library without copying (DLPack export): the memory stays valid while
    /// `self` (or a clone or view) lives, and is written by the work queued on
    /// [`stream`](Array::stream) that produces it, so a reader on another stream must first
    /// wait for that stream ([`Stream::wait_for`](crate::Stream::wait_for)).
    pub fn cuda_ptr(&self) -> Option<u64> {
        let b = self.cuda_buffer()?;
        let byte_offset = u64::try_from(self.offset.checked_mul(self.dtype.size())?).ok()?;
        b.address().checked_add(byte_offset)
    }

    /// [`cuda_ptr`](Array::cuda_ptr) for reading and writing: the device address of the
    /// first element when the array is on a GPU in a buffer ferrofast allocated and no other
    /// `Array` shares that buffer; `None` otherwise (a CPU array, memory from
    /// [`Array::from_cuda_external`], or a buffer another array or view also holds:
    /// [`copy`](Array::copy) gives one that qualifies). Writing through it is sound on a
    /// stream that has waited for [`stream`](Array::stream), while no clone or view of
    /// `self` is made, with values valid for the dtype (for `Bool`, 0 or 1).
    pub fn cuda_ptr_mut(&mut self) -> Option<u64> {
        let owned = match Arc::get_mut(&mut self.storage)? {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => !b.is_borrowed(),
            _ => false,
        };
        if owned {
            self.cuda_ptr()
        } else {
            None
        }
    }

    /// Hands this GPU array's device memory over to the caller, who owns (and frees) it from
    /// then on: the way a result becomes another library's tensor without a copy (candle's
    /// `CudaStorage`, a `cudaMalloc`ed buffer a C API takes over). The elements are row-major
    /// in [`shape`](Array::shape) from [`CudaAllocation::address`]. An array that is the only
    /// handle on its whole row-major buffer (an op's output) gives its own buffer; any other
    /// (a view, a shared buffer, memory borrowed through [`Array::from_cuda_external`]) is
    /// first copied into a fresh one on its stream.
    ///
    /// The memory comes from the driver's stream-ordered allocator (`cuMemAllocAsync` on the
    /// device's default memory pool; `cuMemAlloc` on devices without it) in the device's
    /// primary context: free it with `cuMemFreeAsync` on a stream ordered after
    /// [`CudaAllocation::stream`] (or `cuMemFree`), exactly once. The work that writes it is
    /// queued on that stream: a reader on another stream waits for it first.
    ///
    /// # Errors
    /// `Error::Device` for a CPU array; as [`copy`](Array::copy) when a copy is needed.
    pub fn into_cuda_allocation(self) -> Result<CudaAllocation> {
        if self.cuda_buffer().is_none() {
            return Err(Error::Device(
                "[into_cuda_allocation] the array is on the CPU; only a GPU array's memory can \
                 be handed over (into_vec takes a host array's)"
                    .into(),
            ));
        }
        let own = if self.owns_whole_buffer() {
            self
        } else {
            self.copy()?
        };
        #[cfg(feature = "cuda")]
        {
            let mut own = own;
            // The array is dropped right after: its buffer, released, is then leaked.
            let raw = match Arc::get_mut(&mut own.storage) {
                Some(Storage::Cuda(b)) => b.release(),
                _ => None,
            };
            drop(own);
            let (address, bytes, stream) = raw.ok_or_else(|| {
                Error::invalid("internal: a fresh GPU buffer was shared or borrowed")
            })?;
            Ok(CudaAllocation {
                address,
                bytes,
                stream,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            drop(own);
            Err(Error::CudaUnavailable(
                "this build of ferrofast has no CUDA support".into(),
            ))
        }
    }

    /// The stream that produced this GPU array (ops on it run there); `None` on the CPU.
    pub fn stream(&self) -> Option<crate::Stream> {
        self.cuda_buffer().map(|b| b.stream().clone())
    }

    /// A row-major copy of the array on `stream`'s device, produced on `stream`, so ops
    /// that take it run there. Work already queued elsewhere that produces `self` is waited
    /// for on the GPU, not on the host.
    ///
    /// # Errors
    /// Device and driver errors.
    pub fn to_stream(&self, stream: &crate::Stream) -> Result<Array> {
        match self.cuda_buffer() {
            Some(b) if Device::Cuda(b.ordinal()) == stream.device() => {
                crate::cuda::storage::copy_cast(self, self.dtype, Some(stream))
            }
            _ => {
                let host = self.to_device(&Device::Cpu)?.contiguous()?;
                crate::cuda::storage::upload(&host, stream)
            }
        }
    }

    /// Host view of the logical elements if they are row-major contiguous.
    pub(crate) fn contiguous_slice<T: Element>(&self) -> Result<Option<&[T]>> {
        let buf = self.cpu_buffer::<T>()?;
        if self.is_contiguous() {
            Ok(Some(&buf[self.offset..self.offset + self.size()]))
        } else {
            Ok(None)
        }
    }

    // ----- reading back -------------------------------------------------------------------

    /// Copies the elements out in row-major order of the shape.
    ///
    /// # Errors
    /// `Error::DTypeMismatch` unless `T` is exactly the array's dtype; `Error::OutOfMemory`
    /// when the host cannot hold the copy (a broadcast view may have far more elements than
    /// its buffer).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let host = self.to_device(&Device::Cpu)?;
        let buf = host.cpu_buffer::<T>()?;
        let mut out = host_pool::with_capacity::<T>(host.size())?;
        if let Some(s) = host.contiguous_slice::<T>()? {
            out.extend_from_slice(s);
            return Ok(out);
        }
        host.for_each_offset(|o| out.push(buf[o]));
        Ok(out)
    }

    /// The elements as a vector in row-major order, consuming the array: the buffer itself,
    /// without a copy, when this array is the only handle on its whole row-major host buffer
    /// (an op's output, or the vector given to [`Array::from_vec`]); a copy as
    /// [`to_vec`](Array::to_vec) makes otherwise (views, shared buffers, external memory,
    /// GPU arrays).
    ///
    /// # Errors
    /// As [`to_vec`](Array::to_vec).
    pub fn into_vec<T: Element>(self) -> Result<Vec<T>> {
        if self.dtype != T::DTYPE {
            return Err(Error::DTypeMismatch {
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        match self.into_host_vec::<T>() {
            Ok(v) => Ok(v),
            Err(a) => a.to_vec(),
        }
    }

    /// The elements converted to f64, in row-major order (any dtype).
    ///
    /// # Errors
    /// As [`to_vec`](Array::to_vec).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        dispatch_dtype!(self.dtype, T => host_pool::map(&self.to_vec::<T>()?, |x| x.to_f64()))
    }

    /// Calls `f` with the buffer offset of every element, in row-major order.
    pub(crate) fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        let n = self.ndim();
        if self.size() == 0 {
            return;
        }
        if n == 0 {
            f(self.offset);
            return;
        }
        let inner = self.shape[n - 1];
        let inner_stride = self.strides[n - 1];
        let mut idx = vec![0usize; n - 1];
        let mut base = [self.offset as isize];
        loop {
            let mut o = base[0];
            for _ in 0..inner {
                f(o as usize);
                o += inner_stride;
            }
            if !next_index(&mut idx, &self.shape, [&self.strides], &mut base) {
                return;
            }
        }
    }

    // ----- conversion ---------------------------------------------------------------------

    /// A copy converted to `dtype` (floats round to nearest; float to integer truncates
    /// toward zero and saturates; integer to integer wraps; to bool is `!= 0`). Returns a
    /// cheap clone if the dtype already matches.
    ///
    /// # Errors
    /// `Error::Shape` when the result's byte size overflows the address space,
    /// `Error::OutOfMemory` when the memory cannot be had; device errors.
    pub fn astype(&self, dtype: DType) -> Result<Array> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        checked_layout(&self.shape, dtype)?;
        if self.cuda_buffer().is_some() {
            return crate::cuda::storage::copy_cast(self, dtype, None);
        }
        fn convert<S: Element, D: Element>(a: &Array) -> Result<CpuData> {
            // A contiguous array is read in place; a view is gathered first.
            let gathered;
            let src: &[S] = match a.contiguous_slice::<S>()? {
                Some(s) => s,
                None => {
                    gathered = a.to_vec::<S>()?;
                    &gathered
                }
            };
            let int_path = !S::DTYPE.is_floating() && !D::DTYPE.is_floating();
            // Room for every element first, so the parallel extend never reallocates.
            let mut out = host_pool::take_uninit::<D>(src.len())?;
            if int_path {
                out.par_extend(src.par_iter().map(|&x| D::from_i64(x.to_i64())));
            } else {
                out.par_extend(src.par_iter().map(|&x| D::from_f64(x.to_f64())));
            }
            Ok(D::wrap(out))
        }
        let data =
            dispatch_dtype!(self.dtype, S => dispatch_dtype!(dtype, D => convert::<S, D>(self)?));
        let device = self.device();
        Array::from_cpu_data(data, &self.shape)?.to_device(&device)
    }

    /// The array on `device`: a cheap clone if it is already there, otherwise a row-major
    /// copy (host to GPU uploads on the device's default stream; GPU to host waits for the
    /// work producing the array).
    ///
    /// # Errors
    /// `Error::CudaUnavailable` without a CUDA driver or device (or in a build without the
    /// `cuda` feature), `Error::Device` for a missing ordinal, driver errors.
    pub fn to_device(&self, device: &Device) -> Result<Array> {
        match (device, &*self.storage) {
            (Device::Cpu, Storage::Cpu(..) | Storage::External(_)) => Ok(self.clone()),
            (Device::Cpu, Storage::Cuda(_)) => crate::cuda::storage::download(self),
            (Device::Cuda(i), Storage::Cuda(b)) if b.ordinal() == *i => Ok(self.clone()),
            (Device::Cuda(i), _) => {
                let stream = crate::cuda::storage::default_stream(*i)?;
                let host = self.to_device(&Device::Cpu)?.contiguous()?;
                crate::cuda::storage::upload(&host, &stream)
            }
        }
    }

    /// A row-major contiguous array with the same elements: `self` if already contiguous,
    /// else a copy.
    ///
    /// # Errors
    /// `Error::OutOfMemory` when the copy does not fit (a broadcast view may have far more
    /// elements than its buffer); device errors.
    pub fn contiguous(&self) -> Result<Array> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        if self.cuda_buffer().is_some() {
            return crate::cuda::storage::copy_cast(self, self.dtype, None);
        }
        let data = dispatch_dtype!(self.dtype, T => T::wrap(self.host_copy::<T>()?));
        Array::from_cpu_data(data, &self.shape)
    }

    /// The elements of this host array in row-major order, in a recycled buffer when the
    /// host pool has one (see [`host_pool::take_uninit`]); a contiguous source is copied on
    /// the rayon pool.
    fn host_copy<T: Element>(&self) -> Result<Vec<T>> {
        /// Elements per parallel piece, and the size below which one thread copies.
        const CHUNK: usize = 1 << 16;
        fn write<T: Copy>(dst: &mut [std::mem::MaybeUninit<T>], src: &[T]) {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s);
            }
        }
        let n = self.size();
        let mut out = host_pool::take_uninit::<T>(n)?;
        let dst = &mut out.spare_capacity_mut()[..n];
        let written = if let Some(src) = self.contiguous_slice::<T>()? {
            if n > CHUNK {
                dst.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| write(d, s));
            } else {
                write(dst, src);
            }
            n
        } else {
            let buf = self.cpu_buffer::<T>()?;
            let mut i = 0;
            self.for_each_offset(|o| {
                if let Some(d) = dst.get_mut(i) {
                    d.write(buf[o]);
                }
                i += 1;
            });
            i
        };
        if written != n {
            return Err(Error::invalid(format!(
                "internal: copied {written} elements of an array of {n}"
            )));
        }
        // SAFETY: `n` <= the capacity (`take_uninit(n)`), and elements 0..n are written: the
        // contiguous branch copies `src`, exactly `n` elements, into `dst`, `n` long; the
        // strided branch counts its writes, and any count but `n` returned an error above.
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// A new row-major buffer with the same elements, on the same device, always copied
    /// (unlike [`contiguous`](Array::contiguous), which returns `self` when it can).
    ///
    /// # Errors
    /// As [`contiguous`](Array::contiguous).
    pub fn copy(&self) -> Result<Array> {
        if self.cuda_buffer().is_some() {
            return crate::cuda::storage::copy_cast(self, self.dtype, None);
        }
        let data = dispatch_dtype!(self.dtype, T => T::wrap(self.host_copy::<T>()?));
        Array::from_cpu_data(data, &self.shape)
    }

    // ----- views --------------------------------------------------------------------------

    fn view(&self, shape: Vec<usize>, strides: Vec<isize>, offset: usize) -> Array {
        Array {
            shape,
            strides,
            offset,
            dtype: self.dtype,
            storage: Arc::clone(&self.storage),
        }
    }

    /// A view of the same buffer with any layout; the caller guarantees every element it
    /// addresses lies inside the buffer.
    #[cfg(feature = "cuda")]
    pub(crate) fn with_layout(&self, shape: &[usize], strides: &[isize], offset: usize) -> Array {
        self.view(shape.to_vec(), strides.to_vec(), offset)
    }

    /// The same elements with a new shape of equal size: a view when the array is
    /// contiguous, otherwise a contiguous copy reshaped.
    ///
    /// # Errors
    /// `Error::Shape` if the sizes differ; as [`contiguous`](Array::contiguous) for the copy.
    pub fn reshape(&self, shape: &[usize]) -> Result<Array> {
        if checked_layout(shape, self.dtype)? != self.size() {
            return Err(Error::Shape(format!(
                "[reshape] Cannot reshape array of size {} into shape {}.",
                self.size(),
                fmt_shape(shape)
            )));
        }
        let c = self.contiguous()?;
        Ok(c.view(shape.to_vec(), row_major_strides(shape), c.offset))
    }

    /// Permutes the axes: output axis `i` is input axis `axes[i]` (negative axes count from
    /// the end). A view.
    ///
    /// # Errors
    /// `Error::InvalidArgument` unless `axes` is a permutation of `0..ndim`.
    pub fn transpose(&self, axes: &[isize]) -> Result<Array> {
        let n = self.ndim();
        if axes.len() != n {
            return Err(Error::invalid(format!(
                "[transpose] Received {} axes for array with {} dimensions.",
                axes.len(),
                n
            )));
        }
        let mut seen = vec![false; n];
        let mut shape = Vec::with_capacity(n);
        let mut strides = Vec::with_capacity(n);
        for &a in axes {
            let a = normalize_axis(a, n)?;
            if seen[a] {
                return Err(Error::invalid("[transpose] Repeat axes not allowed."));
            }
            seen[a] = true;
            shape.push(self.shape[a]);
            strides.push(self.strides[a]);
        }
        Ok(self.view(shape, strides, self.offset))
    }

    /// Swaps two axes (negative axes count from the end). A view.
    ///
    /// # Errors
    /// `Error::InvalidArgument` if an axis is out of range.
    pub fn swapaxes(&self, a: isize, b: isize) -> Result<Array> {
        let n = self.ndim();
        let (a, b) = (normalize_axis(a, n)?, normalize_axis(b, n)?);
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        shape.swap(a, b);
        strides.swap(a, b);
        Ok(self.view(shape, strides, self.offset))
    }

    /// Python-style slicing `a[start0:stop0:step0, start1:stop1:step1, ...]`, one entry per
    /// leading axis (missing trailing axes are taken whole). Negative `start`/`stop` count
    /// from the end and out-of-range values clamp, exactly as Python's `slice.indices`;
    /// `step` may be negative. A view.
    ///
    /// # Errors
    /// `Error::InvalidArgument` if the lists differ in length, exceed `ndim`, or a step is 0.
    pub fn slice(&self, starts: &[isize], stops: &[isize], steps: &[isize]) -> Result<Array> {
        let (shape, strides, offset) = self.slice_layout("slice", starts, stops, steps)?;
        Ok(self.view(shape, strides, offset))
    }

    /// The layout (shape, strides, offset) of [`slice`](Array::slice)'s view, without making
    /// it; `op` names the caller in the messages.
    fn slice_layout(
        &self,
        op: &str,
        starts: &[isize],
        stops: &[isize],
        steps: &[isize],
    ) -> Result<(Vec<usize>, Vec<isize>, usize)> {
        if starts.len() != stops.len() || starts.len() != steps.len() {
            return Err(Error::invalid(format!(
                "[{op}] starts, stops and steps must have the same length."
            )));
        }
        if starts.len() > self.ndim() {
            return Err(Error::invalid(format!(
                "[{op}] Too many indices ({}) for array with {} dimensions.",
                starts.len(),
                self.ndim()
            )));
        }
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        let mut offset = self.offset as isize;
        for ax in 0..starts.len() {
            let (start, len) = slice_indices(op, starts[ax], stops[ax], steps[ax], self.shape[ax])?;
            if len > 0 {
                offset += start * self.strides[ax];
            }
            shape[ax] = len;
            strides[ax] = self.strides[ax] * steps[ax];
        }
        // An empty result may leave `offset` anywhere; keep it inside the buffer.
        let offset = if shape.contains(&0) {
            self.offset
        } else {
            offset as usize
        };
        Ok((shape, strides, offset))
    }

    /// Broadcasts to `shape` (numpy rules, new axes on the left, size-1 axes stretched with
    /// stride 0). A view.
    ///
    /// # Errors
    /// `Error::Shape` with MLX's `[broadcast_shapes]` text if the shapes are incompatible, or
    /// naming the shape when its element count or byte size (`size * dtype.size()`, as if it
    /// were materialised) does not fit in `isize`.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Array> {
        let bshape = broadcast_shapes(&self.shape, shape)?;
        if bshape != shape {
            return Err(Error::Shape(format!(
                "[broadcast_shapes] Shapes {} and {} cannot be broadcast.",
                fmt_shape(&self.shape),
                fmt_shape(shape)
            )));
        }
        checked_layout(shape, self.dtype)?;
        let pad = shape.len() - self.ndim();
        let mut strides = vec![0isize; shape.len()];
        for i in 0..self.ndim() {
            strides[pad + i] = if self.shape[i] == 1 && shape[pad + i] != 1 {
                0
            } else {
                self.strides[i]
            };
        }
        Ok(self.view(shape.to_vec(), strides, self.offset))
    }
}

/// Python's `slice(start, stop, step).indices(n)`: returns (first index, element count).
fn slice_indices(
    op: &str,
    start: isize,
    stop: isize,
    step: isize,
    n: usize,
) -> Result<(isize, usize)> {
    if step == 0 {
        return Err(Error::invalid(format!("[{op}] slice step cannot be zero.")));
    }
    let n = n as isize;
    let clamp = |v: isize, lo: isize, hi: isize| v.max(lo).min(hi);
    let (lo, hi) = if step > 0 { (0, n) } else { (-1, n - 1) };
    let norm = |v: isize| {
        if v < 0 {
            clamp(v + n, lo, hi)
        } else {
            clamp(v, lo, hi)
        }
    };
    let (s, e) = (norm(start), norm(stop));
    let len = if step > 0 {
        if e > s {
            (e - s + step - 1) / step
        } else {
            0
        }
    } else if s > e {
        (s - e + (-step) - 1) / (-step)
    } else {
        0
    };
    Ok((s, len as usize))
}

/// Arrays with more elements than this print only their edges.
const PRINT_THRESHOLD: usize = 1000;
/// Elements printed at each end of a summarised axis (of the last two; one of the others).
const PRINT_EDGE: usize = 3;

/// One element as text: floats with four decimals (`nan`, `inf`, `-inf` spelled out),
/// integers as they are, bools as `true` / `false`.
fn element_text(dtype: DType, v: f64) -> String {
    if dtype == DType::Bool {
        return (v != 0.0).to_string();
    }
    if !dtype.is_floating() {
        return format!("{v:.0}");
    }
    if v.is_nan() {
        "nan".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v:.4}")
    }
}

impl Array {
    /// The indices of axis `axis` to print: all, or the first and last [`PRINT_EDGE`]
    /// (`None` marks the elided middle).
    fn printed_indices(&self, axis: usize, summarise: bool) -> Vec<Option<usize>> {
        let d = self.shape[axis];
        // Three at each end of the last two axes, one of the others: at most 36 * 2^(n-2)
        // elements whatever the shape.
        let edge = if axis + 2 >= self.ndim() {
            PRINT_EDGE
        } else {
            1
        };
        if !summarise || d <= 2 * edge {
            return (0..d).map(Some).collect();
        }
        let mut out: Vec<Option<usize>> = (0..edge).map(Some).collect();
        out.push(None);
        out.extend((d - edge..d).map(Some));
        out
    }

    /// The view of this array with axis `axis` narrowed to `[start, end)`.
    fn narrowed(&self, axis: usize, start: usize, end: usize) -> Result<Array> {
        let n = self.ndim();
        let mut starts = vec![0isize; n];
        let mut stops: Vec<isize> = self.shape.iter().map(|&d| d as isize).collect();
        starts[axis] = start as isize;
        stops[axis] = end as isize;
        self.slice(&starts, &stops, &vec![1; n])
    }

    /// Writes the elements of this view from axis `axis` on (every axis before it narrowed
    /// to one index) as nested brackets.
    fn write_elements(
        &self,
        axis: usize,
        summarise: bool,
        indent: usize,
        out: &mut String,
    ) -> Result<()> {
        let view = self;
        let n = view.ndim();
        out.push('[');
        if axis + 1 == n {
            let idx = view.printed_indices(axis, summarise);
            let mut first = true;
            // Runs of consecutive printed indices are read with one copy each.
            let mut k = 0;
            while k < idx.len() {
                match idx[k] {
                    None => {
                        out.push_str(", ...");
                        k += 1;
                    }
                    Some(start) => {
                        let mut end = start + 1;
                        while k + (end - start) < idx.len() && idx[k + (end - start)] == Some(end) {
                            end += 1;
                        }
                        let part = view.narrowed(axis, start, end)?.to_f64_vec()?;
                        for v in part {
                            if !first {
                                out.push_str(", ");
                            }
                            first = false;
                            out.push_str(&element_text(self.dtype, v));
                        }
                        k += end - start;
                    }
                }
            }
        } else {
            let idx = view.printed_indices(axis, summarise);
            let newlines = "\n".repeat(n - axis - 1);
            for (j, i) in idx.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                    out.push_str(&newlines);
                    out.push_str(&" ".repeat(indent + axis + 1));
                }
                match i {
                    Some(i) => {
                        let sub = view.narrowed(axis, *i, *i + 1)?;
                        sub.write_elements(axis + 1, summarise, indent, out)?;
                    }
                    None => out.push_str("..."),
                }
            }
        }
        out.push(']');
        Ok(())
    }

    /// `array([...], shape=[...], dtype=..., device=...)`, or the reason the elements
    /// could not be read.
    fn summary(&self) -> String {
        const PREFIX: &str = "array(";
        let mut body = String::new();
        let elements = if self.ndim() == 0 {
            self.to_f64_vec()
                .map(|v| element_text(self.dtype, v.first().copied().unwrap_or(f64::NAN)))
        } else if self.size() == 0 {
            Ok("[]".to_string())
        } else {
            let summarise = self.size() > PRINT_THRESHOLD;
            self.write_elements(0, summarise, PREFIX.len(), &mut body)
                .map(|()| body)
        };
        let elements = elements.unwrap_or_else(|e| format!("<elements not readable: {e}>"));
        format!(
            "{PREFIX}{elements}, shape={}, dtype={}, device={})",
            fmt_shape(&self.shape),
            self.dtype,
            self.device()
        )
    }
}

impl std::fmt::Display for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.summary();
        let head = s.strip_suffix(')').unwrap_or(&s);
        write!(
            f,
            "{head}, strides={:?}, offset={})",
            self.strides, self.offset
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_indices_match_python() {
        // list(range(10))[2:8:3] == [2, 5]
        assert_eq!(slice_indices("slice", 2, 8, 3, 10).unwrap(), (2, 2));
        // [::-1]
        assert_eq!(slice_indices("slice", -1, -11, -1, 10).unwrap(), (9, 10));
        // [-3:]
        assert_eq!(slice_indices("slice", -3, 10, 1, 10).unwrap(), (7, 3));
        // [5:2] empty
        assert_eq!(slice_indices("slice", 5, 2, 1, 10).unwrap().1, 0);
        assert!(slice_indices("slice", 0, 1, 0, 10).is_err());
    }

    #[test]
    fn random_is_deterministic_and_not_constant() {
        let a = Array::randn(&[1000], DType::F32, 7, &Device::Cpu).unwrap();
        let b = Array::randn(&[1000], DType::F32, 7, &Device::Cpu).unwrap();
        let (va, vb) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        assert_eq!(va, vb);
        let mean: f32 = va.iter().sum::<f32>() / 1000.0;
        let var: f32 = va.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.15, "mean {mean}");
        assert!((var - 1.0).abs() < 0.2, "var {var}");
    }
}

#[cfg(test)]
mod print_tests {
    use super::*;

    #[test]
    fn small_arrays_print_every_element() {
        let a = Array::from_vec(
            vec![1.0f32, -2.5, 3.0, f32::NAN, f32::INFINITY, 0.125],
            &[2, 3],
        )
        .unwrap();
        let text = a.to_string();
        println!("{text}");
        assert!(text.starts_with("array([[1.0000, -2.5000, 3.0000],\n       [nan, inf, 0.1250]]"));
        assert!(text.ends_with("dtype=float32, device=cpu)"), "{text}");
        // A view prints its own elements.
        let t = a.transpose(&[1, 0]).unwrap().to_string();
        assert!(
            t.starts_with(
                "array([[1.0000, nan],\n       [-2.5000, inf],\n       [3.0000, 0.1250]]"
            ),
            "{t}"
        );
        let b = Array::from_vec(vec![true, false], &[2]).unwrap();
        assert!(b.to_string().starts_with("array([true, false]"));
        let i = Array::from_vec(vec![-3i32, 7], &[2]).unwrap();
        assert!(i.to_string().starts_with("array([-3, 7]"));
        assert!(Array::scalar(2.5f32)
            .to_string()
            .starts_with("array(2.5000, shape="));
        let e = Array::from_vec(Vec::<f32>::new(), &[0, 3]).unwrap();
        assert!(e.to_string().starts_with("array([], shape="));
        let d = format!("{a:?}");
        assert!(d.contains("strides=[3, 1], offset=0)"), "{d}");
    }

    #[test]
    fn large_arrays_print_their_edges_only() {
        let n = 1000 * 2000;
        let a = Array::from_vec((0..n).map(|v| v as f32).collect(), &[1000, 2000]).unwrap();
        let text = a.to_string();
        println!("{text}");
        assert!(text.len() < 600, "{} characters", text.len());
        assert!(text.contains("[0.0000, 1.0000, 2.0000, ..., 1997.0000, 1998.0000, 1999.0000]"));
        assert!(text.contains("..."));
        assert!(text.contains("1999999.0000]]"), "{text}");
        let big = Array::from_vec(vec![0.5f32; 4 * 5 * 6 * 7 * 8], &[4, 5, 6, 7, 8]).unwrap();
        let text = big.to_string();
        assert!(text.len() < 5_000, "{} characters", text.len());
        assert!(text.contains("shape=(4,5,6,7,8)"), "{text}");
    }
}
