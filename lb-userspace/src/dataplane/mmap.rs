//! The values of a BPF array map mapped into the agent's memory: the Maglev
//! slots are written as plain stores instead of one `bpf()` syscall each
//! (issue 11: 20 M slots for 10 000 dual-protocol Services took ~6 s of
//! syscalls; as stores they take milliseconds).
//!
//! The kernel allows this for arrays created with `BPF_F_MMAPABLE`
//! (Linux 5.5). The mapping shows the array's value area as the datapath
//! sees it: element `i` at byte `i * round_up(value_size, 8)` (the array's
//! element stride), so a `u32` slot is the first half of an 8-byte cell.
//! aya 0.14 has no mmap of maps, hence this small unsafe module.
//!
//! Each slot is read and written as one aligned `AtomicU32`: the datapath
//! reads a slot with one 32-bit load, so it sees the old or the new backend
//! id, never a mix. Whoever publishes slots through another map (the
//! reconciler, with the service entry) must order the stores before that
//! write: [`MappedU32Array::publish`].

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering, fence},
};

/// A `u32`-valued BPF array, mapped shared and writable.
pub struct MappedU32Array {
    base: NonNull<u8>,
    /// Bytes mapped: entries × stride.
    bytes: usize,
    entries: u32,
    /// Bytes from one element to the next.
    stride: usize,
}

// SAFETY: the mapping is owned by this value (unmapped on drop) and only
// accessed through atomics, which any thread may do.
unsafe impl Send for MappedU32Array {}
// SAFETY: as above; every access is an atomic load or store.
unsafe impl Sync for MappedU32Array {}

impl MappedU32Array {
    /// Maps the array map `fd` of `entries` elements of `value_size` bytes
    /// (4: one `u32`). Fails when the map was created without
    /// `BPF_F_MMAPABLE` (`EINVAL` from the kernel) or is not writable.
    pub fn map(fd: BorrowedFd<'_>, entries: u32, value_size: u32) -> io::Result<Self> {
        if value_size != 4 || entries == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a u32 array ({entries} entries of {value_size} bytes)"),
            ));
        }
        let stride = (value_size as usize).next_multiple_of(8);
        let bytes = (entries as usize)
            .checked_mul(stride)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "array too large"))?;
        // SAFETY: a fresh shared mapping of the map's value area; the kernel
        // checks the length against the array's size and the map's flags.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self {
            base,
            bytes,
            entries,
            stride,
        })
    }

    pub fn len(&self) -> u32 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn cell(&self, index: u32) -> Option<&AtomicU32> {
        if index >= self.entries {
            return None;
        }
        // SAFETY: index < entries, so the 4 bytes at index * stride lie in
        // the mapping; the mapping is page-aligned and the stride a multiple
        // of 8, so they are aligned for an AtomicU32; the mapping lives as
        // long as `self`.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(index as usize * self.stride)
                .cast::<AtomicU32>()
        })
    }

    /// Element `index`; `None` beyond the array.
    pub fn load(&self, index: u32) -> Option<u32> {
        self.cell(index).map(|c| c.load(Ordering::Relaxed))
    }

    /// Writes element `index`; `false` (and nothing written) beyond the
    /// array.
    pub fn store(&self, index: u32, value: u32) -> bool {
        match self.cell(index) {
            Some(c) => {
                c.store(value, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Orders every store before whatever this thread writes next, such
    /// as the map entry (a `bpf()` syscall) that makes the slots reachable.
    /// The kernel publishes that entry with release semantics, so a reader
    /// that finds it also finds the slots.
    pub fn publish(&self) {
        fence(Ordering::Release);
    }
}

impl Drop for MappedU32Array {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}
