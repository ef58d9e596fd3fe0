//! The chunked form of the forward: the delta rule over [`CHUNK`] steps at a time in its
//! WY / UT-transform form, which turns a chunk's 64 rank-one updates into products of
//! `[C, Dk]` and `[C, Dv]` blocks.
//!
//! Within a chunk of `C` steps (`S` the state at its start, `Γ(t, j)` the product of the
//! decays of steps `j+1 ..= t`, `G_t = Γ(t, start)`), the deltas `Δ_t = β_t (v_t - G_t S k_t
//! - Σ_{j<t} Γ(t, j) (k_j · k_t) Δ_j)` solve a unit lower-triangular system:
//! `(I + L) Δ = diag(β) (V - diag(G) K S^T)` with `L_tj = β_t Γ(t, j) k_t · k_j` (`j < t`).
//! With `M = (I + L)^{-1}`: `Δ = U - W S^T`, `U = M diag(β) V`, `W = M diag(β G) K`. Then
//! `out_t = G_t S q_t + Σ_{j<=t} Γ(t, j) (q_t · k_j) Δ_j` and the state after the chunk is
//! `Γ(end, start) S + Σ_j Γ(end, j) Δ_j k_j^T`.
//!
//! `U`, `W` and the `Γ`-weighted `q · k` products depend only on the chunk's inputs; what
//! follows depends on one state row at a time (`Δ`'s column `i` and the new row `i` need
//! only row `i` of `S`), so the rows of a head are walked one by one with the chunk's
//! blocks in cache.
//!
//! Decay products are exact for zero and negative decays: `Γ` is carried as the prefix sum of
//! `ln |γ|` over the non-zero decays, the index of the last zero and the sign, so a zero
//! decay resets what follows it exactly instead of through `ln 0`. A masked-out step is a
//! step with decay 1, `β` 0 and zero vectors (its inputs are not read) whose output is 0.
//! Only a scalar decay per step takes this form (a decay per key dimension makes `Γ` a
//! per-dimension factor inside `k_t · k_j`); the launcher keeps those on the sequential path.

use super::Head;
use crate::array::host_pool;
use crate::error::Result;

/// Steps per chunk.
pub(crate) const CHUNK: usize = 64;

/// Decay products within one chunk of `n <= CHUNK` steps.
struct Decay {
    /// `ln |γ|` summed over the non-zero decays of steps `0..=t`.
    log: [f32; CHUNK],
    /// The last step `<= t` whose decay is exactly zero, or -1.
    zero: [i32; CHUNK],
    /// Whether the decays of steps `0..=t` hold an odd number of negative values.
    neg: [bool; CHUNK],
}

impl Decay {
    fn new(g: &[f32]) -> Decay {
        let mut d = Decay {
            log: [0.0; CHUNK],
            zero: [-1; CHUNK],
            neg: [false; CHUNK],
        };
        let (mut log, mut zero, mut neg) = (0.0f32, -1i32, false);
        for (t, &x) in g.iter().enumerate().take(CHUNK) {
            if x == 0.0 {
                zero = t as i32;
            } else {
                log += x.abs().ln();
                neg ^= x < 0.0;
            }
            d.log[t] = log;
            d.zero[t] = zero;
            d.neg[t] = neg;
        }
        d
    }

    /// The product of the decays of steps `j + 1 ..= t` (`j = -1`: from the chunk's start),
    /// for `j <= t`.
    fn between(&self, t: usize, j: i32) -> f32 {
        if self.zero[t] > j {
            return 0.0;
        }
        let (lj, nj) = if j < 0 {
            (0.0, false)
        } else {
            (self.log[j as usize], self.neg[j as usize])
        };
        let m = (self.log[t] - lj).exp();
        if self.neg[t] != nj {
            -m
        } else {
            m
        }
    }
}

/// A head's per-chunk blocks (reused from chunk to chunk).
struct Blocks {
    k: Vec<f32>,
    q: Vec<f32>,
    v: Vec<f32>,
    /// `W` `[C, Dk]`.
    w: Vec<f32>,
    /// `U` `[C, Dv]`.
    u: Vec<f32>,
    /// `L`, then `M`, `[C, C]`.
    l: Vec<f32>,
    m: Vec<f32>,
    /// `Γ(t, j) q_t · k_j` for `j <= t`, `[C, C]`.
    aqk: Vec<f32>,
    /// `G_t`, `Γ(end, t)`, β, the decays, taken flags.
    g_start: [f32; CHUNK],
    g_end: [f32; CHUNK],
    beta: [f32; CHUNK],
    gam: [f32; CHUNK],
    taken: [bool; CHUNK],
    /// `Γ(end, start)`.
    g_all: f32,
    /// Per row: `W_t · S_i`, `q_t · S_i` and `Δ_t`'s entry `i`.
    ws: [f32; CHUNK],
    qs: [f32; CHUNK],
    delta: [f32; CHUNK],
}

#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `a · b` with eight independent partial sums (vectorises).
#[inline(always)]
fn dot<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, ar) = a.split_at(a.len() / 8 * 8);
    let (b8, br) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = fma::<F>(x[l], y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s = fma::<F>(*x, *y, s);
    }
    s
}

/// `y += a x`.
#[inline(always)]
fn axpy<const F: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = fma::<F>(a, x, *y);
    }
}

impl Blocks {
    fn new(dk: usize, dv: usize) -> Result<Blocks> {
        let z = |n: usize| host_pool::filled(n, 0.0f32);
        Ok(Blocks {
            k: z(CHUNK * dk)?,
            q: z(CHUNK * dk)?,
            v: z(CHUNK * dv)?,
            w: z(CHUNK * dk)?,
            u: z(CHUNK * dv)?,
            l: z(CHUNK * CHUNK)?,
            m: z(CHUNK * CHUNK)?,
            aqk: z(CHUNK * CHUNK)?,
            g_start: [0.0; CHUNK],
            g_end: [0.0; CHUNK],
            beta: [0.0; CHUNK],
            gam: [0.0; CHUNK],
            taken: [false; CHUNK],
            g_all: 1.0,
            ws: [0.0; CHUNK],
            qs: [0.0; CHUNK],
            delta: [0.0; CHUNK],
        })
    }

    /// Loads steps `c0 .. c0 + n` of `head` and forms the chunk's `U`, `W`, `Γ q·k` and
    /// decay factors.
    fn prepare<const F: bool>(&mut self, head: &Head<'_>, c0: usize, n: usize) {
        let (dk, dv) = (head.a.dk, head.a.dv);
        for j in 0..n {
            let t = c0 + j;
            let taken = head.taken(t);
            self.taken[j] = taken;
            let (k, q, v) = (
                &mut self.k[j * dk..][..dk],
                &mut self.q[j * dk..][..dk],
                &mut self.v[j * dv..][..dv],
            );
            if taken {
                k.copy_from_slice(head.k(t));
                q.copy_from_slice(head.q(t));
                v.copy_from_slice(head.v(t));
                self.gam[j] = head.x.gamma[head.bth(t)];
                self.beta[j] = head.beta(t);
            } else {
                k.fill(0.0);
                q.fill(0.0);
                v.fill(0.0);
                self.gam[j] = 1.0;
                self.beta[j] = 0.0;
            }
        }
        let dec = Decay::new(&self.gam[..n]);
        for t in 0..n {
            self.g_start[t] = dec.between(t, -1);
            self.g_end[t] = dec.between(n - 1, t as i32);
        }
        self.g_all = dec.between(n - 1, -1);
        // L (strictly lower) and Γ q·k (lower with the diagonal).
        for t in 0..n {
            let kt = &self.k[t * dk..][..dk];
            let qt = &self.q[t * dk..][..dk];
            for j in 0..=t {
                let kj = &self.k[j * dk..][..dk];
                let gtj = dec.between(t, j as i32);
                self.aqk[t * CHUNK + j] = gtj * dot::<F>(qt, kj);
                if j < t {
                    self.l[t * CHUNK + j] = self.beta[t] * gtj * dot::<F>(kt, kj);
                }
            }
        }
        // M = (I + L)^{-1} by forward substitution, a row at a time: row t is
        // e_t - Σ_{j<t} L_tj M_j (row j of M is zero past column j).
        for t in 0..n {
            let (done, rest) = self.m.split_at_mut(t * CHUNK);
            let row = &mut rest[..CHUNK];
            row[..n].fill(0.0);
            row[t] = 1.0;
            for j in 0..t {
                let l = self.l[t * CHUNK + j];
                axpy::<F>(&mut row[..=j], -l, &done[j * CHUNK..][..=j]);
            }
        }
        // W = M diag(β G) K, U = M diag(β) V.
        self.w[..n * dk].fill(0.0);
        self.u[..n * dv].fill(0.0);
        for t in 0..n {
            for j in 0..=t {
                let m = self.m[t * CHUNK + j] * self.beta[j];
                axpy::<F>(
                    &mut self.w[t * dk..][..dk],
                    m * self.g_start[j],
                    &self.k[j * dk..][..dk],
                );
                axpy::<F>(&mut self.u[t * dv..][..dv], m, &self.v[j * dv..][..dv]);
            }
        }
    }

    /// The chunk for state row `i` (`s`, updated in place); writes the row's outputs of the
    /// chunk's `n` steps to `out[j * dv]`.
    fn row<const F: bool>(
        &mut self,
        n: usize,
        dk: usize,
        dv: usize,
        i: usize,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        for t in 0..n {
            self.ws[t] = dot::<F>(&self.w[t * dk..][..dk], s);
            self.qs[t] = dot::<F>(&self.q[t * dk..][..dk], s);
            self.delta[t] = self.u[t * dv + i] - self.ws[t];
        }
        for t in 0..n {
            let mut o = self.g_start[t] * self.qs[t];
            for j in 0..=t {
                o = fma::<F>(self.aqk[t * CHUNK + j], self.delta[j], o);
            }
            out[t * dv] = if self.taken[t] { o } else { 0.0 };
        }
        for x in s.iter_mut() {
            *x *= self.g_all;
        }
        for j in 0..n {
            axpy::<F>(s, self.g_end[j] * self.delta[j], &self.k[j * dk..][..dk]);
        }
    }
}

/// The forward of one head in chunks: `s` (`[Dv, Dk]`) holds the initial state and receives
/// the final one, `out` (`[T, Dv]`) the outputs.
pub(super) fn head_forward(
    head: &Head<'_>,
    s: &mut [f32],
    out: &mut [f32],
    fma: bool,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if fma {
        // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma`, checked by the caller).
        return unsafe { head_forward_avx2(head, s, out) };
    }
    let _ = fma;
    head_forward_generic::<false>(head, s, out)
}

/// [`head_forward_generic`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_forward_avx2(head: &Head<'_>, s: &mut [f32], out: &mut [f32]) -> Result<()> {
    head_forward_generic::<true>(head, s, out)
}

#[inline(always)]
fn head_forward_generic<const F: bool>(
    head: &Head<'_>,
    s: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let (ts, dk, dv) = (head.a.t, head.a.dk, head.a.dv);
    let mut x = Blocks::new(dk, dv)?;
    for c0 in (0..ts).step_by(CHUNK) {
        let n = CHUNK.min(ts - c0);
        x.prepare::<F>(head, c0, n);
        for (i, row) in s.chunks_exact_mut(dk.max(1)).enumerate().take(dv) {
            x.row::<F>(n, dk, dv, i, row, &mut out[c0 * dv + i..]);
        }
    }
    Ok(())
}
