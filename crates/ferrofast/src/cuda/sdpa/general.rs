//! Launcher of `kernels/attn_general.cu`: attention for any shape, head dims and strides
//! (the feature axis included), read in place: a flash-style SIMT kernel with key/value
//! tiles in shared memory and an online softmax. It takes every call no faster kernel takes
//! (f32 prefill, head dims without a tensor-core table).

use super::{
    buffer, launch_kernel, mask_arg, push_inputs, sinks_arg, to_i32, AttnParams, Forward,
    LseBuffer, DTYPES, OP,
};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaArgs;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `kernels/attn_general.cu`: attention for any shape, head dims and strides.
/// Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::new(
        "attn_general.cu",
        include_str!("../kernels/attn_general.cu"),
    ),
    variants,
};

/// Threads, query rows and output features per block of the general kernel.
const GENERAL_THREADS: u32 = 128;
const GENERAL_BQ: usize = 32;
const GENERAL_DVC: usize = 128;

fn general_variant(dtype: DType) -> String {
    format!("attn_general<{}>", type_tag(dtype))
}

/// Every instantiation of `attn_general.cu` a launch can ask for.
fn variants() -> Vec<String> {
    DTYPES.iter().map(|&d| general_variant(d)).collect()
}

/// Runs the general kernel on `stream`.
///
/// # Errors
/// `Error::Unsupported` for grids past the CUDA limits; compile and driver errors.
pub(super) fn run(c: &SdpaArgs, stream: &Stream, with_lse: bool) -> Result<Forward> {
    let dtype = c.dtype;
    let ordinal = stream.ordinal();
    let device = runtime::device(ordinal)?;
    let [b, nq, tq, dv] = c.out_shape;
    let nkv = c.k.shape()[1];
    let group = nq / nkv;
    let n_row_chunks = (group * tq).div_ceil(GENERAL_BQ);
    let n_dv_chunks = dv.div_ceil(GENERAL_DVC);
    let blocks = (b as u64) * (nkv as u64) * (n_row_chunks as u64) * (n_dv_chunks as u64);
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Unsupported(format!("{OP} {blocks} blocks exceed the CUDA grid limit"))
        })?;
    let (qb, kb, vb) = (
        buffer(&c.q, "q", ordinal)?,
        buffer(&c.k, "k", ordinal)?,
        buffer(&c.v, "v", ordinal)?,
    );
    let mask = mask_arg(c, ordinal)?;
    let sinks = sinks_arg(c, ordinal)?;
    let params = AttnParams {
        n_row_chunks: to_i32(n_row_chunks, "a row block count")?,
        n_dv_chunks: to_i32(n_dv_chunks, "a feature block count")?,
        ..AttnParams::new(c, [&c.q, &c.k, &c.v], &mask, sinks)?
    };
    let name = general_variant(dtype);
    let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
    let mut out = CudaBuffer::alloc(&device, stream, dtype, b * nq * tq * dv)?;
    let mut lse = LseBuffer::new(c, &device, stream, with_lse)?;
    let null: u64 = 0;
    let cu = stream.cuda();
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (GENERAL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = cu.launch_builder(&func);
    push_inputs(&mut builder, [qb, kb, vb], &mask, sinks, &null);
    builder.arg(out.slice_mut());
    lse.push(&mut builder, &null);
    builder.arg(&params);
    // SAFETY: the arguments match attn_general's parameters in order and type. Every element
    // read is q[b, h, t, i], k[b, g, j, i], v[b, g, j, c] or mask[b, h, t, j] with indices
    // below the views' shapes, at the views' own offsets and strides, or sinks[h] with
    // h < N_q; every element written is below B * N_q * T_q * D_v, the output's size, or
    // (when not null) below B * N_q * T_q, the log-sum-exp's.
    unsafe { launch_kernel(&name, &mut builder, cfg) }?;
    Forward::new(out, lse, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_has_a_compiled_variant() {
        for dtype in DTYPES {
            assert!(variants().contains(&general_variant(dtype)));
        }
    }
}
