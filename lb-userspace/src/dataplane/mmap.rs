//! The values of a BPF array map mapped into the agent's memory: the Maglev
//! slots are written as plain stores instead of one `bpf()` syscall each
//! (issue 11: 20 M slots for 10 000 dual-protocol Services took ~6 s of
//! syscalls; as stores they take milliseconds).
//!
//! The kernel allows this for arrays created with `BPF_F_MMAPABLE`
//! (Linux 5.5). The mapping shows the array's value area as the datapath
//! sees it: element `i` at byte `i * round_up(value_size, 8)` (the array's
//! element stride), so a `u32` slot is the first half of an 8-byte cell.
//! aya 0.14 has no mmap of maps; `memmap2` makes and unmaps the mapping,
//! and this module adds what is the map's own: the element stride, the
//! window and atomic cells.
//!
//! Only a window of [`WINDOW_BYTES`] is mapped at a time, moved (unmapped
//! and mapped again at another offset) when an index falls outside it. The
//! kernel maps every page of an array mapping at `mmap` time
//! (`remap_vmalloc_range`), so a mapping of the whole array would count all
//! of it (268 MB at `--max-services 32768`) in the agent's resident size,
//! though that memory is the kernel's and was there before. Writes come a
//! table at a time and tables are contiguous, so the window moves about
//! once per 32 tables during a full programming.
//!
//! Each slot is read and written as one aligned `AtomicU32`: the datapath
//! reads a slot with one 32-bit load, so it sees the old or the new backend
//! id, never a mix. Whoever publishes slots through another map (the
//! reconciler, with the service entry) must order the stores before that
//! write: [`MappedU32Array::publish`].

use std::{
    io,
    os::fd::{BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering, fence},
};

use memmap2::{MmapOptions, MmapRaw};

/// Bytes mapped at once: 64 pages of 4 KiB, 32 Maglev tables (a multiple
/// of every page size Linux uses up to 256 KiB, as an mmap offset must be).
const WINDOW_BYTES: usize = 256 * 1024;

/// A `u32`-valued BPF array, mapped shared and writable a window at a time.
pub struct MappedU32Array {
    fd: OwnedFd,
    entries: u32,
    /// Bytes from one element to the next.
    stride: usize,
    /// What the kernel lets us map: the value area, page-aligned.
    area_bytes: usize,
    window: Option<Window>,
}

/// One shared, writable mapping of part of the value area, starting at
/// byte `offset` of it.
struct Window {
    map: MmapRaw,
    offset: usize,
}

impl MappedU32Array {
    /// The array map `fd` of `entries` elements of `value_size` bytes (4:
    /// one `u32`). Maps a first window to find out whether the kernel lets
    /// us: it refuses (`EINVAL`) a map created without `BPF_F_MMAPABLE`.
    pub fn map(fd: BorrowedFd<'_>, entries: u32, value_size: u32) -> io::Result<Self> {
        if value_size != 4 || entries == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a u32 array ({entries} entries of {value_size} bytes)"),
            ));
        }
        let stride = (value_size as usize).next_multiple_of(8);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        if !WINDOW_BYTES.is_multiple_of(page) {
            return Err(io::Error::other(format!(
                "page size {page} does not divide the mapping window"
            )));
        }
        let area_bytes = (entries as usize)
            .checked_mul(stride)
            .map(|b| b.next_multiple_of(page))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "array too large"))?;
        let mut array = Self {
            fd: fd.try_clone_to_owned()?,
            entries,
            stride,
            area_bytes,
            window: None,
        };
        array.move_window(0)?;
        Ok(array)
    }

    pub fn len(&self) -> u32 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Maps the window that holds byte `at` of the value area.
    fn move_window(&mut self, at: usize) -> io::Result<()> {
        // The old mapping goes first (dropping it unmaps it).
        self.window = None;
        let offset = at / WINDOW_BYTES * WINDOW_BYTES;
        let bytes = WINDOW_BYTES.min(self.area_bytes - offset);
        // The kernel checks offset and length against the array's size.
        let map = MmapOptions::new()
            .offset(offset as u64)
            .len(bytes)
            .map_raw(&self.fd)?;
        self.window = Some(Window { map, offset });
        Ok(())
    }

    /// The cell of element `index`, moving the window to it if need be.
    fn cell(&mut self, index: u32) -> io::Result<&AtomicU32> {
        if index >= self.entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("index {index} beyond the array's {} elements", self.entries),
            ));
        }
        let at = index as usize * self.stride;
        let inside = |w: &Window| at >= w.offset && at + 4 <= w.offset + w.map.len();
        if !self.window.as_ref().is_some_and(inside) {
            self.move_window(at)?;
        }
        let w = self.window.as_ref().expect("a window is mapped");
        // SAFETY: `at` lies in the window (checked or just mapped: the
        // window starts at `at` rounded down to WINDOW_BYTES and a cell
        // never straddles a window, the stride dividing WINDOW_BYTES); the
        // mapping is page-aligned and the stride a multiple of 8, so the
        // cell is aligned for an AtomicU32; it lives until the window
        // moves, which needs `&mut self` again.
        Ok(unsafe { &*w.map.as_mut_ptr().add(at - w.offset).cast::<AtomicU32>() })
    }

    /// Element `index`.
    pub fn load(&mut self, index: u32) -> io::Result<u32> {
        Ok(self.cell(index)?.load(Ordering::Relaxed))
    }

    /// Writes element `index`.
    pub fn store(&mut self, index: u32, value: u32) -> io::Result<()> {
        self.cell(index)?.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Orders every store before whatever this thread writes next, such
    /// as the map entry (a `bpf()` syscall) that makes the slots reachable.
    /// The kernel publishes that entry with release semantics, so a reader
    /// that finds it also finds the slots.
    pub fn publish(&self) {
        fence(Ordering::Release);
    }
}
