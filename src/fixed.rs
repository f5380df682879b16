//! Registered fixed buffers: a pool of equal-sized buffers the kernel knows
//! (`IORING_REGISTER_BUFFERS`, Linux 5.1), leased, filled, frozen into
//! `Bytes` that can be sent to any number of connections without a copy.
//!
//! A buffer returns to the pool only when its last `Bytes` is dropped. The
//! engine holds a clone of every `Bytes` a write uses until that write's
//! completion and, for zero-copy sends, its notification: so a buffer is
//! never leased again while the kernel may still read it.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

/// A pool of `count` buffers of `size` bytes each.
///
/// `Clone` (one more reference to the same pool) and `Send + Sync`: lease
/// from any thread. Several engines may register the same pool
/// ([`MoverBuilder::fixed_pool`](crate::MoverBuilder::fixed_pool)); each
/// keeps it alive while its ring exists, and a buffer's memory lives as
/// long as the pool, its lease or any `Bytes` frozen from it.
#[derive(Clone)]
pub struct FixedBufPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    size: usize,
    count: usize,
    /// Buffers not leased. A leased buffer's `Vec` lives in its lease or
    /// its frozen owner; its heap memory never moves (capacity is fixed).
    free: Mutex<Vec<(u16, Vec<u8>)>>,
    /// `(start address, index)` of every buffer, sorted by address.
    bases: Vec<(usize, u16)>,
}

// Hand-written: the derived form would print every buffer's bytes.
impl std::fmt::Debug for FixedBufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBufPool")
            .field("count", &self.inner.count)
            .field("buf_size", &self.inner.size)
            .field("available", &self.available())
            .finish()
    }
}

impl FixedBufPool {
    /// Allocates `count` buffers of `size` bytes (at most 65536 buffers,
    /// each at most 1 GiB, as the kernel allows).
    pub fn new(count: usize, size: usize) -> io::Result<FixedBufPool> {
        if count == 0 || count > 1 << 16 || size == 0 || size > 1 << 30 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fixed buffers: {count} x {size} bytes; need 1..=65536 buffers of 1 byte..=1 GiB"
                ),
            ));
        }
        let mut free = Vec::with_capacity(count);
        let mut bases = Vec::with_capacity(count);
        for i in 0..count {
            let buf = vec![0u8; size];
            let index = i as u16;
            bases.push((buf.as_ptr() as usize, index));
            free.push((index, buf));
        }
        bases.sort_unstable();
        // Lease in index order (pop from the back).
        free.reverse();
        Ok(FixedBufPool {
            inner: Arc::new(PoolInner {
                size,
                count,
                free: Mutex::new(free),
                bases,
            }),
        })
    }

    fn free(&self) -> MutexGuard<'_, Vec<(u16, Vec<u8>)>> {
        // A panic while holding the lock cannot leave the list inconsistent
        // (push/pop only): recover from poisoning.
        self.inner.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leases a buffer. `WouldBlock` when every buffer is in use: wait for
    /// completions (which release sent buffers) and try again.
    pub fn lease(&self) -> io::Result<FixedBufMut> {
        match self.free().pop() {
            Some((index, mut buf)) => {
                buf.clear();
                Ok(FixedBufMut {
                    pool: Arc::clone(&self.inner),
                    index,
                    buf: Some(buf),
                })
            }
            None => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "all {} fixed buffers are in use: wait for completions",
                    self.inner.count
                ),
            )),
        }
    }

    /// Buffers not leased and not held by any `Bytes`.
    pub fn available(&self) -> usize {
        self.free().len()
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.inner.size
    }

    /// `(address, length)` of every buffer by index, for registration.
    #[cfg(target_os = "linux")]
    pub(crate) fn regions(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(u16, usize)> = self.inner.bases.iter().map(|&(a, i)| (i, a)).collect();
        v.sort_unstable();
        v.into_iter().map(|(_, a)| (a, self.inner.size)).collect()
    }

    /// Whether `s` lies wholly inside one of the pool's buffers (registered
    /// memory: never copied into glued buffers).
    pub(crate) fn holds(&self, s: &[u8]) -> bool {
        self.index_of(s.as_ptr(), s.len()).is_some()
    }

    /// The index of the buffer that wholly contains `ptr..ptr+len`, if any.
    pub(crate) fn index_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let p = ptr as usize;
        let bases = &self.inner.bases;
        let at = bases.partition_point(|&(a, _)| a <= p).checked_sub(1)?;
        let (base, index) = bases[at];
        (p + len <= base + self.inner.size).then_some(index)
    }
}

/// A leased buffer being filled. Freeze it to send it.
pub struct FixedBufMut {
    pool: Arc<PoolInner>,
    index: u16,
    /// Always `Some` until frozen or dropped.
    buf: Option<Vec<u8>>,
}

impl std::fmt::Debug for FixedBufMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBufMut")
            .field("index", &self.index)
            .field("len", &self.len())
            .field("capacity", &self.pool.size)
            .finish()
    }
}

impl FixedBufMut {
    fn vec(&mut self) -> &mut Vec<u8> {
        self.buf.get_or_insert_with(Vec::new)
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, Vec::len)
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.pool.size
    }

    /// The pool index (`buf_index` in the SQE).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Appends `data`; an error if it does not fit (the buffer never grows:
    /// its memory is what the kernel registered).
    pub fn extend_from_slice(&mut self, data: &[u8]) -> io::Result<()> {
        let cap = self.pool.size;
        let v = self.vec();
        if v.len() + data.len() > cap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} more bytes do not fit: fixed buffer holds {} of {cap}",
                    data.len(),
                    v.len()
                ),
            ));
        }
        v.extend_from_slice(data);
        Ok(())
    }

    /// Fills the buffer to `len` bytes with `byte` (a convenience for tests
    /// and generated payloads); `len` is capped at the capacity.
    pub fn fill(&mut self, byte: u8, len: usize) {
        let cap = self.pool.size;
        let v = self.vec();
        v.clear();
        v.resize(len.min(cap), byte);
    }

    /// The written bytes, for in-place filling.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.vec().as_mut_slice()
    }

    /// Makes the buffer an immutable, cheaply clonable `Bytes`. Clones and
    /// slices of it stay in registered memory; the buffer returns to the pool
    /// when the last one is dropped.
    pub fn freeze(mut self) -> Bytes {
        let buf = self.buf.take().unwrap_or_default();
        Bytes::from_owner(Frozen {
            pool: Arc::clone(&self.pool),
            index: self.index,
            buf: Some(buf),
        })
    }
}

impl Drop for FixedBufMut {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(&self.pool, self.index, buf);
        }
    }
}

/// The owner behind a frozen buffer's `Bytes`.
struct Frozen {
    pool: Arc<PoolInner>,
    index: u16,
    buf: Option<Vec<u8>>,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(&self.pool, self.index, buf);
        }
    }
}

fn give_back(pool: &PoolInner, index: u16, buf: Vec<u8>) {
    pool.free
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((index, buf));
}
