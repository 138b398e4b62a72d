//! Checksum arithmetic as the datapath does it, bit for bit: the XDP path's
//! one-shot RFC 1624 (eqn. 3) update (`lb-ebpf/src/checksum.rs`), and the
//! kernel's `bpf_l3_csum_replace` / `bpf_l4_csum_replace` that the tc path
//! calls once per field. Both act on 16-bit words as loaded from memory
//! (native byte order), so the model loads them the same way. The two agree
//! with a full recompute except, at most, in which of the one's complement
//! zeros (0x0000, 0xffff) they leave; the model predicts the exact one.

/// The XDP path's accumulated delta: `HC' = ~(~HC + sum(~m + m'))`.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    pub fn dword(&mut self, old: u32, new: u32) {
        self.word(old as u16, new as u16);
        self.word((old >> 16) as u16, (new >> 16) as u16);
    }

    /// The accumulated change folded to 16 bits: a field holding this value
    /// becomes 0 when the delta is applied (the one's complement zero edge
    /// the generator aims at).
    pub fn folded(&self) -> u16 {
        let mut sum = self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    pub fn apply(&self, check: u16) -> u16 {
        let mut sum = (!check) as u32 + self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// The kernel's `csum_add` (32-bit, end-around carry).
fn csum_add(csum: u32, addend: u32) -> u32 {
    let res = csum.wrapping_add(addend);
    res.wrapping_add((res < addend) as u32)
}

fn csum_sub(csum: u32, addend: u32) -> u32 {
    csum_add(csum, !addend)
}

/// The kernel's `csum_fold`.
fn csum_fold(csum: u32) -> u16 {
    let mut sum = (csum & 0xffff) + (csum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The kernel's `csum_replace4` (what both helpers do on an skb whose
/// checksum is not offloaded, as in a test run). A 2-byte field goes through
/// it zero-extended (`inet_proto_csum_replace2`).
pub fn csum_replace4(sum: u16, from: u32, to: u32) -> u16 {
    csum_fold(csum_add(csum_sub(!(sum as u32), from), to))
}

/// `bpf_l4_csum_replace` on such an skb; `mangled_zero` is
/// `BPF_F_MARK_MANGLED_0` (UDP: a 0 field stays 0, a computed 0 is 0xffff).
pub fn l4_csum_replace(sum: u16, from: u32, to: u32, mangled_zero: bool) -> u16 {
    if mangled_zero && sum == 0 {
        return 0;
    }
    let new = csum_replace4(sum, from, to);
    if mangled_zero && new == 0 {
        0xffff
    } else {
        new
    }
}

/// A 16-bit word of `frame` at `offset` as a program loads it.
pub fn word_at(frame: &[u8], offset: usize) -> u16 {
    u16::from_ne_bytes([frame[offset], frame[offset + 1]])
}

/// A 32-bit word of `frame` at `offset` as a program loads it.
pub fn dword_at(frame: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(frame[offset..offset + 4].try_into().expect("4 bytes"))
}

pub fn put_word(frame: &mut [u8], offset: usize, value: u16) {
    frame[offset..offset + 2].copy_from_slice(&value.to_ne_bytes());
}

pub fn put_dword(frame: &mut [u8], offset: usize, value: u32) {
    frame[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum;

    /// Both update styles agree with a full recompute on a valid header.
    #[test]
    fn incremental_updates_match_a_recompute() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let mut header: Vec<u8> = (0..20).map(|_| rng.u8(..)).collect();
            header[10] = 0;
            header[11] = 0;
            let c = checksum(&header);
            put_word(&mut header, 10, u16::from_ne_bytes(c.to_be_bytes()));
            let (old, new) = (dword_at(&header, 12), rng.u32(..));
            let mut delta = Delta::default();
            delta.dword(old, new);
            let xdp = delta.apply(word_at(&header, 10));
            let kernel = csum_replace4(word_at(&header, 10), old, new);
            put_dword(&mut header, 12, new);
            for c in [xdp, kernel] {
                put_word(&mut header, 10, c);
                assert_eq!(checksum(&header), 0);
            }
        }
    }
}
