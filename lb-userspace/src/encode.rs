//! How the model's values are written as the map keys and values of
//! lb-common, and read back (adoption of pinned maps, `xlb inspect`). The
//! only place that knows the 16-byte address form, so IPv6 is added here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Be16, Be32, CLUSTER_NETWORK_FAMILY_BITS,
    ClusterNetwork, FAMILY_V4, FAMILY_V6, FrontendKey, LocalBackendKey, SERVICE_F_AFFINITY,
    SERVICE_F_LOCAL_ONLY, SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS,
};

use crate::model::{Backend, Frontend, FrontendSpec, Network, Protocol, SourceRange};

/// An address in the maps' 16-byte form (see [`lb_common::addr_v4`]).
pub fn addr16(addr: IpAddr) -> Result<[u8; 16]> {
    match addr {
        IpAddr::V4(a) => Ok(lb_common::addr_v4(a.octets())),
        // The datapath parses IPv4 only.
        IpAddr::V6(_) => bail!("IPv6 is not supported yet"),
    }
}

/// The inverse of [`addr16`]: `family` says how many of the 16 bytes count.
/// Maps whose entries carry no family (the source-range trie) hold IPv4.
pub fn addr_from16(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

/// The family byte of the keys and values that carry one.
pub fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

/// `SERVICES` key of a frontend.
pub fn frontend_key(frontend: &Frontend) -> Result<FrontendKey> {
    Ok(FrontendKey {
        addr: addr16(frontend.addr).with_context(|| format!("frontend {frontend}"))?,
        port: Be16::from_host(frontend.port),
        proto: frontend.protocol.number(),
        family: family(frontend.addr),
    })
}

/// The frontend a `SERVICES` key names; `None` for a key this agent never
/// writes (another family or protocol).
pub fn frontend_from_key(key: &FrontendKey) -> Option<Frontend> {
    if key.family != FAMILY_V4 {
        return None;
    }
    Some(Frontend {
        addr: addr_from16(&key.addr, key.family),
        port: key.port.host(),
        protocol: Protocol::from_number(key.proto)?,
    })
}

/// `SERVICES` value of a frontend whose service id is `service_id`. The
/// Maglev table is the service's own (`table_id == service_id`): it is
/// updated in place, see `reconcile`.
pub fn service_value(service_id: u32, spec: &FrontendSpec) -> lb_common::Service {
    let mut flags = 0;
    if spec.local_only {
        flags |= SERVICE_F_LOCAL_ONLY;
    }
    if !spec.source_ranges.is_empty() {
        flags |= SERVICE_F_SOURCE_RANGES;
    }
    if spec.affinity_timeout.is_some() {
        flags |= SERVICE_F_AFFINITY;
    }
    lb_common::Service {
        service_id,
        table_id: service_id,
        backend_count: spec.backends.len() as u32,
        flags,
        affinity_timeout: spec.affinity_timeout.unwrap_or(0),
    }
}

/// `BACKENDS` value of a backend of service `service_id`.
pub fn backend_value(backend: &Backend, service_id: u32) -> Result<lb_common::Backend> {
    let mut flags = 0;
    if backend.local {
        flags |= BACKEND_F_LOCAL;
    }
    if backend.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    Ok(lb_common::Backend {
        addr: addr16(backend.addr).with_context(|| format!("backend {}", backend.addr))?,
        port: Be16::from_host(backend.port),
        family: family(backend.addr),
        flags,
        service_id,
    })
}

/// The backend a `BACKENDS` value describes.
pub fn backend_from_value(value: &lb_common::Backend) -> Backend {
    Backend {
        addr: addr_from16(&value.addr, value.family),
        port: value.port.host(),
        local: value.flags & BACKEND_F_LOCAL != 0,
        terminating: value.flags & BACKEND_F_TERMINATING != 0,
    }
}

/// `LOCAL_BACKENDS` key of a node-local backend reached with `protocol`.
pub fn local_backend_key(backend: &Backend, protocol: Protocol) -> Result<LocalBackendKey> {
    Ok(LocalBackendKey {
        addr: addr16(backend.addr).with_context(|| format!("backend {}", backend.addr))?,
        port: Be16::from_host(backend.port),
        proto: protocol.number(),
        family: family(backend.addr),
    })
}

/// `CLUSTER_NETWORKS` trie key and prefix length of one network, either
/// family: the prefix covers the family byte, so an IPv4 network never
/// matches an IPv6 address that starts with the same bytes.
pub fn cluster_network_key(network: &Network) -> (ClusterNetwork, u32) {
    let addr = match network.addr {
        IpAddr::V4(a) => lb_common::addr_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    };
    let key = ClusterNetwork {
        family: family(network.addr),
        addr,
        _pad: [0; 3],
    };
    (
        key,
        CLUSTER_NETWORK_FAMILY_BITS + u32::from(network.prefix_len),
    )
}

/// The network a `CLUSTER_NETWORKS` trie key names.
pub fn cluster_network_from_key(key: &ClusterNetwork, prefix_len: u32) -> Network {
    Network {
        addr: addr_from16(&key.addr, key.family),
        prefix_len: prefix_len.saturating_sub(CLUSTER_NETWORK_FAMILY_BITS) as u8,
    }
}

/// `SOURCE_RANGES` trie key and prefix length of one range of service
/// `service_id`: the prefix covers the id too, so a lookup only matches
/// ranges of its own service.
pub fn source_range_key(
    service_id: u32,
    range: &SourceRange,
) -> Result<(lb_common::SourceRange, u32)> {
    Ok((
        lb_common::SourceRange {
            service_id: Be32::from_host(service_id),
            family: family(range.addr),
            addr: addr16(range.addr).with_context(|| format!("source range {range}"))?,
            _pad: [0; 3],
        },
        SOURCE_RANGE_ID_BITS + range.prefix_len as u32,
    ))
}

/// Whether a range is written to `SOURCE_RANGES`. IPv6 ranges cannot match
/// the IPv4 datapath: they are not written, but still count (the service is
/// flagged), so a list of only IPv6 ranges blocks IPv4 clients.
pub fn source_range_is_written(range: &SourceRange) -> bool {
    range.addr.is_ipv4()
}

/// The service id and range a `SOURCE_RANGES` trie key names.
pub fn source_range_from_key(key: &lb_common::SourceRange, prefix_len: u32) -> (u32, SourceRange) {
    (
        key.service_id.host(),
        SourceRange {
            addr: addr_from16(&key.addr, key.family),
            prefix_len: prefix_len.saturating_sub(SOURCE_RANGE_ID_BITS) as u8,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceRef;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn ipv4_addresses_fill_the_first_four_bytes_and_read_back() {
        let addr = v4(10, 200, 0, 7);
        let bytes = addr16(addr).unwrap();
        assert_eq!(bytes[..4], [10, 200, 0, 7]);
        assert!(bytes[4..].iter().all(|b| *b == 0));
        assert_eq!(addr_from16(&bytes, family(addr)), addr);
        assert_eq!(family(addr), FAMILY_V4);
    }

    #[test]
    fn ipv6_is_refused_with_the_object_named() {
        let frontend = Frontend {
            addr: "2001:db8::1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let error = format!("{:#}", frontend_key(&frontend).unwrap_err());
        assert_eq!(
            error,
            "frontend [2001:db8::1]:80/TCP: IPv6 is not supported yet"
        );
    }

    #[test]
    fn cluster_networks_round_trip_in_both_families() {
        for text in ["10.42.0.0/16", "10.0.1.1/32", "fd00:42::/56", "0.0.0.0/0"] {
            let network = Network::from(text.parse::<ipnet::IpNet>().unwrap());
            let (key, prefix_len) = cluster_network_key(&network);
            assert_eq!(
                cluster_network_from_key(&key, prefix_len),
                network,
                "{text}"
            );
        }
        let (v4, v4_len) = cluster_network_key(&Network::from(
            "10.42.0.0/16".parse::<ipnet::IpNet>().unwrap(),
        ));
        assert_eq!((v4.family, v4_len), (FAMILY_V4, 24));
        assert_eq!(v4.addr[..4], [10, 42, 0, 0]);
    }

    #[test]
    fn frontend_key_round_trips() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let frontend = Frontend {
                addr: v4(192, 0, 2, 10),
                port: 8443,
                protocol,
            };
            let key = frontend_key(&frontend).unwrap();
            assert_eq!(key.port.wire().to_ne_bytes(), 8443u16.to_be_bytes());
            assert_eq!(frontend_from_key(&key), Some(frontend));
        }
    }

    #[test]
    fn foreign_frontend_keys_are_not_read() {
        let mut key = frontend_key(&Frontend {
            addr: v4(192, 0, 2, 10),
            port: 53,
            protocol: Protocol::Udp,
        })
        .unwrap();
        key.proto = 1;
        assert_eq!(frontend_from_key(&key), None);
        key.proto = lb_common::PROTO_UDP;
        key.family = FAMILY_V6;
        assert_eq!(frontend_from_key(&key), None);
    }

    #[test]
    fn backend_value_round_trips_with_its_flags() {
        for (local, terminating) in [(false, false), (true, false), (false, true), (true, true)] {
            let backend = Backend {
                addr: v4(10, 1, 0, 3),
                port: 8080,
                local,
                terminating,
            };
            let value = backend_value(&backend, 42).unwrap();
            assert_eq!(value.service_id, 42);
            assert_eq!(value.family, FAMILY_V4);
            assert_eq!(backend_from_value(&value), backend);
        }
    }

    #[test]
    fn source_range_key_round_trips_and_counts_the_id_bits() {
        let range = SourceRange {
            addr: v4(198, 51, 100, 0),
            prefix_len: 24,
        };
        let (key, prefix_len) = source_range_key(7, &range).unwrap();
        assert_eq!(prefix_len, SOURCE_RANGE_ID_BITS + 24);
        assert_eq!(key.service_id.wire().to_ne_bytes(), [0, 0, 0, 7]);
        assert_eq!(source_range_from_key(&key, prefix_len), (7, range));
    }

    #[test]
    fn service_value_sets_a_flag_per_policy() {
        let mut spec = FrontendSpec {
            service: ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: String::new(),
            },
            backends: vec![],
            local_only: false,
            affinity_timeout: None,
            source_ranges: vec![],
        };
        let plain = service_value(3, &spec);
        assert_eq!(
            (
                plain.service_id,
                plain.table_id,
                plain.backend_count,
                plain.flags
            ),
            (3, 3, 0, 0)
        );
        spec.local_only = true;
        spec.affinity_timeout = Some(600);
        spec.source_ranges = vec![SourceRange {
            addr: v4(198, 51, 100, 0),
            prefix_len: 24,
        }];
        let all = service_value(3, &spec);
        assert_eq!(
            all.flags,
            SERVICE_F_LOCAL_ONLY | SERVICE_F_SOURCE_RANGES | SERVICE_F_AFFINITY
        );
        assert_eq!(all.affinity_timeout, 600);
    }
}
