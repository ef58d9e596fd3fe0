//! How a sequence is laid out over the ranks: [`shard_ranges`], [`shard_sequence`],
//! [`gather_sequence`], and the sequence-axis slicing and concatenation the ring
//! algorithms share.

use crate::array::fmt_shape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::Array;
use std::ops::Range;

/// The sequence axis of `[B, H, T, D]` arrays and of `[B, H, T]` log-sum-exps.
pub(crate) const SEQ_AXIS: usize = 2;

/// The positions `0..seq_len` of the sequence that rank `rank` of `world_size` holds, in the
/// order it holds them.
///
/// - `causal = false`, the contiguous layout: one range, the sequence cut into
///   `world_size` runs as even as can be (the first `seq_len % world_size` ranks hold one
///   position more).
/// - `causal = true`, the load-balanced layout: the sequence cut into `2 * world_size`
///   chunks of equal length `c`, and rank `r` holds chunk `r` then chunk
///   `2 * world_size - 1 - r` (two ranges). Under a causal mask every rank then has the
///   same work: its early chunk sees few keys, its late one many.
///
/// # Errors
/// `Error::InvalidArgument` for `world_size = 0` or `rank >= world_size`, and in the causal
/// layout for a `seq_len` that is not a multiple of `2 * world_size` (the message says to
/// pad the sequence at the end: under a causal mask the real positions never see the
/// padding).
pub fn shard_ranges(
    seq_len: usize,
    world_size: usize,
    rank: usize,
    causal: bool,
) -> Result<Vec<Range<usize>>> {
    if world_size == 0 || rank >= world_size {
        return Err(Error::invalid(format!(
            "[ring_attention] rank {rank} is not in a ring of {world_size} ranks."
        )));
    }
    if !causal {
        let (base, rem) = (seq_len / world_size, seq_len % world_size);
        let start = rank * base + rank.min(rem);
        let end = start + base + usize::from(rank < rem);
        return Ok(std::iter::once(start..end).collect());
    }
    let chunks = 2 * world_size;
    if !seq_len.is_multiple_of(chunks) {
        return Err(Error::invalid(format!(
            "[ring_attention] the causal layout cuts the sequence into 2 * world_size = \
             {chunks} chunks of equal length, but the sequence length {seq_len} is not a \
             multiple of {chunks}; pad the sequence at the end to {} positions (under a causal \
             mask no real position sees the padding).",
            seq_len.div_ceil(chunks) * chunks
        )));
    }
    let c = seq_len / chunks;
    let late = chunks - 1 - rank;
    Ok(vec![rank * c..(rank + 1) * c, late * c..(late + 1) * c])
}

/// Rank `rank`'s shard of `x` along axis 2 (the sequence axis of `[B, H, T, D]` inputs and
/// of `[B, H, T]` log-sum-exps) in the layout of [`shard_ranges`]: a view for the
/// contiguous layout (`causal = false`), a new array of its two chunks for the load-balanced
/// one. Every rank shards `q`, `k`, `v` (and, for the backward, `d_out`) with the same
/// `causal` as the ring call.
///
/// # Errors
/// `Error::InvalidArgument` when `x` has fewer than 3 dimensions, and as [`shard_ranges`].
pub fn shard_sequence(x: &Array, world_size: usize, rank: usize, causal: bool) -> Result<Array> {
    check_rank3("shard_sequence", x)?;
    let ranges = shard_ranges(x.shape()[SEQ_AXIS], world_size, rank, causal)?;
    let parts = ranges
        .iter()
        .map(|r| seq_slice(x, r.start, r.end))
        .collect::<Result<Vec<_>>>()?;
    concat_seq(&parts, x.dtype())
}

/// The full sequence from every rank's shard (`shards[r]` from rank `r`, in the layout
/// of [`shard_ranges`] with this `causal`), concatenated along axis 2 in sequence order:
/// the inverse of [`shard_sequence`], for outputs, log-sum-exps and gradients.
///
/// # Errors
/// `Error::InvalidArgument` for no shards, shards of fewer than 3 dimensions, of different
/// dtypes, or whose shapes differ off the sequence axis; in the causal layout, shards of
/// different or odd lengths. Device errors when the shards live on different devices.
pub fn gather_sequence(shards: &[Array], causal: bool) -> Result<Array> {
    let Some(first) = shards.first() else {
        return Err(Error::invalid(
            "[gather_sequence] there are no shards to gather.",
        ));
    };
    for s in shards {
        check_rank3("gather_sequence", s)?;
        let (mut a, mut b) = (first.shape().to_vec(), s.shape().to_vec());
        if !causal {
            a[SEQ_AXIS] = 0;
            b[SEQ_AXIS] = 0;
        }
        if a != b || s.dtype() != first.dtype() {
            return Err(Error::invalid(format!(
                "[gather_sequence] the shards must have one dtype and one shape{} but have \
                 {} {} and {} {}.",
                if causal { "" } else { " off the sequence axis" },
                first.dtype(),
                fmt_shape(first.shape()),
                s.dtype(),
                fmt_shape(s.shape())
            )));
        }
    }
    if !causal {
        return concat_seq(shards, first.dtype());
    }
    let len = first.shape()[SEQ_AXIS];
    if len % 2 != 0 {
        return Err(Error::invalid(format!(
            "[gather_sequence] a shard of the causal layout holds two chunks of equal length, \
             but the shards have {len} positions."
        )));
    }
    let c = len / 2;
    let world = shards.len();
    let mut parts = Vec::with_capacity(2 * world);
    for s in shards {
        parts.push(seq_slice(s, 0, c)?);
    }
    for s in shards.iter().rev() {
        parts.push(seq_slice(s, c, len)?);
    }
    concat_seq(&parts, first.dtype())
}

fn check_rank3(op: &str, x: &Array) -> Result<()> {
    if x.ndim() < 3 {
        return Err(Error::invalid(format!(
            "[{op}] the sequence is axis 2 of [B, H, T, D] or [B, H, T] arrays, but the array \
             has shape {}.",
            fmt_shape(x.shape())
        )));
    }
    Ok(())
}

/// `x[:, :, lo..hi]` (a view).
pub(crate) fn seq_slice(x: &Array, lo: usize, hi: usize) -> Result<Array> {
    let n = x.ndim();
    let mut starts = vec![0isize; n];
    let mut stops: Vec<isize> = x.shape().iter().map(|&d| d as isize).collect();
    starts[SEQ_AXIS] = lo as isize;
    stops[SEQ_AXIS] = hi as isize;
    x.slice(&starts, &stops, &vec![1; n])
}

/// `parts` concatenated along axis 2 and converted to `dtype`: a new row-major array on
/// the first part's device (its stream on a GPU); a single part is only converted.
pub(crate) fn concat_seq(parts: &[Array], dtype: DType) -> Result<Array> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid("[ring_attention] nothing to concatenate."));
    };
    if parts.len() == 1 {
        return first.astype(dtype);
    }
    let mut shape = first.shape().to_vec();
    shape[SEQ_AXIS] = parts.iter().map(|p| p.shape()[SEQ_AXIS]).sum();
    let mut out = match first.stream() {
        Some(stream) => Array::uninit_on(&stream, &shape, dtype)?,
        None => Array::uninit(&shape, dtype, &first.device())?,
    };
    let n = shape.len();
    let mut at = 0;
    for p in parts {
        let len = p.shape()[SEQ_AXIS];
        let mut starts = vec![0isize; n];
        let mut stops: Vec<isize> = shape.iter().map(|&d| d as isize).collect();
        starts[SEQ_AXIS] = at as isize;
        stops[SEQ_AXIS] = (at + len) as isize;
        out.slice_update(p, &starts, &stops, &vec![1; n])?;
        at += len;
    }
    Ok(out)
}
