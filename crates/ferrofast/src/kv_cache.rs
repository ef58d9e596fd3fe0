//! [`KvCache`]: one attention layer's keys and values for autoregressive decoding, in
//! preallocated buffers that each step appends to in place.

use crate::array::fmt_shape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::{Array, Device};

const OP: &str = "[KvCache]";

/// One attention layer's keys `[B, H_kv, capacity, D]` and values
/// `[B, H_kv, capacity, D_v]`, preallocated on a device in one dtype, of which the first
/// [`len`](KvCache::len) positions along the third axis are filled.
///
/// [`append`](KvCache::append) writes a step's new keys and values after the filled part
/// with [`Array::slice_update`] and returns `[B, H_kv, len, D]` / `[B, H_kv, len, D_v]`
/// views of the filled part (strided views of the buffers, not copies), which
/// [`fast::scaled_dot_product_attention`](crate::fast::scaled_dot_product_attention) reads
/// as they are (on the CPU and on CUDA, where rows of `D * dtype size` bytes, a multiple of
/// 16, are loaded in place; other head sizes are copied by the GPU kernels). A decode step
/// therefore costs the new entries' copy plus the attention itself, whatever the length.
///
/// **Writing in place.** The views hold the buffers. An append made while a view returned
/// earlier (by [`append`](KvCache::append), [`keys`](KvCache::keys) or
/// [`values`](KvCache::values)), or a clone or view of one, is still alive cannot write into
/// the shared buffers: it moves the filled part into new buffers of the same capacity first
/// (one copy of the cache; the old views keep their contents). The decode loop that writes
/// in place drops the views before the next append, as a loop body does:
///
/// ```
/// use ferrofast::fast::{self, Mask};
/// use ferrofast::{Array, DType, Device, KvCache};
///
/// let cpu = Device::Cpu;
/// // B 1, 8 kv heads of 64, room for 16 positions.
/// let mut cache = KvCache::new(1, 8, 64, 16, DType::F32, &cpu)?;
/// for step in 0..20u64 {
///     let q = Array::randn(&[1, 32, 1, 64], DType::F32, 3 * step, &cpu)?;
///     let k = Array::randn(&[1, 8, 1, 64], DType::F32, 3 * step + 1, &cpu)?;
///     let v = Array::randn(&[1, 8, 1, 64], DType::F32, 3 * step + 2, &cpu)?;
///     let (keys, values) = cache.append(&k, &v)?; // [1, 8, step + 1, 64] views
///     let out = fast::scaled_dot_product_attention(&q, &keys, &values, 0.125, Mask::None, None)?;
///     assert_eq!(out.shape(), &[1, 32, 1, 64]);
/// } // `keys` and `values` are dropped here: the next append writes in place
/// assert_eq!(cache.len(), 20);
/// assert!(cache.capacity() >= 20); // grew once, to 32
/// # Ok::<(), ferrofast::Error>(())
/// ```
///
/// **Growth.** An append past the capacity moves the filled part into buffers of at least
/// twice the capacity (exactly the length needed if that much cannot be had), so `n`
/// one-position appends copy `O(n)` entries in all. [`reserve`](KvCache::reserve) grows
/// ahead of time.
///
/// **Memory.** Host buffers are zeroed memory that the system maps as it is first written,
/// so the process grows with the filled part; they never join the host buffer pool, so the
/// buffers a growth replaces are freed. GPU buffers come from the device's stream-ordered
/// pool and are written on the stream they were made on (the device's default stream, or
/// the one given to [`new_on`](KvCache::new_on)); work on other streams that produces the
/// new entries or reads the views is ordered on the GPU, with no host wait.
#[derive(Debug)]
pub struct KvCache {
    keys: Array,
    values: Array,
    len: usize,
}

/// `n` as an `isize` slice bound (every array dimension fits).
fn bound(n: usize) -> Result<isize> {
    isize::try_from(n).map_err(|_| Error::Shape(format!("{OP} {n} positions overflow isize")))
}

impl KvCache {
    /// An empty cache for `batch` sequences of `kv_heads` heads with keys and values of
    /// `head_dim` features, with room for `capacity` positions, in `dtype` on `device` (a
    /// GPU cache on the device's default stream).
    ///
    /// # Errors
    /// As [`with_value_dim`](KvCache::with_value_dim).
    pub fn new(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<KvCache> {
        KvCache::with_value_dim(batch, kv_heads, head_dim, head_dim, capacity, dtype, device)
    }

    /// [`new`](KvCache::new) with keys of `key_dim` and values of `value_dim` features.
    ///
    /// # Errors
    /// `Error::InvalidArgument` for a dtype that is not floating; `Error::Shape` when a
    /// buffer's size overflows the address space; `Error::OutOfMemory` when the memory
    /// cannot be had; `Error::CudaUnavailable` or `Error::Device` for a GPU that cannot be
    /// used.
    pub fn with_value_dim(
        batch: usize,
        kv_heads: usize,
        key_dim: usize,
        value_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<KvCache> {
        check_dtype(dtype)?;
        Ok(KvCache {
            keys: Array::uninit(&[batch, kv_heads, capacity, key_dim], dtype, device)?,
            values: Array::uninit(&[batch, kv_heads, capacity, value_dim], dtype, device)?,
            len: 0,
        })
    }

    /// [`with_value_dim`](KvCache::with_value_dim) on `stream`'s device, with the buffers
    /// made and written on `stream`.
    ///
    /// # Errors
    /// As [`with_value_dim`](KvCache::with_value_dim).
    pub fn new_on(
        stream: &crate::Stream,
        batch: usize,
        kv_heads: usize,
        key_dim: usize,
        value_dim: usize,
        capacity: usize,
        dtype: DType,
    ) -> Result<KvCache> {
        check_dtype(dtype)?;
        Ok(KvCache {
            keys: Array::uninit_on(stream, &[batch, kv_heads, capacity, key_dim], dtype)?,
            values: Array::uninit_on(stream, &[batch, kv_heads, capacity, value_dim], dtype)?,
            len: 0,
        })
    }

    /// Filled positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before the next growth.
    pub fn capacity(&self) -> usize {
        self.keys.shape()[2]
    }

    /// Sequences (`B`).
    pub fn batch(&self) -> usize {
        self.keys.shape()[0]
    }

    /// Key and value heads (`H_kv`).
    pub fn kv_heads(&self) -> usize {
        self.keys.shape()[1]
    }

    /// Features of a key (`D`).
    pub fn key_dim(&self) -> usize {
        self.keys.shape()[3]
    }

    /// Features of a value (`D_v`).
    pub fn value_dim(&self) -> usize {
        self.values.shape()[3]
    }

    /// The element type of both buffers.
    pub fn dtype(&self) -> DType {
        self.keys.dtype()
    }

    /// Where the buffers live.
    pub fn device(&self) -> Device {
        self.keys.device()
    }

    /// Bytes the two buffers hold (the whole capacity, filled or not).
    pub fn nbytes(&self) -> usize {
        self.keys.nbytes().saturating_add(self.values.nbytes())
    }

    /// The filled keys, `[B, H_kv, len, D]`: a view of the buffer (see the type's
    /// documentation for what holding it costs the next append).
    pub fn keys(&self) -> Array {
        self.keys.prefix(2, self.len)
    }

    /// The filled values, `[B, H_kv, len, D_v]`: a view of the buffer.
    pub fn values(&self) -> Array {
        self.values.prefix(2, self.len)
    }

    /// Writes `k_new` (`[B, H_kv, t, D]`) and `v_new` (`[B, H_kv, t, D_v]`), converted to
    /// the cache's dtype, at positions `len..len + t`, growing the buffers first when they
    /// are full, and returns [`keys`](KvCache::keys) and [`values`](KvCache::values) of the
    /// filled part, `len + t` positions. The new entries are written in place unless a view
    /// of the buffers is alive (see the type's documentation); the old ones are copied only
    /// when the buffers grow or are shared. `t = 0` writes nothing.
    ///
    /// On error nothing changes: [`len`](KvCache::len) and the filled entries are as
    /// before.
    ///
    /// # Errors
    /// `Error::Shape` when either new array is not `[B, H_kv, t, D]` of the cache's `B`,
    /// `H_kv` and feature sizes, or the two differ in `t` (the messages name the shapes);
    /// `Error::Device` when either lives on another device than the cache;
    /// `Error::OutOfMemory` when a growth cannot be had; device errors.
    pub fn append(&mut self, k_new: &Array, v_new: &Array) -> Result<(Array, Array)> {
        let t = self.check_new(k_new, v_new)?;
        if t > 0 {
            let len = self.len.checked_add(t).ok_or_else(|| {
                Error::Shape(format!("{OP} {} + {t} positions overflow usize", self.len))
            })?;
            if len > self.capacity() {
                self.grow(len)?;
            } else if !self.keys.can_update_in_place() || !self.values.can_update_in_place() {
                // A view is alive: move the filled part rather than copy every position.
                self.reallocate(self.capacity())?;
            }
            let (b, h) = (bound(self.batch())?, bound(self.kv_heads())?);
            let (start, stop) = (bound(self.len)?, bound(len)?);
            let (dk, dv) = (bound(self.key_dim())?, bound(self.value_dim())?);
            let steps = [1; 4];
            self.keys
                .slice_update(k_new, &[0, 0, start, 0], &[b, h, stop, dk], &steps)?;
            self.values
                .slice_update(v_new, &[0, 0, start, 0], &[b, h, stop, dv], &steps)?;
            self.len = len;
        }
        Ok((self.keys(), self.values()))
    }

    /// Makes room for at least `additional` more positions without further growth (at
    /// least doubling the capacity when it grows, as an append does).
    ///
    /// # Errors
    /// `Error::Shape` when the length overflows; as [`append`](KvCache::append) for the
    /// memory.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let need = self.len.checked_add(additional).ok_or_else(|| {
            Error::Shape(format!(
                "{OP} {} + {additional} positions overflow usize",
                self.len
            ))
        })?;
        if need > self.capacity() {
            self.grow(need)?;
        }
        Ok(())
    }

    /// Empties the cache (its length becomes 0); the buffers and their capacity stay.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops the last `n` filled positions (all of them when `n >= len`) and returns how
    /// many were dropped, as MLX-LM's `trim`; later appends overwrite them. The capacity
    /// stays.
    pub fn trim(&mut self, n: usize) -> usize {
        let dropped = n.min(self.len);
        self.len -= dropped;
        dropped
    }

    /// Checks the new entries against the cache; returns their length `t`.
    fn check_new(&self, k_new: &Array, v_new: &Array) -> Result<usize> {
        let device = self.device();
        for (name, a) in [("keys", k_new), ("values", v_new)] {
            if a.device() != device {
                return Err(Error::Device(format!(
                    "{OP} the cache is on {device} but the new {name} are on {}; move them \
                     with to_device first.",
                    a.device()
                )));
            }
        }
        let (b, h) = (self.batch(), self.kv_heads());
        let fits = |a: &Array, d: usize| {
            let s = a.shape();
            s.len() == 4 && s[0] == b && s[1] == h && s[3] == d
        };
        for (name, a, d) in [
            ("keys", k_new, self.key_dim()),
            ("values", v_new, self.value_dim()),
        ] {
            if !fits(a, d) {
                return Err(Error::Shape(format!(
                    "{OP} new {name} of shape {} do not match the cache: expected \
                     [B, H_kv, T, D] = ({b},{h},T,{d}).",
                    fmt_shape(a.shape())
                )));
            }
        }
        let (tk, tv) = (k_new.shape()[2], v_new.shape()[2]);
        if tk != tv {
            return Err(Error::Shape(format!(
                "{OP} new keys of shape {} and new values of shape {} differ in the number of \
                 positions T (axis 2 of [B, H_kv, T, D]).",
                fmt_shape(k_new.shape()),
                fmt_shape(v_new.shape())
            )));
        }
        Ok(tk)
    }

    /// Grows to at least `need` positions: twice the capacity when that is more and can be
    /// had, else exactly `need`.
    fn grow(&mut self, need: usize) -> Result<()> {
        let doubled = self.capacity().saturating_mul(2).max(need);
        match self.reallocate(doubled) {
            Err(Error::OutOfMemory(_) | Error::Shape(_)) if doubled > need => self.reallocate(need),
            other => other,
        }
    }

    /// Moves the filled part into new buffers of `capacity` positions (at least `len`),
    /// made where the current ones live. On error the cache is unchanged.
    fn reallocate(&mut self, capacity: usize) -> Result<()> {
        let fresh = |old: &Array| -> Result<Array> {
            let s = old.shape();
            let shape = [s[0], s[1], capacity, s[3]];
            match old.stream() {
                Some(stream) => Array::uninit_on(&stream, &shape, old.dtype()),
                None => Array::uninit(&shape, old.dtype(), &Device::Cpu),
            }
        };
        let mut keys = fresh(&self.keys)?;
        let mut values = fresh(&self.values)?;
        if self.len > 0 {
            let (b, h) = (bound(self.batch())?, bound(self.kv_heads())?);
            let len = bound(self.len)?;
            let (dk, dv) = (bound(self.key_dim())?, bound(self.value_dim())?);
            let steps = [1; 4];
            keys.slice_update(&self.keys(), &[0; 4], &[b, h, len, dk], &steps)?;
            values.slice_update(&self.values(), &[0; 4], &[b, h, len, dv], &steps)?;
        }
        self.keys = keys;
        self.values = values;
        Ok(())
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    if dtype.is_floating() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{OP} keys and values must be of a floating type, got {dtype}."
        )))
    }
}
