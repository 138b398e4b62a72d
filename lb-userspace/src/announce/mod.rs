//! Announcing Service addresses to the network (issue 12). L2: one node per
//! address answers ARP/NDP for it in XDP (`lb-ebpf/src/announce.rs`);
//! which node is decided by every agent alike (`election`), and the node's
//! side is kept by `l2`.

pub mod election;
pub mod l2;
