//! Which attention kernel a call gets: one pure function of the call's shape, the device's
//! architecture and the selection knobs, so every row of the selection table (in
//! `docs/architecture.md`) is tested without a GPU.

use super::decode::{decode_lanes, mma_tiles, DECODE_MAX_TQ, DECODE_MAX_WIDTH};
use super::prefill::tiles_for;
use crate::dtype::DType;
use crate::ops::sdpa::SdpaArgs;

/// The attention kernels of the CUDA back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `attn_decode_mma` (tensor cores, split-KV): f16 / bf16, `T_q <= 8`, `(D, D_v)` in the
    /// decode table.
    DecodeMma,
    /// `attn_decode` (SIMT, split-KV): `T_q <= 8`, `D` and `D_v` multiples of 8, at most 256.
    DecodeSimt,
    /// `attn_prefill_sm90` (TMA, wgmma; compute capability 9.0 only): f16 / bf16,
    /// `D = D_v` in {64, 128}, no array mask, no sinks.
    PrefillSm90,
    /// `attn_prefill` (`mma.sync`): f16 / bf16, `(D, D_v)` in the prefill table.
    PrefillMma,
    /// `attn_general` (SIMT, any shape and strides): everything else.
    General,
}

/// The facts of a call that selection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) dtype: DType,
    pub(crate) batch: usize,
    pub(crate) n_q: usize,
    pub(crate) n_kv: usize,
    pub(crate) t_q: usize,
    pub(crate) t_kv: usize,
    pub(crate) d: usize,
    pub(crate) d_v: usize,
    /// An array mask (bool or additive) is given; causal masks are not array masks.
    pub(crate) array_mask: bool,
    pub(crate) sinks: bool,
}

impl Problem {
    /// The facts of a validated call.
    pub(crate) fn of(c: &SdpaArgs) -> Problem {
        let [batch, n_q, t_q, d_v] = c.out_shape;
        let ks = c.k.shape();
        Problem {
            dtype: c.dtype,
            batch,
            n_q,
            n_kv: ks[1],
            t_q,
            t_kv: ks[2],
            d: ks[3],
            d_v,
            array_mask: c.mask.is_some(),
            sinks: c.sinks.is_some(),
        }
    }

    fn half_precision(&self) -> bool {
        matches!(self.dtype, DType::F16 | DType::BF16)
    }

    /// Sizes the prefill kernels index with 32-bit integers and launch as a
    /// `(query tiles, N_q, B)` grid of `rows`-row tiles.
    fn fits_prefill_grid(&self, rows: usize) -> bool {
        let i32_max = i32::MAX as usize;
        self.t_q <= i32_max
            && self.t_kv <= i32_max
            && self.n_q <= 65535
            && self.batch <= 65535
            && self.t_q.div_ceil(rows) <= i32_max
    }
}

/// Selection switches read from the environment (for measurements and tests, not production).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Knobs {
    /// `FERROFAST_PREFILL_KERNEL=mma`: never the Hopper kernel.
    pub(crate) prefill_mma_only: bool,
    /// `FERROFAST_DECODE_KERNEL=simt`: f16 / bf16 decode on the SIMT kernel.
    pub(crate) decode_simt_only: bool,
    /// `FERROFAST_BACKWARD_KERNEL=simt`: the attention backward on the SIMT kernels.
    pub(crate) backward_simt_only: bool,
    /// `FERROFAST_BACKWARD_KERNEL=mma`: the attention backward never on the Hopper kernels.
    pub(crate) backward_mma_only: bool,
    /// `FERROFAST_DETERMINISTIC=1`: only kernels whose results do not depend on the order
    /// of concurrent additions (the attention backward's two-pass Hopper kernels instead of
    /// the fused one).
    pub(crate) deterministic: bool,
}

/// The environment variable that keeps prefill off the Hopper kernel (`mma`).
pub(crate) const PREFILL_KERNEL_KNOB: &str = "FERROFAST_PREFILL_KERNEL";
/// The environment variable that keeps decode off the tensor cores (`simt`).
pub(crate) const DECODE_KERNEL_KNOB: &str = "FERROFAST_DECODE_KERNEL";
/// The environment variable that keeps the attention backward off the Hopper kernels (`mma`)
/// or off the tensor cores (`simt`).
pub(crate) const BACKWARD_KERNEL_KNOB: &str = "FERROFAST_BACKWARD_KERNEL";
/// The environment variable that asks for bit-reproducible results (`1` or `true`).
pub(crate) const DETERMINISTIC_KNOB: &str = "FERROFAST_DETERMINISTIC";

impl Knobs {
    /// The knobs as the environment sets them now (values trimmed, any case; read at
    /// every call, so a test can switch kernels between calls).
    pub(crate) fn from_env() -> Knobs {
        let is = |name: &str, value: &str| {
            std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
        };
        Knobs {
            prefill_mma_only: is(PREFILL_KERNEL_KNOB, "mma"),
            decode_simt_only: is(DECODE_KERNEL_KNOB, "simt"),
            backward_simt_only: is(BACKWARD_KERNEL_KNOB, "simt"),
            backward_mma_only: is(BACKWARD_KERNEL_KNOB, "mma"),
            deterministic: is(DETERMINISTIC_KNOB, "1") || is(DETERMINISTIC_KNOB, "true"),
        }
    }
}

/// Query rows per block of the Hopper prefill kernel.
pub(crate) const SM90_ROWS: usize = 128;

/// The kernel a call with facts `p` gets on a device of architecture `arch` (NVRTC's name,
/// `sm_90`), for a non-empty output and a dtype the CUDA kernels take (f32, f16, bf16).
pub(crate) fn select(p: &Problem, arch: &str, knobs: Knobs) -> Kernel {
    if p.t_q <= DECODE_MAX_TQ {
        if p.half_precision() && !knobs.decode_simt_only && mma_tiles(p.d, p.d_v).is_some() {
            return Kernel::DecodeMma;
        }
        let width = p.d.max(p.d_v);
        if p.d.is_multiple_of(8)
            && p.d_v.is_multiple_of(8)
            && width <= DECODE_MAX_WIDTH
            && decode_lanes(p.dtype, width).is_some()
        {
            return Kernel::DecodeSimt;
        }
    }
    if !knobs.prefill_mma_only
        && arch == "sm_90"
        && p.half_precision()
        && p.d == p.d_v
        && matches!(p.d, 64 | 128)
        && !p.array_mask
        && !p.sinks
        && p.batch > 0
        && p.n_q > 0
        && p.n_kv > 0
        && p.t_q > 0
        && p.t_kv > 0
        && p.fits_prefill_grid(SM90_ROWS)
    {
        return Kernel::PrefillSm90;
    }
    if p.half_precision() {
        if let Some(t) = tiles_for(p.d, p.d_v) {
            if p.fits_prefill_grid(t.rows()) {
                return Kernel::PrefillMma;
            }
        }
    }
    Kernel::General
}

/// The kernels of the attention backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackwardKernel {
    /// `attn_backward_sm90.cu`'s fused pass (TMA, wgmma; compute capability 9.0 only):
    /// f16 / bf16, `D = D_v` in {64, 128}, every mask kind and sinks; dK, dV and dQ in one
    /// pass, dQ added in f32 by bulk reductions (results can differ in the last bits
    /// between runs).
    Sm90Fused,
    /// `attn_backward_sm90.cu`'s two passes (dK / dV, then dQ; each block owns what it
    /// writes): [`BackwardKernel::Sm90Fused`]'s calls under the `deterministic` knob.
    Sm90,
    /// `attn_backward_mma.cu` (`mma.sync`): f16 / bf16, `(D, D_v)` in its table.
    Mma,
    /// `attn_backward.cu` (SIMT, any shape and strides): everything else.
    Simt,
}

/// The backward kernels a call with facts `p` gets on a device of architecture `arch`
/// (NVRTC's name, `sm_90`), for a non-empty problem and a dtype the CUDA kernels take.
pub(crate) fn select_backward(p: &Problem, arch: &str, knobs: Knobs) -> BackwardKernel {
    let grid_fits = p.t_q <= i32::MAX as usize
        && p.t_kv <= i32::MAX as usize
        && p.n_q <= 65535
        && p.n_kv <= 65535
        && p.batch <= 65535;
    if arch == "sm_90"
        && p.half_precision()
        && !knobs.backward_simt_only
        && !knobs.backward_mma_only
        && super::backward::sm90_takes(p.d, p.d_v)
        && grid_fits
    {
        return if knobs.deterministic {
            BackwardKernel::Sm90
        } else {
            BackwardKernel::Sm90Fused
        };
    }
    if p.half_precision()
        && !knobs.backward_simt_only
        && super::backward::mma_tiles(p.d, p.d_v).is_some()
        && grid_fits
    {
        BackwardKernel::Mma
    } else {
        BackwardKernel::Simt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BF16: DType = DType::BF16;
    const F16: DType = DType::F16;
    const F32: DType = DType::F32;

    /// A problem with `t_q` queries over 4096 keys, 32 query heads over 8 kv heads.
    fn p(dtype: DType, t_q: usize, d: usize, d_v: usize) -> Problem {
        Problem {
            dtype,
            batch: 2,
            n_q: 32,
            n_kv: 8,
            t_q,
            t_kv: 4096,
            d,
            d_v,
            array_mask: false,
            sinks: false,
        }
    }

    const NO: Knobs = Knobs {
        prefill_mma_only: false,
        decode_simt_only: false,
        backward_simt_only: false,
        backward_mma_only: false,
        deterministic: false,
    };
    use Kernel::*;

    /// The `(D, D_v)` pairs of the tensor-core decode, prefill and backward tables.
    const TABLE_HEAD_DIMS: [(usize, usize); 6] = [
        (64, 64),
        (80, 80),
        (96, 96),
        (128, 128),
        (192, 128),
        (256, 256),
    ];

    #[test]
    fn decode_rows() {
        // Tensor-core decode: f16 / bf16, T_q <= 8, (D, D_v) in its table.
        for (d, dv) in TABLE_HEAD_DIMS {
            for dt in [F16, BF16] {
                for tq in [1, 8] {
                    assert_eq!(select(&p(dt, tq, d, dv), "sm_90", NO), DecodeMma);
                    assert_eq!(select(&p(dt, tq, d, dv), "sm_80", NO), DecodeMma);
                }
            }
            // f32 decode is SIMT.
            assert_eq!(select(&p(F32, 1, d, dv), "sm_90", NO), DecodeSimt);
        }
        // SIMT decode: other multiples of 8 up to 256, and the knob.
        assert_eq!(select(&p(BF16, 1, 72, 72), "sm_90", NO), DecodeSimt);
        assert_eq!(select(&p(F32, 4, 8, 256), "sm_90", NO), DecodeSimt);
        let simt = Knobs {
            decode_simt_only: true,
            ..NO
        };
        assert_eq!(select(&p(BF16, 1, 128, 128), "sm_90", simt), DecodeSimt);
        // Not multiples of 8, or wider than 256: not decode.
        assert_eq!(select(&p(F32, 1, 65, 65), "sm_90", NO), General);
        assert_eq!(select(&p(F32, 1, 264, 264), "sm_90", NO), General);
        assert_eq!(select(&p(BF16, 1, 100, 100), "sm_80", NO), General);
        // Past 8 queries: prefill.
        assert_eq!(select(&p(BF16, 9, 128, 128), "sm_80", NO), PrefillMma);
    }

    #[test]
    fn hopper_prefill_rows() {
        for d in [64, 128] {
            for dt in [F16, BF16] {
                assert_eq!(select(&p(dt, 4096, d, d), "sm_90", NO), PrefillSm90);
                // Other architectures, and the knob: mma.sync.
                assert_eq!(select(&p(dt, 4096, d, d), "sm_80", NO), PrefillMma);
                assert_eq!(select(&p(dt, 4096, d, d), "sm_90a", NO), PrefillMma);
                let mma = Knobs {
                    prefill_mma_only: true,
                    ..NO
                };
                assert_eq!(select(&p(dt, 4096, d, d), "sm_90", mma), PrefillMma);
            }
        }
        // Array masks, sinks and other head dims take mma.sync on Hopper.
        let masked = Problem {
            array_mask: true,
            ..p(BF16, 4096, 128, 128)
        };
        assert_eq!(select(&masked, "sm_90", NO), PrefillMma);
        let sinks = Problem {
            sinks: true,
            ..p(BF16, 4096, 128, 128)
        };
        assert_eq!(select(&sinks, "sm_90", NO), PrefillMma);
        for (d, dv) in [(80, 80), (96, 96), (192, 128), (256, 256)] {
            assert_eq!(select(&p(BF16, 4096, d, dv), "sm_90", NO), PrefillMma);
        }
        // No keys: mma.sync (which writes the zeros).
        let empty = Problem {
            t_kv: 0,
            ..p(BF16, 4096, 128, 128)
        };
        assert_eq!(select(&empty, "sm_90", NO), PrefillMma);
    }

    #[test]
    fn mma_prefill_and_general_rows() {
        // f32 prefill and head dims without a tensor-core table: general.
        assert_eq!(select(&p(F32, 4096, 128, 128), "sm_90", NO), General);
        assert_eq!(select(&p(BF16, 4096, 72, 72), "sm_90", NO), General);
        assert_eq!(select(&p(BF16, 4096, 128, 64), "sm_90", NO), General);
        // Grids past the launch limits: general.
        for big in [
            Problem {
                n_q: 65536,
                n_kv: 65536,
                ..p(BF16, 4096, 128, 128)
            },
            Problem {
                batch: 65536,
                ..p(BF16, 4096, 128, 128)
            },
            Problem {
                t_kv: 1 << 31,
                ..p(BF16, 4096, 128, 128)
            },
        ] {
            assert_eq!(select(&big, "sm_90", NO), General, "{big:?}");
            assert_eq!(select(&big, "sm_80", NO), General, "{big:?}");
        }
    }

    #[test]
    fn backward_rows() {
        // Tensor cores (mma.sync) off Hopper: f16 / bf16 with (D, D_v) in the backward table,
        // any T_q, masks and sinks included.
        for (d, dv) in TABLE_HEAD_DIMS {
            for dt in [F16, BF16] {
                for tq in [1, 4096] {
                    let mut prob = p(dt, tq, d, dv);
                    assert_eq!(select_backward(&prob, "sm_80", NO), BackwardKernel::Mma);
                    prob.array_mask = true;
                    prob.sinks = true;
                    assert_eq!(select_backward(&prob, "sm_80", NO), BackwardKernel::Mma);
                }
            }
            // f32 and the knob: SIMT.
            for arch in ["sm_80", "sm_90"] {
                assert_eq!(
                    select_backward(&p(F32, 4096, d, dv), arch, NO),
                    BackwardKernel::Simt
                );
                let simt = Knobs {
                    backward_simt_only: true,
                    ..NO
                };
                assert_eq!(
                    select_backward(&p(BF16, 4096, d, dv), arch, simt),
                    BackwardKernel::Simt
                );
            }
        }
        // Other head dims and grids past the kernels' limits: SIMT.
        for (d, dv) in [(32, 32), (80, 48), (128, 64), (512, 512)] {
            for arch in ["sm_80", "sm_90"] {
                assert_eq!(
                    select_backward(&p(BF16, 64, d, dv), arch, NO),
                    BackwardKernel::Simt
                );
            }
        }
        let mut wide = p(BF16, 64, 128, 128);
        wide.n_q = 65536;
        assert_eq!(select_backward(&wide, "sm_90", NO), BackwardKernel::Simt);
    }

    #[test]
    fn hopper_backward_rows() {
        // Hopper: f16 / bf16, D = D_v in {64, 128}; every mask kind and sinks; the fused
        // pass unless the deterministic knob asks for the two passes. The mma knob keeps
        // both on mma.sync.
        let exact = Knobs {
            deterministic: true,
            ..NO
        };
        let mma = Knobs {
            backward_mma_only: true,
            ..NO
        };
        for d in [64, 128] {
            for dt in [F16, BF16] {
                for tq in [1, 4096] {
                    let plain = p(dt, tq, d, d);
                    let masked = Problem {
                        array_mask: true,
                        sinks: true,
                        ..plain
                    };
                    for prob in [plain, masked] {
                        let on_sm90 = |knobs| select_backward(&prob, "sm_90", knobs);
                        assert_eq!(on_sm90(NO), BackwardKernel::Sm90Fused);
                        assert_eq!(on_sm90(exact), BackwardKernel::Sm90);
                        assert_eq!(on_sm90(mma), BackwardKernel::Mma);
                    }
                    let prob = masked;
                    // sm_90a (not a device's name) and other architectures: mma.sync.
                    for knobs in [NO, exact] {
                        assert_eq!(select_backward(&prob, "sm_90a", knobs), BackwardKernel::Mma);
                        assert_eq!(select_backward(&prob, "sm_89", knobs), BackwardKernel::Mma);
                    }
                }
                assert_eq!(
                    select_backward(&p(dt, 4096, d, d), "sm_90", mma),
                    BackwardKernel::Mma
                );
            }
        }
        // Other head dims in the mma.sync table stay there on Hopper.
        for (d, dv) in [(80, 80), (96, 96), (192, 128), (256, 256)] {
            for knobs in [NO, exact] {
                assert_eq!(
                    select_backward(&p(BF16, 4096, d, dv), "sm_90", knobs),
                    BackwardKernel::Mma
                );
            }
        }
        // f32: SIMT on Hopper too.
        assert_eq!(
            select_backward(&p(F32, 4096, 128, 128), "sm_90", NO),
            BackwardKernel::Simt
        );
    }
}
