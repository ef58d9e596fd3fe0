//! GPU memory: freed arrays' memory stays in ferrofast's pool for reuse, an allocation that
//! runs out of memory hands that memory back and retries, and running out for real is a
//! typed error. A test binary of its own because it fills the whole GPU. Without a CUDA
//! device it prints a line and passes.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use ferrofast::{Array, DType, Error};

const GIB: usize = 1 << 30;

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
fn the_pool_gives_freed_memory_back_when_an_allocation_needs_it() {
    let Some(dev) = gpu() else { return };
    let one = Array::full(&[GIB], 7.0, DType::U8, &dev).expect("upload 1 GiB");
    // Fill the device with 1 GiB copies until the driver says no.
    let mut copies = Vec::new();
    let failure = loop {
        match one.copy() {
            Ok(c) => copies.push(c),
            Err(e) => break e,
        }
        assert!(
            copies.len() < 1024,
            "1 TiB allocated without running out of memory"
        );
    };
    assert!(
        matches!(failure, Error::OutOfMemory(_)),
        "running out of GPU memory must be Error::OutOfMemory, got {failure:?}"
    );
    let count = copies.len();
    assert!(count >= 4, "only {count} GiB could be allocated");
    dev.synchronize().expect("synchronize");
    drop(copies);
    // The pool now holds about `count` GiB of freed 1 GiB blocks. One allocation of nearly
    // all of it in a single piece must still succeed.
    let rows = count - 2;
    let big = one
        .reshape(&[1, GIB])
        .and_then(|a| a.broadcast_to(&[rows, GIB]))
        .and_then(|a| a.contiguous())
        .expect("one allocation of nearly all the memory the pool held");
    assert_eq!(big.shape(), &[rows, GIB]);
    let tail = big
        .slice(
            &[rows as isize - 1, GIB as isize - 4],
            &[rows as isize, GIB as isize],
            &[1, 1],
        )
        .and_then(|a| a.contiguous())
        .and_then(|a| a.to_vec::<u8>())
        .expect("read the last bytes back");
    assert_eq!(tail, vec![7u8; 4]);
    drop(big);
    dev.release_cached_memory()
        .expect("release_cached_memory after the arrays are gone");
    // And the memory is usable again afterwards.
    let again = one.copy().expect("allocate after the release");
    assert_eq!(again.shape(), &[GIB]);
}
