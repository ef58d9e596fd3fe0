//! The chunked form of the forward and of the backward: the delta rule over [`CHUNK`] steps
//! at a time in its WY / UT-transform form, which turns a chunk's 64 rank-one updates into
//! products of `[C, Dk]` and `[C, Dv]` blocks. The backward ([`head_vjp`]) keeps the state
//! at every chunk's start and walks the chunks in reverse ([`ChunkGrads`] has its algebra).
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
    /// `aqk` transposed (`[j, t]`, for the backward's `A^T dO`).
    aqk_t: Vec<f32>,
    /// `q_t · k_j` (`j <= t`) and `k_t · k_j` (`j < t`), `[C, C]` (for the backward).
    qk: Vec<f32>,
    kk: Vec<f32>,
    /// The chunk's decay products.
    dec: Decay,
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
            aqk_t: z(CHUNK * CHUNK)?,
            qk: z(CHUNK * CHUNK)?,
            kk: z(CHUNK * CHUNK)?,
            dec: Decay::new(&[]),
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
    #[inline(always)]
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
        self.dec = Decay::new(&self.gam[..n]);
        let dec = &self.dec;
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
                let qk = dot::<F>(qt, kj);
                self.qk[t * CHUNK + j] = qk;
                self.aqk[t * CHUNK + j] = gtj * qk;
                self.aqk_t[j * CHUNK + t] = gtj * qk;
                if j < t {
                    let kk = dot::<F>(kt, kj);
                    self.kk[t * CHUNK + j] = kk;
                    self.l[t * CHUNK + j] = self.beta[t] * gtj * kk;
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
    #[inline(always)]
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
            let o = self.g_start[t] * self.qs[t]
                + dot::<F>(&self.aqk[t * CHUNK..][..=t], &self.delta[..=t]);
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

fma_dispatch! {
    /// The forward of one head in chunks: `s` (`[Dv, Dk]`) holds the initial state and
    /// receives the final one, `out` (`[T, Dv]`) the outputs.
    pub(super) fn head_forward / head_forward_avx2 => head_forward_generic(
        head: &Head<'_>,
        s: &mut [f32],
        out: &mut [f32],
    ) -> Result<()>
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

/// A chunk's gradient accumulators and the backward's scratch (reused from chunk to chunk).
///
/// Over the chunk's `n` steps, with `S` the state at its start and `dS'` the gradient of the
/// state at its end (`Δ = U - W S^T`, `O = diag(G) Q S^T + A Δ` with `A_tj = Γ(t, j) q_t · k_j`,
/// `S' = Γ(end, start) S + Δ^T diag(Γ(end, ·)) K`):
/// `dΔ = A^T dO + diag(Γ(end, ·)) K dS'^T`, `dU = dΔ`, `dW = -dΔ S`, and the gradient of the
/// state at the chunk's start `Γ(end, start) dS' + dO^T diag(G) Q - dΔ^T W`. Each of these
/// needs one state row at a time, as the forward's rows do; what sums over the rows is kept
/// here and turned into the inputs' gradients once the chunk's rows are done
/// ([`ChunkGrads::finish`]).
struct ChunkGrads {
    /// The chunk's output cotangents, `[C, Dv]` (0 for masked-out steps).
    dout: Vec<f32>,
    /// `dA_tj = dO_t · Δ_j` for `j <= t`, `[C, C]`.
    da: Vec<f32>,
    /// `dW` `[C, Dk]` and `dU` `[C, Dv]`.
    dw: Vec<f32>,
    du: Vec<f32>,
    /// `S^T dO_t` and `dS'^T Δ_t`, `[C, Dk]`.
    sdo: Vec<f32>,
    dsd: Vec<f32>,
    /// `<dS', S>`.
    dg_all: f32,
    /// Per row: `Δ_t` and `dΔ_t` entry `i`, `k_t · dS'_i`, `dO_t` entry `i`.
    delta: [f32; CHUNK],
    doc: [f32; CHUNK],
    ddelta: [f32; CHUNK],
    kd: [f32; CHUNK],
    /// `dM`, then `dM M^T`, then `dL`, `[C, C]`.
    dm: Vec<f32>,
    tmp: Vec<f32>,
    /// The decay products `Γ(t, j)` for `-1 <= j <= t` at `t * (C + 1) + j + 1`, and the
    /// gradient of each (the terms of `dγ`), same layout.
    gam: Vec<f32>,
    x: Vec<f32>,
    /// The step gradients, `[C, Dk]` / `[C, Dv]` / `[C]`.
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dgamma: [f32; CHUNK],
    dbeta: [f32; CHUNK],
}

impl ChunkGrads {
    fn new(dk: usize, dv: usize) -> Result<ChunkGrads> {
        let z = |n: usize| host_pool::filled(n, 0.0f32);
        Ok(ChunkGrads {
            dout: z(CHUNK * dv)?,
            da: z(CHUNK * CHUNK)?,
            dw: z(CHUNK * dk)?,
            du: z(CHUNK * dv)?,
            sdo: z(CHUNK * dk)?,
            dsd: z(CHUNK * dk)?,
            dg_all: 0.0,
            delta: [0.0; CHUNK],
            doc: [0.0; CHUNK],
            ddelta: [0.0; CHUNK],
            kd: [0.0; CHUNK],
            dm: z(CHUNK * CHUNK)?,
            tmp: z(CHUNK * CHUNK)?,
            gam: z(CHUNK * (CHUNK + 1))?,
            x: z(CHUNK * (CHUNK + 1))?,
            dq: z(CHUNK * dk)?,
            dk: z(CHUNK * dk)?,
            dv: z(CHUNK * dv)?,
            dgamma: [0.0; CHUNK],
            dbeta: [0.0; CHUNK],
        })
    }

    /// Loads the cotangents of steps `c0 .. c0 + n` and clears the accumulators.
    fn start(&mut self, head: &Head<'_>, d_out: &[f32], c0: usize, n: usize, x: &Blocks) {
        let dv = head.a.dv;
        for j in 0..n {
            let row = &mut self.dout[j * dv..][..dv];
            if x.taken[j] {
                row.copy_from_slice(&d_out[head.bth(c0 + j) * dv..][..dv]);
            } else {
                row.fill(0.0);
            }
        }
        self.da.fill(0.0);
        self.dw.fill(0.0);
        self.du.fill(0.0);
        self.sdo.fill(0.0);
        self.dsd.fill(0.0);
        self.dg_all = 0.0;
    }

    /// The chunk's backward for state row `i`: `s` is the row at the chunk's start, `ds` the
    /// row's gradient at its end, turned into the gradient at its start.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn row<const F: bool>(
        &mut self,
        x: &Blocks,
        n: usize,
        dk: usize,
        dv: usize,
        i: usize,
        s: &[f32],
        ds: &mut [f32],
    ) {
        for t in 0..n {
            self.delta[t] = x.u[t * dv + i] - dot::<F>(&x.w[t * dk..][..dk], s);
            self.kd[t] = dot::<F>(&x.k[t * dk..][..dk], ds);
        }
        for t in 0..n {
            self.doc[t] = self.dout[t * dv + i];
        }
        for t in 0..n {
            let a = &x.aqk_t[t * CHUNK..][t..n];
            self.ddelta[t] = x.g_end[t] * self.kd[t] + dot::<F>(a, &self.doc[t..n]);
            axpy::<F>(
                &mut self.da[t * CHUNK..][..=t],
                self.doc[t],
                &self.delta[..=t],
            );
        }
        self.dg_all += dot::<F>(ds, s);
        for t in 0..n {
            let o = self.doc[t];
            axpy::<F>(&mut self.dw[t * dk..][..dk], -self.ddelta[t], s);
            axpy::<F>(&mut self.sdo[t * dk..][..dk], o, s);
            axpy::<F>(&mut self.dsd[t * dk..][..dk], self.delta[t], ds);
            self.du[t * dv + i] = self.ddelta[t];
        }
        for v in ds.iter_mut() {
            *v *= x.g_all;
        }
        for t in 0..n {
            let o = self.doc[t];
            axpy::<F>(ds, x.g_start[t] * o, &x.q[t * dk..][..dk]);
            axpy::<F>(ds, -self.ddelta[t], &x.w[t * dk..][..dk]);
        }
    }

    /// The gradients of the chunk's inputs from the accumulators, once every row is done:
    /// through `O`'s first term and the end state, `A = Γ ∘ Q K^T`, `W = M diag(β G) K`,
    /// `U = M diag(β) V`, `M = (I + L)^{-1}` (`dL = -M^T dM M^T`, strictly lower),
    /// `L = diag(β) (Γ ∘ K K^T)`, and every decay product.
    #[inline(always)]
    fn finish<const F: bool>(&mut self, x: &Blocks, n: usize, dk: usize, dv: usize) {
        const W: usize = CHUNK + 1;
        self.dq[..n * dk].fill(0.0);
        self.dk[..n * dk].fill(0.0);
        self.x[..n * W].fill(0.0);
        for t in 0..n {
            for j in -1..=(t as i32) {
                self.gam[t * W + (j + 1) as usize] = x.dec.between(t, j);
            }
        }
        // O's first term (`G_t S q_t`) and the end state's `Γ(end, j) Δ_j k_j^T`.
        for t in 0..n {
            axpy::<F>(
                &mut self.dq[t * dk..][..dk],
                x.g_start[t],
                &self.sdo[t * dk..][..dk],
            );
            self.x[t * W] += dot::<F>(&x.q[t * dk..][..dk], &self.sdo[t * dk..][..dk]);
            axpy::<F>(
                &mut self.dk[t * dk..][..dk],
                x.g_end[t],
                &self.dsd[t * dk..][..dk],
            );
            if t + 1 < n {
                self.x[(n - 1) * W + t + 1] +=
                    dot::<F>(&x.k[t * dk..][..dk], &self.dsd[t * dk..][..dk]);
            }
        }
        self.x[(n - 1) * W] += self.dg_all;
        // W and U: dM_tj = β_j (G_j dW_t · k_j + dU_t · v_j) (only j < t matters: M is unit
        // lower triangular for every L), then dBw = M^T dW and dBu = M^T dU.
        self.dm[..n * CHUNK].fill(0.0);
        for t in 0..n {
            for j in 0..t {
                let w = x.g_start[j] * dot::<F>(&self.dw[t * dk..][..dk], &x.k[j * dk..][..dk]);
                let u = dot::<F>(&self.du[t * dv..][..dv], &x.v[j * dv..][..dv]);
                self.dm[t * CHUNK + j] = x.beta[j] * (w + u);
            }
        }
        self.dv[..n * dv].fill(0.0);
        for j in 0..n {
            // dBw_j and dBu_j, accumulated straight into the gradients they feed.
            let mut kbw = 0.0f32;
            let mut vbu = 0.0f32;
            for t in j..n {
                let m = x.m[t * CHUNK + j];
                kbw = fma::<F>(
                    m,
                    dot::<F>(&self.dw[t * dk..][..dk], &x.k[j * dk..][..dk]),
                    kbw,
                );
                vbu = fma::<F>(
                    m,
                    dot::<F>(&self.du[t * dv..][..dv], &x.v[j * dv..][..dv]),
                    vbu,
                );
                axpy::<F>(
                    &mut self.dk[j * dk..][..dk],
                    m * x.beta[j] * x.g_start[j],
                    &self.dw[t * dk..][..dk],
                );
                axpy::<F>(
                    &mut self.dv[j * dv..][..dv],
                    m * x.beta[j],
                    &self.du[t * dv..][..dv],
                );
            }
            self.dbeta[j] = x.g_start[j] * kbw + vbu;
            self.x[j * W] += x.beta[j] * kbw;
        }
        // dL = -M^T dM M^T on the strict lower triangle: tmp = dM M^T, dL = -M^T tmp.
        for a in 0..n {
            for j in 0..n {
                let mut acc = 0.0f32;
                for b in 0..a.min(j + 1) {
                    acc = fma::<F>(self.dm[a * CHUNK + b], x.m[j * CHUNK + b], acc);
                }
                self.tmp[a * CHUNK + j] = acc;
            }
        }
        for t in 0..n {
            for j in 0..t {
                let mut acc = 0.0f32;
                for a in t..n {
                    acc = fma::<F>(x.m[a * CHUNK + t], self.tmp[a * CHUNK + j], acc);
                }
                self.dm[t * CHUNK + j] = -acc;
            }
        }
        // L_tj = β_t Γ(t, j) k_t · k_j and A_tj = Γ(t, j) q_t · k_j: β, the decay products
        // and the q / k products.
        for t in 0..n {
            let mut db = 0.0f32;
            for j in 0..=t {
                let g = self.gam[t * W + j + 1];
                let da = self.da[t * CHUNK + j];
                // q_t · k_j: dq_t += da Γ k_j, dk_j += da Γ q_t.
                axpy::<F>(&mut self.dq[t * dk..][..dk], da * g, &x.k[j * dk..][..dk]);
                axpy::<F>(&mut self.dk[j * dk..][..dk], da * g, &x.q[t * dk..][..dk]);
                if j < t {
                    let dl = self.dm[t * CHUNK + j];
                    let kk = x.kk[t * CHUNK + j];
                    db = fma::<F>(dl * g, kk, db);
                    let dkk = dl * x.beta[t] * g;
                    axpy::<F>(&mut self.dk[t * dk..][..dk], dkk, &x.k[j * dk..][..dk]);
                    axpy::<F>(&mut self.dk[j * dk..][..dk], dkk, &x.k[t * dk..][..dk]);
                    self.x[t * W + j + 1] += da * x.qk[t * CHUNK + j] + dl * x.beta[t] * kk;
                }
            }
            self.dbeta[t] += db;
        }
        // dγ_s = Σ_{t >= s > j} dΓ(t, j) Γ(t, s) Γ(s - 1, j): the product over (j, t] without
        // step s, exact for zero decays (no division by γ_s).
        for s in 0..n {
            let mut acc = 0.0f32;
            for t in s..n {
                let mut inner = 0.0f32;
                for j in -1..(s as i32) {
                    let before = if j + 1 == s as i32 {
                        1.0
                    } else {
                        self.gam[(s - 1) * W + (j + 1) as usize]
                    };
                    inner = fma::<F>(self.x[t * W + (j + 1) as usize], before, inner);
                }
                acc = fma::<F>(self.gam[t * W + s + 1], inner, acc);
            }
            self.dgamma[s] = acc;
        }
    }
}

fma_dispatch! {
    /// The backward of one head in chunks (scalar decay): the forward once more keeping the
    /// state at every chunk's start, then the chunks in reverse, each recomputing its blocks
    /// and walking the state rows. `d_out` is the call's `[B, T, Hv, Dv]` cotangent; `g.ds0`
    /// holds the final state's gradient and receives the initial state's; the step gradients
    /// of taken steps are written to `g` (the others are left as they are).
    pub(super) fn head_vjp / head_vjp_avx2 => head_vjp_generic(
        head: &Head<'_>,
        d_out: &[f32],
        g: &mut super::HeadGrads,
    ) -> Result<()>
}

#[inline(always)]
fn head_vjp_generic<const F: bool>(
    head: &Head<'_>,
    d_out: &[f32],
    g: &mut super::HeadGrads,
) -> Result<()> {
    let (ts, dk, dv) = (head.a.t, head.a.dk, head.a.dv);
    let n_state = dv * dk;
    if n_state == 0 || ts == 0 {
        return Ok(());
    }
    let chunks = ts.div_ceil(CHUNK);
    let mut x = Blocks::new(dk, dv)?;
    let mut cg = ChunkGrads::new(dk, dv)?;
    let mut ckpt = host_pool::filled(crate::array::checked_size(&[chunks, n_state])?, 0.0f32)?;
    let mut s = host_pool::filled(n_state, 0.0f32)?;
    let mut scratch = host_pool::filled(CHUNK * dv, 0.0f32)?;
    head.init(0, &mut s);
    for ch in 0..chunks {
        ckpt[ch * n_state..][..n_state].copy_from_slice(&s);
        if ch + 1 < chunks {
            let c0 = ch * CHUNK;
            x.prepare::<F>(head, c0, CHUNK);
            for (i, row) in s.chunks_exact_mut(dk).enumerate() {
                x.row::<F>(CHUNK, dk, dv, i, row, &mut scratch[i..]);
            }
        }
    }
    for ch in (0..chunks).rev() {
        let c0 = ch * CHUNK;
        let n = CHUNK.min(ts - c0);
        x.prepare::<F>(head, c0, n);
        cg.start(head, d_out, c0, n, &x);
        let start = &ckpt[ch * n_state..][..n_state];
        for (i, (row, drow)) in start
            .chunks_exact(dk)
            .zip(g.ds0.chunks_exact_mut(dk))
            .enumerate()
        {
            cg.row::<F>(&x, n, dk, dv, i, row, drow);
        }
        cg.finish::<F>(&x, n, dk, dv);
        for j in 0..n {
            if !x.taken[j] {
                continue;
            }
            let t = c0 + j;
            g.dq[t * dk..][..dk].copy_from_slice(&cg.dq[j * dk..][..dk]);
            g.dk[t * dk..][..dk].copy_from_slice(&cg.dk[j * dk..][..dk]);
            g.dv[t * dv..][..dv].copy_from_slice(&cg.dv[j * dv..][..dv]);
            g.dg[t] = cg.dgamma[j];
            g.db[t] = cg.dbeta[j];
        }
    }
    Ok(())
}
