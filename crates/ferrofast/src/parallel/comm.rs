//! The transport of context parallelism: [`Communicator`], and [`ThreadRing`], its
//! implementation for ranks that are threads of one process.

use crate::error::{Error, Result};
use crate::{Array, Device};
use std::sync::mpsc::{channel, Receiver, Sender};

/// A ring of `world_size()` ranks, as the ring algorithms of [`crate::parallel`] see it:
/// each rank sends to the next rank (`(rank + 1) % world_size`) and receives from the
/// previous one (`(rank + world_size - 1) % world_size`), messages arriving in the order
/// they were sent.
///
/// A message is a list of arrays. The algorithms send before they receive (every rank
/// sends its block, computes, then receives its neighbour's), so [`send_next`] must not
/// wait for the matching [`recv_prev`]: it queues the message (an implementation over a
/// network or NCCL posts a non-blocking send and completes it before the next receive or
/// when the arrays are dropped). The receiver knows from the algorithm how many arrays
/// to expect; their shapes and dtypes travel with them (a transport that needs them up
/// front can send them first, or take them from the sequence layout: every message of
/// [`ring_attention`](super::ring_attention) with a causal mask has the receiving rank's own
/// shapes).
///
/// The received arrays are what the algorithm computes with, so a transport delivers them
/// on the receiving rank's device.
///
/// [`send_next`]: Communicator::send_next
/// [`recv_prev`]: Communicator::recv_prev
pub trait Communicator {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the ring (at least 1).
    fn world_size(&self) -> usize;

    /// Queues `arrays` for the next rank without waiting for it to receive them.
    ///
    /// # Errors
    /// Transport errors (for [`ThreadRing`]: the next rank has stopped).
    fn send_next(&self, arrays: Vec<Array>) -> Result<()>;

    /// Waits for the previous rank's next message and returns its arrays.
    ///
    /// # Errors
    /// Transport errors (for [`ThreadRing`]: the previous rank has stopped without sending
    /// it).
    fn recv_prev(&self) -> Result<Vec<Array>>;
}

/// One rank of a ring of threads in one process, over standard channels: the transport
/// for running context parallelism on the CPU and for testing the ring algorithms. From
/// [`ThreadRing::new`] the arrays are handed over as they are, without a copy (ranks on the
/// CPU, or sharing one GPU); from [`ThreadRing::with_devices`] each rank's received arrays
/// are moved to its device, through host memory between GPUs (a fallback for testing
/// ranks on several GPUs; a device-to-device transport such as NCCL is the fast way).
///
/// ```
/// use ferrofast::parallel::{Communicator, ThreadRing};
/// use ferrofast::{Array, DType, Device};
///
/// let ranks = ThreadRing::new(3)?;
/// let got: Vec<f32> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .into_iter()
///         .map(|comm| {
///             s.spawn(move || -> ferrofast::Result<f32> {
///                 let mine = Array::full(&[1], comm.rank() as f64, DType::F32, &Device::Cpu)?;
///                 comm.send_next(vec![mine])?;
///                 Ok(comm.recv_prev()?[0].to_vec::<f32>()?[0])
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
/// });
/// assert_eq!(got, vec![2.0, 0.0, 1.0]);
/// # Ok::<(), ferrofast::Error>(())
/// ```
///
/// A rank that stops (its `ThreadRing` dropped, say after an error) makes its neighbours'
/// next receive or send fail instead of wait forever, so an error on one rank ends every
/// rank's call.
#[derive(Debug)]
pub struct ThreadRing {
    rank: usize,
    world_size: usize,
    /// Where received arrays are moved (`None`: kept where they are).
    device: Option<Device>,
    to_next: Sender<Vec<Array>>,
    from_prev: Receiver<Vec<Array>>,
}

impl ThreadRing {
    /// The `world_size` ranks of a new ring, in rank order; give each to its own thread.
    ///
    /// # Errors
    /// `Error::InvalidArgument` for a world size of 0.
    pub fn new(world_size: usize) -> Result<Vec<ThreadRing>> {
        ThreadRing::ring(world_size, &[])
    }

    /// The ranks of a new ring, rank `r` working on `devices[r]` (one rank per entry; a
    /// device may appear more than once): the arrays a rank receives are moved to its
    /// device ([`Array::to_device`]: a cheap handle when they are there already, a copy
    /// through host memory between GPUs).
    ///
    /// # Errors
    /// `Error::InvalidArgument` for an empty list.
    pub fn with_devices(devices: &[Device]) -> Result<Vec<ThreadRing>> {
        ThreadRing::ring(devices.len(), devices)
    }

    fn ring(world_size: usize, devices: &[Device]) -> Result<Vec<ThreadRing>> {
        if world_size == 0 {
            return Err(Error::invalid(
                "[ThreadRing] a ring needs at least one rank but world_size is 0.",
            ));
        }
        // Channel i carries rank i's messages to rank i + 1.
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..world_size).map(|_| channel()).unzip();
        receivers.rotate_right(1);
        Ok(senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to_next, from_prev))| ThreadRing {
                rank,
                world_size,
                device: devices.get(rank).copied(),
                to_next,
                from_prev,
            })
            .collect())
    }
}

impl Communicator for ThreadRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn send_next(&self, arrays: Vec<Array>) -> Result<()> {
        self.to_next.send(arrays).map_err(|_| {
            Error::invalid(format!(
                "[ThreadRing] rank {} cannot send: rank {} has stopped.",
                self.rank,
                (self.rank + 1) % self.world_size
            ))
        })
    }

    fn recv_prev(&self) -> Result<Vec<Array>> {
        let got = self.from_prev.recv().map_err(|_| {
            Error::invalid(format!(
                "[ThreadRing] rank {} cannot receive: rank {} has stopped without sending.",
                self.rank,
                (self.rank + self.world_size - 1) % self.world_size
            ))
        })?;
        match &self.device {
            None => Ok(got),
            Some(d) => got.iter().map(|a| a.to_device(d)).collect(),
        }
    }
}
