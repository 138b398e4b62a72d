//! Test support for xlb's privileged end-to-end tests, the demo and the
//! benchmark, split by concern:
//!
//! - [`netns`]: network namespaces, veth pairs, running code inside them;
//! - [`topology`]: the reference topology of shared/DESIGN.md section 4;
//! - [`agent`]: the real `xlb agent` under test;
//! - [`traffic`]: servers in pods, clients and their parsed replies;
//! - [`packet`]: crafted frames and `BPF_PROG_TEST_RUN`;
//! - [`fuzz`]: random frames through the datapath against a reference model;
//! - [`scrape`]: the agent's metrics and health endpoint;
//! - [`segment`]: one L2 segment (bridge) of two nodes and two clients;
//! - [`objects`]: typed Kubernetes objects for manifests and the fake API;
//! - [`fake_api`]: a fake Kubernetes API server.

pub mod agent;
pub mod bgp_lab;
pub mod fake_api;
pub mod fuzz;
pub mod netns;
pub mod objects;
pub mod packet;
pub mod rbac;
pub mod scrape;
pub mod segment;
pub mod topology;
pub mod traffic;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use agent::{Agent, spawn_agent, xlb_bin};
pub use netns::{in_netns, ns_cmd, ns_sh, scoped_in_netns, sh};
pub use topology::{
    CLIENT_ADDR, CLIENT_ADDR_2, CLIENT_ADDR_V6, CLIENT_ADDR_V6_2, FRONTEND_NET, FRONTEND_NET_V6,
    Links, NODE_ADDR, NODE_ADDR_V6, NODE_LINK_ADDR, NODE_LINK_ADDR_V6, NODE2_ADDR, NODE2_ADDR_V6,
    POD_A, POD_A_V6, POD_B, POD_B_V6, POD_C, POD_C_V6, Pod, Topology,
};
pub use traffic::{
    Conn, PythonServer, Reply, parse_reply, snmp_counter, tcp_request, tcp_request_v6, udp_request,
    udp_request_v6,
};

/// Polls `f` every 50 ms until it holds, failing after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
