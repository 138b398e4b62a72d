//! Zeroing and copying by explicit stores. LLVM's BPF backend lowers a zero
//! fill or a copy of more than a few bytes to a call to compiler_builtins'
//! `memset`/`memcpy`: a BPF subprogram that loops byte by byte (a 64-byte
//! fill is about 200 instructions). On the per-packet paths that cost more
//! than everything else the packet needs; volatile stores are emitted as
//! they are written.

use core::{
    mem::{MaybeUninit, align_of, size_of},
    ptr::{read_volatile, write_volatile},
};

/// Zeroes `value` with 4-byte stores.
#[inline(always)]
pub fn zero<T>(value: &mut T) {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let words = value as *mut T as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: in bounds (size checked above), aligned (align checked).
        unsafe { write_volatile(words.add(i), 0) };
    }
}

/// Zeroes an uninitialised slot (a stack variable) and hands it out.
#[inline(always)]
pub fn zeroed<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let words = slot.as_mut_ptr() as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: in bounds and aligned, as in `zero`.
        unsafe { write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte is written, and all-zero is a valid `T` for the
    // C structures this is used on.
    unsafe { slot.assume_init_mut() }
}

/// Copies `src` into `dst` with 4-byte loads and stores.
#[inline(always)]
pub fn copy<T: Copy>(dst: &mut T, src: &T) {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let to = dst as *mut T as *mut u32;
    let from = src as *const T as *const u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: both in bounds and aligned, as in `zero`.
        unsafe { write_volatile(to.add(i), read_volatile(from.add(i))) };
    }
}

/// Copies a byte array (a MAC address in a packet, where no alignment is
/// known) byte by byte, without a call.
#[inline(always)]
pub fn copy_bytes<const N: usize>(dst: &mut [u8; N], src: &[u8; N]) {
    for (i, byte) in src.iter().enumerate() {
        // SAFETY: `i < N`.
        unsafe { write_volatile(dst.as_mut_ptr().add(i), *byte) };
    }
}

/// A 16-byte address (in a packet, a key or a map value) as the four
/// network-order words checksums and route lookups take. Word loads: the
/// BPF backend splits a load it may not assume aligned into four byte
/// loads (and their spills), while BPF itself allows the unaligned word
/// loads the IPv4 path has always made (its headers sit at offset 14).
#[inline(always)]
pub fn addr_words(addr: &[u8; 16]) -> [u32; 4] {
    let from = addr.as_ptr() as *const u32;
    // SAFETY: four in-bounds words.
    unsafe {
        [
            read_volatile(from),
            read_volatile(from.add(1)),
            read_volatile(from.add(2)),
            read_volatile(from.add(3)),
        ]
    }
}

/// Writes a 16-byte address as four word stores (a plain array assignment
/// may become a bytewise `memcpy`).
#[inline(always)]
pub fn store_addr(dst: &mut [u8; 16], words: [u32; 4]) {
    let to = dst.as_mut_ptr() as *mut u32;
    for (i, word) in words.iter().enumerate() {
        // SAFETY: `i < 4`, in bounds; word stores as in `addr_words`.
        unsafe { write_volatile(to.add(i), *word) };
    }
}
