//! Telling the network where Service addresses are (issues 12 and 13).
//! L2: one node per address answers ARP/NDP for it in XDP
//! (`lb-ebpf/src/announce.rs`); which node is decided by every agent alike
//! (`election`), and the node's side is kept by `l2`. BGP: sessions to the
//! routers (`bgp`).

pub mod bgp;
pub mod election;
pub mod l2;
