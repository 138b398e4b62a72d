//! The contract between the xlb eBPF programs (`lb-ebpf`) and the agent
//! (`lb-userspace`): every map key and value, every flag and every constant
//! both sides must agree on.
//!
//! Rules (see shared/STYLE.md):
//! - every type is `#[repr(C)]` with explicit padding fields, so the layout is
//!   the same for the BPF target and the host, and no padding byte is left
//!   uninitialised in a hash key;
//! - values in network byte order use [`Be16`] / [`Be32`];
//! - addresses are 16 bytes: an IPv4 address occupies the first 4 bytes and
//!   the other 12 are zero (see [`addr_v4`]);
//! - the layout tests at the bottom pin size and alignment of every type.
#![no_std]

/// Slots in one Maglev lookup table. Prime, as Maglev requires; with up to a
/// few dozen backends per service each one owns M/N slots ± 1, and one backend
/// change moves only about 1/N of the slots.
pub const MAGLEV_TABLE_SIZE: u32 = 1021;

/// `BPF_F_MMAPABLE`: the flags of the Maglev array (`XLB_MAGLEV`). The
/// agent maps the array into its memory and writes slots as plain aligned
/// `u32` stores, instead of one `bpf()` syscall per slot (20 M slots for
/// 10 000 dual-protocol Services: ~6 s of syscalls, ~15 ms of stores). The
/// datapath reads it as any array; only the kernel's allocation differs
/// (page-aligned, `vmalloc_user`). Part of the pinned map's shape: a pin
/// without it is migrated (`dataplane::pinned`).
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A 16-bit value stored in network byte order.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Be16(u16);

impl Be16 {
    pub const fn from_host(v: u16) -> Self {
        Self(v.to_be())
    }
    /// Wraps a value read straight from a packet (already big-endian).
    pub const fn from_wire(raw: u16) -> Self {
        Self(raw)
    }
    pub const fn host(self) -> u16 {
        u16::from_be(self.0)
    }
    pub const fn wire(self) -> u16 {
        self.0
    }
}

impl core::fmt::Debug for Be16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.host())
    }
}

/// A 32-bit value stored in network byte order.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Be32(u32);

impl Be32 {
    pub const fn from_host(v: u32) -> Self {
        Self(v.to_be())
    }
    pub const fn from_wire(raw: u32) -> Self {
        Self(raw)
    }
    pub const fn host(self) -> u32 {
        u32::from_be(self.0)
    }
    pub const fn wire(self) -> u32 {
        self.0
    }
}

impl core::fmt::Debug for Be32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.host())
    }
}

/// An IPv4 address (octets in network order) in the 16-byte address form.
pub const fn addr_v4(octets: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = octets[0];
    a[1] = octets[1];
    a[2] = octets[2];
    a[3] = octets[3];
    a
}

/// `SERVICES` key: one frontend, the address, port and protocol a client
/// reaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    pub port: Be16,
    pub proto: u8,
    pub family: u8,
}

/// `externalTrafficPolicy: Local`: only node-local backends, never SNAT.
pub const SERVICE_F_LOCAL_ONLY: u32 = 1 << 0;
/// The service has `loadBalancerSourceRanges`: sources must match
/// `SOURCE_RANGES`.
pub const SERVICE_F_SOURCE_RANGES: u32 = 1 << 1;
/// `sessionAffinity: ClientIP`.
pub const SERVICE_F_AFFINITY: u32 = 1 << 2;

/// `SERVICES` value: one frontend (address, port, protocol) of a Kubernetes
/// Service. "Service" here is the datapath's word, as in Cilium's
/// `lb4_service`: a Service with two ports and two addresses is four of
/// these, each with its own `service_id`, backends and Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into `STATS`, key part of `AFFINITY` and `SOURCE_RANGES`. Stable
    /// for the life of the frontend, also across agent restarts.
    pub service_id: u32,
    /// Which Maglev table (`MAGLEV[table_id * MAGLEV_TABLE_SIZE ..]`) new
    /// flows use. The agent writes a fresh table and then switches this
    /// field, so readers never see a half-written table.
    pub table_id: u32,
    /// Number of eligible backends; 0 means new flows are dropped (counted).
    pub backend_count: u32,
    pub flags: u32,
    /// `sessionAffinity` timeout in seconds.
    pub affinity_timeout: u32,
}

/// Backend lives on this node: its replies pass this node anyway, so the
/// client address is kept (no SNAT).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// Endpoint is terminating (used only when no endpoint is ready).
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;

/// `BACKENDS` value, keyed by backend id (u32). Backend ids are never
/// shared between services, so `service_id` lets the datapath check that an
/// affinity entry still points at a backend of its own service, and lets a
/// restarted agent adopt the ids it finds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port: Be16,
    pub family: u8,
    pub flags: u8,
    pub service_id: u32,
}

/// `FLOWS` key: a packet's 5-tuple as seen on the wire, in either direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The entry is the reply direction (backend → client).
pub const FLOW_F_REPLY: u8 = 1 << 0;
/// The forward direction was source-translated to the node address.
pub const FLOW_F_SNAT: u8 = 1 << 1;
/// A TCP FIN or RST was seen: the sweeper uses the short timeout.
pub const FLOW_F_CLOSING: u8 = 1 << 2;
/// Set on the reply entry by the first reply packet: a flow the backend never
/// answered expires sooner (and frees its SNAT port).
pub const FLOW_F_ANSWERED: u8 = 1 << 3;
/// Set on a TCP forward entry by the first client packet that carries an ACK
/// and no SYN: with `FLOW_F_ANSWERED` on the reply entry, the handshake is
/// complete. Until both are set the pair has the short handshake timeout.
pub const FLOW_F_ACKED: u8 = 1 << 4;
/// `FLOW_F_CLOSING` came from a RST on this entry. A RST ends a connection in
/// one packet, so the next packet in the same direction that is not a RST
/// or FIN shows the RST was not the sender's (spoofed, or refused by the
/// peer) and clears both flags: a forged RST cannot shorten a live flow.
pub const FLOW_F_RESET: u8 = 1 << 5;

/// `FLOWS` value: the tuple a matching packet is rewritten to. The forward
/// entry holds the backend address itself, so a flow keeps working after its
/// backend left `BACKENDS` (established flows survive backend changes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_coarse_ns`) of the last packet,
    /// refreshed at most once a second.
    pub last_seen_ns: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: Be16,
    pub dst_port: Be16,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: u8,
    // Padding as a byte and a word, not `[u8; 3]`: the datapath builds
    // entries as struct literals, and LLVM's BPF backend turns a 3-byte
    // zero fill into a call to a bytewise `memset`.
    pub _pad: u8,
    pub _pad2: u16,
}

/// `AFFINITY` key (`sessionAffinity: ClientIP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub family: u8,
    // A byte and a word, as in `Flow`.
    pub _pad: u8,
    pub _pad2: u16,
    pub client: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// `SOURCE_RANGES` (LPM trie) key data; the trie key is
/// `{prefix_len: u32, data: SourceRange}`. `prefix_len` counts the 32 bits of
/// `service_id`, the family and the address prefix, so a lookup only
/// matches ranges of its own service and family (an IPv4 range must never
/// match an IPv6 client whose address starts with the same bytes).
/// `service_id` is big-endian because the trie matches bits from the first
/// byte on. A trie prefix covers `service_id`, `family` and the address
/// bits, never `_pad`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRange {
    pub service_id: Be32,
    pub family: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}

/// Bits of `SourceRange::service_id` and `SourceRange::family` in a trie
/// prefix: a range of `n` address bits has prefix `SOURCE_RANGE_ID_BITS + n`.
pub const SOURCE_RANGE_ID_BITS: u32 = 40;

/// `LOCAL_BACKENDS` key: a node-local backend of a LoadBalancer Service (or
/// one that was, until the agent retires it). A packet leaving an uplink
/// from this address and port with no reply entry is a reply whose flow is
/// gone (swept, ended with its Service, evicted): sent on, it would carry
/// the pod's address to the client (audit A-10 part 3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalBackendKey {
    pub addr: [u8; 16],
    pub port: Be16,
    pub proto: u8,
    pub family: u8,
}

/// `CLUSTER_NETWORKS` (LPM trie) key data; the trie key is
/// `{prefix_len: u32, data: ClusterNetwork}`. The cluster's own networks:
/// pod CIDRs, node addresses, `--cluster-cidr`. A pod's packet to one of
/// them is cluster traffic (a ClusterIP reply to another node's pod, a
/// hostNetwork peer), never a leak. `prefix_len` counts the family byte and
/// the address prefix, so an IPv4 network never matches an IPv6 address;
/// never `_pad`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterNetwork {
    pub family: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}

/// Bits of `ClusterNetwork::family` in a trie prefix: a network of `n`
/// address bits has prefix `CLUSTER_NETWORK_FAMILY_BITS + n`.
pub const CLUSTER_NETWORK_FAMILY_BITS: u32 = 8;

/// Per-service counters (`STATS`, per-CPU array indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    pub drop_source_range: u64,
    pub drop_no_backend: u64,
    pub drop_snat_exhausted: u64,
    /// Packets for the frontend that xlb will not translate (IPv4 fragments,
    /// IP options): dropped, because passing them would reach a frontend
    /// address with no listener.
    pub drop_unsupported: u64,
    /// New flows refused because their reply tuple belongs to another live
    /// flow: the same client ip:port reaching the same backend through a
    /// second frontend without SNAT (node-local backend, `Local` policy).
    pub drop_flow_conflict: u64,
}

impl ServiceStats {
    /// The sum of the per-CPU copies of a service's counters (`STATS` is a
    /// per-CPU array: each CPU counts without contention, readers add up).
    pub fn accumulate<'a>(per_cpu: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut sum = Self::default();
        for s in per_cpu {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.reply_packets += s.reply_packets;
            sum.reply_bytes += s.reply_bytes;
            sum.new_flows += s.new_flows;
            sum.drop_source_range += s.drop_source_range;
            sum.drop_no_backend += s.drop_no_backend;
            sum.drop_snat_exhausted += s.drop_snat_exhausted;
            sum.drop_unsupported += s.drop_unsupported;
            sum.drop_flow_conflict += s.drop_flow_conflict;
        }
        sum
    }
}

/// Index of the single entry in `GLOBAL_STATS`.
pub const GLOBAL_STATS_KEY: u32 = 0;

/// Node-wide counters (`GLOBAL_STATS`, per-CPU array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Packets that were not for a frontend nor a reply of a flow.
    pub passed: u64,
    /// Translated packets sent with `bpf_redirect_map`.
    pub redirected: u64,
    /// Translated packets handed to the kernel (no neighbour yet, local
    /// delivery, egress device not in `TX_PORTS`).
    pub translated_passed: u64,
    /// Truncated or malformed headers.
    pub malformed: u64,
    /// ICMP errors quoting a translated flow, translated and sent on.
    pub icmp_translated: u64,
    /// "Fragmentation needed" sent for translated packets with DF that did
    /// not fit the device they would leave through.
    pub frag_needed_sent: u64,
    /// Packets matching a reply entry that arrived through an interface the
    /// route to their source does not use: passed untranslated.
    pub reply_wrong_interface: u64,
    /// Flow entries put back by their partner after the LRU flow table had
    /// evicted them (one half of a pair gone: the table is too small for
    /// the flows it holds).
    pub flow_halves_restored: u64,
    /// Would-be new flows to a frontend that is one of the node's own
    /// addresses, on a port a socket of the node holds (a host daemon, a
    /// reply to the node's own UDP socket): left to the kernel.
    pub host_socket: u64,
    /// Would-be new flows left to the kernel because the agent's heartbeat
    /// is older than `Config::stale_after_s`.
    pub stale_passed: u64,
    /// Later IPv4 fragments given the addresses their first fragment was
    /// translated to.
    pub fragments_translated: u64,
    /// Packets from a node-local backend's address and port, with no reply
    /// entry, to a destination outside the cluster's networks, dropped at
    /// uplink egress: replies of flows xlb no longer has, which would leave
    /// with the pod's address (`CONFIG_F_POD_SOURCE_GUARD`).
    pub reply_leaks_dropped: u64,
    /// ICMP "time exceeded" / ICMPv6 "time exceeded" sent to clients whose
    /// packet reached a source-translated flow with TTL (hop limit) 1: the
    /// kernel's own would go to the translated source, the node itself.
    pub time_exceeded_sent: u64,
}

impl GlobalStats {
    /// The sum of the per-CPU copies of the node-wide counters.
    pub fn accumulate<'a>(per_cpu: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut sum = Self::default();
        for s in per_cpu {
            sum.passed += s.passed;
            sum.redirected += s.redirected;
            sum.translated_passed += s.translated_passed;
            sum.malformed += s.malformed;
            sum.icmp_translated += s.icmp_translated;
            sum.frag_needed_sent += s.frag_needed_sent;
            sum.reply_wrong_interface += s.reply_wrong_interface;
            sum.flow_halves_restored += s.flow_halves_restored;
            sum.host_socket += s.host_socket;
            sum.stale_passed += s.stale_passed;
            sum.fragments_translated += s.fragments_translated;
            sum.reply_leaks_dropped += s.reply_leaks_dropped;
            sum.time_exceeded_sent += s.time_exceeded_sent;
        }
        sum
    }
}

/// Index of the single entry in `CONFIG`.
pub const CONFIG_KEY: u32 = 0;

/// Use `bpf_redirect_map` for translated packets when possible.
pub const CONFIG_F_REDIRECT: u32 = 1 << 0;
/// Translate a packet that matches a reply entry at an ingress hook only if
/// it came in through the interface the route to its source leaves by
/// (audit A-12: no reply injection from the client side).
pub const CONFIG_F_REVERSE_PATH: u32 = 1 << 1;
/// At uplink egress, drop a packet without a reply entry whose source is a
/// node-local backend (`LOCAL_BACKENDS`) and whose destination is outside
/// the cluster's networks (`CLUSTER_NETWORKS`): a reply of a flow xlb no
/// longer has, leaving with the pod's address.
pub const CONFIG_F_POD_SOURCE_GUARD: u32 = 1 << 2;

/// `CONFIG` value, written by the agent before any service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Address remote-backend flows are source-translated to (IPv4 in the
    /// first 4 bytes). All zero: SNAT impossible, such flows are dropped.
    pub node_addr: [u8; 16],
    /// Inclusive SNAT port range, host byte order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
    /// New flows are left to the kernel once the agent's heartbeat is older
    /// than this many seconds (0: never): a datapath nobody keeps up to
    /// date must not send new clients to pod addresses Kubernetes may have
    /// given to other pods since.
    pub stale_after_s: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC when the agent last said it was
    /// alive; rewritten every few seconds by its main loop.
    pub heartbeat_ns: u64,
    /// Address IPv6 remote-backend flows are source-translated to. All
    /// zero: IPv6 SNAT impossible, such flows are dropped.
    pub node_addr_v6: [u8; 16],
}

/// `L2_ADDRESSES` key: an address this node answers ARP (IPv4) or
/// neighbour solicitations (IPv6) for, on one interface. Only the node the
/// agents elected announces an address, so at most one node of a segment
/// holds an entry for it; never `_pad`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L2Key {
    /// The interface the request arrives on (and the answer leaves by).
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

/// `L2_ADDRESSES` value: the link-layer address the answer names (the
/// interface's own MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Answer {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Index of the single entry in `L2_LIVENESS`.
pub const L2_LIVENESS_KEY: u32 = 0;

/// `L2_LIVENESS` value: the datapath answers for `L2_ADDRESSES` only while
/// `bpf_ktime_get_ns() - refreshed_ns <= stale_after_ns`. The agent
/// refreshes it several times per window; a dead agent's pinned entries
/// then stop claiming their addresses within one window, before any other
/// node takes them over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Liveness {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) of the agent's last refresh;
    /// 0: never answer.
    pub refreshed_ns: u64,
    pub stale_after_ns: u64,
}

/// `L2_STATS` value (per-CPU hash keyed by ifindex; the agent creates one
/// entry per uplink): what the ARP/NDP responder saw and did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Stats {
    /// ARP requests and neighbour solicitations for an address in
    /// `L2_ADDRESSES` on this interface.
    pub requests: u64,
    /// Replies and neighbour advertisements sent.
    pub replies: u64,
    /// Requests not answered because `L2_LIVENESS` was stale.
    pub stale: u64,
}

impl L2Stats {
    /// The sum of the per-CPU copies.
    pub fn accumulate<'a>(per_cpu: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut sum = Self::default();
        for s in per_cpu {
            sum.requests += s.requests;
            sum.replies += s.replies;
            sum.stale += s.stale;
        }
        sum
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made of integers and byte arrays, with
    // explicit padding fields: any bit pattern is valid and no byte is
    // uninitialised.
    unsafe impl aya::Pod for Be16 {}
    unsafe impl aya::Pod for Be32 {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for LocalBackendKey {}
    unsafe impl aya::Pod for ClusterNetwork {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for GlobalStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for L2Key {}
    unsafe impl aya::Pod for L2Answer {}
    unsafe impl aya::Pod for L2Liveness {}
    unsafe impl aya::Pod for L2Stats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(
            (size_of::<FrontendKey>(), align_of::<FrontendKey>()),
            (20, 2)
        );
        assert_eq!((size_of::<Service>(), align_of::<Service>()), (20, 4));
        assert_eq!((size_of::<Backend>(), align_of::<Backend>()), (24, 4));
        assert_eq!((size_of::<FlowKey>(), align_of::<FlowKey>()), (40, 2));
        assert_eq!((size_of::<Flow>(), align_of::<Flow>()), (56, 8));
        assert_eq!(
            (size_of::<AffinityKey>(), align_of::<AffinityKey>()),
            (24, 4)
        );
        assert_eq!((size_of::<Affinity>(), align_of::<Affinity>()), (16, 8));
        assert_eq!(
            (size_of::<SourceRange>(), align_of::<SourceRange>()),
            (24, 4)
        );
        assert_eq!(
            (size_of::<LocalBackendKey>(), align_of::<LocalBackendKey>()),
            (20, 2)
        );
        assert_eq!(
            (size_of::<ClusterNetwork>(), align_of::<ClusterNetwork>()),
            (20, 1)
        );
        assert_eq!(
            (size_of::<ServiceStats>(), align_of::<ServiceStats>()),
            (80, 8)
        );
        assert_eq!(
            (size_of::<GlobalStats>(), align_of::<GlobalStats>()),
            (104, 8)
        );
        assert_eq!((size_of::<Config>(), align_of::<Config>()), (56, 8));
        assert_eq!((size_of::<L2Key>(), align_of::<L2Key>()), (24, 4));
        assert_eq!((size_of::<L2Answer>(), align_of::<L2Answer>()), (8, 1));
        assert_eq!((size_of::<L2Liveness>(), align_of::<L2Liveness>()), (16, 8));
        assert_eq!((size_of::<L2Stats>(), align_of::<L2Stats>()), (24, 8));
        assert_eq!(offset_of!(L2Key, addr), 8);
    }

    #[test]
    fn no_implicit_padding() {
        // The sum of field sizes equals the struct size: there is no hole the
        // compiler could leave uninitialised in a hash key.
        assert_eq!(offset_of!(FlowKey, _pad) + 2, size_of::<FlowKey>());
        assert_eq!(offset_of!(Flow, _pad) + 3, size_of::<Flow>());
        assert_eq!(offset_of!(AffinityKey, client), 8);
        assert_eq!(offset_of!(SourceRange, addr), 5);
        assert_eq!(offset_of!(SourceRange, _pad) + 3, size_of::<SourceRange>());
        assert_eq!(offset_of!(Backend, service_id), 20);
        assert_eq!(offset_of!(LocalBackendKey, family) + 1, 20);
        assert_eq!(offset_of!(ClusterNetwork, addr), 1);
        assert_eq!(
            offset_of!(ClusterNetwork, _pad) + 3,
            size_of::<ClusterNetwork>()
        );
        assert_eq!(offset_of!(Flow, src_addr), 8);
    }

    #[test]
    fn per_cpu_counters_add_up_field_by_field() {
        let cpu = |n: u64| ServiceStats {
            packets: n,
            bytes: 2 * n,
            reply_packets: 3 * n,
            reply_bytes: 4 * n,
            new_flows: 5 * n,
            drop_source_range: 6 * n,
            drop_no_backend: 7 * n,
            drop_snat_exhausted: 8 * n,
            drop_unsupported: 9 * n,
            drop_flow_conflict: 10 * n,
        };
        assert_eq!(ServiceStats::accumulate(&[cpu(1), cpu(10)]), cpu(11));
        assert_eq!(ServiceStats::accumulate(&[]), ServiceStats::default());
        let node = |n: u64| GlobalStats {
            passed: n,
            redirected: 2 * n,
            translated_passed: 3 * n,
            malformed: 4 * n,
            icmp_translated: 5 * n,
            frag_needed_sent: 6 * n,
            reply_wrong_interface: 7 * n,
            flow_halves_restored: 8 * n,
            host_socket: 9 * n,
            stale_passed: 10 * n,
            fragments_translated: 11 * n,
            reply_leaks_dropped: 12 * n,
            time_exceeded_sent: 13 * n,
        };
        assert_eq!(GlobalStats::accumulate(&[node(2), node(5)]), node(7));
    }

    #[test]
    fn byte_order_newtypes() {
        let p = Be16::from_host(80);
        assert_eq!(p.host(), 80);
        assert_eq!(p.wire().to_ne_bytes(), [0, 80]);
        let a = Be32::from_host(0x0a00_0001);
        assert_eq!(a.wire().to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(addr_v4([10, 0, 0, 1])[..5], [10, 0, 0, 1, 0]);
    }
}
