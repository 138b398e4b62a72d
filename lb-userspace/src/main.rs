//! `xlb`: the node agent and its inspection commands.

use anyhow::Result;
use clap::{Parser, Subcommand};
use xlb::{
    agent::{self, AgentConfig, NodeArgs},
    dataplane::{Maps, PinDir, attach},
    inspect, state_file,
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

// Parsed once at start; boxing the agent's arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the datapath to the uplinks and keep its
    /// maps in step with the manifests.
    Agent(AgentConfig),
    /// Detach everything the agent pinned for this node and remove the maps.
    Reset {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print the CustomResourceDefinitions of xlb's own resources
    /// (AddressPool, BGPPeer) as YAML, to apply before the agent
    /// (deploy/crds.yaml is this output).
    Crd,
    /// Print the live maps (`bgp`: the BGP sessions).
    Inspect {
        #[command(flatten)]
        node: NodeArgs,
        what: inspect::What,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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

/// jemalloc instead of the C library's allocator, for the agent's resident
/// size (issue 11, the benchmark's agent at 10 000 Services + 10 000
/// EndpointSlices, side by side): glibc kept what the first full sync's
/// decoding freed among the objects that live on, 59-61 MiB idle for the
/// manifest source and 68-70 for the Kubernetes source with ~30-40 MiB
/// live, whatever was trimmed; jemalloc, one arena, giving freed pages back
/// at once, 45 and 62. Its default settings kept more than glibc (138 MiB
/// then): `malloc_conf` below. musl (the static image) gets the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (read at its first allocation): one arena (the
/// agent's work is one loop; more arenas hold more partly used pages) and
/// dirty and muzzy pages returned to the kernel as soon as they are free.
/// `_RJEM_MALLOC_CONF` in the environment still adds to it.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0\0";

fn run(command: Command) -> Result<()> {
    match command {
        Command::Agent(cfg) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(agent::run(cfg)),
        Command::Reset { node } => {
            let pins = PinDir::new(&node.bpffs, &node.node_name);
            attach::reset(&pins)?;
            let _ = std::fs::remove_dir_all(node.state_dir.join(&node.node_name));
            println!("removed {}", pins.root.display());
            Ok(())
        }
        Command::Crd => {
            print!("{}", xlb::crds_yaml()?);
            Ok(())
        }
        Command::Inspect {
            node,
            what: inspect::What::Bgp,
            json,
        } => {
            let peers = xlb::announce::bgp::status::read(&node.state_dir, &node.node_name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                print!("{}", xlb::announce::bgp::status::table(&peers));
            }
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
