//! Ring attention: [`ring_attention`] (forward) and [`ring_attention_vjp`] (backward) over
//! the local shards of a sequence, exchanging key/value blocks around a [`Communicator`].

use super::comm::Communicator;
use super::layout::{concat_seq, seq_slice, SEQ_AXIS};
use crate::array::fmt_shape;
use crate::dtype::{promote_types, DType};
use crate::error::{Error, Result};
use crate::fast::{self, Mask};
use crate::Array;

const OP: &str = "[ring_attention]";

/// Which query rows of this rank see which keys of the block held at one step, in the
/// load-balanced causal layout (chunks `r` and `2R-1-r` on rank `r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visible {
    /// The rank's own block: its two chunks against its two chunks, causal on the local
    /// positions (the early chunk sees its own chunk causally and not the late one, the late
    /// chunk sees the early one fully and itself causally).
    Own,
    /// A block from a rank `s < r`: every query row sees the block's early chunk (chunk `s`
    /// precedes both of this rank's chunks), no row sees its late one (`2R-1-s` follows
    /// both).
    EarlyHalf,
    /// A block from a rank `s > r`: the late query chunk sees the whole block (both of its
    /// chunks precede `2R-1-r`), the early query chunk sees none of it.
    LateQueries,
    /// The contiguous layout without a mask: every row sees every key.
    All,
}

fn visible(causal: bool, rank: usize, src: usize) -> Visible {
    match (causal, src.cmp(&rank)) {
        (false, _) => Visible::All,
        (true, std::cmp::Ordering::Equal) => Visible::Own,
        (true, std::cmp::Ordering::Less) => Visible::EarlyHalf,
        (true, std::cmp::Ordering::Greater) => Visible::LateQueries,
    }
}

/// The ring's size and this rank, checked.
fn ring<C: Communicator + ?Sized>(comm: &C) -> Result<(usize, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 0 || rank >= world {
        return Err(Error::invalid(format!(
            "{OP} the communicator says rank {rank} of {world} ranks."
        )));
    }
    Ok((rank, world))
}

/// The local shards' layout checks that the ring needs before attention's own validation:
/// 4-D inputs, and in the causal layout queries and keys of one even length (two equal
/// chunks). Returns the chunk length (the whole local length without a mask).
fn check_shards(q: &Array, k: &Array, v: &Array, causal: bool) -> Result<usize> {
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.ndim() != 4 {
            return Err(Error::invalid(format!(
                "{OP} {name} must be this rank's 4-dimensional [B, H, T, D] shard but has \
                 shape {}.",
                fmt_shape(x.shape())
            )));
        }
    }
    let (tq, tk) = (q.shape()[SEQ_AXIS], k.shape()[SEQ_AXIS]);
    if !causal {
        return Ok(tq);
    }
    if tq != tk || !tq.is_multiple_of(2) {
        return Err(Error::invalid(format!(
            "{OP} with a causal mask each rank holds chunks r and 2R-1-r of the sequence for \
             queries and keys alike (shard_sequence with causal = true), so q and k must have \
             one even length along T, but q has shape {} and k {}.",
            fmt_shape(q.shape()),
            fmt_shape(k.shape())
        )));
    }
    Ok(tq / 2)
}

/// Checks a received key/value block against this rank's own.
fn check_block(
    got: &[Array],
    want: usize,
    k: &Array,
    v: &Array,
    causal: bool,
    src: usize,
) -> Result<()> {
    if got.len() != want {
        return Err(Error::invalid(format!(
            "{OP} rank {src} sent {} arrays where {want} were expected: every rank must make \
             the same ring call (causal, sinks).",
            got.len()
        )));
    }
    for (name, own, recv) in [("keys", k, &got[0]), ("values", v, &got[1])] {
        let mut a = own.shape().to_vec();
        let mut b = recv.shape().to_vec();
        if !causal {
            a[SEQ_AXIS] = 0;
            b[SEQ_AXIS] = 0;
        }
        if a != b || recv.ndim() != 4 {
            return Err(Error::invalid(format!(
                "{OP} rank {src}'s {name} have shape {} but this rank's have shape {}{}.",
                fmt_shape(recv.shape()),
                fmt_shape(own.shape()),
                if causal {
                    ": under the causal layout every rank holds two chunks of one length"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// The dtype partial results are accumulated in: float32, float64 for float64 calls.
fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A running merge of partial attention results over some query rows.
struct Partial {
    acc: Option<(Array, Array)>,
}

impl Partial {
    fn new() -> Partial {
        Partial { acc: None }
    }

    /// Merges in the result `(out, lse)` of the same rows over more keys.
    fn merge(&mut self, out: &Array, lse: &Array) -> Result<()> {
        let out = out.astype(acc_dtype(out.dtype()))?;
        self.acc = Some(match self.acc.take() {
            None => (out, lse.clone()),
            Some((ao, al)) => fast::merge_attention_states(&ao, &al, &out, lse)?,
        });
        Ok(())
    }

    fn take(self) -> Result<(Array, Array)> {
        self.acc
            .ok_or_else(|| Error::invalid(format!("{OP} internal: a row block saw no step")))
    }
}

/// Context-parallel attention forward over this rank's shards of the sequence:
/// `(out, lse)` for this rank's query rows, as
/// [`fast::scaled_dot_product_attention_with_lse`](crate::fast::scaled_dot_product_attention_with_lse)
/// over the whole sequence gives them (`out` in the call's dtype, `lse` float32, float64
/// for float64 calls, both in this rank's layout).
///
/// Every rank of `comm` calls it at once with its own shards of `q` `[B, N_q, T_r, D]`,
/// `k` `[B, N_kv, T_r, D]` and `v` `[B, N_kv, T_r, D_v]` (made with
/// [`shard_sequence`](super::shard_sequence) and this `causal`) and the same `scale`,
/// `causal` and `sinks` (`(N_q,)`, or none). `N_q` is a multiple of `N_kv` (grouped-query
/// attention; k and v are never repeated).
///
/// The key/value blocks go around the ring: at step `t` rank `r` holds the block of rank
/// `r - t` and sends it on before computing with it, so the exchange overlaps the compute
/// when the transport queues sends. Per step the visible part is one attention call
/// with its log-sum-exp, merged with [`fast::merge_attention_states`] into float32
/// accumulators (float64 for float64 calls):
/// - `causal = false` (contiguous layout, any shard lengths): every block fully.
/// - `causal = true` (load-balanced layout, see [`shard_ranges`](super::shard_ranges)):
///   the own block with a causal mask over the local positions; a block from an earlier
///   rank, its first chunk for every query; a block from a later rank, all of it for the
///   late query chunk only. Every rank computes the same amount.
///
/// The sinks enter once, in the own block's call. The result equals single-device
/// attention up to the rounding of the per-block outputs to the call's dtype before they
/// are merged.
///
/// # Errors
/// `Error::InvalidArgument` when the communicator's rank is not below its world size, an
/// input is not 4-D, or (causal) q and k do not have one even length; a received block
/// whose shape does not fit (naming the rank it belongs to); attention's errors for the shards
/// (see [`fast::scaled_dot_product_attention`]); the communicator's errors. An error on one
/// rank ends that rank's call: with [`ThreadRing`](super::ThreadRing), its neighbours'
/// calls then fail too rather than wait.
pub fn ring_attention<C: Communicator + ?Sized>(
    comm: &C,
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    causal: bool,
    sinks: Option<&Array>,
) -> Result<(Array, Array)> {
    let (rank, world) = ring(comm)?;
    let c = check_shards(q, k, v, causal)?;
    let tq = q.shape()[SEQ_AXIS];
    // Row blocks: the early and late query chunks (causal), or all rows.
    let mut early = Partial::new();
    let mut late = Partial::new();
    let (mut kb, mut vb) = (k.clone(), v.clone());
    for step in 0..world {
        let src = (rank + world - step) % world;
        if step + 1 < world {
            comm.send_next(vec![kb.clone(), vb.clone()])?;
        }
        let attn = |q: &Array, k: &Array, v: &Array, mask: Mask<'_>, sinks: Option<&Array>| {
            fast::scaled_dot_product_attention_with_lse(q, k, v, scale, mask, sinks)
        };
        match visible(causal, rank, src) {
            Visible::All => {
                let (o, l) = attn(q, &kb, &vb, Mask::None, sinks.filter(|_| step == 0))?;
                early.merge(&o, &l)?;
            }
            Visible::Own | Visible::EarlyHalf => {
                let (o, l) = if src == rank {
                    attn(q, &kb, &vb, Mask::Causal, sinks)?
                } else {
                    let (ka, va) = (seq_slice(&kb, 0, c)?, seq_slice(&vb, 0, c)?);
                    attn(q, &ka, &va, Mask::None, None)?
                };
                early.merge(&seq_slice(&o, 0, c)?, &seq_slice(&l, 0, c)?)?;
                late.merge(&seq_slice(&o, c, tq)?, &seq_slice(&l, c, tq)?)?;
            }
            Visible::LateQueries => {
                let (o, l) = attn(&seq_slice(q, c, tq)?, &kb, &vb, Mask::None, None)?;
                late.merge(&o, &l)?;
            }
        }
        if step + 1 < world {
            let got = comm.recv_prev()?;
            let from = (src + world - 1) % world;
            check_block(&got, 2, k, v, causal, from)?;
            kb = got[0].clone();
            vb = got[1].clone();
        }
    }
    let dtype = promote_types(promote_types(q.dtype(), k.dtype()), v.dtype());
    let (eo, el) = early.take()?;
    if !causal {
        return Ok((eo.astype(dtype)?, el));
    }
    let (lo, ll) = late.take()?;
    let lse_dtype = el.dtype();
    Ok((
        concat_seq(&[eo, lo], dtype)?,
        concat_seq(&[el, ll], lse_dtype)?,
    ))
}

/// A running sum of partial gradients (float32, float64 for float64 calls).
fn accumulate(acc: &mut Option<Array>, x: &Array) -> Result<()> {
    *acc = Some(fast::accumulate(acc.as_ref(), x)?);
    Ok(())
}

/// The accumulators of one key/value block's gradients as they travel the ring: dK and dV
/// per chunk (two chunks in the causal layout, one otherwise), then the dsinks partials of
/// the ranks the block has visited, in visiting order.
struct BlockGrads {
    dk: Vec<Option<Array>>,
    dv: Vec<Option<Array>>,
    dsinks: Vec<Array>,
}

impl BlockGrads {
    fn new(chunks: usize) -> BlockGrads {
        BlockGrads {
            dk: vec![None; chunks],
            dv: vec![None; chunks],
            dsinks: Vec::new(),
        }
    }

    /// Adds a block's dK and dV: the whole block, or its first chunk only.
    fn add(&mut self, dk: &Array, dv: &Array, c: usize, first_chunk_only: bool) -> Result<()> {
        let n = self.dk.len();
        if n == 1 {
            accumulate(&mut self.dk[0], dk)?;
            return accumulate(&mut self.dv[0], dv);
        }
        let len = dk.shape()[SEQ_AXIS];
        accumulate(&mut self.dk[0], &seq_slice(dk, 0, c)?)?;
        accumulate(&mut self.dv[0], &seq_slice(dv, 0, c)?)?;
        if !first_chunk_only {
            accumulate(&mut self.dk[1], &seq_slice(dk, c, len)?)?;
            accumulate(&mut self.dv[1], &seq_slice(dv, c, len)?)?;
        }
        Ok(())
    }

    /// The message: every accumulator, then the dsinks partials.
    fn into_message(self) -> Result<Vec<Array>> {
        let missing = || {
            Error::invalid(format!(
                "{OP} internal: a gradient block was never computed"
            ))
        };
        let mut out = Vec::with_capacity(2 * self.dk.len() + self.dsinks.len());
        for a in self.dk.into_iter().chain(self.dv) {
            out.push(a.ok_or_else(missing)?);
        }
        out.extend(self.dsinks);
        Ok(out)
    }

    fn from_message(msg: Vec<Array>, chunks: usize, src: usize) -> Result<BlockGrads> {
        if msg.len() < 2 * chunks {
            return Err(Error::invalid(format!(
                "{OP} rank {src} sent {} gradient arrays where at least {} were expected: every \
                 rank must make the same ring call (causal, sinks).",
                msg.len(),
                2 * chunks
            )));
        }
        let mut it = msg.into_iter();
        let dk = it.by_ref().take(chunks).map(Some).collect();
        let dv = it.by_ref().take(chunks).map(Some).collect();
        Ok(BlockGrads {
            dk,
            dv,
            dsinks: it.collect(),
        })
    }
}

/// The backward pass of [`ring_attention`]: `(dq, dk, dv, dsinks)` for this rank's shards,
/// each as [`fast::scaled_dot_product_attention_vjp`] over the whole sequence gives it
/// (in this rank's layout, in its primal's dtype; `dsinks` only with sinks, and the same
/// total on every rank).
///
/// Every rank calls it at once with the forward's arguments and its shards of the forward's
/// `out` and `lse` (as [`ring_attention`] returned them) and of the output's cotangent
/// `d_out`. The key/value blocks travel the ring as in the forward; per step the visible
/// part gets one [`fast::scaled_dot_product_attention_vjp`] call with the *global* `out`
/// and `lse` of its query rows, which makes its `dq`, `dk` and `dv` the exact partial
/// gradients of those keys. `dq` is summed locally; each block's `dk` / `dv` accumulators
/// (float32) travel the ring with it, each rank adding its part, and arrive back at the
/// block's owner after one more send. The sinks' gradient is computed once per rank (its
/// own block's call, where the sinks entered the forward); each rank's partial travels with
/// the gradient blocks, and every rank sums all of them in rank order, so every rank gets
/// the same bits.
///
/// # Errors
/// As [`ring_attention`]; attention's backward errors (see
/// [`fast::scaled_dot_product_attention_vjp`]: `out`, `lse` and `d_out` of the wrong shape
/// or dtype); a received gradient message of the wrong length.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn ring_attention_vjp<C: Communicator + ?Sized>(
    comm: &C,
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    causal: bool,
    sinks: Option<&Array>,
    out: &Array,
    lse: &Array,
    d_out: &Array,
) -> Result<(Array, Array, Array, Option<Array>)> {
    let (rank, world) = ring(comm)?;
    let c = check_shards(q, k, v, causal)?;
    let tq = q.shape()[SEQ_AXIS];
    let chunks = if causal { 2 } else { 1 };
    let late = |x: &Array| seq_slice(x, c, tq);
    let mut dq_early: Option<Array> = None;
    let mut dq_late: Option<Array> = None;
    let mut own_dsinks: Option<Array> = None;
    let (mut kb, mut vb) = (k.clone(), v.clone());
    let mut grads = BlockGrads::new(chunks);
    for step in 0..world {
        let src = (rank + world - step) % world;
        if step + 1 < world {
            comm.send_next(vec![kb.clone(), vb.clone()])?;
        }
        let vjp = |q: &Array,
                   k: &Array,
                   v: &Array,
                   mask: Mask<'_>,
                   sinks: Option<&Array>,
                   o: &Array,
                   l: &Array,
                   g: &Array| {
            fast::scaled_dot_product_attention_vjp(q, k, v, scale, mask, sinks, o, l, g)
        };
        match visible(causal, rank, src) {
            Visible::All => {
                let s = sinks.filter(|_| step == 0);
                let (dq, dk, dv, ds) = vjp(q, &kb, &vb, Mask::None, s, out, lse, d_out)?;
                accumulate(&mut dq_early, &dq)?;
                grads.add(&dk, &dv, c, false)?;
                own_dsinks = own_dsinks.or(ds);
            }
            Visible::Own => {
                let (dq, dk, dv, ds) = vjp(q, &kb, &vb, Mask::Causal, sinks, out, lse, d_out)?;
                accumulate(&mut dq_early, &seq_slice(&dq, 0, c)?)?;
                accumulate(&mut dq_late, &late(&dq)?)?;
                grads.add(&dk, &dv, c, false)?;
                own_dsinks = ds;
            }
            Visible::EarlyHalf => {
                let (ka, va) = (seq_slice(&kb, 0, c)?, seq_slice(&vb, 0, c)?);
                let (dq, dk, dv, _) = vjp(q, &ka, &va, Mask::None, None, out, lse, d_out)?;
                accumulate(&mut dq_early, &seq_slice(&dq, 0, c)?)?;
                accumulate(&mut dq_late, &late(&dq)?)?;
                grads.add(&dk, &dv, c, true)?;
            }
            Visible::LateQueries => {
                let (dq, dk, dv, _) = vjp(
                    &late(q)?,
                    &kb,
                    &vb,
                    Mask::None,
                    None,
                    &late(out)?,
                    &late(lse)?,
                    &late(d_out)?,
                )?;
                accumulate(&mut dq_late, &dq)?;
                grads.add(&dk, &dv, c, false)?;
            }
        }
        if let Some(ds) = &own_dsinks {
            grads.dsinks.push(ds.clone());
        }
        let from = (src + world - 1) % world;
        if step + 1 < world {
            comm.send_next(grads.into_message()?)?;
            let got = comm.recv_prev()?;
            check_block(&got, 2, k, v, causal, from)?;
            kb = got[0].clone();
            vb = got[1].clone();
            grads = BlockGrads::from_message(comm.recv_prev()?, chunks, from)?;
        } else if world > 1 {
            // The last send hands each block's gradients back to their owner.
            comm.send_next(grads.into_message()?)?;
            grads = BlockGrads::from_message(comm.recv_prev()?, chunks, from)?;
        }
    }
    // The own block's message holds every rank's dsinks partial, rank r's first: sum them
    // in rank order, the same on every rank.
    let dsinks = match sinks {
        None => None,
        Some(s) => {
            if grads.dsinks.len() != world {
                return Err(Error::invalid(format!(
                    "{OP} the sinks' gradient gathered {} partials from {world} ranks: every \
                     rank must pass sinks.",
                    grads.dsinks.len()
                )));
            }
            let mut total = None;
            for j in 0..world {
                accumulate(&mut total, &grads.dsinks[(j + world - rank) % world])?;
            }
            total.map(|t| t.astype(s.dtype())).transpose()?
        }
    };
    let missing = || Error::invalid(format!("{OP} internal: a gradient was never computed"));
    let mut dq_parts = vec![dq_early.ok_or_else(missing)?];
    dq_parts.extend(dq_late);
    let mut dk_parts = Vec::with_capacity(chunks);
    let mut dv_parts = Vec::with_capacity(chunks);
    for (dk, dv) in grads.dk.into_iter().zip(grads.dv) {
        dk_parts.push(dk.ok_or_else(missing)?);
        dv_parts.push(dv.ok_or_else(missing)?);
    }
    Ok((
        concat_seq(&dq_parts, q.dtype())?,
        concat_seq(&dk_parts, k.dtype())?,
        concat_seq(&dv_parts, v.dtype())?,
        dsinks,
    ))
}
