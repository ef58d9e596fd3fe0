//! Hand-vectorised AVX2 + FMA (+ F16C) rows of the norm backward for bf16, f16 and f32, the
//! forward kernel's element formats ([`Format`]): each row is read from memory once, widened
//! in registers (no scratch row), and taken in two passes from L1 / L2: the statistics (RMS
//! norm's two sums; layer norm's four shifted moments, plus a pass about the mean when they
//! cannot be trusted), then dx with this row's share of dw / db. The next rows' inputs (and
//! output, unless it is streamed past the caches) are prefetched during the output pass.
//!
//! The formulas are [`Job::rows`]'s; the sums are taken in another order (vector lanes)
//! and products with a sum are fused (FMA), so results differ from the portable loop's in
//! the last bits, as any two summation orders do; a call gives the same bits on every run.
//! Each element of `x` and the cotangent arrives in the format's step order
//! ([`Format::split`]: bf16 as even and odd elements); the weight table and the task's `dw`
//! / `db` sums are kept in that order ([`Format::step_layout`]) and put back in natural
//! order once per task.

use super::{Job, Partials};
use crate::array::host_pool;
use crate::cpu::norm::avx2::Format;
use crate::error::Result;
use std::arch::x86_64::*;

/// Elements per vector step (one [`Format::split`]: two vectors of 8 f32).
const STEP: usize = 16;

/// Whether this CPU runs the kernel: AVX2, FMA and F16C.
fn supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `dx` of the rows of `x` / `g` (row-major, `job.d` per row) written into `out`, and the
/// task's `dw` / `db` sums in natural order (empty when not wanted), as [`Job::rows`]
/// defines them; `None` when this CPU lacks AVX2, FMA or F16C.
///
/// # Errors
/// `Error::OutOfMemory` when the task's weight table or sums cannot be allocated.
pub(super) fn rows<H: Format>(
    job: &Job<'_, f32>,
    x: &[H],
    g: &[H],
    out: &mut [H],
) -> Option<Result<Partials<f32>>> {
    if !supported() {
        return None;
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
    Some(unsafe { rows_avx2(job, x, g, out) })
}

/// [`rows`] once the CPU is known to run it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<H: Format>(
    job: &Job<'_, f32>,
    x: &[H],
    g: &[H],
    out: &mut [H],
) -> Result<Partials<f32>> {
    let d = job.d;
    // SAFETY: the CPU supports what `step_layout` needs (this function's contract).
    let w = unsafe { H::step_layout(&job.w[..d]) };
    let mut dw = host_pool::filled(if job.want_dw { d } else { 0 }, 0.0f32)?;
    let mut db = host_pool::filled(if job.want_db { d } else { 0 }, 0.0f32)?;
    let rows = Rows {
        d,
        eps: job.eps,
        inv_d: job.inv_d,
        w: &w,
        high: std::hint::black_box([0xFFFF_0000u32; 8]),
    };
    // Non-temporal stores of dx where the call's output outgrows the caches and every
    // row's vector steps start 32-byte aligned.
    let row_bytes = d * std::mem::size_of::<H>();
    let nt = job.stream_out
        && (out.as_ptr() as usize).is_multiple_of(32)
        && row_bytes.is_multiple_of(32);
    macro_rules! run {
        ($l:literal, $w:literal, $b:literal) => {
            if nt {
                rows.run::<H, $l, $w, $b, true>(x, g, out, &mut dw, &mut db)
            } else {
                rows.run::<H, $l, $w, $b, false>(x, g, out, &mut dw, &mut db)
            }
        };
    }
    // SAFETY: in every arm the CPU supports AVX2, FMA and F16C (this function's contract);
    // `w` holds d values, `dw` / `db` d values where wanted; with NT, `out` and its row
    // length are 32-byte aligned (checked above).
    unsafe {
        match (job.layer, job.want_dw, job.want_db) {
            (false, false, _) => run!(false, false, false),
            (false, true, _) => run!(false, true, false),
            (true, false, false) => run!(true, false, false),
            (true, true, false) => run!(true, true, false),
            (true, false, true) => run!(true, false, true),
            (true, true, true) => run!(true, true, true),
        }
        if nt {
            // The streamed stores complete before the task returns to the pool.
            _mm_sfence();
        }
    }
    Ok((natural_order::<H>(dw)?, natural_order::<H>(db)?))
}

/// `v` (a row in [`Format::step_layout`]'s order) back in natural order. The permutation is
/// read off the layout of one step of indices, so it holds for every format.
fn natural_order<H: Format>(v: Vec<f32>) -> Result<Vec<f32>> {
    let index: [f32; STEP] = std::array::from_fn(|i| i as f32);
    // SAFETY: `step_layout` needs AVX2, FMA and F16C, which every caller of this function
    // has checked (it runs after `rows_avx2`).
    let laid = unsafe { H::step_layout(&index) };
    // perm[p] = the element of a step that step order puts at position p.
    let perm: [usize; STEP] = std::array::from_fn(|p| laid[p] as usize);
    if perm.iter().enumerate().all(|(p, &i)| p == i) {
        return Ok(v);
    }
    let mut out = host_pool::filled(v.len(), 0.0f32)?;
    let mut src = v.chunks_exact(STEP);
    let mut dst = out.chunks_exact_mut(STEP);
    for (s, o) in (&mut src).zip(&mut dst) {
        for (p, &i) in perm.iter().enumerate() {
            o[i] = s[p];
        }
    }
    dst.into_remainder().copy_from_slice(src.remainder());
    Ok(out)
}

/// What every row of a task shares.
struct Rows<'a> {
    d: usize,
    eps: f32,
    inv_d: f32,
    /// The weight (or ones) in step order, `d` values.
    w: &'a [f32],
    /// `0xFFFF0000` in every lane, hidden from the optimiser (see `cpu/norm/avx2.rs`).
    high: [u32; 8],
}

/// The sum of the 8 lanes of `v`.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_movehdup_ps(q));
    _mm_cvtss_f32(q)
}

impl Rows<'_> {
    /// Sums over a row of `d = x - shift` and `gw = g * w`: `[d^2, gw * d, d, gw]` (the last
    /// two only with `FOUR`, else 0): the vector steps, then the scalar tail.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xr` and `gr` hold `self.d` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn moments<H: Format, const FOUR: bool>(
        &self,
        xr: &[H],
        gr: &[H],
        shift: f32,
    ) -> [f32; 4] {
        let d = self.d;
        let full = d / STEP * STEP;
        // SAFETY: the mask is 8 u32s, the 32 bytes loaded.
        let high = unsafe { _mm256_loadu_si256(self.high.as_ptr().cast()) };
        let (xp, gp, wp) = (xr.as_ptr(), gr.as_ptr(), self.w.as_ptr());
        let sv = _mm256_set1_ps(shift);
        // Accumulator k of the result element k / 2 (two halves of a step each).
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..full).step_by(STEP) {
            // SAFETY: i + 16 <= full <= d: one step of x, g and w lies inside their rows.
            let (xa, xb, ga, gb, wa, wb) = unsafe {
                let (xa, xb) = H::split(xp.add(i), high);
                let (ga, gb) = H::split(gp.add(i), high);
                (
                    xa,
                    xb,
                    ga,
                    gb,
                    _mm256_loadu_ps(wp.add(i)),
                    _mm256_loadu_ps(wp.add(i + 8)),
                )
            };
            let (gwa, gwb) = (_mm256_mul_ps(ga, wa), _mm256_mul_ps(gb, wb));
            let (da, db) = (_mm256_sub_ps(xa, sv), _mm256_sub_ps(xb, sv));
            acc[0] = _mm256_fmadd_ps(da, da, acc[0]);
            acc[1] = _mm256_fmadd_ps(db, db, acc[1]);
            acc[2] = _mm256_fmadd_ps(gwa, da, acc[2]);
            acc[3] = _mm256_fmadd_ps(gwb, db, acc[3]);
            if FOUR {
                acc[4] = _mm256_add_ps(acc[4], da);
                acc[5] = _mm256_add_ps(acc[5], db);
                acc[6] = _mm256_add_ps(acc[6], gwa);
                acc[7] = _mm256_add_ps(acc[7], gwb);
            }
        }
        let mut out = [0.0f32; 4];
        for i in full..d {
            let (dv, gw) = (xr[i].to_f32() - shift, gr[i].to_f32() * self.w[i]);
            out[0] += dv * dv;
            out[1] += gw * dv;
            if FOUR {
                out[2] += dv;
                out[3] += gw;
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            // SAFETY: the CPU supports AVX2 (this function's contract).
            *o += unsafe { hsum(_mm256_add_ps(acc[2 * k], acc[2 * k + 1])) };
        }
        out
    }

    /// The row statistics `(shift, m1, mean_gw, n, c)`: the row is centred as
    /// `(x - shift) - m1`, `n = rsqrt(var + eps)` and `c = mean(g * w * xc) * n^3`. RMS
    /// norm: shift and m1 are 0, one pass. Layer norm: one pass of shifted moments about
    /// the row's first element (`m1 = mean - shift`, `var = E[d^2] - m1^2`, the centred sum
    /// `E[gw * d] - m1 * E[gw]`), trusted while `m1^2 <= 16 var` (the cancellation then
    /// costs a few ulps of var); otherwise a second pass about the estimated mean gives
    /// both centred sums directly (the forward's two-pass form).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xr` and `gr` hold `self.d` elements, at
    /// least one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stats<H: Format, const LAYER: bool>(
        &self,
        xr: &[H],
        gr: &[H],
    ) -> (f32, f32, f32, f32, f32) {
        let inv_d = self.inv_d;
        let finish = |var: f32, sgc: f32| {
            let n = 1.0 / (var + self.eps).sqrt();
            (n, sgc * n * n * n)
        };
        if !LAYER {
            // SAFETY: as this function's.
            let [sxx, sgx, ..] = unsafe { self.moments::<H, false>(xr, gr, 0.0) };
            let (n, c) = finish(sxx * inv_d, sgx * inv_d);
            return (0.0, 0.0, 0.0, n, c);
        }
        let shift = xr[0].to_f32();
        // SAFETY: as this function's.
        let [sdd, sgd, sd, sgw] = unsafe { self.moments::<H, true>(xr, gr, shift) };
        let (m1, mean_gw) = (sd * inv_d, sgw * inv_d);
        let var = sdd * inv_d - m1 * m1;
        if m1 * m1 <= 16.0 * var {
            let (n, c) = finish(var, sgd * inv_d - m1 * mean_gw);
            return (shift, m1, mean_gw, n, c);
        }
        // Not trusted (the first element is an outlier of its row, the row is constant, or a
        // value is not finite): centre on the estimated mean and sum again.
        let mean = shift + m1;
        // SAFETY: as this function's.
        let [scc, sgc, ..] = unsafe { self.moments::<H, false>(xr, gr, mean) };
        let (n, c) = finish(scc * inv_d, sgc * inv_d);
        (mean, 0.0, mean_gw, n, c)
    }

    /// Every row: the statistics, then dx and the row's share of dw (`DW`) and db (`DB`,
    /// layer norm only), added into `dw` / `db` (step order); dx by non-temporal stores
    /// with `NT` (the caller fences).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `x`, `g` and `out` hold whole rows of
    /// `self.d`, `self.w` holds `self.d` values and so do `dw` (if `DW`) and `db` (if `DB`);
    /// with `NT`, `out` and `self.d` elements are multiples of 32 bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<H: Format, const LAYER: bool, const DW: bool, const DB: bool, const NT: bool>(
        &self,
        x: &[H],
        g: &[H],
        out: &mut [H],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let d = self.d;
        let full = d / STEP * STEP;
        let out_start = out.as_ptr();
        // SAFETY: the mask is 8 u32s, the 32 bytes loaded.
        let high = unsafe { _mm256_loadu_si256(self.high.as_ptr().cast()) };
        let wp = self.w.as_ptr();
        for (r, ((xr, gr), o)) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
            .enumerate()
        {
            // The next row's inputs and output, prefetched a cache line at a time in the
            // output pass (a prefetch never faults: past the last row they fetch nothing
            // of use, and the pointers are only offset, never dereferenced).
            let ahead = (r + 1) * d;
            let (xn, gn) = (
                x.as_ptr().wrapping_add(ahead),
                g.as_ptr().wrapping_add(ahead),
            );
            let on = out_start.wrapping_add(ahead);
            // SAFETY: the CPU supports AVX2, FMA and F16C (this function's contract); xr and
            // gr are rows of d >= 1 elements.
            let (shift, m1, mean_gw, n, c) = unsafe { self.stats::<H, LAYER>(xr, gr) };
            let (sv, m1v) = (_mm256_set1_ps(shift), _mm256_set1_ps(m1));
            let (nv, cv, mgw) = (
                _mm256_set1_ps(n),
                _mm256_set1_ps(c),
                _mm256_set1_ps(mean_gw),
            );
            let (xp, gp, op) = (xr.as_ptr(), gr.as_ptr(), o.as_mut_ptr());
            for i in (0..full).step_by(STEP) {
                if (i / STEP).is_multiple_of(H::STEPS_PER_LINE) {
                    _mm_prefetch::<_MM_HINT_T0>(xn.wrapping_add(i).cast());
                    _mm_prefetch::<_MM_HINT_T0>(gn.wrapping_add(i).cast());
                    if !NT {
                        _mm_prefetch::<_MM_HINT_T0>(on.wrapping_add(i).cast());
                    }
                }
                // SAFETY: i + 16 <= full <= d: one step of x, g, w, out, dw and db lies
                // inside their rows.
                unsafe {
                    let (xa, xb) = H::split(xp.add(i), high);
                    let (ga, gb) = H::split(gp.add(i), high);
                    let (wa, wb) = (_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(wp.add(i + 8)));
                    let (ca, cb) = if LAYER {
                        (
                            _mm256_sub_ps(_mm256_sub_ps(xa, sv), m1v),
                            _mm256_sub_ps(_mm256_sub_ps(xb, sv), m1v),
                        )
                    } else {
                        (xa, xb)
                    };
                    let ta = _mm256_mul_ps(_mm256_fmsub_ps(ga, wa, mgw), nv);
                    let tb = _mm256_mul_ps(_mm256_fmsub_ps(gb, wb, mgw), nv);
                    H::narrow_store::<NT>(
                        _mm256_fnmadd_ps(ca, cv, ta),
                        _mm256_fnmadd_ps(cb, cv, tb),
                        op.add(i),
                    );
                    if DW {
                        let p = dw.as_mut_ptr().add(i);
                        let (gna, gnb) = (_mm256_mul_ps(ga, nv), _mm256_mul_ps(gb, nv));
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(gna, ca, _mm256_loadu_ps(p)));
                        let p = p.add(8);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(gnb, cb, _mm256_loadu_ps(p)));
                    }
                    if DB {
                        let p = db.as_mut_ptr().add(i);
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), ga));
                        let p = p.add(8);
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), gb));
                    }
                }
            }
            for i in full..d {
                let (xv, gv) = (xr[i].to_f32(), gr[i].to_f32());
                let xc = (xv - shift) - m1;
                o[i] = H::narrow_scalar((gv * self.w[i] - mean_gw) * n - xc * c);
                if DW {
                    dw[i] += gv * xc * n;
                }
                if DB {
                    db[i] += gv;
                }
            }
        }
    }
}
