//! The flow hash: the Maglev slot and the first SNAT port come from it.

use lb_common::FlowKey;

use crate::words::addr_words;

/// A 16-byte address folded to 32 bits; an IPv4 address (zero tail) folds
/// to itself, so IPv4 flows hash as they always have.
#[inline(always)]
fn fold(addr: &[u8; 16]) -> u32 {
    let w = addr_words(addr);
    w[0] ^ w[1] ^ w[2] ^ w[3]
}

/// murmur3's 32-bit finaliser: cheap and mixes every input bit.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the 5-tuple; the Maglev slot and the first SNAT port come from it.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = ((key.src_port.wire() as u32) << 16) | key.dst_port.wire() as u32;
    mix(fold(&key.src_addr) ^ mix(fold(&key.dst_addr) ^ mix(ports ^ mix(key.proto as u32))))
}
