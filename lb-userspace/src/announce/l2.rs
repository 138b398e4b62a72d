//! The node's side of L2 announcement: keeps `XLB_L2_ADDRS` equal to the
//! addresses this node won (one entry per address and uplink, answered
//! with the uplink's MAC by `lb-ebpf/src/announce.rs`), keeps the
//! responder's liveness fresh, and on taking an address over sends a short
//! burst of gratuitous ARP (IPv4, RFC 5227 announcements) or unsolicited
//! neighbour advertisements (IPv6, RFC 4861 7.2.6) so that clients and
//! switches move to this node at once instead of when their entry expires.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lb_common::{FAMILY_V4, FAMILY_V6, L2Answer, L2Key};

use crate::{dataplane::Maps, netdev, telemetry::telemetry};

/// How long the responder keeps answering after the agent's last
/// refresh. The agent refreshes every [`REFRESH`]; a dead agent's node
/// stops answering within this, before the per-node Lease (2 s by default)
/// lets another node take its addresses: never two answers at once.
pub const LIVENESS_WINDOW: Duration = Duration::from_millis(1500);
pub const REFRESH: Duration = Duration::from_millis(250);
/// Gratuitous ARP / unsolicited NA on take-over: this many, this far
/// apart (RFC 5227 sends two announcements 2 s apart; a take-over wants
/// the move at once, and a lost frame covered within a second).
pub const BURST: usize = 3;
pub const BURST_GAP: Duration = Duration::from_millis(300);

/// An uplink the responder answers on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl Uplink {
    /// The interface's index and MAC, read from the kernel.
    pub fn lookup(name: &str) -> Result<Uplink> {
        let ifindex = netdev::ifindex(name)?;
        let mac = netdev::mac(name)?
            .with_context(|| format!("interface {name} has no Ethernet address"))?;
        Ok(Uplink {
            name: name.to_string(),
            ifindex,
            mac,
        })
    }
}

/// The responder's map key for `addr` on `ifindex`.
pub fn key(ifindex: u32, addr: IpAddr) -> L2Key {
    match addr {
        IpAddr::V4(a) => L2Key {
            ifindex,
            family: FAMILY_V4,
            _pad: [0; 3],
            addr: lb_common::addr_v4(a.octets()),
        },
        IpAddr::V6(a) => L2Key {
            ifindex,
            family: FAMILY_V6,
            _pad: [0; 3],
            addr: a.octets(),
        },
    }
}

/// The address a responder key names.
pub fn key_addr(key: &L2Key) -> IpAddr {
    if key.family == FAMILY_V6 {
        IpAddr::from(key.addr)
    } else {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    }
}

/// What the responder answers for, and its counters' last readings.
pub struct Responder {
    uplinks: Vec<Uplink>,
    /// (address, uplink name) pairs answered for now.
    answering: BTreeSet<(IpAddr, String)>,
    /// Last counter readings per uplink (requests, replies, stale), so the
    /// metrics advance by the difference.
    seen: BTreeMap<u32, lb_common::L2Stats>,
}

impl Responder {
    /// The responder on `ifaces`, taking over what a previous agent left
    /// in the pinned map: entries for interfaces that are no longer
    /// uplinks are removed, the rest are kept until the first [`apply`]
    /// (which sends no burst for them: this node held them already).
    pub fn start(ifaces: &[String], maps: &mut Maps) -> Result<Responder> {
        let uplinks = ifaces
            .iter()
            .map(|name| Uplink::lookup(name))
            .collect::<Result<Vec<_>>>()?;
        for uplink in &uplinks {
            maps.ensure_l2_stats(uplink.ifindex)?;
        }
        let mut answering = BTreeSet::new();
        for (key, _) in maps.l2_entries()? {
            match uplinks.iter().find(|u| u.ifindex == key.ifindex) {
                Some(u) => {
                    answering.insert((key_addr(&key), u.name.clone()));
                }
                None => maps.remove_l2(&key)?,
            }
        }
        if !answering.is_empty() {
            tracing::info!(
                entries = answering.len(),
                "adopting the L2 announcements a previous agent left"
            );
        }
        Ok(Responder {
            uplinks,
            answering,
            seen: BTreeMap::new(),
        })
    }

    pub fn uplinks(&self) -> &[Uplink] {
        &self.uplinks
    }

    /// Answers for exactly `wanted` (address → uplink names), and sends
    /// the take-over burst for what is new. Returns the addresses newly
    /// announced.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        wanted: &BTreeMap<IpAddr, Vec<String>>,
    ) -> Result<Vec<IpAddr>> {
        let wanted_pairs: BTreeSet<(IpAddr, String)> = wanted
            .iter()
            .flat_map(|(addr, ifaces)| ifaces.iter().map(move |i| (*addr, i.clone())))
            .filter(|(_, i)| self.uplinks.iter().any(|u| &u.name == i))
            .collect();
        for (addr, iface) in self.answering.difference(&wanted_pairs) {
            let uplink = self.uplink(iface)?;
            maps.remove_l2(&key(uplink.ifindex, *addr))?;
            tracing::info!(address = %addr, interface = %iface, "no longer announcing");
        }
        let mut new = Vec::new();
        for (addr, iface) in wanted_pairs.difference(&self.answering) {
            let uplink = self.uplink(iface)?.clone();
            let answer = L2Answer {
                mac: uplink.mac,
                _pad: [0; 2],
            };
            maps.put_l2(&key(uplink.ifindex, *addr), &answer)?;
            tracing::info!(address = %addr, interface = %iface, "announcing (ARP/NDP answered here)");
            send_burst(uplink, *addr);
            new.push(*addr);
        }
        self.answering = wanted_pairs;
        telemetry().publish_l2_announced(self.answering.iter().map(|(a, _)| *a).collect());
        Ok(new)
    }

    /// Sends the take-over burst again for every address answered here
    /// but those in `except` (just sent): after another node may have
    /// claimed them.
    pub fn reannounce(&self, except: &[IpAddr]) {
        for (addr, iface) in &self.answering {
            if except.contains(addr) {
                continue;
            }
            if let Ok(uplink) = self.uplink(iface) {
                tracing::info!(address = %addr, interface = %iface, "a node came back: announcing again");
                send_burst(uplink.clone(), *addr);
            }
        }
    }

    fn uplink(&self, name: &str) -> Result<&Uplink> {
        self.uplinks
            .iter()
            .find(|u| u.name == name)
            .with_context(|| format!("{name} is not an uplink"))
    }

    /// Keeps the datapath answering for another [`LIVENESS_WINDOW`], and
    /// carries the responder's counters into the metrics.
    pub fn refresh(&mut self, maps: &mut Maps) {
        if let Err(e) =
            maps.write_l2_liveness(netdev::monotonic_ns(), LIVENESS_WINDOW.as_nanos() as u64)
        {
            tracing::warn!(error = %format!("{e:#}"), "refreshing the L2 responder's liveness");
        }
        for uplink in &self.uplinks {
            let Ok(now) = maps.l2_stats(uplink.ifindex) else {
                continue;
            };
            let before = self.seen.insert(uplink.ifindex, now).unwrap_or_default();
            telemetry().count_l2(&uplink.name, &before, &now);
        }
    }

    /// Stops every answer at once (the agent is leaving: another node
    /// takes over as soon as it sees this one's Lease released).
    pub fn silence(&mut self, maps: &mut Maps) {
        if let Err(e) = maps.write_l2_liveness(0, 0) {
            tracing::warn!(error = %format!("{e:#}"), "silencing the L2 responder");
        }
    }
}

/// Sends [`BURST`] announcements of `addr` out of `uplink`, from a thread
/// of their own (the agent's loop does not wait for the gaps).
fn send_burst(uplink: Uplink, addr: IpAddr) {
    std::thread::spawn(move || {
        let frame = match addr {
            IpAddr::V4(a) => gratuitous_arp(uplink.mac, a.octets()),
            IpAddr::V6(a) => unsolicited_na(uplink.mac, a),
        };
        let socket = match PacketSocket::open(uplink.ifindex) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), interface = %uplink.name, "cannot send gratuitous ARP/NA");
                return;
            }
        };
        for i in 0..BURST {
            if i > 0 {
                std::thread::sleep(BURST_GAP);
            }
            match socket.send(&frame) {
                Ok(()) => telemetry().count_gratuitous(&uplink.name),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), interface = %uplink.name, address = %addr, "sending gratuitous ARP/NA")
                }
            }
        }
    });
}

/// An ARP announcement (RFC 5227 section 2.3): a broadcast request whose
/// sender and target are both `addr`. Linux updates an existing neighbour
/// entry from it at once (`arp_process` treats it as gratuitous and skips
/// the lock time).
pub fn gratuitous_arp(mac: [u8; 6], addr: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&addr);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&addr);
    f.resize(60, 0);
    f
}

/// An unsolicited neighbour advertisement (RFC 4861 section 7.2.6) of
/// `addr` to all nodes, override set, with the target link-layer option:
/// receivers that have an entry for `addr` take the new MAC.
pub fn unsolicited_na(mac: [u8; 6], addr: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&addr.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let check = icmp6_checksum(addr, all_nodes, &icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&addr.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum (RFC 8200 section 8.1 pseudo-header).
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut bytes = Vec::with_capacity(40 + message.len());
    bytes.extend_from_slice(&src.octets());
    bytes.extend_from_slice(&dst.octets());
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 58]);
    bytes.extend_from_slice(message);
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An `AF_PACKET` socket bound to one interface, for whole frames.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSocket {
    fn open(ifindex: u32) -> Result<PacketSocket> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PacketSocket { fd, ifindex })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below
        // are what sendto(2) on a packet socket reads.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `to` outlive the call; sizes are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_both_families() {
        for addr in [
            IpAddr::from([10, 200, 0, 10]),
            IpAddr::from(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10)),
        ] {
            assert_eq!(key_addr(&key(3, addr)), addr);
        }
    }

    #[test]
    fn the_unsolicited_advertisement_checksums_to_zero() {
        let addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
        let f = unsolicited_na([2, 0, 0, 0, 0, 1], addr);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(icmp6_checksum(addr, all_nodes, &f[54..]), 0);
        assert_eq!(f[54], 136);
        assert_eq!(f[58], 0x20, "override, not solicited");
    }

    #[test]
    fn the_gratuitous_arp_names_the_address_as_sender_and_target() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 1], [10, 200, 0, 10]);
        assert_eq!(&f[28..32], &[10, 200, 0, 10]);
        assert_eq!(&f[38..42], &[10, 200, 0, 10]);
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), 60);
    }
}
