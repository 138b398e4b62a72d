//! Every map of the datapath, declared once. Sizes here are defaults; the
//! agent sets the real ones (`--max-services`, `--max-flows`) before loading.
//! All maps are pinned by name, so a restarted agent adopts them and the
//! flows they hold.

use crate::fragments::{Fragment, FragmentKey};
use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_sock_tuple},
    macros::map,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
    },
};
use lb_common::{
    Affinity, AffinityKey, Backend, ClusterNetwork, Config, Flow, FlowKey, FrontendKey,
    GlobalStats, L2Answer, L2Key, L2Liveness, L2Stats, LocalBackendKey, MAGLEV_MAP_FLAGS,
    MAGLEV_TABLE_SIZE, Service, ServiceStats, SourceRange,
};

/// Frontend → service. Written by the agent (reconciler); read by XDP for
/// packets without a flow entry.
#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<FrontendKey, Service> = HashMap::pinned(4096, 0);

/// Backend id → backend. Written by the agent; read by XDP when a new flow
/// picks its backend.
#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(65536, 0);

/// `table_id * MAGLEV_TABLE_SIZE + slot` → backend id. Written by the agent
/// (slot by slot in place, through an mmap of the array: hence
/// `MAGLEV_MAP_FLAGS`, `BPF_F_MMAPABLE`); read by XDP for new flows.
#[map(name = "XLB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned((4096 + 256) * MAGLEV_TABLE_SIZE, MAGLEV_MAP_FLAGS);

/// Connection tracking, both directions of every flow. Written by XDP (new
/// flows, last-seen, closing flag); read by XDP and TC egress; expired entries
/// deleted by the agent's sweeper.
#[map(name = "XLB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(262144, 0);

/// Who holds each SNAT port: the reply key a SNAT'd flow claimed (backend →
/// node:port) → the forward key of that flow. The LRU flow table may evict
/// one entry of a pair; a port is free only when neither its reply entry
/// nor a live forward entry that rewrites to it exists, and only this map
/// (never evicted) can say which forward entry that is (audit A-6). Written
/// by XDP/TC when a port is claimed; stale owners (forward gone or moved
/// on) are taken over by the next claim or deleted by the agent's sweeper.
#[map(name = "XLB_SNAT_OWNERS")]
pub static SNAT_OWNERS: HashMap<FlowKey, FlowKey> = HashMap::pinned(131072, 0);

/// `sessionAffinity: ClientIP` pins. Written and read by XDP.
#[map(name = "XLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(65536, 0);

/// `loadBalancerSourceRanges`. Written by the agent; read by XDP for new flows
/// of services with `SERVICE_F_SOURCE_RANGES`.
#[map(name = "XLB_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32> = LpmTrie::pinned(16384, 0);

/// Node-local backends (address, port, protocol) of LB Services, and
/// those that were until the agent retired them. Written by the agent; read
/// by tc egress for packets with no reply entry (`leak.rs`).
#[map(name = "XLB_LOCAL_BACKS")]
pub static LOCAL_BACKENDS: HashMap<LocalBackendKey, u32> = HashMap::pinned(65536, 0);

/// The cluster's own networks (pod CIDRs, node addresses,
/// `--cluster-cidr`). Written by the agent; read by tc egress with
/// `LOCAL_BACKENDS` (`leak.rs`).
#[map(name = "XLB_CLUSTER_NET")]
pub static CLUSTER_NETWORKS: LpmTrie<ClusterNetwork, u32> = LpmTrie::pinned(4096, 0);

/// Per-service counters. Written by XDP and TC; read by `xlb inspect stats`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(4096, 0);

/// Node-wide counters.
#[map(name = "XLB_GLOBAL")]
pub static GLOBAL_STATS: PerCpuArray<GlobalStats> = PerCpuArray::pinned(1, 0);

/// Node configuration (SNAT address and ports, flags). Written by the agent.
#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// What a new flow builds before it is inserted: per-CPU room for the two
/// entries and a key, so the new-flow path does not need them on the 512-byte
/// BPF stack (the hook's frame and the call chain share that limit). Each
/// packet overwrites it; nothing in it outlives the packet, so it is neither
/// pinned nor adopted.
#[repr(C)]
pub struct NewFlowScratch {
    pub forward: Flow,
    pub reply: Flow,
    /// The new flow's reply key (the SNAT probes rewrite its port).
    pub reply_key: FlowKey,
    /// Another flow's key, looked at when the reply key is taken.
    pub other_key: FlowKey,
    /// The socket tuple the SNAT probes look up.
    pub tuple: bpf_sock_tuple,
    /// The source-range lookup key.
    pub range: Key<SourceRange>,
    /// The affinity pin's key.
    pub affinity_key: AffinityKey,
    /// The chosen backend.
    pub backend: Backend,
}

#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<NewFlowScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for the route lookup of a translated packet (parameters and
/// result, 64 bytes): on the stack it would not fit next to the new-flow
/// call chain. Like `XLB_SCRATCH`, it lives for one packet.
#[map(name = "XLB_ROUTE")]
pub static ROUTE: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room the IPv6 parser passes an offset through, so the verifier
/// forgets where it came from (`packet::opaque_offset`). Lives for one
/// packet; neither pinned nor adopted.
#[map(name = "XLB_OFFSET")]
pub static OFFSET: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// IPv4 datagrams whose first fragment was translated → what their later
/// fragments become (`fragments.rs`). A record matters for the moments a
/// datagram's fragments take to pass, so the map is neither pinned nor
/// adopted: a restarted agent loses only datagrams in flight.
#[map(name = "XLB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, Fragment> = LruHashMap::with_max_entries(16384, 0);

/// Interfaces translated packets may be redirected to (ifindex → ifindex):
/// only devices known to accept XDP frames. Written by the agent.
#[map(name = "XLB_TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(64, 0);

/// Addresses this node announces (`announce.rs`): (ifindex, address) →
/// the MAC to answer with. Written by the agent for the addresses it won
/// the election for; read by XDP for ARP requests and neighbour
/// solicitations.
#[map(name = "XLB_L2_ADDRS")]
pub static L2_ADDRESSES: HashMap<L2Key, L2Answer> = HashMap::pinned(8192, 0);

/// The agent's liveness for the responder: `L2_ADDRESSES` is answered only
/// while it is fresh. Written by the agent every fraction of its window;
/// read by XDP.
#[map(name = "XLB_L2_LIVE")]
pub static L2_LIVENESS: Array<L2Liveness> = Array::pinned(1, 0);

/// ARP/NDP responder counters per ifindex. Entries created by the agent
/// (one per uplink), incremented by XDP.
#[map(name = "XLB_L2_STATS")]
pub static L2_STATS: PerCpuHashMap<u32, L2Stats> = PerCpuHashMap::pinned(64, 0);
