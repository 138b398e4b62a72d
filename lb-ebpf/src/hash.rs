//! The flow hash: the Maglev slot and the first SNAT port come from it.

use lb_common::FlowKey;

use crate::packet::v4_raw;

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
    mix(v4_raw(&key.src_addr) ^ mix(v4_raw(&key.dst_addr) ^ mix(ports ^ mix(key.proto as u32))))
}
