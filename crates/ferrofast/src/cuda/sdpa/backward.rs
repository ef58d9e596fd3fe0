//! Launcher of `kernels/attn_backward.cu`: the attention backward pass on the SIMT cores,
//! for every case the forward takes (see the kernel file for the method). Four launches on
//! one stream: `delta = rowsum(dO * O)`, `dK`/`dV` per key tile, `dQ` per query tile, and
//! the sinks' gradient. Each block owns what it writes: results are deterministic.

use super::{
    allow_shared_memory, buffer, launch, mask_arg, push_inputs, sinks_arg, to_i32, AttnParams,
    DTYPES, OP,
};
use crate::cuda::copy::type_tag;
use crate::cuda::jit::{self, KernelFile, Registered};
use crate::cuda::memory::CudaBuffer;
use crate::cuda::runtime::{self, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::SdpaVjpArgs;
use crate::Array;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `kernels/attn_backward.cu`. Every instantiation a launch can ask for is in `variants`.
pub(super) const REGISTERED: Registered = Registered {
    file: KernelFile::new(
        "attn_backward.cu",
        include_str!("../kernels/attn_backward.cu"),
    ),
    variants,
};

/// Threads per block of every backward kernel (`FF_BWD_THREADS`).
const THREADS: u32 = 128;
/// Query / key tile sizes, largest first: the largest whose shared memory fits is used.
const TILES: [usize; 3] = [32, 16, 8];
/// The shared memory a block may use (the sm_90 limit; older devices refuse larger
/// requests when the size is set, with a driver error).
const MAX_SHARED: usize = 227 * 1024;

/// Every instantiation of `attn_backward.cu` a launch can ask for.
fn variants() -> Vec<String> {
    let mut v = Vec::new();
    for dtype in DTYPES {
        let t = type_tag(dtype);
        v.push(format!("attn_bwd_delta<{t}>"));
        v.push(format!("attn_bwd_dsinks<{t}>"));
        for tile in TILES {
            v.push(format!("attn_bwd_dkdv<{t}, {tile}>"));
            v.push(format!("attn_bwd_dq<{t}, {tile}>"));
        }
    }
    v
}

/// Shared memory (bytes) of a dK/dV block with query and key tiles of `tile` rows: the q, dO,
/// k and v tiles (rows padded by one float), P and dS, the rows' lse and delta, and the dK and
/// dV accumulators (the dQ kernel needs less).
fn shared_bytes(tile: usize, d: usize, dv: usize) -> usize {
    let floats = 2 * tile * (d + 1)
        + 2 * tile * (dv + 1)
        + 2 * tile * (tile + 1)
        + 2 * tile
        + tile * (d + dv);
    4 * floats
}

/// `a` as a row-major array with no offset on `stream`'s device: itself, or a copy.
fn dense(a: &Array, stream: &Stream) -> Result<Array> {
    if a.is_contiguous() && a.offset() == 0 {
        Ok(a.clone())
    } else {
        a.to_stream(stream)
    }
}

/// `n` blocks as a grid size, or an error past the CUDA limit.
fn grid(n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| Error::Unsupported(format!("{OP} {n} blocks exceed the CUDA grid limit")))
}

/// Runs the backward pass of a validated call on `stream`: `(dq, dk, dv, dsinks)` in the
/// call's dtype (the caller casts them to the primals' dtypes).
///
/// # Errors
/// `Error::Unsupported` for dtypes other than f32 / f16 / bf16, head dims whose tiles do not
/// fit in shared memory, and sizes past the kernels' 32-bit limits; compile and driver
/// errors.
pub(super) fn run(
    c: &SdpaVjpArgs,
    stream: &Stream,
) -> Result<(Array, Array, Array, Option<Array>)> {
    let f = &c.fwd;
    let dtype = f.dtype;
    let ordinal = stream.ordinal();
    let device = runtime::device(ordinal)?;
    let [b, nq, tq, dv] = f.out_shape;
    let (nkv, tkv, d) = (f.k.shape()[1], f.k.shape()[2], f.k.shape()[3]);
    let rows = b * nq * tq;
    let zeros = |shape: &[usize], dt: DType| -> Result<Array> {
        Array::zeros(shape, dt, &crate::Device::Cpu)?.to_stream(stream)
    };
    let empty = rows == 0 || tkv == 0;
    if empty {
        // No query or no key: no probability anywhere, every gradient is 0.
        return Ok((
            zeros(f.q.shape(), dtype)?,
            zeros(f.k.shape(), dtype)?,
            zeros(f.v.shape(), dtype)?,
            f.sinks.as_ref().map(|_| zeros(&[nq], dtype)).transpose()?,
        ));
    }
    let tile = TILES
        .into_iter()
        .find(|&t| shared_bytes(t, d, dv) <= MAX_SHARED)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{OP} the CUDA backward pass takes head dims whose tiles fit in shared memory; \
                 D {d} and D_v {dv} do not"
            ))
        })?;
    let smem = shared_bytes(tile, d, dv);

    let (q, k, v) = (
        buffer(&f.q, "q", ordinal)?,
        buffer(&f.k, "k", ordinal)?,
        buffer(&f.v, "v", ordinal)?,
    );
    let out = dense(&c.out, stream)?;
    let d_out = dense(&c.d_out, stream)?;
    let lse = dense(&c.lse, stream)?;
    let (out_b, g_b, lse_b) = (
        buffer(&out, "out", ordinal)?,
        buffer(&d_out, "d_out", ordinal)?,
        buffer(&lse, "lse", ordinal)?,
    );
    let mask = mask_arg(f, ordinal)?;
    let sinks = sinks_arg(f, ordinal)?;
    let params = AttnParams::new(f, [&f.q, &f.k, &f.v], &mask, sinks)?;
    let scale = f.scale;
    let t = type_tag(dtype);
    let null: u64 = 0;
    let cu = stream.cuda();

    // delta.
    let mut delta = CudaBuffer::alloc(&device, stream, DType::F32, rows)?;
    {
        let name = format!("attn_bwd_delta<{t}>");
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        let rows64 = rows as i64;
        let dv32 = to_i32(dv, "a value head dimension")?;
        let cfg = LaunchConfig {
            grid_dim: (grid(rows.div_ceil(THREADS as usize / 32))?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = cu.launch_builder(&func);
        builder
            .arg(out_b.slice())
            .arg(g_b.slice())
            .arg(delta.slice_mut())
            .arg(&rows64)
            .arg(&dv32);
        // SAFETY: the arguments match attn_bwd_delta's parameters. out and d_out are
        // row-major with no offset and hold rows * D_v elements; delta holds rows floats;
        // warp w of block x reads and writes row 4x + w < rows only.
        launch(&format!("launching {name}"), || {
            unsafe { builder.launch(cfg) }.map(|_| ())
        })?;
    }

    // dK and dV per key tile, then dQ per query tile: the same arguments up to the outputs.
    let mut dk = CudaBuffer::alloc(&device, stream, dtype, b * nkv * tkv * d)?;
    let mut dvb = CudaBuffer::alloc(&device, stream, dtype, b * nkv * tkv * dv)?;
    let mut dq = CudaBuffer::alloc(&device, stream, dtype, rows * d)?;
    let passes: [(&str, usize, Vec<&mut CudaBuffer>); 2] = [
        (
            "attn_bwd_dkdv",
            b * nkv * tkv.div_ceil(tile),
            vec![&mut dk, &mut dvb],
        ),
        ("attn_bwd_dq", b * nq * tq.div_ceil(tile), vec![&mut dq]),
    ];
    for (kernel, blocks, outs) in passes {
        let name = format!("{kernel}<{t}, {tile}>");
        let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
        allow_shared_memory(&func, smem, "the attention backward kernel")?;
        let cfg = LaunchConfig {
            grid_dim: (grid(blocks)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut builder = cu.launch_builder(&func);
        push_inputs(&mut builder, [q, k, v], &mask, sinks, &null);
        builder
            .arg(g_b.slice())
            .arg(lse_b.slice())
            .arg(delta.slice());
        for out in outs {
            builder.arg(out.slice_mut());
        }
        builder.arg(&params).arg(&scale);
        // SAFETY: the arguments match attn_bwd_dkdv's (outputs dk, dv) and attn_bwd_dq's
        // (output dq) parameters. q, k, v and the mask are read at indices below their
        // views' shapes through their own offsets and strides (as the forward reads them);
        // d_out, lse and delta are row-major with no offset and read at rows below
        // B * N_q * T_q. Block (b, g, key tile) writes keys below T_kv of kv head (b, g) in
        // dk and dv (B * N_kv * T_kv * D and * D_v elements); block (b, h, query tile) writes
        // rows below T_q of head (b, h) in dq (B * N_q * T_q * D elements). Shared memory:
        // at most `smem` bytes, allowed above.
        launch(&format!("launching {name}"), || {
            unsafe { builder.launch(cfg) }.map(|_| ())
        })?;
    }

    // The sinks' gradient.
    let dsinks = match sinks {
        None => None,
        Some((s, _, _)) => {
            let mut ds = CudaBuffer::alloc(&device, stream, DType::F32, nq)?;
            let name = format!("attn_bwd_dsinks<{t}>");
            let func = jit::function(&device, &REGISTERED.file, &name, &[])?;
            let batch = to_i32(b, "a batch size")?;
            let cfg = LaunchConfig {
                grid_dim: (grid(nq)?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = cu.launch_builder(&func);
            builder
                .arg(s.slice())
                .arg(lse_b.slice())
                .arg(delta.slice())
                .arg(ds.slice_mut())
                .arg(&params)
                .arg(&batch);
            // SAFETY: the arguments match attn_bwd_dsinks' parameters. Block h < N_q reads
            // sinks[h] through the sinks' offset and stride, lse and delta at rows
            // (b * N_q + h) * T_q + i with b < B, i < T_q, and writes dsinks[h] (N_q floats).
            launch(&format!("launching {name}"), || {
                unsafe { builder.launch(cfg) }.map(|_| ())
            })?;
            Some(Array::from_cuda_buffer(ds, &[nq])?.astype(dtype)?)
        }
    };
    Ok((
        Array::from_cuda_buffer(dq, f.q.shape())?,
        Array::from_cuda_buffer(dk, f.k.shape())?,
        Array::from_cuda_buffer(dvb, f.v.shape())?,
        dsinks,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_up_to_256_take_the_largest_tile() {
        for (d, dv) in [(64, 64), (128, 128), (192, 128), (256, 256)] {
            assert!(shared_bytes(32, d, dv) <= MAX_SHARED, "D {d} D_v {dv}");
        }
        assert!(shared_bytes(8, 1024, 1024) <= MAX_SHARED);
        assert_eq!(variants().len(), 3 * (2 + 2 * TILES.len()));
    }
}
