//! One peer's session: the RFC 4271 §8 state machine for a speaker that
//! only connects out and only announces. Connect → OpenSent → OpenConfirm
//! → Established; anything unexpected or malformed from the peer is
//! answered with the NOTIFICATION §6 names, the connection is closed, and
//! the peer is retried with exponential backoff (its own task: a peer that
//! is down keeps no other peer waiting).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::{BgpMessage, capabilities::BgpCapability, codec::BgpCodec};
use netgauze_iana::address_family::AddressType;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpSocket, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    time::Instant,
};
use tokio_util::codec::{Decoder, Encoder};

use super::{
    message::{self, IPV4_PER_UPDATE, IPV6_PER_UPDATE, Notification, PathAttributes, SessionPhase},
    peer::PeerConfig,
    routes::{RouteAttributes, Routes},
    status::{SessionState, Status},
};

/// RFC 4271 §8: the hold time used until the peer's OPEN arrives.
const OPEN_HOLD: Duration = Duration::from_secs(240);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff (RFC 4271 ConnectRetryTimer, grown exponentially so
/// a peer that keeps refusing is not hammered).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How a session ended.
#[derive(Debug)]
enum Ending {
    /// We sent this NOTIFICATION and closed.
    Sent(Notification),
    /// The peer sent a NOTIFICATION.
    Received(BgpMessage),
    Closed,
    Io(std::io::Error),
    /// Asked to stop (the BGPPeer went away); Cease was sent.
    Stopped,
    /// The agent is stopping: the connection is closed without a
    /// NOTIFICATION, so the peer keeps the routes (graceful restart).
    Detached,
    /// Nothing to open a session with (no router id).
    Unusable(String),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Sent(n) => write!(f, "sent NOTIFICATION {:?}", n.0),
            Ending::Received(BgpMessage::Notification(n)) => {
                write!(f, "peer sent NOTIFICATION {n:?}")
            }
            Ending::Received(m) => write!(f, "peer sent {:?}", m.get_type()),
            Ending::Closed => f.write_str("peer closed the connection"),
            Ending::Io(e) => write!(f, "connection failed: {e}"),
            Ending::Stopped => f.write_str("peer deconfigured"),
            Ending::Detached => f.write_str("agent stopping; routes kept by graceful restart"),
            Ending::Unusable(reason) => f.write_str(reason),
        }
    }
}

/// What the speaker asks of a running session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// The BGPPeer went away: Cease, the router withdraws at once.
    Deconfigured,
    /// The agent stops: close without a NOTIFICATION.
    Detached,
}

/// How long a closing session reads what the peer still sends, so that
/// the kernel closes the connection with a FIN, not a reset (unread data
/// at close makes it a reset, which some routers do not take for a
/// restart).
const DRAIN: Duration = Duration::from_secs(1);

/// Runs one peer until `stop` leaves [`Stop::Running`]: connects, holds the session,
/// reconnects with backoff. `restarted`: this agent found a datapath
/// already forwarding, so its first OPEN sets the Restart State bit.
pub async fn run(
    peer: PeerConfig,
    mut routes: watch::Receiver<Arc<Routes>>,
    status: Status,
    mut restarted: bool,
    mut stop: watch::Receiver<Stop>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        status.set_state(&peer.name, SessionState::Connect);
        let ending = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&peer)).await {
            Ok(Ok(stream)) => {
                let mut session = Session {
                    peer: &peer,
                    status: &status,
                    codec: BgpCodec::new(true),
                    buffer: BytesMut::with_capacity(message::MAX_MESSAGE_LEN),
                    hold_deadline: Instant::now() + OPEN_HOLD,
                    hold: None,
                    established: false,
                };
                let ending = session
                    .run(stream, &mut routes, &mut restarted, &mut stop)
                    .await;
                if session.established {
                    backoff = BACKOFF_MIN;
                }
                ending
            }
            Ok(Err(error)) => Ending::Io(error),
            Err(_) => Ending::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TCP connect timed out",
            )),
        };
        if matches!(ending, Ending::Detached) || *stop.borrow() == Stop::Detached {
            status.session_down(&peer.name, &Ending::Detached.to_string());
            return;
        }
        status.session_down(&peer.name, &ending.to_string());
        if matches!(ending, Ending::Stopped) || *stop.borrow() != Stop::Running {
            status.remove(&peer.name);
            return;
        }
        tracing::warn!(peer = %peer, reason = %ending, retry_in_ms = backoff.as_millis() as u64,
            "BGP session down");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {
                status.remove(&peer.name);
                return;
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(peer: &PeerConfig) -> std::io::Result<TcpStream> {
    let socket = match peer.peer_address {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if peer.source_address.is_some() || peer.source_port.is_some() {
        let address = peer.source_address.unwrap_or(match peer.peer_address {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        });
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(address, peer.source_port.unwrap_or(0)))?;
    }
    socket.set_nodelay(true)?;
    if let Some(password) = &peer.password {
        sign_with_md5(&socket, peer.peer_address, password.bytes())?;
    }
    let stream = socket
        .connect(SocketAddr::new(peer.peer_address, peer.peer_port))
        .await?;
    if peer.peer_address.is_ipv4() {
        stream.set_ttl(u32::from(peer.ttl))?;
    }
    Ok(stream)
}

/// Has the kernel sign (and require) TCP MD5 signatures (RFC 2385) with
/// `key` on the connection to `peer`: `setsockopt(TCP_MD5SIG)`, before
/// connecting. Written out here because neither libc (the constant only)
/// nor socket2 nor nix has `struct tcp_md5sig` (linux/tcp.h).
fn sign_with_md5(socket: &TcpSocket, peer: IpAddr, key: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;

    #[repr(C)]
    struct TcpMd5Sig {
        addr: libc::sockaddr_storage,
        flags: u8,
        prefix_len: u8,
        key_len: u16,
        ifindex: libc::c_int,
        key: [u8; super::peer::MAX_PASSWORD_LEN],
    }
    if key.len() > super::peer::MAX_PASSWORD_LEN {
        return Err(std::io::Error::other("TCP MD5 key over 80 bytes"));
    }
    // SAFETY: all-zero bytes are a valid value of this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(address) => {
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            let sin = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(address.octets());
        }
        IpAddr::V6(address) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = address.octets();
        }
    }
    sig.key_len = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct Session<'a> {
    peer: &'a PeerConfig,
    status: &'a Status,
    codec: BgpCodec,
    buffer: BytesMut,
    hold_deadline: Instant,
    /// The negotiated hold time, once the peer's OPEN is accepted.
    hold: Option<u16>,
    established: bool,
}

/// What one session negotiated.
struct Negotiated {
    hold_time: u16,
    ipv4: bool,
    ipv6: bool,
    attributes: PathAttributes,
}

impl Session<'_> {
    async fn run(
        &mut self,
        stream: TcpStream,
        routes: &mut watch::Receiver<Arc<Routes>>,
        restarted: &mut bool,
        stop: &mut watch::Receiver<Stop>,
    ) -> Ending {
        let local = match stream.local_addr() {
            Ok(local) => local.ip(),
            Err(error) => return Ending::Io(error),
        };
        let (mut reader, mut writer) = stream.into_split();
        let ending = self
            .exchange(&mut reader, &mut writer, local, routes, restarted, stop)
            .await;
        if let Ending::Sent(notification) = &ending {
            let _ = self.send(&mut writer, notification.message()).await;
        }
        let _ = writer.shutdown().await;
        if !matches!(ending, Ending::Closed | Ending::Io(_)) {
            let _ = tokio::time::timeout(DRAIN, async {
                let mut sink = [0u8; 4096];
                while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        ending
    }

    async fn exchange(
        &mut self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
        local: IpAddr,
        routes: &mut watch::Receiver<Arc<Routes>>,
        restarted: &mut bool,
        stop: &mut watch::Receiver<Stop>,
    ) -> Ending {
        let router_id = match self
            .peer
            .router_id
            .or(routes.borrow().node_v4)
            .or(match local {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }) {
            Some(id) => id,
            None => {
                return Ending::Unusable(
                    "no BGP identifier: set routerID on the BGPPeer (the node has no IPv4 address)"
                        .into(),
                );
            }
        };
        self.status
            .set_state(&self.peer.name, SessionState::OpenSent);
        let open = message::open(
            self.peer.local_asn,
            self.peer.hold_time,
            router_id,
            self.peer.restart_time,
            *restarted,
        );
        if let Err(error) = self.send(writer, open).await {
            return Ending::Io(error);
        }
        // OpenSent: only an OPEN may come.
        let negotiated = match self.read(reader).await {
            Ok(BgpMessage::Open(open)) => match self.check_open(&open, router_id) {
                Ok(negotiated) => negotiated,
                Err(notification) => return Ending::Sent(notification),
            },
            Ok(BgpMessage::Notification(n)) => {
                return Ending::Received(BgpMessage::Notification(n));
            }
            Ok(_) => return Ending::Sent(Notification::unexpected_message(SessionPhase::OpenSent)),
            Err(ending) => return ending,
        };
        if let Err(error) = self.send(writer, BgpMessage::KeepAlive).await {
            return Ending::Io(error);
        }
        self.hold = Some(negotiated.hold_time);
        self.hold_deadline = hold_deadline(negotiated.hold_time);
        self.status
            .set_state(&self.peer.name, SessionState::OpenConfirm);
        // OpenConfirm: a KEEPALIVE establishes the session.
        match self.read(reader).await {
            Ok(BgpMessage::KeepAlive) => {}
            Ok(BgpMessage::Notification(n)) => {
                return Ending::Received(BgpMessage::Notification(n));
            }
            Ok(_) => {
                return Ending::Sent(Notification::unexpected_message(SessionPhase::OpenConfirm));
            }
            Err(ending) => return ending,
        }
        self.established = true;
        *restarted = false;
        self.status
            .set_state(&self.peer.name, SessionState::Established);
        tracing::info!(peer = %self.peer, hold_time = negotiated.hold_time,
            ipv4 = negotiated.ipv4, ipv6 = negotiated.ipv6, "BGP session established");
        self.established_loop(reader, writer, local, &negotiated, routes, stop)
            .await
    }

    /// Checks the peer's OPEN (RFC 4271 §6.2) and what the two OPENs agree
    /// on.
    fn check_open(
        &self,
        open: &netgauze_bgp_pkt::open::BgpOpenMessage,
        router_id: Ipv4Addr,
    ) -> Result<Negotiated, Notification> {
        if open.my_asn4() != self.peer.peer_asn {
            return Err(Notification::bad_peer_as(open.my_asn4()));
        }
        if open.hold_time() == 1 || open.hold_time() == 2 {
            return Err(Notification::unacceptable_hold_time());
        }
        // RFC 6286 §2.2: identical identifiers are an error on iBGP.
        if open.bgp_id() == Ipv4Addr::UNSPECIFIED
            || (!self.peer.is_ebgp() && open.bgp_id() == router_id)
        {
            return Err(Notification::bad_bgp_identifier());
        }
        let capabilities = open.capabilities();
        let families: Vec<AddressType> = capabilities
            .iter()
            .filter_map(|c| match c {
                BgpCapability::MultiProtocolExtensions(mp) => Some(mp.address_type()),
                _ => None,
            })
            .collect();
        let asn4 = capabilities
            .iter()
            .any(|c| matches!(c, BgpCapability::FourOctetAs(_)));
        Ok(Negotiated {
            hold_time: self.peer.hold_time.min(open.hold_time()),
            // RFC 4760 §8: a peer without the capability speaks IPv4
            // unicast only.
            ipv4: families.is_empty() || families.contains(&AddressType::Ipv4Unicast),
            ipv6: families.contains(&AddressType::Ipv6Unicast),
            attributes: PathAttributes {
                local_asn: self.peer.local_asn,
                ebgp: self.peer.is_ebgp(),
                asn4,
            },
        })
    }

    async fn established_loop(
        &mut self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
        local: IpAddr,
        negotiated: &Negotiated,
        routes: &mut watch::Receiver<Arc<Routes>>,
        stop: &mut watch::Receiver<Stop>,
    ) -> Ending {
        let keepalive_every = self.peer.keepalive_interval(negotiated.hold_time);
        let mut keepalive = tokio::time::interval(keepalive_every.unwrap_or(Duration::MAX / 4));
        keepalive.tick().await;
        let mut rib_out = BTreeMap::new();
        // The whole table, then End-of-RIB per family (RFC 4724 §4.1): a
        // router keeping this node's routes from before a restart drops
        // the ones not sent again only now.
        let table = wanted(&routes.borrow_and_update(), local, negotiated);
        if let Err(error) = self.update(writer, &mut rib_out, table, negotiated).await {
            return Ending::Io(error);
        }
        if negotiated.ipv4
            && let Err(error) = self.send(writer, message::end_of_rib_v4()).await
        {
            return Ending::Io(error);
        }
        if negotiated.ipv6
            && let Err(error) = self.send(writer, message::end_of_rib_v6()).await
        {
            return Ending::Io(error);
        }
        loop {
            loop {
                match self.frame() {
                    Ok(Some(BgpMessage::KeepAlive)) => {}
                    Ok(Some(BgpMessage::Update(_))) => {
                        // xlb announces only; what a router offers is not used.
                        self.status.update_received(&self.peer.name);
                    }
                    Ok(Some(BgpMessage::RouteRefresh(_))) => {
                        // RFC 2918: send the table again.
                        let table = std::mem::take(&mut rib_out);
                        if let Err(error) =
                            self.update(writer, &mut rib_out, table, negotiated).await
                        {
                            return Ending::Io(error);
                        }
                    }
                    Ok(Some(message @ BgpMessage::Notification(_))) => {
                        return Ending::Received(message);
                    }
                    Ok(Some(BgpMessage::Open(_))) => {
                        return Ending::Sent(Notification::unexpected_message(
                            SessionPhase::Established,
                        ));
                    }
                    Ok(None) => break,
                    Err(ending) => return ending,
                }
            }
            tokio::select! {
                read = reader.read_buf(&mut self.buffer) => match read {
                    Ok(0) => return Ending::Closed,
                    Ok(_) => {}
                    Err(error) => return Ending::Io(error),
                },
                () = tokio::time::sleep_until(self.hold_deadline), if negotiated.hold_time != 0 => {
                    return Ending::Sent(Notification::hold_timer_expired());
                }
                _ = keepalive.tick(), if keepalive_every.is_some() => {
                    if let Err(error) = self.send(writer, BgpMessage::KeepAlive).await {
                        return Ending::Io(error);
                    }
                }
                changed = routes.changed() => {
                    if changed.is_err() {
                        return Ending::Stopped;
                    }
                    let table = wanted(&routes.borrow_and_update(), local, negotiated);
                    if let Err(error) = self.update(writer, &mut rib_out, table, negotiated).await {
                        return Ending::Io(error);
                    }
                }
                _ = stop.changed() => match *stop.borrow() {
                    Stop::Running => {}
                    Stop::Deconfigured => {
                        return Ending::Sent(Notification::peer_deconfigured());
                    }
                    Stop::Detached => return Ending::Detached,
                },
            }
        }
    }

    /// Sends what it takes to turn `rib_out` into `wanted`.
    async fn update(
        &mut self,
        writer: &mut OwnedWriteHalf,
        rib_out: &mut RibOut,
        wanted: RibOut,
        negotiated: &Negotiated,
    ) -> std::io::Result<()> {
        let change = diff(rib_out, &wanted);
        let mut messages = Vec::new();
        let withdrawn_v4: Vec<Ipv4Net> = change.withdraw.iter().filter_map(v4).collect();
        let withdrawn_v6: Vec<Ipv6Net> = change.withdraw.iter().filter_map(v6).collect();
        for chunk in withdrawn_v4.chunks(IPV4_PER_UPDATE) {
            messages.push(message::withdraw_v4(chunk));
        }
        for chunk in withdrawn_v6.chunks(IPV6_PER_UPDATE) {
            messages.push(message::withdraw_v6(chunk));
        }
        for ((next_hop, route), prefixes) in &change.announce {
            match next_hop {
                IpAddr::V4(next_hop) => {
                    let prefixes: Vec<Ipv4Net> = prefixes.iter().filter_map(v4).collect();
                    for chunk in prefixes.chunks(IPV4_PER_UPDATE) {
                        messages.push(negotiated.attributes.announce_v4(chunk, *next_hop, route));
                    }
                }
                IpAddr::V6(next_hop) => {
                    let prefixes: Vec<Ipv6Net> = prefixes.iter().filter_map(v6).collect();
                    for chunk in prefixes.chunks(IPV6_PER_UPDATE) {
                        messages.push(negotiated.attributes.announce_v6(chunk, *next_hop, route));
                    }
                }
            }
        }
        for message in messages {
            self.send(writer, message).await?;
            self.status.update_sent(&self.peer.name);
        }
        if !change.withdraw.is_empty() || !change.announce.is_empty() {
            tracing::info!(peer = %self.peer, announced = ?change.announce, withdrawn = ?change.withdraw,
                "BGP routes updated");
        }
        *rib_out = wanted;
        self.status.set_prefixes(&self.peer.name, rib_out.len());
        Ok(())
    }

    async fn send(
        &mut self,
        writer: &mut OwnedWriteHalf,
        message: BgpMessage,
    ) -> std::io::Result<()> {
        let mut wire = BytesMut::new();
        self.codec
            .encode(message, &mut wire)
            .map_err(|e| std::io::Error::other(format!("encoding a BGP message: {e:?}")))?;
        writer.write_all(&wire).await
    }

    /// Reads until one whole message has arrived (or the hold time runs
    /// out).
    async fn read(&mut self, reader: &mut OwnedReadHalf) -> Result<BgpMessage, Ending> {
        loop {
            if let Some(message) = self.frame()? {
                return Ok(message);
            }
            tokio::select! {
                read = reader.read_buf(&mut self.buffer) => match read {
                    Ok(0) => return Err(Ending::Closed),
                    Ok(_) => {}
                    Err(error) => return Err(Ending::Io(error)),
                },
                () = tokio::time::sleep_until(self.hold_deadline) => {
                    return Err(Ending::Sent(Notification::hold_timer_expired()));
                }
            }
        }
    }

    /// The next message in the buffer, if a whole one is there. Any
    /// message restarts the hold timer (RFC 4271 §4.4).
    fn frame(&mut self) -> Result<Option<BgpMessage>, Ending> {
        let Some(mut frame) = message::next_frame(&mut self.buffer).map_err(Ending::Sent)? else {
            return Ok(None);
        };
        let kind = frame[18];
        let message = match self.codec.decode(&mut frame) {
            Ok(Some((message, _ignored))) => message,
            Ok(None) | Err(_) => return Err(Ending::Sent(message::body_error(kind))),
        };
        // Before the OPEN is accepted the long hold stays.
        if let Some(hold) = self.hold {
            self.hold_deadline = hold_deadline(hold);
        }
        Ok(Some(message))
    }
}

/// A hold time of 0 means no hold timer (RFC 4271 §4.2).
fn hold_deadline(hold_time: u16) -> Instant {
    let hold = match hold_time {
        0 => Duration::from_secs(365 * 24 * 3600),
        seconds => Duration::from_secs(u64::from(seconds)),
    };
    Instant::now() + hold
}

fn v4(prefix: &IpNet) -> Option<Ipv4Net> {
    match prefix {
        IpNet::V4(p) => Some(*p),
        IpNet::V6(_) => None,
    }
}

fn v6(prefix: &IpNet) -> Option<Ipv6Net> {
    match prefix {
        IpNet::V6(p) => Some(*p),
        IpNet::V4(_) => None,
    }
}

/// The routes one session carries, address → next hop: the session's own
/// address for its family (the node reaches the router from there), the
/// node's address of the other family otherwise; none for a family the
/// peer did not take or the node has no address of.
fn wanted(routes: &Routes, local: IpAddr, negotiated: &Negotiated) -> RibOut {
    let next_hop_v4 = match local {
        IpAddr::V4(local) => Some(local),
        IpAddr::V6(_) => routes.node_v4,
    };
    let next_hop_v6 = match local {
        IpAddr::V6(local) if !local.is_unicast_link_local() => Some(local),
        _ => routes.node_v6,
    };
    let mut table = RibOut::new();
    for &address in &routes.addresses {
        let next_hop = match address {
            IpAddr::V4(_) if negotiated.ipv4 => next_hop_v4.map(IpAddr::V4),
            IpAddr::V6(_) if negotiated.ipv6 => next_hop_v6.map(IpAddr::V6),
            _ => None,
        };
        let Some(next_hop) = next_hop else {
            continue;
        };
        let attributes = routes.attributes.get(&address).cloned().unwrap_or_default();
        // A pool's aggregate is announced once, with the attributes of its
        // first address (pools that share an aggregate should agree).
        let prefix = attributes.prefix(address);
        if message::is_unicast(prefix) {
            table.entry(prefix).or_insert((next_hop, attributes));
        }
    }
    table
}

/// What one session announced (or is to): prefix (a Service address's
/// host route, or its pool's aggregate) → next hop and the pool's
/// attributes.
type RibOut = BTreeMap<IpNet, (IpAddr, RouteAttributes)>;

/// What changes between two Adj-RIB-Outs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff {
    /// By next hop and attributes (one UPDATE carries one set).
    announce: BTreeMap<(IpAddr, RouteAttributes), Vec<IpNet>>,
    withdraw: Vec<IpNet>,
}

fn diff(sent: &RibOut, wanted: &RibOut) -> Diff {
    let mut change = Diff::default();
    for (address, route) in wanted {
        if sent.get(address) != Some(route) {
            change
                .announce
                .entry(route.clone())
                .or_default()
                .push(*address);
        }
    }
    change.withdraw = sent
        .keys()
        .filter(|address| !wanted.contains_key(address))
        .copied()
        .collect();
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        IpNet::from(ip(text))
    }

    fn negotiated(ipv4: bool, ipv6: bool) -> Negotiated {
        Negotiated {
            hold_time: 9,
            ipv4,
            ipv6,
            attributes: PathAttributes {
                local_asn: 64501,
                ebgp: true,
                asn4: true,
            },
        }
    }

    #[test]
    fn each_family_gets_a_next_hop_of_its_own() {
        let routes = Routes {
            addresses: [ip("192.0.2.10"), ip("2001:db8::10")].into(),
            node_v4: Some("10.0.0.9".parse().unwrap()),
            node_v6: Some("fd00::9".parse().unwrap()),
            attributes: BTreeMap::new(),
        };
        // Over IPv4: the session's address for IPv4, the node's for IPv6.
        let over_v4 = wanted(&routes, ip("10.0.0.2"), &negotiated(true, true));
        assert_eq!(over_v4[&net("192.0.2.10")].0, ip("10.0.0.2"));
        assert_eq!(over_v4[&net("2001:db8::10")].0, ip("fd00::9"));
        // A peer that did not take IPv6 gets none.
        let v4_only = wanted(&routes, ip("10.0.0.2"), &negotiated(true, false));
        assert_eq!(v4_only.len(), 1);
        // Without an IPv6 node address, no IPv6 route over IPv4.
        let no_v6 = Routes {
            node_v6: None,
            ..routes.clone()
        };
        assert_eq!(
            wanted(&no_v6, ip("10.0.0.2"), &negotiated(true, true)).len(),
            1
        );
    }

    #[test]
    fn diff_sends_only_what_changed() {
        let plain = |hop: &str| (ip(hop), RouteAttributes::default());
        let tagged = RouteAttributes {
            communities: vec![1],
            ..RouteAttributes::default()
        };
        let sent = BTreeMap::from([
            (net("192.0.2.10"), plain("10.0.0.2")),
            (net("192.0.2.11"), plain("10.0.0.2")),
            (net("192.0.2.13"), plain("10.0.0.2")),
        ]);
        let wanted = BTreeMap::from([
            (net("192.0.2.10"), plain("10.0.0.2")),
            (net("192.0.2.12"), plain("10.0.0.2")),
            // Its pool now tags it: announced again, with the community.
            (net("192.0.2.13"), (ip("10.0.0.2"), tagged.clone())),
        ]);
        let change = diff(&sent, &wanted);
        assert_eq!(change.withdraw, [net("192.0.2.11")]);
        assert_eq!(
            change.announce,
            BTreeMap::from([
                (plain("10.0.0.2"), vec![net("192.0.2.12")]),
                ((ip("10.0.0.2"), tagged), vec![net("192.0.2.13")]),
            ])
        );
        assert_eq!(diff(&wanted, &wanted), Diff::default());
    }

    #[test]
    fn a_pools_aggregate_is_one_route_and_a_multicast_address_none() {
        let aggregated = RouteAttributes {
            aggregation_length: Some(24),
            ..RouteAttributes::default()
        };
        let routes = Routes {
            addresses: [
                ip("192.0.2.10"),
                ip("192.0.2.77"),
                ip("198.51.100.1"),
                ip("224.0.0.5"),
            ]
            .into(),
            node_v4: None,
            node_v6: None,
            attributes: [
                (ip("192.0.2.10"), aggregated.clone()),
                (ip("192.0.2.77"), aggregated.clone()),
            ]
            .into(),
        };
        let table = wanted(&routes, ip("10.0.0.2"), &negotiated(true, true));
        let prefixes: Vec<String> = table.keys().map(ToString::to_string).collect();
        assert_eq!(prefixes, ["192.0.2.0/24", "198.51.100.1/32"]);
        assert_eq!(table[&"192.0.2.0/24".parse().unwrap()].1, aggregated);
    }
}
