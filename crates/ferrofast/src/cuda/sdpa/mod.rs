//! CUDA `scaled_dot_product_attention`: [`run`] takes a validated call, asks [`select()`]
//! which kernel serves it and launches that kernel; the launchers share the operand helpers
//! below, one mask encoding ([`MaskKind`]) and one
//! parameter block ([`AttnParams`], `ff_attn_params` in `kernels/attn.cuh`).
//!
//! The kernels (`select.rs` has the table and its test):
//! - **decode** (`decode.rs`; `T_q <= 8`): the query heads of a GQA group and all query
//!   positions share one read of each key/value row, split-KV with a combine kernel when the
//!   (batch, kv head) pairs alone would not fill the GPU; on the tensor cores (`mma.sync`) for
//!   f16 / bf16 with the head dims of its table, a SIMT kernel otherwise.
//! - **Hopper prefill** (`prefill_sm90.rs`; compute capability 9.0): TMA, warp
//!   specialisation and wgmma for f16 / bf16, `D = D_v` in {64, 128}, causal or no mask.
//! - **tensor-core prefill** (`prefill.rs`): `mma.sync` flash attention for f16 / bf16 with
//!   `(D, D_v)` in (64, 64), (80, 80), (96, 96), (128, 128), (256, 256) and (192, 128),
//!   every mask kind and sinks.
//! - **general** (`general.rs`): any `T_q`, `D`, `D_v` and strides (the feature axis
//!   included), a flash-style SIMT kernel with key/value tiles in shared memory.
//!
//! Every kernel takes every mask kind (none, lower-right causal, bool, additive with any
//! strides, stride 0 included) it is selected for, and sinks. A row with no visible key and
//! no sink is 0 (the CPU's rule); `T_kv == 0` gives zeros. No kernel stores anything of size
//! `T_q x T_kv`.

mod backward;
mod decode;
mod general;
mod prefill;
mod prefill_sm90;
pub(crate) mod select;

use super::copy::copy_cast;
use super::memory::CudaBuffer;
use super::runtime::{self, CudaDevice, Stream};
pub(super) use super::runtime::{launch_kernel, resident_blocks};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::sdpa::{SdpaArgs, SdpaVjpArgs};
use crate::{Array, Device};
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchArgs, PushKernelArg};
pub(crate) use select::{select, Kernel, Knobs, Problem};
use std::sync::Arc;

const OP: &str = "[scaled_dot_product_attention]";

/// The dtypes the CUDA attention kernels take.
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every built-in attention kernel file with the instantiations its launcher can ask for.
pub(crate) fn kernel_files() -> [super::jit::Registered; 7] {
    [
        backward::REGISTERED,
        backward::REGISTERED_MMA,
        backward::REGISTERED_SM90,
        decode::REGISTERED,
        general::REGISTERED,
        prefill::REGISTERED,
        prefill_sm90::REGISTERED,
    ]
}

/// How an array mask is applied (`FF_MASK_*` in `kernels/attn.cuh`, the `MASK` template
/// argument of the prefill kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MaskKind {
    /// No array mask (causal or not).
    None = 0,
    /// A bool array: keep where true.
    Bool = 1,
    /// An additive array of the input dtype.
    Additive = 2,
}

/// `ff_attn_params` in `kernels/attn.cuh`: the layout of every operand and the problem's
/// sizes, passed by value to the decode, combine and general kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AttnParams {
    q_off: i64,
    q_sb: i64,
    q_sh: i64,
    q_st: i64,
    q_sd: i64,
    k_off: i64,
    k_sb: i64,
    k_sh: i64,
    k_st: i64,
    k_sd: i64,
    v_off: i64,
    v_sb: i64,
    v_sh: i64,
    v_st: i64,
    v_sd: i64,
    m_off: i64,
    m_sb: i64,
    m_sh: i64,
    m_st: i64,
    m_sk: i64,
    s_off: i64,
    s_stride: i64,
    mask_kind: i32,
    causal: i32,
    has_sinks: i32,
    n_kv: i32,
    group: i32,
    t_q: i32,
    t_kv: i32,
    d: i32,
    d_v: i32,
    /// Blocks per (batch, kv head) along the rows of the GQA group.
    pub(super) n_row_chunks: i32,
    /// Blocks along the output features (general kernel; 1 for decode).
    pub(super) n_dv_chunks: i32,
    /// Key ranges (decode; 1 for general).
    pub(super) n_splits: i32,
    /// Keys per range (decode; `T_kv` for general).
    pub(super) split_len: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the C layout of `ff_attn_params`.
unsafe impl DeviceRepr for AttnParams {}

impl AttnParams {
    /// The layouts of `q`, `k`, `v` (the operands as the kernel reads them: `c`'s own or
    /// copies), the mask and the sinks, and `c`'s sizes; one row chunk, one feature chunk,
    /// one key range.
    ///
    /// # Errors
    /// `Error::Unsupported` for sizes past the kernels' 32-bit indices.
    pub(super) fn new(
        c: &SdpaArgs,
        [q, k, v]: [&Array; 3],
        mask: &MaskArg<'_>,
        sinks: Option<(&CudaBuffer, i64, i64)>,
    ) -> Result<AttnParams> {
        let [_, nq, tq, dv] = c.out_shape;
        let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
        let (qs, ks, vs) = (strides4(q), strides4(k), strides4(v));
        // The feature strides are read as they are (a size-1 feature axis never steps).
        let sd = |a: &Array| a.strides()[3] as i64;
        Ok(AttnParams {
            q_off: q.offset() as i64,
            q_sb: qs[0],
            q_sh: qs[1],
            q_st: qs[2],
            q_sd: sd(q),
            k_off: k.offset() as i64,
            k_sb: ks[0],
            k_sh: ks[1],
            k_st: ks[2],
            k_sd: sd(k),
            v_off: v.offset() as i64,
            v_sb: vs[0],
            v_sh: vs[1],
            v_st: vs[2],
            v_sd: sd(v),
            m_off: mask.offset,
            m_sb: mask.strides[0],
            m_sh: mask.strides[1],
            m_st: mask.strides[2],
            m_sk: mask.strides[3],
            s_off: sinks.map_or(0, |s| s.1),
            s_stride: sinks.map_or(0, |s| s.2),
            mask_kind: mask.kind as i32,
            causal: i32::from(c.causal),
            has_sinks: i32::from(sinks.is_some()),
            n_kv: to_i32(nkv, "a kv head count")?,
            group: to_i32(nq / nkv.max(1), "a GQA group")?,
            t_q: to_i32(tq, "a query length")?,
            t_kv: to_i32(tkv, "a key sequence length")?,
            d: to_i32(d, "a head dimension")?,
            d_v: to_i32(dv, "a value head dimension")?,
            n_row_chunks: 1,
            n_dv_chunks: 1,
            n_splits: 1,
            split_len: to_i32(tkv, "a key sequence length")?,
            scale_log2: c.scale * std::f32::consts::LOG2_E,
        })
    }
}

/// Runs a validated attention call on `stream` (whose device holds every input) with the
/// kernel [`select()`] names. Returns a new row-major `[B, N_q, T_q, D_v]` array produced on
/// `stream`.
///
/// # Errors
/// `Error::Unsupported` for dtypes other than f32, f16 and bf16 and for sizes past the
/// kernels' 32-bit limits; compile and driver errors.
pub(crate) fn run(c: &SdpaArgs, stream: &Stream) -> Result<Array> {
    let device = runtime::device(stream.ordinal())?;
    if !launchable(c)? {
        let out = CudaBuffer::alloc(&device, stream, c.dtype, 0)?;
        return Array::from_cuda_buffer(out, &c.out_shape);
    }
    match select(&Problem::of(c), &device.arch(), Knobs::from_env()) {
        Kernel::DecodeMma => decode::run(c, stream, decode::Variant::Mma),
        Kernel::DecodeSimt => decode::run(c, stream, decode::Variant::Simt),
        Kernel::PrefillSm90 => prefill_sm90::run(c, stream),
        Kernel::PrefillMma => prefill::run(c, stream, false).map(|f| f.out),
        Kernel::General => general::run(c, stream, false).map(|f| f.out),
    }
}

/// Checks a call against the kernels' dtypes and 32-bit limits; `Ok(false)` when its output
/// is empty (nothing to launch).
fn launchable(c: &SdpaArgs) -> Result<bool> {
    let dtype = c.dtype;
    if !DTYPES.contains(&dtype) {
        return Err(Error::Unsupported(format!(
            "{OP} the CUDA kernels take float32, float16 and bfloat16, not {dtype}; compute \
             {dtype} on the CPU"
        )));
    }
    let [_, nq, tq, _] = c.out_shape;
    let (nkv, tkv, d) = (c.k.shape()[1], c.k.shape()[2], c.k.shape()[3]);
    for (v, what) in [
        (tkv, "a key sequence length"),
        (d, "a head dimension"),
        (c.out_shape[3], "a value head dimension"),
        (nkv, "a kv head count"),
        ((nq / nkv.max(1)) * tq, "a GQA group times the query length"),
    ] {
        to_i32(v, what)?;
    }
    Ok(c.out_shape.iter().product::<usize>() > 0)
}

/// The output of a forward launch, and its log-sum-exp when one was asked for.
pub(super) struct Forward {
    pub(super) out: Array,
    pub(super) lse: Option<Array>,
}

impl Forward {
    /// Wraps a launch's buffers as arrays of the call's shapes.
    pub(super) fn new(out: CudaBuffer, lse: LseBuffer, c: &SdpaArgs) -> Result<Forward> {
        let [b, nq, tq, _] = c.out_shape;
        Ok(Forward {
            out: Array::from_cuda_buffer(out, &c.out_shape)?,
            lse: lse
                .0
                .map(|l| Array::from_cuda_buffer(l, &[b, nq, tq]))
                .transpose()?,
        })
    }

    /// The result of a call with an empty output: no output values, and (when asked) the
    /// log-sum-exp of rows that see no key: their sink, or -inf.
    pub(super) fn empty(
        c: &SdpaArgs,
        device: &Arc<CudaDevice>,
        stream: &Stream,
        with_lse: bool,
    ) -> Result<Forward> {
        let out = CudaBuffer::alloc(device, stream, c.dtype, 0)?;
        let out = Array::from_cuda_buffer(out, &c.out_shape)?;
        let lse = if with_lse {
            Some(empty_rows_lse(c)?.to_stream(stream)?)
        } else {
            None
        };
        Ok(Forward { out, lse })
    }
}

/// The log-sum-exp of every row of a call whose rows see no key (`T_kv = 0`): each head's
/// sink, or -inf. Made on the host (a `[B, N_q, T_q]` f32 array).
fn empty_rows_lse(c: &SdpaArgs) -> Result<Array> {
    let [b, nq, tq, _] = c.out_shape;
    let sinks = match &c.sinks {
        Some(s) => Some(s.to_f64_vec()?),
        None => None,
    };
    let values: Vec<f32> = (0..b * nq * tq)
        .map(|row| {
            sinks
                .as_ref()
                .map_or(f32::NEG_INFINITY, |s| s[(row / tq) % nq] as f32)
        })
        .collect();
    Array::from_kernel_vec(values, &[b, nq, tq])
}

/// The `lse` operand of a forward launch: a `[B, N_q, T_q]` f32 buffer, or none (a null
/// pointer: the kernel writes no log-sum-exp).
pub(super) struct LseBuffer(Option<CudaBuffer>);

impl LseBuffer {
    pub(super) fn new(
        c: &SdpaArgs,
        device: &Arc<CudaDevice>,
        stream: &Stream,
        with_lse: bool,
    ) -> Result<LseBuffer> {
        let [b, nq, tq, _] = c.out_shape;
        Ok(LseBuffer(if with_lse {
            Some(CudaBuffer::alloc(device, stream, DType::F32, b * nq * tq)?)
        } else {
            None
        }))
    }

    /// Pushes the buffer, or `null`, as the kernel's `lse` argument.
    pub(super) fn push<'a>(&'a mut self, builder: &mut LaunchArgs<'a>, null: &'a u64) {
        match &mut self.0 {
            Some(l) => builder.arg(l.slice_mut()),
            None => builder.arg(null),
        };
    }
}

/// Attention with its log-sum-exp on `stream` (see
/// `fast::scaled_dot_product_attention_with_lse`): the kernel [`select()`] names when it
/// writes the log-sum-exp (the `mma.sync` prefill and the general kernel), else the one of
/// those that takes the call (the Hopper prefill gives way to the `mma.sync` prefill, the
/// decode kernels to the general kernel).
///
/// # Errors
/// As [`run`].
pub(crate) fn run_with_lse(c: &SdpaArgs, stream: &Stream) -> Result<(Array, Array)> {
    let device = runtime::device(stream.ordinal())?;
    let fwd = if !launchable(c)? || c.k.shape()[2] == 0 {
        if c.k.shape()[2] == 0 && c.out_shape.iter().product::<usize>() > 0 {
            // Rows that see no key: zeros, and their sinks' (or -inf) log-sum-exp.
            let out = Array::zeros(&c.out_shape, c.dtype, &Device::Cpu)?.to_stream(stream)?;
            Forward {
                out,
                lse: Some(empty_rows_lse(c)?.to_stream(stream)?),
            }
        } else {
            Forward::empty(c, &device, stream, true)?
        }
    } else {
        match select(&Problem::of(c), &device.arch(), Knobs::from_env()) {
            Kernel::PrefillSm90 | Kernel::PrefillMma => prefill::run(c, stream, true)?,
            Kernel::DecodeMma | Kernel::DecodeSimt | Kernel::General => {
                general::run(c, stream, true)?
            }
        }
    };
    let lse = fwd
        .lse
        .ok_or_else(|| Error::Device(format!("{OP} the kernel gave no log-sum-exp")))?;
    Ok((fwd.out, lse))
}

/// The attention backward pass on `stream` (see `fast::scaled_dot_product_attention_vjp`):
/// `(dq, dk, dv, dsinks)` in the primals' dtypes.
///
/// # Errors
/// As [`run`]; `Error::Unsupported` for head dims whose tiles do not fit in shared memory.
pub(crate) fn run_vjp(
    c: &SdpaVjpArgs,
    stream: &Stream,
) -> Result<(Array, Array, Array, Option<Array>)> {
    launchable(&c.fwd)?;
    c.to_primals(backward::run(c, stream)?)
}

/// The kernel a validated call on CUDA device `ordinal` gets (for tests and benchmarks).
///
/// # Errors
/// `Error::CudaUnavailable` / `Error::Device` when the device cannot be reached.
pub(crate) fn selected_kernel(c: &SdpaArgs, ordinal: usize) -> Result<Kernel> {
    let device = runtime::device(ordinal)?;
    Ok(select(&Problem::of(c), &device.arch(), Knobs::from_env()))
}

/// `v` as an `i32` kernel argument.
pub(super) fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "{OP} {what} of {v} exceeds the CUDA kernels' limit of 2^31 - 1"
        ))
    })
}

/// Lets `func` use `bytes` of dynamic shared memory (above the 48 KB default), checked by the
/// driver against the device; `what` names the kernel in the error.
pub(super) fn allow_shared_memory(func: &CudaFunction, bytes: usize, what: &str) -> Result<()> {
    runtime::allow_dynamic_shared_memory(func, bytes, what)
}

pub(super) fn buffer<'a>(a: &'a Array, name: &str, ordinal: usize) -> Result<&'a CudaBuffer> {
    let buf = a.cuda_buffer().ok_or_else(|| {
        Error::Device(format!(
            "{OP} the stream is on cuda:{ordinal} but {name} is on {}; move every input to \
             one CUDA device",
            a.device()
        ))
    })?;
    if buf.device().ordinal() != ordinal {
        return Err(Error::Device(format!(
            "{OP} the stream is on cuda:{ordinal} but {name} is on cuda:{}; move every input \
             to one CUDA device",
            buf.device().ordinal()
        )));
    }
    Ok(buf)
}

/// Strides of a 4-D view as `i64`, with the stride of every size-1 axis set to 0 (such
/// strides are arbitrary and never used).
pub(super) fn strides4(a: &Array) -> [i64; 4] {
    let mut s = [0i64; 4];
    for (i, (&d, &st)) in a.shape().iter().zip(a.strides()).enumerate().take(4) {
        s[i] = if d == 1 { 0 } else { st as i64 };
    }
    s
}

/// The mask operand: its kind, buffer and layout.
pub(super) struct MaskArg<'a> {
    pub(super) kind: MaskKind,
    pub(super) buffer: Option<&'a CudaBuffer>,
    pub(super) offset: i64,
    pub(super) strides: [i64; 4],
}

pub(super) fn mask_arg<'a>(c: &'a SdpaArgs, ordinal: usize) -> Result<MaskArg<'a>> {
    match &c.mask {
        None => Ok(MaskArg {
            kind: MaskKind::None,
            buffer: None,
            offset: 0,
            strides: [0; 4],
        }),
        Some(m) => Ok(MaskArg {
            kind: if m.dtype() == DType::Bool {
                MaskKind::Bool
            } else {
                MaskKind::Additive
            },
            buffer: Some(buffer(m, "the mask", ordinal)?),
            offset: m.offset() as i64,
            strides: strides4(m),
        }),
    }
}

/// The sinks operand: buffer, offset and stride.
pub(super) fn sinks_arg(c: &SdpaArgs, ordinal: usize) -> Result<Option<(&CudaBuffer, i64, i64)>> {
    c.sinks
        .as_ref()
        .map(|s| {
            Ok((
                buffer(s, "sinks", ordinal)?,
                s.offset() as i64,
                s.strides()[0] as i64,
            ))
        })
        .transpose()
}

/// Whether `a` (`[B, H, T, F]`) can be read in place by a kernel loading 16-byte vectors of
/// its rows (decode, prefill): unit feature stride and 16-byte aligned rows.
fn vector_readable(a: &Array, buf: &CudaBuffer) -> bool {
    let size = a.dtype().size() as i64;
    let s = strides4(a);
    (a.shape()[3] <= 1 || a.strides()[3] == 1)
        && buf.is_aligned(a.offset(), 16)
        && s[..3].iter().all(|&x| (x * size).rem_euclid(16) == 0)
}

/// An operand as the vector-loading kernels (decode, prefill) read it: in place, or a
/// row-major copy on `stream` (16-byte aligned rows when `F * size` is a multiple of 16).
pub(super) fn vector_operand(a: &Array, stream: &Stream) -> Result<Array> {
    let buf = a
        .cuda_buffer()
        .ok_or_else(|| Error::Device(format!("{OP} k and v must be on the GPU")))?;
    if vector_readable(a, buf) {
        Ok(a.clone())
    } else {
        copy_cast(a, a.dtype(), Some(stream))
    }
}

/// Pushes the input pointers the decode and general kernels take first: q, k, v, the mask
/// (null when there is none) and the sinks (likewise).
pub(super) fn push_inputs<'a>(
    builder: &mut LaunchArgs<'a>,
    [q, k, v]: [&'a CudaBuffer; 3],
    mask: &MaskArg<'a>,
    sinks: Option<(&'a CudaBuffer, i64, i64)>,
    null: &'a u64,
) {
    builder.arg(q.slice()).arg(k.slice()).arg(v.slice());
    push_mask(builder, mask, null);
    match sinks {
        Some((s, _, _)) => builder.arg(s.slice()),
        None => builder.arg(null),
    };
}

/// Pushes the mask's buffer, or `null` without one, as a kernel's mask argument.
pub(super) fn push_mask<'a>(builder: &mut LaunchArgs<'a>, mask: &MaskArg<'a>, null: &'a u64) {
    match mask.buffer {
        Some(m) => builder.arg(m.slice()),
        None => builder.arg(null),
    };
}

/// Padding (elements) of each K / V row in the shared-memory tiles of the tensor-core
/// attention kernels: none where `d` and `dv` are multiples of 64 (the rows are swizzled,
/// `SW` in `ferrofast_mma.cuh`), 8 otherwise.
pub(super) fn kv_row_pad(d: usize, dv: usize) -> usize {
    if d.is_multiple_of(64) && dv.is_multiple_of(64) {
        0
    } else {
        8
    }
}
