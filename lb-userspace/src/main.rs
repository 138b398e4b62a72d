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

/// glibc gives each thread that allocates its own arena (up to 8 per
/// core); the watch tasks list and decode on worker threads, so every arena
/// ended up holding freed memory between long-lived objects. One arena was
/// measured (issue 11, bench at 10 000 Services on the Kubernetes API):
/// resident 98 -> 83 MiB, churn CPU and latency unchanged; jemalloc and
/// mimalloc (preloaded, default settings) kept more (138, 160 MiB).
/// `MALLOC_ARENA_MAX` in the environment still decides. musl (the static
/// image) has a single allocator state anyway.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // any thread is started.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Agent(cfg) => {
            one_malloc_arena();
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
