use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::model::{Backend, FrontendSpec, Protocol, ServiceRef};

#[derive(Default)]
struct FakeMaps {
    backends: BTreeSet<(IpAddr, u16, u8)>,
    networks: BTreeSet<Network>,
    writes: usize,
}

fn decode(key: &LocalBackendKey) -> (IpAddr, u16, u8) {
    (
        crate::encode::addr_from16(&key.addr, key.family),
        key.port.host(),
        key.proto,
    )
}

impl GuardMaps for FakeMaps {
    fn put_local_backend(&mut self, key: &LocalBackendKey) -> Result<()> {
        self.writes += 1;
        self.backends.insert(decode(key));
        Ok(())
    }
    fn delete_local_backend(&mut self, key: &LocalBackendKey) -> Result<()> {
        self.writes += 1;
        self.backends.remove(&decode(key));
        Ok(())
    }
    fn local_backends(&self) -> Result<Vec<LocalBackendKey>> {
        Ok(self
            .backends
            .iter()
            .map(|(addr, port, proto)| LocalBackendKey {
                addr: crate::encode::addr16(*addr).unwrap(),
                port: lb_common::Be16::from_host(*port),
                proto: *proto,
                family: lb_common::FAMILY_V4,
            })
            .collect())
    }
    fn put_cluster_network(&mut self, network: &Network) -> Result<()> {
        self.writes += 1;
        self.networks.insert(*network);
        Ok(())
    }
    fn delete_cluster_network(&mut self, network: &Network) -> Result<()> {
        self.writes += 1;
        self.networks.remove(network);
        Ok(())
    }
    fn cluster_networks(&self) -> Result<Vec<Network>> {
        Ok(self.networks.iter().copied().collect())
    }
}

const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2));
const POD_C: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 3, 2));
const TCP: u8 = lb_common::PROTO_TCP;
const UDP: u8 = lb_common::PROTO_UDP;

fn frontend(port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)),
        port,
        protocol,
    }
}

fn backend(addr: IpAddr, local: bool) -> Backend {
    Backend {
        addr,
        port: 8080,
        local,
        terminating: false,
    }
}

fn spec(backends: Vec<Backend>) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
        },
        backends,
        local_only: false,
        affinity_timeout: None,
        source_ranges: Vec::new(),
    }
}

fn network(text: &str) -> Network {
    Network::from(text.parse::<ipnet::IpNet>().unwrap())
}

#[test]
fn only_local_backends_are_guarded_per_protocol() {
    let mut desired = DesiredState::default();
    desired.frontends.insert(
        frontend(80, Protocol::Tcp),
        spec(vec![backend(POD_A, true), backend(POD_C, false)]),
    );
    desired.frontends.insert(
        frontend(53, Protocol::Udp),
        spec(vec![backend(POD_A, true)]),
    );
    let mut maps = FakeMaps::default();
    let mut guard = EgressGuard::new([]);
    let now = Instant::now();
    guard.apply(&desired, None, &mut maps, now).unwrap();
    assert_eq!(
        maps.backends,
        BTreeSet::from([(POD_A, 8080, TCP), (POD_A, 8080, UDP)])
    );
}

#[test]
fn a_backend_that_leaves_is_kept_for_the_retention_then_removed() {
    let tcp = frontend(80, Protocol::Tcp);
    let mut desired = DesiredState::default();
    desired
        .frontends
        .insert(tcp, spec(vec![backend(POD_A, true)]));
    let mut maps = FakeMaps::default();
    let mut guard = EgressGuard::new([]);
    let start = Instant::now();
    guard.apply(&desired, None, &mut maps, start).unwrap();
    // The Service goes: only its frontend changed.
    desired.frontends.clear();
    guard
        .apply(&desired, Some(&BTreeSet::from([tcp])), &mut maps, start)
        .unwrap();
    assert_eq!(
        maps.backends.len(),
        1,
        "kept while its flows' packets may come"
    );
    let retention = Duration::from_secs(60);
    assert_eq!(
        guard
            .expire(&mut maps, start + Duration::from_secs(59), retention)
            .unwrap(),
        0
    );
    assert_eq!(
        guard
            .expire(&mut maps, start + Duration::from_secs(60), retention)
            .unwrap(),
        1
    );
    assert!(maps.backends.is_empty());
    assert_eq!(guard.guarded(), 0);
}

#[test]
fn a_key_two_frontends_share_stays_listed_while_one_lists_it() {
    let (first, second) = (frontend(80, Protocol::Tcp), frontend(81, Protocol::Tcp));
    let mut desired = DesiredState::default();
    desired
        .frontends
        .insert(first, spec(vec![backend(POD_A, true)]));
    desired
        .frontends
        .insert(second, spec(vec![backend(POD_A, true)]));
    let mut maps = FakeMaps::default();
    let mut guard = EgressGuard::new([]);
    let start = Instant::now();
    guard.apply(&desired, None, &mut maps, start).unwrap();
    desired.frontends.remove(&first);
    guard
        .apply(&desired, Some(&BTreeSet::from([first])), &mut maps, start)
        .unwrap();
    // Still listed by `second`: no retention clock runs.
    let later = start + RETENTION * 2;
    assert_eq!(guard.expire(&mut maps, later, RETENTION).unwrap(), 0);
    assert_eq!(maps.backends.len(), 1);
    // Back in a frontend before its retention ends: the clock stops.
    desired.frontends.remove(&second);
    guard
        .apply(&desired, Some(&BTreeSet::from([second])), &mut maps, later)
        .unwrap();
    desired
        .frontends
        .insert(first, spec(vec![backend(POD_A, true)]));
    guard
        .apply(&desired, Some(&BTreeSet::from([first])), &mut maps, later)
        .unwrap();
    assert_eq!(
        guard
            .expire(&mut maps, later + RETENTION * 2, RETENTION)
            .unwrap(),
        0
    );
    assert_eq!(maps.backends.len(), 1);
}

#[test]
fn an_unchanged_state_writes_nothing_again() {
    let mut desired = DesiredState::default();
    desired.frontends.insert(
        frontend(80, Protocol::Tcp),
        spec(vec![backend(POD_A, true)]),
    );
    desired.cluster_networks.insert(network("10.244.1.0/24"));
    let mut maps = FakeMaps::default();
    let mut guard = EgressGuard::new([network("10.42.0.0/16")]);
    let now = Instant::now();
    guard.apply(&desired, None, &mut maps, now).unwrap();
    let writes = maps.writes;
    guard.apply(&desired, None, &mut maps, now).unwrap();
    assert_eq!(maps.writes, writes);
}

#[test]
fn networks_are_the_nodes_and_the_flags_and_follow_changes() {
    let mut desired = DesiredState::default();
    desired.cluster_networks.insert(network("10.244.1.0/24"));
    desired.cluster_networks.insert(network("10.0.1.1/32"));
    let mut maps = FakeMaps::default();
    let mut guard = EgressGuard::new([network("10.42.0.0/16")]);
    let now = Instant::now();
    guard.apply(&desired, None, &mut maps, now).unwrap();
    assert_eq!(
        maps.networks,
        BTreeSet::from([
            network("10.244.1.0/24"),
            network("10.0.1.1/32"),
            network("10.42.0.0/16")
        ])
    );
    desired.cluster_networks.remove(&network("10.0.1.1/32"));
    guard.apply(&desired, None, &mut maps, now).unwrap();
    assert!(!maps.networks.contains(&network("10.0.1.1/32")));
    assert!(maps.networks.contains(&network("10.42.0.0/16")));
}

#[test]
fn a_restarted_agent_keeps_what_it_finds_for_the_retention() {
    let mut maps = FakeMaps::default();
    maps.backends.insert((POD_A, 8080, TCP));
    maps.backends.insert((POD_C, 8080, TCP));
    maps.networks.insert(network("192.168.0.0/16"));
    let mut desired = DesiredState::default();
    desired.frontends.insert(
        frontend(80, Protocol::Tcp),
        spec(vec![backend(POD_A, true)]),
    );
    let mut guard = EgressGuard::new([]);
    let start = Instant::now();
    guard.adopt(&maps, start).unwrap();
    guard.apply(&desired, None, &mut maps, start).unwrap();
    // A stale network goes at once; a backend no frontend lists stays
    // its retention (its pod may still be sending), one listed stays.
    assert!(maps.networks.is_empty());
    assert_eq!(guard.expire(&mut maps, start, RETENTION).unwrap(), 0);
    assert_eq!(
        guard
            .expire(&mut maps, start + RETENTION, RETENTION)
            .unwrap(),
        1
    );
    assert_eq!(maps.backends, BTreeSet::from([(POD_A, 8080, TCP)]));
}
