//! Replies whose flow is gone (audit A-10 part 3). A node-local backend
//! that keeps sending on a flow xlb no longer has (swept, ended with its
//! Service, both entries evicted) reaches the uplink untranslated, with the
//! pod's address as source: the address leaks and the client gets a
//! packet it cannot match. kube-proxy drops conntrack-INVALID packets for
//! the same reason.
//!
//! The same pod port may serve other peers directly by pod address
//! (ClusterIP replies to pods on other nodes, hostNetwork peers), so only
//! destinations outside the cluster's networks count. Pod traffic to the
//! outside is masqueraded by the CNI before tc egress (netfilter's
//! POSTROUTING runs first), so what is left there with a backend's source
//! is a leak. Clusters that route pod addresses to the outside turn the
//! check off (`--allow-pod-source-egress`).

use core::mem::MaybeUninit;

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    CLUSTER_NETWORK_FAMILY_BITS, CONFIG_F_POD_SOURCE_GUARD, CONFIG_KEY, ClusterNetwork, FlowKey,
    LocalBackendKey,
};

use crate::{
    maps::{CLUSTER_NETWORKS, CONFIG, LOCAL_BACKENDS},
    stats::global,
    words,
};

/// The trie's key, aligned for the word stores that zero it.
#[repr(C, align(4))]
struct NetworkLookup(Key<ClusterNetwork>);

/// Is this packet without a reply entry (TCP or UDP, `key` as parsed) a
/// reply of a node-local backend whose flow is gone? Counted when it is;
/// the caller drops it.
// Not inlined: its keys get a frame of their own, away from the hook's.
#[inline(never)]
pub fn reply_without_flow(key: &FlowKey) -> bool {
    let on = CONFIG
        .get(CONFIG_KEY)
        .is_some_and(|c| c.flags & CONFIG_F_POD_SOURCE_GUARD != 0);
    if !on {
        return false;
    }
    // Field by field: a whole-struct write would zero-fill bytewise.
    let backend = LocalBackendKey {
        addr: key.src_addr,
        port: key.src_port,
        proto: key.proto,
        family: key.family,
    };
    if unsafe { LOCAL_BACKENDS.get(backend) }.is_none() {
        return false;
    }
    // The trie key is packed: zeroed by words (a literal's `_pad` would be
    // a bytewise memset), then written field by field.
    let mut room = MaybeUninit::<NetworkLookup>::uninit();
    let network = &mut words::zeroed(&mut room).0;
    network.prefix_len = CLUSTER_NETWORK_FAMILY_BITS + 128;
    network.data.family = key.family;
    network.data.addr = key.dst_addr;
    if CLUSTER_NETWORKS.get(network).is_some() {
        return false;
    }
    if let Some(g) = global() {
        g.reply_leaks_dropped += 1;
    }
    true
}
