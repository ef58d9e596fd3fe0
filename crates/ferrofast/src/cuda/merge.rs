//! Launcher for `kernels/merge.cu`: `merge_attention_states`, and the f32 accumulation the
//! context-parallel backward sums its partial gradients with.
//!
//! Every input is read in place through its strides (any views); the results are new
//! row-major arrays on the launch's stream.

use super::copy::{copy_cast, type_tag};
use super::jit::{self, KernelFile, Registered};
use super::memory::CudaBuffer;
use super::runtime::{grid_1d, launch_kernel, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::merge::MergeArgs;
use crate::Array;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, PushKernelArg};

/// `kernels/merge.cu`: the merge and the accumulation kernels.
/// Every instantiation a launch can ask for is in `variants`.
pub(crate) const REGISTERED: Registered = Registered {
    file: KernelFile::new("merge.cu", include_str!("kernels/merge.cu")),
    variants: all_variants,
};

/// Threads per block.
const BLOCK: u32 = 256;

/// Features one work item of `merge_states` covers (`FF_MERGE_V` in `merge.cu`).
const V: usize = 4;

/// The dtypes the kernels are instantiated for.
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn index_type(wide: bool) -> &'static str {
    if wide {
        "long long"
    } else {
        "int"
    }
}

fn merge_variant(dtype: DType, wide: bool) -> String {
    format!("merge_states<{}, {}>", type_tag(dtype), index_type(wide))
}

fn add_variant(dtype: DType, wide: bool) -> String {
    format!("merge_add<{}, {}>", type_tag(dtype), index_type(wide))
}

/// Every instantiation of `merge.cu` a launch can ask for.
fn all_variants() -> Vec<String> {
    let mut out = Vec::new();
    for dtype in DTYPES {
        for wide in [false, true] {
            out.push(merge_variant(dtype, wide));
            out.push(add_variant(dtype, wide));
        }
    }
    out
}

/// The device buffer of `a`, or an error naming the op.
fn buffer<'a>(a: &'a Array, what: &str) -> Result<&'a CudaBuffer> {
    a.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "[merge_attention_states] the CUDA kernel got {what} on {}",
            a.device()
        ))
    })
}

/// `a`'s strides as four (leading axes of stride 0 added) and its offset, as i64.
fn layout4(a: &Array) -> ([i64; 4], i64) {
    let s = a.strides();
    let mut out = [0i64; 4];
    for (o, &v) in out[4 - s.len()..].iter_mut().zip(s) {
        *o = v as i64;
    }
    (out, a.offset() as i64)
}

/// Blocks for `n` items of a grid-stride kernel, and whether the item index needs 64 bits.
fn plan(n: usize, sm_count: u32) -> (u32, bool) {
    let blocks = (n as u128)
        .div_ceil(u128::from(BLOCK))
        .min(u128::from(sm_count) * 16)
        .max(1) as u32;
    let wide = n as u128 + u128::from(blocks) * u128::from(BLOCK) > i32::MAX as u128;
    (blocks, wide)
}

/// Runs a validated `merge_attention_states` call on `stream` (whose device holds the
/// inputs): see `merge.cu` for the arithmetic. Returns the row-major output and
/// log-sum-exp.
///
/// # Errors
/// `Error::Unsupported` for float64 (it stays on the CPU) and for a `D_v` past 2^31 - 1;
/// compile and driver errors.
pub(crate) fn run(args: &MergeArgs, stream: &Stream) -> Result<(Array, Array)> {
    let dtype = args.dtype;
    if !DTYPES.contains(&dtype) {
        return Err(Error::Unsupported(format!(
            "[merge_attention_states] the CUDA kernel takes float32, float16 and bfloat16, \
             not {dtype}; compute {dtype} on the CPU"
        )));
    }
    let [bn, hn, sn, dv] = args.shape;
    let rows = bn * hn * sn;
    let src = buffer(&args.out_a, "out_a")?;
    let device = src.device();
    let mut out = CudaBuffer::alloc(device, stream, dtype, rows * dv)?;
    let mut lse = CudaBuffer::alloc(device, stream, DType::F32, rows)?;
    // Rows with D_v = 0 still have a log-sum-exp: one item per row writes it.
    if rows > 0 {
        let dv_i32 = i32::try_from(dv).map_err(|_| {
            Error::Unsupported(format!(
                "[merge_attention_states] D_v = {dv} exceeds the CUDA kernel's limit of 2^31 - 1"
            ))
        })?;
        let chunks = dv.div_ceil(V).max(1);
        let n_items = rows * chunks;
        let (blocks, wide) = plan(n_items, device.sm_count());
        let name = merge_variant(dtype, wide);
        let func = jit::function(device, &REGISTERED.file, &name, &[])?;
        let (oa, ob) = (src, buffer(&args.out_b, "out_b")?);
        let (la, lb) = (buffer(&args.lse_a, "lse_a")?, buffer(&args.lse_b, "lse_b")?);
        let (oa_s, oa_off) = layout4(&args.out_a);
        let (ob_s, ob_off) = layout4(&args.out_b);
        let (la_s, la_off) = layout4(&args.lse_a);
        let (lb_s, lb_off) = layout4(&args.lse_b);
        let chunks_i32 = chunks as i32;
        let (n_i64, h_i64, s_i64) = (n_items as i64, hn as i64, sn as i64);
        let (n_i32, h_i32, s_i32) = (n_items as i32, hn as i32, sn as i32);
        let cu = stream.cuda();
        let mut builder = cu.launch_builder(&func);
        builder.arg(oa.slice()).arg(&oa_off);
        for s in &oa_s {
            builder.arg(s);
        }
        builder.arg(ob.slice()).arg(&ob_off);
        for s in &ob_s {
            builder.arg(s);
        }
        // The log-sum-exps are 3-D: their strides are the last three of `layout4`.
        builder.arg(la.slice()).arg(&la_off);
        for s in &la_s[1..] {
            builder.arg(s);
        }
        builder.arg(lb.slice()).arg(&lb_off);
        for s in &lb_s[1..] {
            builder.arg(s);
        }
        builder.arg(out.slice_mut()).arg(lse.slice_mut());
        if wide {
            builder.arg(&n_i64).arg(&h_i64).arg(&s_i64);
        } else {
            builder.arg(&n_i32).arg(&h_i32).arg(&s_i32);
        }
        builder.arg(&dv_i32).arg(&chunks_i32);
        let cfg = grid_1d(blocks, BLOCK, 0);
        // SAFETY: the arguments match `merge_states`'s parameters in order and type (the
        // index type `I` is i32 or i64 as `name` says, and every value passed as i32 fits:
        // `wide` is set when the item count, hence the head count and the sequence length,
        // could pass 2^31 - 1). Row (b, h, s) and feature j < D_v read each part at its
        // offset plus b, h, s, j times its own strides, inside its view; the log-sum-exps
        // likewise; `out` holds rows * D_v and `lse` rows elements, and each index written
        // is below that.
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    Ok((
        Array::from_cuda_buffer(out, &args.shape)?,
        Array::from_cuda_buffer(lse, &args.shape[..3])?,
    ))
}

/// `acc + x` as a new row-major float32 array of `x`'s shape on `stream` (`x` alone as f32
/// when `acc` is `None`): `x` of any floating dtype and strides, at most 4-D; `acc` float32
/// of `x`'s shape on `x`'s device (copied to row-major first when it is a view).
///
/// # Errors
/// `Error::Unsupported` for float64 or an `x` of more than four dimensions; compile and
/// driver errors.
pub(crate) fn accumulate(acc: Option<&Array>, x: &Array, stream: &Stream) -> Result<Array> {
    let dtype = x.dtype();
    if !DTYPES.contains(&dtype) || x.ndim() > 4 {
        return Err(Error::Unsupported(format!(
            "[ring_attention] the CUDA accumulation takes float32, float16 and bfloat16 \
             arrays of at most 4 dimensions, not {dtype} of shape {}",
            crate::array::fmt_shape(x.shape())
        )));
    }
    let xb = buffer(x, "a gradient")?;
    let device = xb.device();
    let n = x.size();
    let mut out = CudaBuffer::alloc(device, stream, DType::F32, n)?;
    if n > 0 {
        let acc_rm = match acc {
            Some(a) if a.is_contiguous() && a.offset() == 0 && a.dtype() == DType::F32 => {
                Some(a.clone())
            }
            Some(a) => Some(copy_cast(a, DType::F32, Some(stream))?),
            None => None,
        };
        let (blocks, wide) = plan(n, device.sm_count());
        let name = add_variant(dtype, wide);
        let func = jit::function(device, &REGISTERED.file, &name, &[])?;
        let mut dims = [1usize; 4];
        dims[4 - x.ndim()..].copy_from_slice(x.shape());
        let (xs, x_off) = layout4(x);
        let null: u64 = 0;
        let wide_args = [dims[1] as i64, dims[2] as i64, dims[3] as i64, n as i64];
        let narrow_args = wide_args.map(|v| v as i32);
        let cu = stream.cuda();
        let mut builder = cu.launch_builder(&func);
        match &acc_rm {
            Some(a) => builder.arg(buffer(a, "an accumulator")?.slice()),
            None => builder.arg(&null),
        };
        builder.arg(xb.slice()).arg(&x_off);
        for s in &xs {
            builder.arg(s);
        }
        if wide {
            push_add_sizes(&mut builder, &wide_args, out.slice_mut());
        } else {
            push_add_sizes(&mut builder, &narrow_args, out.slice_mut());
        }
        let cfg = grid_1d(blocks, BLOCK, 0);
        // SAFETY: the arguments match `merge_add`'s parameters in order and type (`I` as
        // `name` says; the i32 values fit when `wide` is false, as every dimension is at most
        // the element count). Element i reads x at its offset plus its four indices times
        // x's strides, inside x's view, and `acc[i]` and `out[i]` for i < n, the length of
        // both row-major f32 buffers (acc has x's shape).
        unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    }
    Array::from_cuda_buffer(out, x.shape())
}

/// Pushes `merge_add`'s parameters after `x`'s strides: `x`'s last three sizes, the output
/// `out`, then the element count, `sizes` holding the four in the kernel's index type.
fn push_add_sizes<'a, I: DeviceRepr>(
    builder: &mut LaunchArgs<'a>,
    sizes: &'a [I; 4],
    out: &'a mut CudaSlice<u8>,
) {
    builder
        .arg(&sizes[0])
        .arg(&sizes[1])
        .arg(&sizes[2])
        .arg(out)
        .arg(&sizes[3]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launch_has_a_compiled_variant() {
        let all = all_variants();
        assert_eq!(all.len(), 12);
        assert!(all.contains(&"merge_states<ff_bf16, int>".to_string()));
        assert!(all.contains(&"merge_add<ff_f16, long long>".to_string()));
    }

    #[test]
    fn plans_switch_to_wide_indices_past_31_bits() {
        assert_eq!(plan(10, 132), (1, false));
        assert!(!plan(1 << 30, 132).1);
        assert!(plan(i32::MAX as usize, 132).1);
    }
}
