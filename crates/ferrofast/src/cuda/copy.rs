//! Strided copy and dtype conversion of GPU arrays (`kernels/copy.cu`): what
//! `contiguous()`, `astype()` and `reshape()` of a GPU array run, with no host round trip;
//! and the copy into a strided view of an existing buffer that `slice_update` runs
//! ([`copy_into`]).

use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{driver_error, grid_1d, guarded, launch_kernel, CudaDevice, Stream};
use crate::array::{collapse2, next_index};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::Array;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

/// `kernels/copy.cu`: strided copy with dtype conversion.
/// Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("copy.cu", include_str!("kernels/copy.cu")),
    variants: all_variants,
};

/// Most dimensions the copy kernel takes after merging contiguous ones.
const MAX_DIMS: usize = 8;

/// Threads per block of the copy kernel.
const BLOCK: u32 = 256;

/// The prelude's name for a dtype's element tag.
pub(crate) fn type_tag(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "ff_bool",
        DType::U8 => "ff_u8",
        DType::U32 => "ff_u32",
        DType::I32 => "ff_i32",
        DType::I64 => "ff_i64",
        DType::F16 => "ff_f16",
        DType::BF16 => "ff_bf16",
        DType::F32 => "ff_f32",
        DType::F64 => "ff_f64",
    }
}

fn variant(src: DType, dst: DType, wide: bool) -> String {
    format!(
        "copy_cast<{}, {}, {}>",
        type_tag(src),
        type_tag(dst),
        if wide { "long long" } else { "int" }
    )
}

/// The element storage `copy_strided` moves for a dtype: its width's unsigned integer.
fn width_tag(dtype: DType) -> &'static str {
    match dtype.size() {
        1 => "ff_u8_t",
        2 => "ff_u16_t",
        4 => "ff_u32_t",
        _ => "ff_u64_t",
    }
}

fn strided_variant(width: &str, wide: bool) -> String {
    format!(
        "copy_strided<{width}, {}>",
        if wide { "long long" } else { "int" }
    )
}

/// Every instantiation of `copy.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for src in DType::ALL {
        for dst in DType::ALL {
            for wide in [false, true] {
                out.push(variant(src, dst, wide));
            }
        }
    }
    for width in ["ff_u8_t", "ff_u16_t", "ff_u32_t", "ff_u64_t"] {
        for wide in [false, true] {
            out.push(strided_variant(width, wide));
        }
    }
    out
}

/// `ff_copy_layout` in `copy.cu`: passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CopyLayout {
    shape: [i64; MAX_DIMS],
    strides: [i64; MAX_DIMS],
}

// SAFETY: plain old data with the C layout of `ff_copy_layout`.
unsafe impl DeviceRepr for CopyLayout {}

/// The row stride of `x` if its rows can be addressed as `offset + r * stride` with unit
/// stride along the last axis.
pub(crate) fn row_stride(x: &Array) -> Option<i64> {
    let nd = x.ndim();
    let d = x.shape()[nd - 1];
    if d > 1 && x.strides()[nd - 1] != 1 {
        return None;
    }
    let (shape, strides) = collapse(&x.shape()[..nd - 1], &x.strides()[..nd - 1]);
    match shape.len() {
        0 => Some(d as i64),
        1 => Some(strides[0] as i64),
        _ => None,
    }
}

/// A row length `d` as the row kernels' 32-bit element index, which needs room for one
/// more block of loads past the row.
///
/// # Errors
/// `Error::Unsupported` with `message()` when `d` exceeds 2^31 - 2^16.
pub(crate) fn row_len_i32(d: usize, message: impl FnOnce() -> String) -> Result<i32> {
    i32::try_from(d)
        .ok()
        .filter(|&v| v <= i32::MAX - (1 << 16))
        .ok_or_else(|| Error::Unsupported(message()))
}

/// Drops size-1 axes and merges neighbours that are contiguous with each other, so most
/// views become one or two dimensions. Returns (shape, strides), outermost first.
pub(crate) fn collapse(shape: &[usize], strides: &[isize]) -> (Vec<usize>, Vec<isize>) {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<isize> = Vec::new();
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match (out_shape.last_mut(), out_strides.last_mut()) {
            (Some(pd), Some(ps)) if *ps == s * d as isize => {
                *pd *= d;
                *ps = s;
            }
            _ => {
                out_shape.push(d);
                out_strides.push(s);
            }
        }
    }
    (out_shape, out_strides)
}

/// The lowest and highest element offsets the view (`offset`, `shape`, `strides`) of a
/// non-empty array addresses, or `None` when they fall outside `0..len`.
fn view_extent(
    offset: usize,
    shape: &[usize],
    strides: &[isize],
    len: usize,
) -> Option<(i128, i128)> {
    let (mut lo, mut hi) = (offset as i128, offset as i128);
    for (&d, &s) in shape.iter().zip(strides) {
        let reach = (d as i128 - 1) * s as i128;
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    (lo >= 0 && hi < len as i128).then_some((lo, hi))
}

/// `ff_copy2_layout` in `copy.cu`: passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Copy2Layout {
    shape: [i64; MAX_DIMS],
    src_strides: [i64; MAX_DIMS],
    dst_strides: [i64; MAX_DIMS],
}

// SAFETY: plain old data with the C layout of `ff_copy2_layout`.
unsafe impl DeviceRepr for Copy2Layout {}

/// Writes the elements of `src` (a GPU array of `dst`'s dtype, on `dst`'s device, of shape
/// `shape`; stride-0 broadcast views included) into the view (`offset`, `shape`,
/// `strides`) of `dst`, on `dst`'s stream, with no host wait (work on other streams that
/// produces `src` or reads `dst` is ordered on the GPU through the buffers' events). The
/// view's elements must be distinct (the caller checks; a broadcast destination would be
/// written by several threads).
///
/// # Errors
/// `Error::InvalidArgument` when `src` does not match `dst`'s dtype or `shape`, or either
/// view reaches outside its buffer; `Error::Device` when `src` is not on `dst`'s device;
/// compile and driver errors.
pub(crate) fn copy_into(
    dst: &mut CudaBuffer,
    offset: usize,
    shape: &[usize],
    strides: &[isize],
    src: &Array,
) -> Result<()> {
    let src_buf = src
        .cuda_buffer()
        .ok_or_else(|| Error::Device("copy_into expects a source on a CUDA device".into()))?;
    if src_buf.ordinal() != dst.ordinal() {
        return Err(Error::Device(format!(
            "the update is on cuda:{} but the array it is written into is on cuda:{}",
            src_buf.ordinal(),
            dst.ordinal()
        )));
    }
    if src.dtype() != dst.dtype() || src.shape() != shape || strides.len() != shape.len() {
        return Err(Error::invalid(format!(
            "internal: copy_into got a source of {} {} for a view of {} {}",
            src.dtype(),
            crate::array::fmt_shape(src.shape()),
            dst.dtype(),
            crate::array::fmt_shape(shape)
        )));
    }
    let n = src.size();
    if n == 0 {
        return Ok(());
    }
    // Both views inside their buffers: what makes the launch below sound.
    let outside = |what: &str| {
        Error::invalid(format!(
            "internal: copy_into's {what} view reaches outside its buffer"
        ))
    };
    view_extent(offset, shape, strides, dst.len()).ok_or_else(|| outside("destination"))?;
    view_extent(src.offset(), shape, src.strides(), src_buf.len())
        .ok_or_else(|| outside("source"))?;
    let stream = dst.stream().clone();
    let (shape, src_strides, dst_strides) = collapse2(shape, src.strides(), strides);
    let unit = |s: &[isize]| s.first().is_none_or(|&s| s == 1);
    if shape.len() <= 1 && unit(&src_strides) && unit(&dst_strides) {
        let size = dst.dtype().size();
        let (s0, d0) = (src.offset() * size, offset * size);
        let bytes = n * size;
        let from = src_buf
            .slice()
            .try_slice(s0..s0 + bytes)
            .ok_or_else(|| outside("source"))?;
        let mut to = dst
            .slice_mut()
            .try_slice_mut(d0..d0 + bytes)
            .ok_or_else(|| outside("destination"))?;
        let cu = stream.cuda();
        return guarded("copying on the GPU", || {
            cu.memcpy_dtod(&from, &mut to)
                .map_err(|e| driver_error("copying on the GPU", e))
        });
    }
    // Past 8 dimensions, one launch per index of the outer ones.
    let outer = shape.len().saturating_sub(MAX_DIMS);
    let mut idx = vec![0usize; outer];
    loop {
        let mut s_off = src.offset() as isize;
        let mut d_off = offset as isize;
        for (k, &i) in idx.iter().enumerate() {
            s_off += i as isize * src_strides[k];
            d_off += i as isize * dst_strides[k];
        }
        launch_strided(
            src_buf,
            s_off as i64,
            dst,
            d_off as i64,
            (
                &shape[outer..],
                &src_strides[outer..],
                &dst_strides[outer..],
            ),
            &stream,
        )?;
        if !next_index(&mut idx, &shape, [], &mut []) {
            return Ok(());
        }
    }
}

/// The grid of a grid-stride copy over `n` elements (at most 16 blocks a multiprocessor)
/// and whether it needs 64-bit index arithmetic: 32 bits do when every element offset the
/// kernel forms (at most `reach`) fits and the loop's index cannot overflow on its last step.
fn grid_plan(sm_count: impl Into<u128>, n: u128, reach: u128) -> (u32, bool) {
    let blocks = n.div_ceil(BLOCK as u128).min(sm_count.into() * 16).max(1) as u32;
    let last_index = n + blocks as u128 * BLOCK as u128;
    (
        blocks,
        last_index > i32::MAX as u128 || reach > i32::MAX as u128,
    )
}

/// The copy kernel that `name(wide)` names (`wide`: 64-bit index arithmetic), compiled for
/// `device`, and its grid-stride launch over `n` elements whose furthest element offset is
/// `reach` (see [`grid_plan`]).
fn copy_kernel(
    device: &CudaDevice,
    n: u128,
    reach: u128,
    name: impl FnOnce(bool) -> String,
) -> Result<(CudaFunction, LaunchConfig)> {
    let (blocks, wide) = grid_plan(device.sm_count(), n, reach);
    let func = jit::function(device, &REGISTERED.file, &name(wide), &[])?;
    Ok((func, grid_1d(blocks, BLOCK, 0)))
}

/// One `copy_strided` launch over at most [`MAX_DIMS`] dimensions: (shape, source strides,
/// destination strides) from the given element offsets, both views inside their buffers.
fn launch_strided(
    src: &CudaBuffer,
    src_offset: i64,
    dst: &mut CudaBuffer,
    dst_offset: i64,
    (shape, src_strides, dst_strides): (&[usize], &[isize], &[isize]),
    stream: &Stream,
) -> Result<()> {
    let mut layout = Copy2Layout {
        shape: [1; MAX_DIMS],
        src_strides: [0; MAX_DIMS],
        dst_strides: [0; MAX_DIMS],
    };
    let mut n = 1u128;
    let (mut src_reach, mut dst_reach) = (src_offset as u128, dst_offset as u128);
    for (i, ((&d, &ss), &ds)) in shape.iter().zip(src_strides).zip(dst_strides).enumerate() {
        layout.shape[i] = d as i64;
        layout.src_strides[i] = ss as i64;
        layout.dst_strides[i] = ds as i64;
        n *= d as u128;
        src_reach += (d as u128 - 1) * ss.unsigned_abs() as u128;
        dst_reach += (d as u128 - 1) * ds.unsigned_abs() as u128;
    }
    let (func, cfg) = copy_kernel(dst.device(), n, src_reach.max(dst_reach), |wide| {
        strided_variant(width_tag(dst.dtype()), wide)
    })?;
    let ndim = shape.len().max(1) as i32;
    let count = n as i64;
    let cu = stream.cuda();
    let mut builder = cu.launch_builder(&func);
    builder
        .arg(src.slice())
        .arg(&src_offset)
        .arg(dst.slice_mut())
        .arg(&dst_offset)
        .arg(&layout)
        .arg(&ndim)
        .arg(&count);
    // SAFETY: the arguments match copy_strided's parameters in order and type; every
    // offset the kernel forms lies inside the source and destination views, which
    // `copy_into` checked lie inside their allocations; the destination's elements are
    // distinct (the caller's contract), so no element is written twice.
    unsafe { launch_kernel("copy_strided", &mut builder, cfg) }
}

/// A row-major copy of `a` (a GPU array) converted to `dtype`, produced on `stream` (the
/// array's own stream when `None`). Conversion follows the host `astype` rules.
///
/// Views with more than 8 dimensions left after merging contiguous axes are gathered on the
/// host instead.
///
/// # Errors
/// `Error::Device` if `a` is not on the stream's device; compile and driver errors.
pub(crate) fn copy_cast(a: &Array, dtype: DType, stream: Option<&Stream>) -> Result<Array> {
    let src = a
        .cuda_buffer()
        .ok_or_else(|| Error::Device("copy_cast expects an array on a CUDA device".into()))?;
    let stream = stream.unwrap_or(src.stream());
    if stream.ordinal() != src.device().ordinal() {
        return Err(Error::Device(format!(
            "array is on cuda:{} but the stream is on cuda:{}",
            src.device().ordinal(),
            stream.ordinal()
        )));
    }
    let device = src.device();
    let n = a.size();
    let mut out = CudaBuffer::alloc(device, stream, dtype, n)?;
    if n > 0 {
        let (shape, strides) = collapse(a.shape(), a.strides());
        let cu = stream.cuda();
        let contiguous = shape.len() <= 1 && strides.first().is_none_or(|&s| s == 1);
        if contiguous && dtype == a.dtype() {
            let size = dtype.size();
            let start = a.offset() * size;
            let view = src
                .slice()
                .try_slice(start..start + n * size)
                .ok_or_else(|| Error::Cuda("copy source outside its allocation".into()))?;
            guarded("copying on the GPU", || {
                cu.memcpy_dtod(&view, out.slice_mut())
                    .map_err(|e| driver_error("copying on the GPU", e))
            })?;
        } else if shape.len() > MAX_DIMS {
            return copy_cast_via_host(a, src, dtype, stream);
        } else {
            launch_copy(a, src, &shape, &strides, &mut out, stream)?;
        }
    }
    Array::from_cuda_buffer(out, a.shape())
}

/// The rare view with more than 8 non-mergeable dimensions: gather and convert on the host.
fn copy_cast_via_host(a: &Array, src: &CudaBuffer, dtype: DType, stream: &Stream) -> Result<Array> {
    let whole = Array::from_cpu_data(src.download(0, src.len())?, &[src.len()])?;
    let host = whole
        .with_layout(a.shape(), a.strides(), a.offset())
        .astype(dtype)?
        .contiguous()?;
    super::memory::upload(&host, stream)
}

fn launch_copy(
    a: &Array,
    src: &CudaBuffer,
    shape: &[usize],
    strides: &[isize],
    out: &mut CudaBuffer,
    stream: &Stream,
) -> Result<()> {
    let n = a.size();
    let mut layout = CopyLayout {
        shape: [1; MAX_DIMS],
        strides: [0; MAX_DIMS],
    };
    let mut reach = a.offset() as u128;
    for (i, (&d, &s)) in shape.iter().zip(strides).enumerate() {
        layout.shape[i] = d as i64;
        layout.strides[i] = s as i64;
        reach += (d as u128 - 1) * s.unsigned_abs() as u128;
    }
    let (func, cfg) = copy_kernel(src.device(), n as u128, reach, |wide| {
        variant(a.dtype(), out.dtype(), wide)
    })?;
    let src_offset = a.offset() as i64;
    let ndim = shape.len().max(1) as i32;
    let count = n as i64;
    let cu = stream.cuda();
    let mut builder = cu.launch_builder(&func);
    builder
        .arg(src.slice())
        .arg(&src_offset)
        .arg(out.slice_mut())
        .arg(&layout)
        .arg(&ndim)
        .arg(&count);
    // SAFETY: the arguments match copy_cast's parameters in order and type; every offset the
    // kernel forms lies inside the source view, which lies inside its allocation, and it
    // writes exactly `n` elements of the output, which holds `n`.
    unsafe { launch_kernel("copy_cast", &mut builder, cfg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_merges_contiguous_axes() {
        assert_eq!(collapse(&[2, 3, 4], &[12, 4, 1]), (vec![24], vec![1]));
        assert_eq!(collapse(&[2, 3, 4], &[1, 8, 2]), (vec![2, 12], vec![1, 2]));
        assert_eq!(
            collapse(&[2, 3, 4], &[1, 9, 2]),
            (vec![2, 3, 4], vec![1, 9, 2])
        );
        assert_eq!(collapse(&[2, 1, 4], &[4, 99, 1]), (vec![8], vec![1]));
        assert_eq!(collapse(&[1, 1], &[5, 7]), (vec![], vec![]));
        assert_eq!(collapse(&[3, 4], &[0, 1]), (vec![3, 4], vec![0, 1]));
        assert_eq!(collapse(&[3, 4], &[-4, 1]), (vec![3, 4], vec![-4, 1]));
        assert_eq!(
            collapse(&[4, 5, 6], &[60, 6, 1]),
            (vec![4, 30], vec![60, 1])
        );
    }

    #[test]
    fn view_extents_stay_inside_the_buffer() {
        assert_eq!(view_extent(0, &[2, 3], &[3, 1], 6), Some((0, 5)));
        assert_eq!(view_extent(0, &[2, 3], &[3, 1], 5), None);
        assert_eq!(view_extent(5, &[2, 3], &[-3, -1], 6), Some((0, 5)));
        assert_eq!(view_extent(4, &[2, 3], &[-3, -1], 6), None);
        assert_eq!(view_extent(2, &[4], &[0], 3), Some((2, 2)));
    }
}
