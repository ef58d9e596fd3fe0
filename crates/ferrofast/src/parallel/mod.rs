//! Context parallelism: attention over a sequence split along `T` across ranks, which
//! exchange key/value blocks around a ring (ring attention), forward and backward, with
//! causal load balancing and grouped-query heads.
//!
//! - [`Communicator`]: the ring transport (send to the next rank, receive from the
//!   previous one); [`ThreadRing`] implements it for ranks that are threads of one process
//!   (the CPU and test transport). A multi-GPU transport (NCCL) implements the same trait.
//! - [`shard_ranges`], [`shard_sequence`], [`gather_sequence`]: the layout of the sequence
//!   over the ranks, the same for users and the algorithms. Without a mask, contiguous
//!   runs of any length; with a causal mask, the load-balanced layout where the sequence is
//!   cut into `2R` chunks and rank `r` holds chunks `r` and `2R-1-r` (the sequence length
//!   must be a multiple of `2R`).
//! - [`ring_attention`], [`ring_attention_vjp`]: attention and its backward over the local
//!   shards, built from
//!   [`fast::scaled_dot_product_attention_with_lse`](crate::fast::scaled_dot_product_attention_with_lse),
//!   [`fast::scaled_dot_product_attention_vjp`](crate::fast::scaled_dot_product_attention_vjp)
//!   and [`fast::merge_attention_states`](crate::fast::merge_attention_states), so
//!   they run on whatever device the shards live on.
//!
//! ```
//! use ferrofast::parallel::{gather_sequence, ring_attention, shard_sequence, ThreadRing};
//! use ferrofast::{fast, Array, DType, Device};
//!
//! let (world, causal) = (4, true);
//! let q = Array::randn(&[1, 4, 64, 32], DType::F32, 0, &Device::Cpu)?;
//! let k = Array::randn(&[1, 2, 64, 32], DType::F32, 1, &Device::Cpu)?;
//! let v = Array::randn(&[1, 2, 64, 32], DType::F32, 2, &Device::Cpu)?;
//! let outs = std::thread::scope(|s| {
//!     let handles: Vec<_> = ThreadRing::new(world)?
//!         .into_iter()
//!         .enumerate()
//!         .map(|(r, comm)| {
//!             let (q, k, v) = (&q, &k, &v);
//!             s.spawn(move || -> ferrofast::Result<Array> {
//!                 let shard = |x: &Array| shard_sequence(x, world, r, causal);
//!                 let (out, _lse) =
//!                     ring_attention(&comm, &shard(q)?, &shard(k)?, &shard(v)?, 0.17, causal, None)?;
//!                 Ok(out)
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect::<ferrofast::Result<Vec<_>>>()
//! })?;
//! let out = gather_sequence(&outs, causal)?;
//! let full = fast::scaled_dot_product_attention(&q, &k, &v, 0.17, fast::Mask::Causal, None)?;
//! let diff = out.to_vec::<f32>()?.iter().zip(full.to_vec::<f32>()?).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//! assert!(diff < 1e-5);
//! # Ok::<(), ferrofast::Error>(())
//! ```

mod comm;
mod layout;
mod ring;

pub use comm::{Communicator, ThreadRing};
pub use layout::{gather_sequence, shard_ranges, shard_sequence};
pub use ring::{ring_attention, ring_attention_vjp};
