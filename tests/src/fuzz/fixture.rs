//! The datapath under fuzz: the real object loaded (maps pinned under a
//! name of this process), services programmed through the agent's own
//! reconciler, redirect on, inside a fresh network namespace whose links,
//! routes and neighbours make `bpf_fib_lookup` answer every way: redirect
//! (a neighbour behind a TX port), pass (no route, no neighbour, egress not
//! a TX port), fragmentation needed (a 1400-byte link).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{CONFIG_F_REDIRECT, CONFIG_F_REVERSE_PATH, Config};
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef, SourceRange},
    reconcile::Reconciler,
};

use super::{
    generator::Targets,
    model::{FragmentMap, Route},
};
use crate::netns::ns_sh;

pub const NODE: [u8; 4] = [10, 0, 1, 1];

/// One link of the namespace as the model needs it.
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: &'static str,
    pub mac: [u8; 6],
    pub mtu: u16,
    /// In `XLB_TX_PORTS`: translated packets may be redirected to it.
    pub tx_port: bool,
    /// (address, prefix length) of each connected subnet.
    pub addresses: Vec<([u8; 4], u8)>,
    /// Neighbours with a permanent entry.
    pub neighbours: Vec<([u8; 4], [u8; 6])>,
}

/// The namespace's routing as `bpf_fib_lookup` sees it.
#[derive(Clone, Debug)]
pub struct Routes {
    pub interfaces: Vec<Interface>,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl Routes {
    /// Where a forwarded packet to `dst` goes: the connected subnet's link,
    /// its MTU against the header's total length, its neighbour, then the
    /// datapath's own TX-port and TTL checks.
    pub fn route(&self, dst: [u8; 4], tot_len: u16, ttl: u8) -> Route {
        let d = u32::from_be_bytes(dst);
        for link in &self.interfaces {
            for (addr, prefix) in &link.addresses {
                let m = mask(*prefix);
                let a = u32::from_be_bytes(*addr);
                if d & m != a & m {
                    continue;
                }
                if d == a || d & !m == !m {
                    return Route::Pass; // local or broadcast: not forwarded
                }
                if tot_len > link.mtu {
                    return Route::FragNeeded { mtu: link.mtu };
                }
                let Some((_, dmac)) = link.neighbours.iter().find(|(n, _)| *n == dst) else {
                    return Route::Pass;
                };
                if !link.tx_port || ttl <= 1 {
                    return Route::Pass;
                }
                return Route::Redirect {
                    dmac: *dmac,
                    smac: link.mac,
                };
            }
        }
        Route::Pass
    }
}

fn links() -> Vec<Interface> {
    let neighbour = |a: [u8; 4]| (a, [0x02, 0xee, a[0], a[1], a[2], a[3]]);
    vec![
        Interface {
            name: "fz0",
            mac: [0x02, 0xfa, 0, 0, 0, 1],
            mtu: 1400,
            tx_port: true,
            addresses: vec![([10, 244, 0, 1], 16), ([198, 51, 100, 1], 24)],
            neighbours: [
                [10, 244, 1, 2],
                [10, 244, 1, 3],
                [10, 244, 1, 4],
                [10, 244, 3, 2],
                [10, 244, 3, 3],
                [198, 51, 100, 2],
                [198, 51, 100, 3],
            ]
            .into_iter()
            .map(neighbour)
            .collect(),
        },
        Interface {
            name: "fz1",
            mac: [0x02, 0xfa, 0, 0, 0, 2],
            mtu: 1500,
            tx_port: false,
            addresses: vec![([192, 0, 2, 1], 24)],
            neighbours: [[192, 0, 2, 7], [192, 0, 2, 8]]
                .into_iter()
                .map(neighbour)
                .collect(),
        },
    ]
}

fn text(a: [u8; 4]) -> String {
    Ipv4Addr::from(a).to_string()
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes the links, addresses, neighbours of namespace `ns`; turns
/// forwarding on (`bpf_fib_lookup` answers only for a forwarding device).
pub fn build_network(ns: &str) -> Result<Routes> {
    let interfaces = links();
    ns_sh(
        ns,
        &[
            "ip", "link", "add", "fz0", "type", "veth", "peer", "name", "fz1",
        ],
    )?;
    for link in &interfaces {
        let mtu = link.mtu.to_string();
        let mac = mac_text(link.mac);
        ns_sh(
            ns,
            &[
                "ip", "link", "set", link.name, "address", &mac, "mtu", &mtu, "up",
            ],
        )?;
        for (addr, prefix) in &link.addresses {
            let cidr = format!("{}/{prefix}", text(*addr));
            ns_sh(ns, &["ip", "addr", "add", &cidr, "dev", link.name])?;
        }
        for (addr, mac) in &link.neighbours {
            let (addr, mac) = (text(*addr), mac_text(*mac));
            ns_sh(
                ns,
                &[
                    "ip",
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    link.name,
                    "nud",
                    "permanent",
                ],
            )?;
        }
    }
    ns_sh(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    Ok(Routes { interfaces })
}

/// The loaded datapath with its services; removes its pins when dropped.
pub struct Fixture {
    pins: PinDir,
    pub maps: Maps,
    /// The datapath's fragment records (not pinned: taken from the object).
    pub fragments: FragmentMap,
    ebpf: Ebpf,
    /// ifindex of each of `Routes::interfaces`, in order.
    pub ifindexes: Vec<u32>,
    reconciler: Reconciler,
    desired: DesiredState,
    /// Backends [`Fixture::churn`] has taken away.
    parked: Vec<(Frontend, Backend)>,
}

fn backend(addr: [u8; 4], port: u16, local: bool) -> Backend {
    Backend {
        addr: IpAddr::V4(addr.into()),
        port,
        local,
        terminating: false,
    }
}

/// One programmed frontend: address, port, protocols, backends, source
/// ranges.
type ServiceSpec = ([u8; 4], u16, Vec<Protocol>, Vec<Backend>, Vec<SourceRange>);

/// The services. Local and remote (SNAT) backends, one frontend whose local
/// backend is another's too, a source-range service, one without backends.
fn services() -> Vec<ServiceSpec> {
    let both = || vec![Protocol::Tcp, Protocol::Udp];
    vec![
        (
            [10, 200, 0, 10],
            80,
            both(),
            vec![
                backend([10, 244, 1, 2], 8080, true),
                backend([10, 244, 1, 3], 8080, true),
            ],
            vec![],
        ),
        (
            [10, 200, 0, 10],
            90,
            both(),
            vec![
                backend([10, 244, 3, 2], 8080, false),
                backend([10, 244, 3, 3], 8080, false),
            ],
            vec![],
        ),
        (
            [10, 200, 0, 11],
            80,
            vec![Protocol::Tcp],
            vec![
                backend([10, 244, 1, 2], 8080, true),
                backend([10, 244, 3, 2], 8080, false),
            ],
            vec![],
        ),
        (
            [10, 200, 0, 12],
            443,
            both(),
            vec![backend([10, 244, 1, 4], 8443, true)],
            vec![SourceRange {
                addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)),
                prefix_len: 25,
            }],
        ),
        ([10, 200, 0, 13], 80, both(), vec![], vec![]),
    ]
}

impl Fixture {
    /// Loads and programs the datapath; call from inside the namespace
    /// [`build_network`] made, with its `routes`.
    pub fn new(routes: &Routes) -> Result<Fixture> {
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        dataplane::ensure_bpffs(bpffs)?;
        let pins = PinDir::new(bpffs, &format!("fuzz{}", std::process::id()));
        let limits = Limits {
            max_services: 16,
            max_backends: 64,
            max_flows: 65536,
        };
        let mut ebpf = dataplane::load(&pins, limits)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let fragments = ebpf
            .take_map("XLB_FRAGMENTS")
            .context("XLB_FRAGMENTS missing from the object")?
            .try_into()?;
        maps.write_config(&Config {
            node_addr: lb_common::addr_v4(NODE),
            snat_port_min: 32768,
            snat_port_max: 60999,
            flags: CONFIG_F_REDIRECT | CONFIG_F_REVERSE_PATH,
            ..Config::default()
        })?;
        let mut ifindexes = Vec::new();
        for link in &routes.interfaces {
            let name = std::ffi::CString::new(link.name)?;
            // SAFETY: a valid C string; looks the name up in this thread's
            // network namespace.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            anyhow::ensure!(index != 0, "no interface {} in the namespace", link.name);
            if link.tx_port {
                maps.tx_ports
                    .insert(index, index, None, 0)
                    .with_context(|| format!("adding {} to XLB_TX_PORTS", link.name))?;
            }
            ifindexes.push(index);
        }
        let mut desired = DesiredState::default();
        for (addr, port, protocols, backends, source_ranges) in services() {
            for protocol in protocols {
                desired.frontends.insert(
                    Frontend {
                        addr: IpAddr::V4(addr.into()),
                        port,
                        protocol,
                    },
                    FrontendSpec {
                        service: ServiceRef {
                            namespace: "fuzz".into(),
                            name: format!("s{port}"),
                            port_name: String::new(),
                        },
                        backends: backends.clone(),
                        local_only: false,
                        affinity_timeout: None,
                        source_ranges: source_ranges.clone(),
                    },
                );
            }
        }
        let mut fixture = Fixture {
            pins,
            maps,
            fragments,
            ebpf,
            ifindexes,
            reconciler: Reconciler::new(limits.max_services, limits.max_backends),
            desired,
            parked: Vec::new(),
        };
        fixture.apply()?;
        Ok(fixture)
    }

    fn apply(&mut self) -> Result<()> {
        let summary = self.reconciler.apply(&self.desired, &mut self.maps);
        anyhow::ensure!(summary.errors.is_empty(), "{:?}", summary.errors);
        Ok(())
    }

    /// Takes the last backend away from every frontend with two, or gives
    /// the taken ones back: flows whose backend has left (a SYN on such a
    /// closed flow starts a new one) and backends that return.
    pub fn churn(&mut self) -> Result<()> {
        if self.parked.is_empty() {
            for (frontend, spec) in self.desired.frontends.iter_mut() {
                if spec.backends.len() == 2 {
                    let gone = spec.backends.pop().expect("two backends");
                    self.parked.push((*frontend, gone));
                }
            }
        } else {
            for (frontend, backend) in self.parked.drain(..) {
                let spec = self.desired.frontends.get_mut(&frontend).expect("kept");
                spec.backends.push(backend);
                spec.backends.sort();
            }
        }
        self.apply()
    }

    pub fn xdp(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program("xlb_xdp")
            .context("xlb_xdp")?
            .try_into()?)
    }

    pub fn tc(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self.ebpf.program(name).context("tc program")?.try_into()?)
    }

    /// Empties `FLOWS`, so new flows keep being made.
    pub fn clear_flows(&mut self) -> Result<()> {
        let keys: Vec<_> = self.maps.flows.keys().collect::<Result<_, _>>()?;
        for key in keys {
            let _ = self.maps.flows.remove(&key);
        }
        Ok(())
    }

    /// Frames aim at these frontends and addresses.
    pub fn targets(&self) -> Targets {
        let mut frontends = Vec::new();
        for (addr, port, protocols, _, _) in services() {
            for p in protocols {
                frontends.push((addr, port, if p == Protocol::Tcp { 6 } else { 17 }));
            }
        }
        let addresses = vec![
            [192, 0, 2, 7],
            [192, 0, 2, 8],
            [192, 0, 2, 200],
            [198, 51, 100, 2],
            [198, 51, 100, 3],
            [198, 51, 100, 9],
            [10, 200, 0, 10],
            [10, 200, 0, 11],
            [10, 200, 0, 12],
            [10, 200, 0, 13],
            [10, 244, 1, 2],
            [10, 244, 1, 3],
            [10, 244, 3, 2],
            [10, 244, 0, 254],
            [10, 244, 0, 1],
            [10, 244, 255, 255],
            NODE,
        ];
        Targets {
            frontends,
            addresses,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = dataplane::attach::reset(&self.pins);
    }
}
