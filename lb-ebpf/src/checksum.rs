//! Incremental Internet checksum update (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`), accumulated over every 16-bit word a rewrite
//! changes. Words are taken in whatever byte order they are loaded in: the
//! one's complement sum is byte-order independent as long as the checksum
//! field is loaded and stored the same way.

pub struct CsumDelta(u32);

impl CsumDelta {
    #[inline(always)]
    pub fn new() -> Self {
        Self(0)
    }

    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    #[inline(always)]
    pub fn dword(&mut self, old: u32, new: u32) {
        self.word(old as u16, new as u16);
        self.word((old >> 16) as u16, (new >> 16) as u16);
    }

    /// The accumulated difference as a 32-bit one's complement sum (what
    /// `bpf_l4_csum_replace` takes with size 0).
    #[inline(always)]
    pub fn sum(&self) -> u32 {
        self.0
    }

    /// Applies the delta to a checksum field value.
    #[inline(always)]
    pub fn apply(&self, check: u16) -> u16 {
        let mut sum = (!check) as u32 + self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}
