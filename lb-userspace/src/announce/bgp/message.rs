//! The BGP messages xlb sends, built with NetGauze's types, and the
//! framing of what it receives: a frame whose header is wrong is answered
//! with the NOTIFICATION RFC 4271 §6.1 names before NetGauze sees it.

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use ipnet::{Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::{
    BgpMessage,
    capabilities::{
        BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily,
        GracefulRestartCapability, MultiProtocolExtensionsCapability,
    },
    community::Community,
    nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress},
    notification::{
        BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
        MessageHeaderError, OpenMessageError, UpdateMessageError,
    },
    open::{BgpOpenMessage, BgpOpenMessageParameter},
    path_attribute::{
        As2PathSegment, As4PathSegment, AsPath, AsPathSegmentType, Communities, LocalPreference,
        MpReach, MpUnreach, NextHop, Origin, PathAttribute, PathAttributeValue,
    },
    update::BgpUpdateMessage,
};
use netgauze_iana::address_family::AddressType;

use super::RouteAttributes;

/// RFC 4271 §4.1.
pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
/// RFC 6793: the 2-octet stand-in for a 4-octet AS number.
const AS_TRANS: u16 = 23456;
/// Host routes per UPDATE: 5 octets each for IPv4, 17 for IPv6, well
/// inside 4096 octets with the attributes.
pub const IPV4_PER_UPDATE: usize = 500;
pub const IPV6_PER_UPDATE: usize = 200;
/// LOCAL_PREF sent to iBGP peers (RFC 4271 §5.1.5 makes it mandatory
/// there); 100 is the routers' own default.
const LOCAL_PREFERENCE: u32 = 100;

/// The OPEN this node sends: 4-octet AS (RFC 6793), IPv4 and IPv6 unicast
/// (RFC 4760), graceful restart (RFC 4724) with the forwarding state kept
/// for both families, since the datapath forwards from pinned maps while
/// the agent is away. `restarted` sets the Restart State bit: the first
/// session of an agent that found its datapath already running.
pub fn open(
    local_asn: u32,
    hold_time: u16,
    router_id: Ipv4Addr,
    restart_time: u16,
    restarted: bool,
) -> BgpMessage {
    let my_as = u16::try_from(local_asn).unwrap_or(AS_TRANS);
    let families = [AddressType::Ipv4Unicast, AddressType::Ipv6Unicast];
    let mut capabilities: Vec<BgpCapability> = families
        .iter()
        .map(|&family| {
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(family))
        })
        .collect();
    capabilities.push(BgpCapability::RouteRefresh);
    capabilities.push(BgpCapability::GracefulRestartCapability(
        GracefulRestartCapability::new(
            restarted,
            false,
            restart_time,
            families
                .iter()
                .map(|&family| GracefulRestartAddressFamily::new(true, family))
                .collect::<Vec<_>>(),
        ),
    ));
    capabilities.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(
        local_asn,
    )));
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        hold_time,
        router_id,
        vec![BgpOpenMessageParameter::new_capabilities(capabilities)],
    ))
}

/// How this node's routes look to one peer.
#[derive(Clone, Copy, Debug)]
pub struct PathAttributes {
    pub local_asn: u32,
    pub ebgp: bool,
    /// The peer took the 4-octet AS capability.
    pub asn4: bool,
}

impl PathAttributes {
    /// ORIGIN IGP, AS_PATH (this AS towards eBGP peers, empty towards iBGP
    /// ones), LOCAL_PREF towards iBGP peers (the pool's, or 100), and the
    /// pool's COMMUNITIES.
    fn common(&self, route: &RouteAttributes) -> Vec<PathAttribute> {
        let mut attributes = vec![well_known(PathAttributeValue::Origin(Origin::IGP))];
        let as_path = match (self.ebgp, self.asn4) {
            (false, true) => AsPath::As4PathSegments(Box::new([])),
            (false, false) => AsPath::As2PathSegments(Box::new([])),
            (true, true) => AsPath::As4PathSegments(Box::new([As4PathSegment::new(
                AsPathSegmentType::AsSequence,
                [self.local_asn],
            )])),
            (true, false) => AsPath::As2PathSegments(Box::new([As2PathSegment::new(
                AsPathSegmentType::AsSequence,
                [u16::try_from(self.local_asn).unwrap_or(AS_TRANS)],
            )])),
        };
        attributes.push(well_known(PathAttributeValue::AsPath(as_path)));
        if !self.ebgp {
            attributes.push(well_known(PathAttributeValue::LocalPreference(
                LocalPreference::new(route.local_preference.unwrap_or(LOCAL_PREFERENCE)),
            )));
        }
        if !route.communities.is_empty() {
            let communities: Vec<Community> = route
                .communities
                .iter()
                .map(|&c| Community::new(c))
                .collect();
            // Optional transitive (RFC 1997).
            attributes.push(
                PathAttribute::from(
                    true,
                    true,
                    false,
                    false,
                    PathAttributeValue::Communities(Communities::new(communities)),
                )
                .expect("optional transitive flags"),
            );
        }
        attributes
    }

    pub fn announce_v4(
        &self,
        prefixes: &[Ipv4Net],
        next_hop: Ipv4Addr,
        route: &RouteAttributes,
    ) -> BgpMessage {
        let mut attributes = self.common(route);
        attributes.push(well_known(PathAttributeValue::NextHop(NextHop::new(
            next_hop,
        ))));
        BgpMessage::Update(BgpUpdateMessage::new(
            Vec::new(),
            attributes,
            prefixes.iter().map(|&p| unicast_v4(p)).collect::<Vec<_>>(),
        ))
    }

    pub fn announce_v6(
        &self,
        prefixes: &[Ipv6Net],
        next_hop: Ipv6Addr,
        route: &RouteAttributes,
    ) -> BgpMessage {
        let mut attributes = self.common(route);
        attributes.push(optional(PathAttributeValue::MpReach(
            MpReach::Ipv6Unicast {
                next_hop_global: next_hop,
                next_hop_local: None,
                nlri: prefixes.iter().map(|&p| unicast_v6(p)).collect(),
            },
        )));
        BgpMessage::Update(BgpUpdateMessage::new(Vec::new(), attributes, Vec::new()))
    }
}

pub fn withdraw_v4(prefixes: &[Ipv4Net]) -> BgpMessage {
    BgpMessage::Update(BgpUpdateMessage::new(
        prefixes.iter().map(|&p| unicast_v4(p)).collect::<Vec<_>>(),
        Vec::new(),
        Vec::new(),
    ))
}

pub fn withdraw_v6(prefixes: &[Ipv6Net]) -> BgpMessage {
    BgpMessage::Update(BgpUpdateMessage::new(
        Vec::new(),
        vec![optional(PathAttributeValue::MpUnreach(
            MpUnreach::Ipv6Unicast {
                nlri: prefixes.iter().map(|&p| unicast_v6(p)).collect(),
            },
        ))],
        Vec::new(),
    ))
}

/// RFC 4724 §2: End-of-RIB of IPv4 unicast is an empty UPDATE; of IPv6
/// unicast an UPDATE holding only an empty MP_UNREACH_NLRI.
pub fn end_of_rib_v4() -> BgpMessage {
    withdraw_v4(&[])
}

pub fn end_of_rib_v6() -> BgpMessage {
    withdraw_v6(&[])
}

/// Can `net` be sent as unicast NLRI? (Not a multicast prefix: a Service
/// whose status names a multicast address is not announced, rather than
/// crash the session.)
pub fn is_unicast(net: ipnet::IpNet) -> bool {
    match net {
        ipnet::IpNet::V4(net) => Ipv4Unicast::from_net(net).is_ok(),
        ipnet::IpNet::V6(net) => Ipv6Unicast::from_net(net).is_ok(),
    }
}

/// A prefix as NLRI: checked by [`is_unicast`] first.
fn unicast_v4(net: Ipv4Net) -> Ipv4UnicastAddress {
    Ipv4UnicastAddress::new_no_path_id(Ipv4Unicast::from_net(net).expect("checked by is_unicast"))
}

fn unicast_v6(net: Ipv6Net) -> Ipv6UnicastAddress {
    Ipv6UnicastAddress::new(
        None,
        Ipv6Unicast::from_net(net).expect("checked by is_unicast"),
    )
}

fn well_known(value: PathAttributeValue) -> PathAttribute {
    PathAttribute::from(false, true, false, false, value).expect("well-known transitive flags")
}

fn optional(value: PathAttributeValue) -> PathAttribute {
    // Extended length: MP_REACH of 200 IPv6 host routes is over 255 octets.
    PathAttribute::from(true, false, false, true, value).expect("optional non-transitive flags")
}

/// A NOTIFICATION with its RFC 4271 §4.5 code and subcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification(pub BgpNotificationMessage);

impl Notification {
    pub fn message(&self) -> BgpMessage {
        BgpMessage::Notification(self.0.clone())
    }

    pub fn hold_timer_expired() -> Self {
        Self(BgpNotificationMessage::HoldTimerExpiredError(
            HoldTimerExpiredError::Unspecific {
                sub_code: 0,
                value: Box::new([]),
            },
        ))
    }

    pub fn unexpected_message(state: SessionPhase) -> Self {
        let value = Box::new([]);
        Self(BgpNotificationMessage::FiniteStateMachineError(
            match state {
                SessionPhase::OpenSent => {
                    FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value }
                }
                SessionPhase::OpenConfirm => {
                    FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value }
                }
                SessionPhase::Established => {
                    FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value }
                }
            },
        ))
    }

    pub fn bad_peer_as(asn: u32) -> Self {
        let value: Box<[u8]> = match u16::try_from(asn) {
            Ok(short) => Box::new(short.to_be_bytes()),
            Err(_) => Box::new(AS_TRANS.to_be_bytes()),
        };
        Self(BgpNotificationMessage::OpenMessageError(
            OpenMessageError::BadPeerAs { value },
        ))
    }

    pub fn unacceptable_hold_time() -> Self {
        Self(BgpNotificationMessage::OpenMessageError(
            OpenMessageError::UnacceptableHoldTime {
                value: Box::new([]),
            },
        ))
    }

    pub fn bad_bgp_identifier() -> Self {
        Self(BgpNotificationMessage::OpenMessageError(
            OpenMessageError::BadBgpIdentifier {
                value: Box::new([]),
            },
        ))
    }

    pub fn peer_deconfigured() -> Self {
        Self(BgpNotificationMessage::CeaseError(
            CeaseError::PeerDeConfigured {
                value: Box::new([]),
            },
        ))
    }
}

/// The states of RFC 4271 §8.2.2 in which messages are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPhase {
    OpenSent,
    OpenConfirm,
    Established,
}

/// Takes the next whole message off `buffer`: `Ok(None)` until one has
/// arrived; a NOTIFICATION to send when its header is wrong (RFC 4271
/// §6.1: marker not all ones, length outside 19..=4096 or too short for its
/// type, unknown type).
pub fn next_frame(buffer: &mut BytesMut) -> Result<Option<BytesMut>, Notification> {
    if buffer.len() < HEADER_LEN {
        return Ok(None);
    }
    if buffer[..16].iter().any(|&b| b != 0xff) {
        return Err(Notification(BgpNotificationMessage::MessageHeaderError(
            MessageHeaderError::ConnectionNotSynchronized {
                value: Box::new([]),
            },
        )));
    }
    let length = usize::from(u16::from_be_bytes([buffer[16], buffer[17]]));
    let kind = buffer[18];
    let minimum = match kind {
        1 => 29, // OPEN
        2 => 23, // UPDATE
        3 => 21, // NOTIFICATION
        4 => 19, // KEEPALIVE
        5 => 23, // ROUTE-REFRESH (RFC 2918)
        _ => {
            return Err(Notification(BgpNotificationMessage::MessageHeaderError(
                MessageHeaderError::BadMessageType {
                    value: Box::new([kind]),
                },
            )));
        }
    };
    if length < minimum || length > MAX_MESSAGE_LEN || (kind == 4 && length != HEADER_LEN) {
        return Err(Notification(BgpNotificationMessage::MessageHeaderError(
            MessageHeaderError::BadMessageLength {
                value: Box::new((length as u16).to_be_bytes()),
            },
        )));
    }
    if buffer.len() < length {
        return Ok(None);
    }
    Ok(Some(buffer.split_to(length)))
}

/// The NOTIFICATION for a frame whose header was right but whose body
/// NetGauze could not parse, by message type (RFC 4271 §6.2, §6.3).
pub fn body_error(kind: u8) -> Notification {
    let value = Box::new([]);
    Notification(match kind {
        1 => BgpNotificationMessage::OpenMessageError(OpenMessageError::Unspecific { value }),
        2 => {
            BgpNotificationMessage::UpdateMessageError(UpdateMessageError::MalformedAttributeList {
                value,
            })
        }
        _ => BgpNotificationMessage::MessageHeaderError(MessageHeaderError::BadMessageLength {
            value,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netgauze_bgp_pkt::codec::BgpCodec;
    use tokio_util::codec::{Decoder, Encoder};

    fn round_trip(message: BgpMessage) -> BgpMessage {
        let mut codec = BgpCodec::new(true);
        let mut wire = BytesMut::new();
        codec.encode(message, &mut wire).unwrap();
        let frame = next_frame(&mut wire).unwrap().expect("a whole frame");
        assert!(wire.is_empty());
        let mut frame = frame;
        codec.decode(&mut frame).unwrap().expect("decoded").0
    }

    #[test]
    fn open_carries_four_octet_as_both_families_and_graceful_restart() {
        let BgpMessage::Open(open) = round_trip(open(
            4_200_000_001,
            9,
            "10.0.0.2".parse().unwrap(),
            120,
            true,
        )) else {
            panic!("not an OPEN");
        };
        assert_eq!(open.my_as(), AS_TRANS);
        assert_eq!(open.my_asn4(), 4_200_000_001);
        let capabilities = open.capabilities();
        let restart = capabilities
            .iter()
            .find_map(|c| match c {
                BgpCapability::GracefulRestartCapability(gr) => Some(gr),
                _ => None,
            })
            .expect("graceful restart capability");
        assert!(restart.restart());
        assert_eq!(restart.time(), 120);
        assert_eq!(restart.address_families().len(), 2);
        assert!(
            restart
                .address_families()
                .iter()
                .all(|f| f.forwarding_state())
        );
        let families = capabilities
            .iter()
            .filter(|c| matches!(c, BgpCapability::MultiProtocolExtensions(_)))
            .count();
        assert_eq!(families, 2);
    }

    #[test]
    fn updates_round_trip_through_the_wire_format() {
        let attributes = PathAttributes {
            local_asn: 64501,
            ebgp: true,
            asn4: true,
        };
        let addresses = [
            "192.0.2.10/32".parse().unwrap(),
            "192.0.2.11/32".parse().unwrap(),
        ];
        let BgpMessage::Update(update) = round_trip(attributes.announce_v4(
            &addresses,
            "10.0.0.2".parse().unwrap(),
            &RouteAttributes::default(),
        )) else {
            panic!("not an UPDATE");
        };
        assert_eq!(update.nlri().len(), 2);
        assert_eq!(
            update.nlri()[0].network().address().to_string(),
            "192.0.2.10/32"
        );
        let BgpMessage::Update(update) = round_trip(attributes.announce_v6(
            &["2001:db8::10/128".parse().unwrap()],
            "fd00::2".parse().unwrap(),
            &RouteAttributes::default(),
        )) else {
            panic!("not an UPDATE");
        };
        assert!(update.path_attributes().iter().any(|a| matches!(
            a.value(),
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast { nlri, .. }) if nlri.len() == 1
        )));
        let BgpMessage::Update(eor) = round_trip(end_of_rib_v6()) else {
            panic!("not an UPDATE");
        };
        assert_eq!(eor.end_of_rib(), Some(AddressType::Ipv6Unicast));
        let BgpMessage::Update(eor) = round_trip(end_of_rib_v4()) else {
            panic!("not an UPDATE");
        };
        assert_eq!(eor.end_of_rib(), Some(AddressType::Ipv4Unicast));
    }

    #[test]
    fn a_pools_communities_go_to_every_peer_and_its_local_preference_to_ibgp_ones_only() {
        let route = RouteAttributes {
            communities: vec![(64500 << 16) | 42, 0xFFFF_FF01],
            local_preference: Some(250),
            ..RouteAttributes::default()
        };
        let sent = |ebgp: bool| {
            let attributes = PathAttributes {
                local_asn: 64501,
                ebgp,
                asn4: true,
            };
            let BgpMessage::Update(update) = round_trip(attributes.announce_v4(
                &["192.0.2.0/24".parse().unwrap()],
                "10.0.0.2".parse().unwrap(),
                &route,
            )) else {
                panic!("not an UPDATE");
            };
            let mut communities = Vec::new();
            let mut local_preference = None;
            for attribute in update.path_attributes() {
                match attribute.value() {
                    PathAttributeValue::Communities(c) => {
                        communities.extend(c.communities().iter().map(|c| c.value()));
                    }
                    PathAttributeValue::LocalPreference(p) => {
                        local_preference = Some(p.metric());
                    }
                    _ => {}
                }
            }
            (communities, local_preference)
        };
        assert_eq!(sent(true), (route.communities.clone(), None));
        assert_eq!(sent(false), (route.communities.clone(), Some(250)));
    }

    #[test]
    fn bad_headers_get_the_rfc_4271_notification() {
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        assert!(matches!(
            next_frame(&mut garbage).unwrap_err().0,
            BgpNotificationMessage::MessageHeaderError(
                MessageHeaderError::ConnectionNotSynchronized { .. }
            )
        ));
        let mut header = BytesMut::from(&[0xffu8; 16][..]);
        header.extend_from_slice(&[0, 19, 9]);
        assert!(matches!(
            next_frame(&mut header).unwrap_err().0,
            BgpNotificationMessage::MessageHeaderError(MessageHeaderError::BadMessageType { .. })
        ));
        let mut header = BytesMut::from(&[0xffu8; 16][..]);
        header.extend_from_slice(&[0x20, 0, 2]);
        assert!(matches!(
            next_frame(&mut header).unwrap_err().0,
            BgpNotificationMessage::MessageHeaderError(MessageHeaderError::BadMessageLength { .. })
        ));
        // Half a KEEPALIVE waits for the rest.
        let mut partial = BytesMut::from(&[0xffu8; 16][..]);
        assert_eq!(next_frame(&mut partial).unwrap(), None);
    }
}
