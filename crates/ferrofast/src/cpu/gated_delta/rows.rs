//! The row loops of the gated delta kernels: one state row of `Dk` floats against the
//! step's key, query and decay vectors. Each has a portable form and an AVX2 + FMA form;
//! `AVX = true` picks the latter and is only instantiated under `step_avx2` /
//! `step_vjp_avx2`, which run after `has_avx2_fma()` returned true.

/// `row *= g`, returns `row · k`.
#[inline(always)]
pub(super) fn scale_dot<const AVX: bool>(row: &mut [f32], g: &[f32], k: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        return unsafe { avx2::scale_dot(row, g, k) };
    }
    let mut sum = 0.0f32;
    for ((r, &g), &k) in row.iter_mut().zip(g).zip(k) {
        *r *= g;
        sum += *r * k;
    }
    sum
}

/// `row += d k`, returns `row · q`.
#[inline(always)]
pub(super) fn axpy_dot<const AVX: bool>(row: &mut [f32], d: f32, k: &[f32], q: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        return unsafe { avx2::axpy_dot(row, d, k, q) };
    }
    let mut sum = 0.0f32;
    for ((r, &k), &q) in row.iter_mut().zip(k).zip(q) {
        *r += d * k;
        sum += *r * q;
    }
    sum
}

/// Four rows of `dk` floats at once (`rows.len() == 4 * dk`): `row_r *= g`, returns
/// `row_r · k` for each (four independent dot products, so their additions overlap).
#[inline(always)]
pub(super) fn scale_dot4<const AVX: bool>(
    rows: &mut [f32],
    dk: usize,
    g: &[f32],
    k: &[f32],
) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        return unsafe { avx2::scale_dot4(rows, dk, g, k) };
    }
    let mut out = [0.0f32; 4];
    for (o, row) in out.iter_mut().zip(rows.chunks_exact_mut(dk.max(1))) {
        *o = scale_dot::<false>(row, g, k);
    }
    out
}

/// Four rows at once: `row_r += d[r] k`, returns `row_r · q` for each.
#[inline(always)]
pub(super) fn axpy_dot4<const AVX: bool>(
    rows: &mut [f32],
    dk: usize,
    d: [f32; 4],
    k: &[f32],
    q: &[f32],
) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        return unsafe { avx2::axpy_dot4(rows, dk, d, k, q) };
    }
    let mut out = [0.0f32; 4];
    for ((o, row), &d) in out.iter_mut().zip(rows.chunks_exact_mut(dk.max(1))).zip(&d) {
        *o = axpy_dot::<false>(row, d, k, q);
    }
    out
}

/// `row += d k`.
#[inline(always)]
pub(super) fn axpy<const AVX: bool>(row: &mut [f32], d: f32, k: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        unsafe { avx2::axpy(row, d, k) };
        return;
    }
    for (r, &k) in row.iter_mut().zip(k) {
        *r += d * k;
    }
}

/// The vectors one backward row pass reads: the states before (`sp`) and after (`sn`) the
/// step, the decay, key and query.
pub(super) struct RowIn<'a> {
    pub(super) sp: &'a [f32],
    pub(super) sn: &'a [f32],
    pub(super) g: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) q: &'a [f32],
}

/// Backward pass 1 over a row: `ds += d_o q`, `dq += d_o sn`; returns
/// `(kv, dd) = ((sp * g) · k, ds · k)` (`ds` after the update).
#[inline(always)]
pub(super) fn vjp_pass1<const AVX: bool>(
    x: &RowIn<'_>,
    d_o: f32,
    ds: &mut [f32],
    dq: &mut [f32],
) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        return unsafe { avx2::vjp_pass1(x, d_o, ds, dq) };
    }
    let (mut kv, mut dd) = (0.0f32, 0.0f32);
    for j in 0..ds.len() {
        ds[j] += d_o * x.q[j];
        dq[j] += d_o * x.sn[j];
        kv += x.sp[j] * x.g[j] * x.k[j];
        dd += ds[j] * x.k[j];
    }
    (kv, dd)
}

/// Backward pass 2 over a row, with `a = sp * g`: `dk += delta ds - dv a`,
/// `da = ds - dv k`, `dg += da sp`, `ds = da g`.
#[inline(always)]
pub(super) fn vjp_pass2<const AVX: bool>(
    x: &RowIn<'_>,
    delta: f32,
    dv: f32,
    ds: &mut [f32],
    dk: &mut [f32],
    dg: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only on paths taken after `has_avx2_fma()` (module docs).
        unsafe { avx2::vjp_pass2(x, delta, dv, ds, dk, dg) };
        return;
    }
    for j in 0..ds.len() {
        let a = x.sp[j] * x.g[j];
        dk[j] += delta * ds[j] - dv * a;
        let da = ds[j] - dv * x.k[j];
        dg[j] += da * x.sp[j];
        ds[j] = da * x.g[j];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Eight lanes at a time; every load and store goes through [`ld`] / [`st`], which
    //! take the eight elements as a bounds-checked subslice, so no access can leave its
    //! slice. Tails shorter than eight run the scalar loop.

    use super::RowIn;
    use crate::cpu::sdpa::avx2::hsum;
    use std::arch::x86_64::*;

    /// The eight floats at `s[i..i + 8]` (panics if out of range: never, the callers'
    /// loops stop at `i + 8 <= len`).
    ///
    /// # Safety
    /// The CPU must support AVX (callers run after `has_avx2_fma()`, module docs).
    #[inline]
    #[target_feature(enable = "avx")]
    fn ld(s: &[f32], i: usize) -> __m256 {
        let c = &s[i..i + 8];
        // SAFETY: `c` holds exactly eight initialised floats (the slice above is checked);
        // `loadu` has no alignment requirement. The CPU has AVX (module docs).
        unsafe { _mm256_loadu_ps(c.as_ptr()) }
    }

    /// Stores eight floats into `s[i..i + 8]`.
    ///
    /// # Safety
    /// The CPU must support AVX (callers run after `has_avx2_fma()`, module docs).
    #[inline]
    #[target_feature(enable = "avx")]
    fn st(s: &mut [f32], i: usize, v: __m256) {
        let c = &mut s[i..i + 8];
        // SAFETY: `c` is exactly eight writable floats (checked above); `storeu` has no
        // alignment requirement. The CPU has AVX (module docs).
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), v) }
    }

    /// The part of a row of `len` floats covered by whole vectors.
    #[inline(always)]
    fn n8(len: usize) -> usize {
        len / 8 * 8
    }

    /// Updates `row` element by element, `x_j = fv(x_j, a_j)` eight lanes at a time and
    /// `fs(x_j, a_j)` on the tail (the same arithmetic), and returns `row · b` after the
    /// update. `a` and `b` are at least as long as `row`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn update_dot(
        row: &mut [f32],
        a: &[f32],
        b: &[f32],
        fv: impl Fn(__m256, __m256) -> __m256,
        fs: impl Fn(f32, f32) -> f32,
    ) -> f32 {
        let n = row.len();
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut j = 0;
        while j + 8 <= n {
            let r = fv(ld(row, j), ld(a, j));
            st(row, j, r);
            acc[(j / 8) & 1] = _mm256_fmadd_ps(r, ld(b, j), acc[(j / 8) & 1]);
            j += 8;
        }
        let mut sum = hsum(_mm256_add_ps(acc[0], acc[1]));
        for j in n8(n)..n {
            row[j] = fs(row[j], a[j]);
            sum = row[j].mul_add(b[j], sum);
        }
        sum
    }

    /// [`update_dot`] on four rows of `dk` at once (`rows` holds at least `4 * dk`), with
    /// the row index `r` passed to `fv` and `fs`: returns each row's dot product with `b`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn update_dot4(
        rows: &mut [f32],
        dk: usize,
        a: &[f32],
        b: &[f32],
        fv: impl Fn(usize, __m256, __m256) -> __m256,
        fs: impl Fn(usize, f32, f32) -> f32,
    ) -> [f32; 4] {
        let (a, b) = (&a[..dk], &b[..dk]);
        let rows = &mut rows[..4 * dk];
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j + 8 <= dk {
            let (aj, bj) = (ld(a, j), ld(b, j));
            for (r, s) in acc.iter_mut().enumerate() {
                let x = fv(r, ld(rows, r * dk + j), aj);
                st(rows, r * dk + j, x);
                *s = _mm256_fmadd_ps(x, bj, *s);
            }
            j += 8;
        }
        let mut out = [0.0f32; 4];
        for (r, (o, s)) in out.iter_mut().zip(acc).enumerate() {
            let row = &mut rows[r * dk..][..dk];
            let mut sum = hsum(s);
            for j in n8(dk)..dk {
                row[j] = fs(r, row[j], a[j]);
                sum = row[j].mul_add(b[j], sum);
            }
            *o = sum;
        }
        out
    }

    /// [`super::scale_dot`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. `g` and `k` are at least as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_dot(row: &mut [f32], g: &[f32], k: &[f32]) -> f32 {
        update_dot(row, g, k, |x, g| _mm256_mul_ps(x, g), |x, g| x * g)
    }

    /// [`super::axpy_dot`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. `k` and `q` are at least as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_dot(row: &mut [f32], d: f32, k: &[f32], q: &[f32]) -> f32 {
        let dv = _mm256_set1_ps(d);
        let fv = |x, k| _mm256_fmadd_ps(dv, k, x);
        update_dot(row, k, q, fv, |x, k| d.mul_add(k, x))
    }

    /// [`super::scale_dot4`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. `rows` holds four rows of `dk`; `g` and `k` are at
    /// least `dk` long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_dot4(rows: &mut [f32], dk: usize, g: &[f32], k: &[f32]) -> [f32; 4] {
        let fv = |_: usize, x, g| _mm256_mul_ps(x, g);
        update_dot4(rows, dk, g, k, fv, |_, x, g| x * g)
    }

    /// [`super::axpy_dot4`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. `rows` holds four rows of `dk`; `k` and `q` are at
    /// least `dk` long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_dot4(
        rows: &mut [f32],
        dk: usize,
        d: [f32; 4],
        k: &[f32],
        q: &[f32],
    ) -> [f32; 4] {
        let dv = d.map(|x| _mm256_set1_ps(x));
        let fv = |r: usize, x, k| _mm256_fmadd_ps(dv[r], k, x);
        update_dot4(rows, dk, k, q, fv, |r, x, k| d[r].mul_add(k, x))
    }

    /// [`super::axpy`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. `k` is at least as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(row: &mut [f32], d: f32, k: &[f32]) {
        let n = row.len();
        let k = &k[..n];
        let dv = _mm256_set1_ps(d);
        let mut j = 0;
        while j + 8 <= n {
            st(row, j, _mm256_fmadd_ps(dv, ld(k, j), ld(row, j)));
            j += 8;
        }
        for j in n8(n)..n {
            row[j] = d.mul_add(k[j], row[j]);
        }
    }

    /// [`super::vjp_pass1`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. Every slice of `x` and `dq` is at least as long as
    /// `ds`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn vjp_pass1(
        x: &RowIn<'_>,
        d_o: f32,
        ds: &mut [f32],
        dq: &mut [f32],
    ) -> (f32, f32) {
        let n = ds.len();
        let (sp, sn, g, k, q, dq) = (
            &x.sp[..n],
            &x.sn[..n],
            &x.g[..n],
            &x.k[..n],
            &x.q[..n],
            &mut dq[..n],
        );
        let dov = _mm256_set1_ps(d_o);
        let (mut kv, mut dd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = 0;
        while j + 8 <= n {
            let kj = ld(k, j);
            let d = _mm256_fmadd_ps(dov, ld(q, j), ld(ds, j));
            st(ds, j, d);
            st(dq, j, _mm256_fmadd_ps(dov, ld(sn, j), ld(dq, j)));
            kv = _mm256_fmadd_ps(_mm256_mul_ps(ld(sp, j), ld(g, j)), kj, kv);
            dd = _mm256_fmadd_ps(d, kj, dd);
            j += 8;
        }
        let (mut kvs, mut dds) = (hsum(kv), hsum(dd));
        for j in n8(n)..n {
            ds[j] = d_o.mul_add(q[j], ds[j]);
            dq[j] = d_o.mul_add(sn[j], dq[j]);
            kvs = (sp[j] * g[j]).mul_add(k[j], kvs);
            dds = ds[j].mul_add(k[j], dds);
        }
        (kvs, dds)
    }

    /// [`super::vjp_pass2`] on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. Every slice of `x`, `dk` and `dg` is at least as
    /// long as `ds`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn vjp_pass2(
        x: &RowIn<'_>,
        delta: f32,
        dv: f32,
        ds: &mut [f32],
        dk: &mut [f32],
        dg: &mut [f32],
    ) {
        let n = ds.len();
        let (sp, g, k, dk, dg) = (&x.sp[..n], &x.g[..n], &x.k[..n], &mut dk[..n], &mut dg[..n]);
        let (deltav, ndv) = (_mm256_set1_ps(delta), _mm256_set1_ps(-dv));
        let mut j = 0;
        while j + 8 <= n {
            let (spj, gj, dsj) = (ld(sp, j), ld(g, j), ld(ds, j));
            let a = _mm256_mul_ps(spj, gj);
            let dkj = _mm256_fmadd_ps(deltav, dsj, _mm256_fmadd_ps(ndv, a, ld(dk, j)));
            st(dk, j, dkj);
            let da = _mm256_fmadd_ps(ndv, ld(k, j), dsj);
            st(dg, j, _mm256_fmadd_ps(da, spj, ld(dg, j)));
            st(ds, j, _mm256_mul_ps(da, gj));
            j += 8;
        }
        for j in n8(n)..n {
            let a = sp[j] * g[j];
            dk[j] = delta.mul_add(ds[j], (-dv).mul_add(a, dk[j]));
            let da = (-dv).mul_add(k[j], ds[j]);
            dg[j] = da.mul_add(sp[j], dg[j]);
            ds[j] = da * g[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::has_avx2_fma;

    /// Seeded values in [-1, 1).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Runs `f` on the portable form and, where the CPU has AVX2 + FMA, on the vector
    /// form, over copies of the same inputs, and compares what each wrote and returned.
    fn both(n: usize, f: impl Fn(bool, &mut [Vec<f32>]) -> Vec<f32>) {
        let init: Vec<Vec<f32>> = (0..4).map(|i| vals(n, 100 + i)).collect();
        let mut p = init.clone();
        let rp = f(false, &mut p);
        if !has_avx2_fma() {
            return;
        }
        let mut v = init;
        let rv = f(true, &mut v);
        close(&rv, &rp, "returned");
        for (a, b) in v.iter().zip(&p) {
            close(a, b, "written");
        }
    }

    #[test]
    fn vector_and_portable_forms_agree() {
        for n in [0, 1, 7, 8, 9, 16, 23, 128, 131] {
            let (g, k, q, sn) = (vals(n, 1), vals(n, 2), vals(n, 3), vals(n, 4));
            both(n, |avx, w| {
                let r = if avx {
                    scale_dot::<true>(&mut w[0], &g, &k)
                } else {
                    scale_dot::<false>(&mut w[0], &g, &k)
                };
                vec![r]
            });
            both(n, |avx, w| {
                let r = if avx {
                    axpy_dot::<true>(&mut w[0], 0.7, &k, &q)
                } else {
                    axpy_dot::<false>(&mut w[0], 0.7, &k, &q)
                };
                if avx {
                    axpy::<true>(&mut w[1], -0.3, &k);
                } else {
                    axpy::<false>(&mut w[1], -0.3, &k);
                }
                vec![r]
            });
            both(4 * n, |avx, w| {
                let r = if avx {
                    scale_dot4::<true>(&mut w[0], n, &g, &k)
                } else {
                    scale_dot4::<false>(&mut w[0], n, &g, &k)
                };
                let d = [0.5, -0.25, 1.5, 0.1];
                let s = if avx {
                    axpy_dot4::<true>(&mut w[1], n, d, &k, &q)
                } else {
                    axpy_dot4::<false>(&mut w[1], n, d, &k, &q)
                };
                r.into_iter().chain(s).collect()
            });
            both(n, |avx, w| {
                let (ds, rest) = w.split_at_mut(1);
                let (dq, rest) = rest.split_at_mut(1);
                let (dk, dg) = rest.split_at_mut(1);
                let x = RowIn {
                    sp: &q,
                    sn: &sn,
                    g: &g,
                    k: &k,
                    q: &q,
                };
                let (kv, dd) = if avx {
                    vjp_pass1::<true>(&x, 0.4, &mut ds[0], &mut dq[0])
                } else {
                    vjp_pass1::<false>(&x, 0.4, &mut ds[0], &mut dq[0])
                };
                if avx {
                    vjp_pass2::<true>(&x, 0.2, -0.6, &mut ds[0], &mut dk[0], &mut dg[0]);
                } else {
                    vjp_pass2::<false>(&x, 0.2, -0.6, &mut ds[0], &mut dk[0], &mut dg[0]);
                }
                vec![kv, dd]
            });
        }
    }
}
