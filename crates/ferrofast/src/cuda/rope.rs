//! Launcher for `kernels/rope.cu`: rotary positional embedding forward.
//!
//! The front end (`fast::rope`) validates the call and reads the offsets and `freqs` on the
//! host into a `RopeArgs`; [`run`] launches the kernel on a GPU input. Inputs whose heads axes (all axes
//! between the batch axis and the last two) merge into one stride and whose last axis has
//! unit stride are read in place (row-contiguous inputs, `[B, T, H, D]` memory viewed as
//! `[B, H, T, D]`, sliced positions, broadcast batches); other views are first copied to
//! row-major on the GPU. Per-batch offsets and `freqs` travel as small device buffers.

use super::copy::{collapse, copy_cast, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{launch_kernel, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::rope::{RopeArgs, RopeFreqs, RopeOffsets};
use crate::Array;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `kernels/rope.cu`: rotary positional embedding forward.
/// Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("rope.cu", include_str!("kernels/rope.cu")),
    variants: all_variants,
};

/// Threads per block.
const BLOCK: u32 = 256;

/// Heads one work item serves (`FF_ROPE_HEADS` in `rope.cu`).
const HEADS_PER_ITEM: usize = 4;

fn variant(dtype: DType, traditional: bool, wide: bool, v: usize) -> String {
    format!(
        "rope<{}, {traditional}, {}, {v}>",
        type_tag(dtype),
        if wide { "long long" } else { "int" }
    )
}

/// Elements one vector access of a work item moves: `v` pairs' halves, or `2 v` interleaved
/// pair elements in traditional mode.
fn chunk_elems(traditional: bool, v: usize) -> usize {
    if traditional {
        2 * v
    } else {
        v
    }
}

/// The column counts a work item may cover for a dtype: vectors of at most 16 bytes.
fn widths(dtype: DType, traditional: bool) -> impl Iterator<Item = usize> {
    [8usize, 4, 2, 1]
        .into_iter()
        .filter(move |&v| chunk_elems(traditional, v) * dtype.size() <= 16)
}

/// Every instantiation of `rope.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for traditional in [false, true] {
            for wide in [false, true] {
                for v in widths(dtype, traditional) {
                    out.push(variant(dtype, traditional, wide, v));
                }
            }
        }
    }
    out
}

/// `(stride_b, stride_h, stride_t)` if `x` can be read in place: unit stride along the last
/// axis and the heads axes merging into one stride.
fn layout(x: &Array) -> Option<(i64, i64, i64)> {
    let nd = x.ndim();
    let (shape, strides) = (x.shape(), x.strides());
    if strides[nd - 1] != 1 {
        return None;
    }
    let (heads, head_strides) = collapse(&shape[1..nd - 2], &strides[1..nd - 2]);
    let stride_h = match heads.len() {
        0 => 0,
        1 => head_strides[0] as i64,
        _ => return None,
    };
    Some((strides[0] as i64, stride_h, strides[nd - 2] as i64))
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "[rope] {what} of {v} exceeds the CUDA kernel's limit of 2^31 - 1"
        ))
    })
}

/// The buffer of a per-call table that lives on the GPU (`RopeFreqs::Device`,
/// `RopeOffsets::Device`): `len` row-major values of `dtype` from the buffer's start, on
/// `device`, as the front end made them.
fn device_table<'a>(
    table: &'a Array,
    dtype: DType,
    len: usize,
    device: &std::sync::Arc<super::runtime::CudaDevice>,
    what: &str,
) -> Result<&'a CudaBuffer> {
    table
        .cuda_buffer()
        .filter(|b| {
            std::sync::Arc::ptr_eq(b.device(), device)
                && table.dtype() == dtype
                && table.size() == len
                && table.offset() == 0
                && table.is_contiguous()
        })
        .ok_or_else(|| {
            Error::Device(format!(
                "[rope] the {what} are not {len} row-major {dtype} values on the input's GPU"
            ))
        })
}

/// Runs a validated `rope` call on `stream` (whose device holds `x`): for pair
/// `i < dims / 2` at position `t` of batch example `b`, `theta = (scale * (t + offset_b)) *
/// inv_freq_i` with `inv_freq_i = exp2(-(i / (dims/2)) * log2(base))` or `1 / freqs[i]`
/// (the periods rounded to f32 first, as MLX); the pair `(x[2i], x[2i+1])` when
/// `traditional`, else `(x[i], x[i + dims/2])`, becomes `(x1 cos - x2 sin, x1 sin + x2 cos)`,
/// all in f32 with one rounding to the dtype. Features `dims..D` are copied bit for bit. The
/// output is a new row-major array of `x`'s shape and dtype.
///
/// # Errors
/// `Error::Unsupported` for f64 (it stays on the CPU) and for sizes past the kernel's 32-bit
/// limits (`T`, `D` or the head count above 2^31 - 1); compile and driver errors.
pub(crate) fn run(args: &RopeArgs, stream: &Stream) -> Result<Array> {
    let x = &args.x;
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!(
            "[rope] the CUDA kernel takes float32, float16 and bfloat16, not {dtype}; compute \
             {dtype} on the CPU"
        )));
    }
    let nd = x.ndim();
    let shape = x.shape();
    let (batch, seq, d) = (shape[0], shape[nd - 2], shape[nd - 1]);
    let n_heads: usize = shape[1..nd - 2].iter().product();
    let (dims, traditional) = (args.dims, args.traditional);
    let half = dims / 2;
    let src = x.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "[rope] the CUDA kernel got an array on {}",
            x.device()
        ))
    })?;
    let device = src.device();
    let n = x.size();
    if n == 0 {
        let out = CudaBuffer::alloc(device, stream, dtype, 0)?;
        return Array::from_cuda_buffer(out, shape);
    }
    let seq_i32 = to_i32(seq, "a sequence length")?;
    let d_i32 = to_i32(d, "a feature dimension")?;
    let heads_i32 = to_i32(n_heads, "a head count")?;
    let half_i32 = half as i32;
    let pass = d - dims;
    let cols = half.max(pass);

    // In place when the heads merge into one stride; a row-major GPU copy otherwise.
    let contiguous_copy;
    let (x, (stride_b, stride_h, stride_s)) = match layout(x) {
        Some(l) => (x, l),
        None => {
            contiguous_copy = copy_cast(x, dtype, Some(stream))?;
            let l = ((n_heads * seq * d) as i64, (seq * d) as i64, d as i64);
            (&contiguous_copy, l)
        }
    };
    let src = x
        .cuda_buffer()
        .ok_or_else(|| Error::Device("contiguous copy left the GPU".into()))?;

    let periods_uploaded;
    let (period_buf, log2_base) = match &args.freqs {
        RopeFreqs::Periods(p) => {
            let periods: Vec<f32> = p.iter().map(|&v| v as f32).collect();
            periods_uploaded = CudaBuffer::upload(device, stream, &periods)?;
            (Some(&periods_uploaded), 0.0)
        }
        RopeFreqs::Device(f) => (
            Some(device_table(f, DType::F32, half, device, "freqs")?),
            0.0,
        ),
        RopeFreqs::Base(b) => (None, b.log2()),
    };
    let uploaded;
    let (offset_buf, offset) = match &args.offsets {
        RopeOffsets::Scalar(v) => (None, *v),
        RopeOffsets::PerBatch(o) => {
            uploaded = CudaBuffer::upload(device, stream, o)?;
            (Some(&uploaded), 0)
        }
        RopeOffsets::Device(o) => (
            Some(device_table(o, DType::I64, batch, device, "offsets")?),
            0,
        ),
    };

    // The widest vectors every access can use aligned: the half, the pass-through part, the
    // row length, the strides, the offset and the buffer must all be multiples of the chunk.
    let x_offset_elems = x.offset();
    // V = 1 needs nothing (a traditional pair is then read element by element).
    let v = widths(dtype, traditional)
        .find(|&v| {
            let k = chunk_elems(traditional, v);
            if v == 1 {
                return true;
            }
            half % v == 0
                && pass % v == 0
                && d % k == 0
                && [stride_b, stride_h, stride_s]
                    .iter()
                    .all(|s| s.rem_euclid(k as i64) == 0)
                && x_offset_elems % k == 0
                && src.is_aligned(x_offset_elems, k * dtype.size())
        })
        .unwrap_or(1);
    let cols = cols / v;
    let groups = n_heads.div_ceil(HEADS_PER_ITEM);
    let n_items = (batch as u128) * (groups as u128) * (seq as u128) * (cols as u128);
    let blocks = n_items
        .div_ceil(BLOCK as u128)
        .min(device.sm_count() as u128 * 16)
        .max(1) as u32;
    // 32-bit item indices when the grid-stride loop's last step cannot overflow them.
    let wide = n_items + blocks as u128 * BLOCK as u128 > i32::MAX as u128;
    let n_items = i64::try_from(n_items).map_err(|_| {
        Error::Unsupported(format!(
            "[rope] {n_items} work items exceed the CUDA kernel's 64-bit index"
        ))
    })?;
    let name = variant(dtype, traditional, wide, v);
    let func = jit::function(device, &REGISTERED.file, &name, &[])?;

    let mut out = CudaBuffer::alloc(device, stream, dtype, n)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let null: u64 = 0;
    let x_offset = x.offset() as i64;
    let cols_i32 = cols as i32;
    let pass_i32 = pass as i32;
    let cu = stream.cuda();
    let mut builder = cu.launch_builder(&func);
    builder
        .arg(src.slice())
        .arg(&x_offset)
        .arg(&stride_b)
        .arg(&stride_h)
        .arg(&stride_s)
        .arg(out.slice_mut())
        .arg(&n_items)
        .arg(&heads_i32)
        .arg(&seq_i32)
        .arg(&cols_i32)
        .arg(&half_i32)
        .arg(&pass_i32)
        .arg(&d_i32);
    match &period_buf {
        Some(p) => builder.arg(p.slice()),
        None => builder.arg(&null),
    };
    builder.arg(&log2_base).arg(&args.scale);
    match &offset_buf {
        Some(o) => builder.arg(o.slice()),
        None => builder.arg(&null),
    };
    builder.arg(&offset);
    // SAFETY: the arguments match the kernel's parameters in order and type. Item (b, group,
    // s, c) reads x at x_offset + b * stride_b + h * stride_h + s * stride_s + j for b < B,
    // h < H, s < T, j < D, all inside x's view (the strides are x's own, or those of the
    // row-major copy); periods[c] for c < dims / 2 and offsets[b] for b < B are inside their
    // uploads (lengths checked above); the output holds B * H * T * D elements, and every
    // index written is below that.
    unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    Array::from_cuda_buffer(out, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn zeros(shape: &[usize]) -> Array {
        Array::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn layouts_read_in_place_or_copied() {
        // Row-contiguous 3-D, 4-D and 5-D (the heads merge).
        assert_eq!(layout(&zeros(&[2, 5, 8])), Some((40, 0, 8)));
        assert_eq!(layout(&zeros(&[2, 3, 5, 8])), Some((120, 40, 8)));
        assert_eq!(layout(&zeros(&[2, 3, 4, 5, 8])), Some((480, 40, 8)));
        // [B, T, H, D] memory viewed as [B, H, T, D].
        let t = zeros(&[2, 5, 3, 8]).transpose(&[0, 2, 1, 3]).unwrap();
        assert_eq!(layout(&t), Some((120, 8, 24)));
        // Heads that do not merge, and a strided last axis: copied.
        let t = zeros(&[2, 3, 4, 5, 8]).transpose(&[0, 2, 1, 3, 4]).unwrap();
        assert_eq!(layout(&t), None);
        let t = zeros(&[2, 3, 5, 8]).transpose(&[0, 1, 3, 2]).unwrap();
        assert_eq!(layout(&t), None);
    }

    #[test]
    fn every_launch_has_a_compiled_variant() {
        let all = all_variants();
        // f32: 3 + 2 widths, 16-bit types: 4 + 3; times two index types.
        assert_eq!(all.len(), 2 * (5 + 7 + 7));
        assert!(all.contains(&variant(DType::BF16, true, true, 4)));
        assert!(all.contains(&"rope<ff_f16, false, int, 8>".to_string()));
        assert!(all.contains(&"rope<ff_f32, true, int, 2>".to_string()));
        assert!(!all.contains(&"rope<ff_f32, true, int, 4>".to_string()));
    }
}
