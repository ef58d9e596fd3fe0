//! Strided copy and dtype conversion of GPU arrays (`kernels/copy.cu`): what
//! `contiguous()`, `astype()` and `reshape()` of a GPU array run, with no host round trip.

use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{driver_error, grid_1d, guarded, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::Array;
use cudarc::driver::{DeviceRepr, PushKernelArg};

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
    let device = src.device();
    let blocks = (n as u64)
        .div_ceil(BLOCK as u64)
        .min(device.sm_count() as u64 * 16)
        .max(1) as u32;
    // 32-bit index arithmetic when every partial offset fits and the grid-stride loop's
    // index cannot overflow on its last step.
    let last_index = n as u128 + blocks as u128 * BLOCK as u128;
    let wide = last_index > i32::MAX as u128 || reach > i32::MAX as u128;
    let func = jit::function(
        device,
        &REGISTERED.file,
        &variant(a.dtype(), out.dtype(), wide),
        &[],
    )?;
    let cfg = grid_1d(blocks, BLOCK, 0);
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
    guarded("launching copy_cast", || {
        // SAFETY: the arguments match copy_cast's parameters in order and type; every offset the
        // kernel forms lies inside the source view, which lies inside its allocation, and it
        // writes exactly `n` elements of the output, which holds `n`.
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver_error("launching copy_cast", e))
    })
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
}
