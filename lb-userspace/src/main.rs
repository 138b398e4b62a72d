//! `xlb`: the node agent and its inspection commands.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use xlb::{
    agent::{self, AgentConfig},
    conntrack::Timeouts,
    dataplane::{Limits, Maps, PinDir, attach},
    inspect,
    source::AddressMode,
    state_file,
};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "eBPF/XDP load balancer for Kubernetes LoadBalancer Services"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `xlb=debug`.
    #[arg(long, global = true, env = "XLB_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct NodeArgs {
    /// This node's name (Kubernetes Node name); names the pin directory.
    #[arg(long, env = "XLB_NODE_NAME")]
    node_name: String,
    /// Where the BPF filesystem is (mounted there if it is not).
    #[arg(long, env = "XLB_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Directory for the agent's state file (names for `inspect`).
    #[arg(long, env = "XLB_STATE_DIR", default_value = "/run/xlb")]
    state_dir: PathBuf,
}

// Parsed once at start; boxing the agent's arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the datapath to the uplinks and keep its
    /// maps in step with the manifests.
    Agent {
        #[command(flatten)]
        node: NodeArgs,
        /// Network-facing interface (uplink, link to other nodes); repeat or
        /// separate with commas.
        #[arg(
            long = "iface",
            env = "XLB_IFACES",
            value_delimiter = ',',
            required = true
        )]
        ifaces: Vec<String>,
        /// Directory of Service / EndpointSlice / Node manifests (YAML or
        /// JSON), watched for changes. Without it the agent watches the
        /// Kubernetes API.
        #[arg(long, env = "XLB_MANIFESTS")]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the Kubernetes API (default: KUBECONFIG,
        /// ~/.kube/config, or the in-cluster service account).
        #[arg(long, env = "KUBECONFIG", conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// `spec.loadBalancerClass` handled besides none; repeat or separate
        /// with commas. Services of other classes are never touched.
        #[arg(long = "lb-class", env = "XLB_LB_CLASS", value_delimiter = ',',
              default_value = xlb::source::kube::DEFAULT_LB_CLASS)]
        lb_classes: Vec<String>,
        /// Where Services' frontend addresses come from: `status` (the
        /// addresses in `status.loadBalancer.ingress`, assigned by an IPAM
        /// such as MetalLB; xlb writes nothing) or `node` (K3s ServiceLB
        /// style: the addresses of the nodes that run xlb, written into the
        /// Services' status by the elected leader).
        #[arg(long, env = "XLB_ADDRESS_MODE", value_enum, default_value_t = AddressMode::Status)]
        address_mode: AddressMode,
        /// Namespace of the leader Lease (Kubernetes source).
        #[arg(long, env = "XLB_NAMESPACE", default_value = "xlb-system")]
        lease_namespace: String,
        /// Name of the leader Lease.
        #[arg(long, env = "XLB_LEASE_NAME", default_value = "xlb-leader")]
        lease_name: String,
        /// Seconds a silent leader keeps the Lease; another agent takes over
        /// within this (plus a fifth of it) after the leader dies.
        #[arg(long, env = "XLB_LEASE_DURATION", default_value_t = 10)]
        lease_duration: u64,
        /// Frontends the maps can hold.
        #[arg(long, env = "XLB_MAX_SERVICES", default_value_t = Limits::default().max_services)]
        max_services: u32,
        /// Backends over all services.
        #[arg(long, env = "XLB_MAX_BACKENDS", default_value_t = Limits::default().max_backends)]
        max_backends: u32,
        /// Connection-tracking entries (two per flow).
        #[arg(long, env = "XLB_MAX_FLOWS", default_value_t = Limits::default().max_flows)]
        max_flows: u32,
        /// Source ports for SNAT towards remote backends, `MIN-MAX`. Ports the
        /// node's own sockets use are skipped when a flow picks its port.
        #[arg(long, env = "XLB_SNAT_PORTS", default_value = "32768-60999")]
        snat_ports: String,
        /// Never redirect in XDP; hand every translated packet to the kernel.
        #[arg(long, env = "XLB_NO_REDIRECT")]
        no_redirect: bool,
        /// XDP attach mode: `auto` (native, else generic with a warning),
        /// `native`, or `generic` (for drivers whose native XDP misbehaves).
        #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value_t = attach::XdpModeChoice::Auto)]
        xdp_mode: attach::XdpModeChoice,
        /// Seconds between flow-table sweeps.
        #[arg(long, env = "XLB_SWEEP_INTERVAL", default_value_t = 10)]
        sweep_interval: u64,
        /// Idle timeout of UDP flows, seconds.
        #[arg(long, env = "XLB_UDP_TIMEOUT", default_value_t = 120)]
        udp_timeout: u64,
        /// Idle timeout of UDP flows the backend never answered, seconds: such
        /// flows give their SNAT port back sooner.
        #[arg(long, env = "XLB_UDP_UNANSWERED_TIMEOUT", default_value_t = 30)]
        udp_unanswered_timeout: u64,
    },
    /// Detach everything the agent pinned for this node and remove the maps.
    Reset {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print the live maps.
    Inspect {
        #[command(flatten)]
        node: NodeArgs,
        what: inspect::What,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_ports(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("--snat-ports {s:?}: expected MIN-MAX"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("--snat-ports {s:?}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("--snat-ports {s:?}"))?,
    );
    if a == 0 || a > b {
        bail!("--snat-ports {s:?}: need 1 <= MIN <= MAX");
    }
    Ok((a, b))
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli.command) {
        eprintln!("xlb: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Agent {
            node,
            ifaces,
            manifests,
            kubeconfig,
            lb_classes,
            address_mode,
            lease_namespace,
            lease_name,
            lease_duration,
            max_services,
            max_backends,
            max_flows,
            snat_ports,
            no_redirect,
            xdp_mode,
            sweep_interval,
            udp_timeout,
            udp_unanswered_timeout,
        } => {
            let cfg = AgentConfig {
                ifaces,
                node_name: node.node_name,
                source: match manifests {
                    Some(dir) => agent::SourceConfig::Manifests(dir),
                    None => agent::SourceConfig::Kubernetes { kubeconfig },
                },
                lb_classes,
                address_mode,
                lease: agent::LeaseSettings {
                    namespace: lease_namespace,
                    name: lease_name,
                    duration: Duration::from_secs(lease_duration.max(1)),
                },
                bpffs: node.bpffs,
                state_dir: node.state_dir,
                limits: Limits {
                    max_services,
                    max_backends,
                    max_flows,
                },
                snat_ports: parse_ports(&snat_ports)?,
                redirect: !no_redirect,
                sweep_interval: Duration::from_secs(sweep_interval.max(1)),
                xdp_mode,
                timeouts: Timeouts {
                    udp_ns: udp_timeout * 1_000_000_000,
                    udp_unanswered_ns: udp_unanswered_timeout * 1_000_000_000,
                    ..Timeouts::default()
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Reset { node } => {
            let pins = PinDir::new(&node.bpffs, &node.node_name);
            attach::reset(&pins)?;
            let _ = std::fs::remove_dir_all(node.state_dir.join(&node.node_name));
            println!("removed {}", pins.root.display());
            Ok(())
        }
        Command::Inspect { node, what, json } => {
            let pins = PinDir::new(&node.bpffs, &node.node_name);
            let maps = Maps::open_pinned(&pins.maps())?;
            let names = state_file::read(&node.state_dir, &node.node_name);
            let rows = inspect::rows(&maps, what, &names)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", inspect::table(&rows));
            }
            Ok(())
        }
    }
}
