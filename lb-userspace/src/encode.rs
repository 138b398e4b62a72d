//! How the model's values are written as the map keys and values of
//! lb-common, and read back (adoption of pinned maps, `xlb inspect`). The
//! only place that knows the 16-byte address form and the family byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Be16, Be32, CLUSTER_NETWORK_FAMILY_BITS,
    ClusterNetwork, FAMILY_V4, FAMILY_V6, FrontendKey, LocalBackendKey, SERVICE_F_AFFINITY,
    SERVICE_F_LOCAL_ONLY, SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS,
};

use crate::model::{Backend, Frontend, FrontendSpec, Network, Protocol, SourceRange};

/// An address in the maps' 16-byte form (see [`lb_common::addr_v4`]); its
/// family goes beside it ([`family`]). Infallible since IPv6 is written
/// too; the `Result` stays for the callers' error context.
pub fn addr16(addr: IpAddr) -> Result<[u8; 16]> {
    Ok(match addr {
        IpAddr::V4(a) => lb_common::addr_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    })
}

/// The inverse of [`addr16`]: `family` says how many of the 16 bytes count.
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
/// writes (an unknown family or protocol).
pub fn frontend_from_key(key: &FrontendKey) -> Option<Frontend> {
    if key.family != FAMILY_V4 && key.family != FAMILY_V6 {
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
/// `service_id`: the prefix covers the id and the family too, so a lookup
/// only matches ranges of its own service and family. A frontend carries
/// every range of its Service, of both families: one with ranges of only
/// the other family is still flagged ([`service_value`]) and matches no
/// client, so it refuses all (fail closed, audit A-13).
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

    fn v6(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_fill_all_sixteen_bytes_and_read_back() {
        let addr = v6("2001:db8::7");
        let bytes = addr16(addr).unwrap();
        assert_eq!(bytes[..2], [0x20, 0x01]);
        assert_eq!(bytes[15], 7);
        assert_eq!(family(addr), FAMILY_V6);
        assert_eq!(addr_from16(&bytes, FAMILY_V6), addr);
        // The same bytes under the IPv4 family are another address: the
        // family byte is what tells them apart.
        assert_eq!(addr_from16(&bytes, FAMILY_V4), v4(0x20, 0x01, 0x0d, 0xb8));
    }

    #[test]
    fn ipv6_frontend_backend_and_range_round_trip() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let frontend = Frontend {
                addr: v6("2001:db8::1"),
                port: 80,
                protocol,
            };
            let key = frontend_key(&frontend).unwrap();
            assert_eq!(key.family, FAMILY_V6);
            assert_eq!(frontend_from_key(&key), Some(frontend));
            assert_eq!(frontend.to_string(), format!("[2001:db8::1]:80/{protocol}"));
        }
        let backend = Backend {
            addr: v6("fd00:10:244::5"),
            port: 8080,
            local: true,
            terminating: false,
        };
        let value = backend_value(&backend, 9).unwrap();
        assert_eq!(value.family, FAMILY_V6);
        assert_eq!(backend_from_value(&value), backend);

        let range = SourceRange {
            addr: v6("2001:db8:100::"),
            prefix_len: 48,
        };
        let (key, prefix_len) = source_range_key(7, &range).unwrap();
        assert_eq!(key.family, FAMILY_V6);
        assert_eq!(prefix_len, SOURCE_RANGE_ID_BITS + 48);
        assert_eq!(source_range_from_key(&key, prefix_len), (7, range));
    }

    #[test]
    fn ranges_of_the_two_families_with_the_same_leading_bytes_are_distinct_keys() {
        // 32.1.13.184/32 and 2001:db8::/32 start with the same four bytes;
        // only the family byte (inside the prefix) keeps an IPv4 range from
        // matching IPv6 clients.
        let ipv4 = SourceRange {
            addr: v4(0x20, 0x01, 0x0d, 0xb8),
            prefix_len: 32,
        };
        let ipv6 = SourceRange {
            addr: v6("2001:db8::"),
            prefix_len: 32,
        };
        let (key4, len4) = source_range_key(3, &ipv4).unwrap();
        let (key6, len6) = source_range_key(3, &ipv6).unwrap();
        assert_eq!((len4, key4.addr), (len6, key6.addr));
        assert_ne!(key4.family, key6.family);
        assert_eq!(source_range_from_key(&key4, len4), (3, ipv4));
        assert_eq!(source_range_from_key(&key6, len6), (3, ipv6));
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
        key.family = 0;
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
