//! deploy/daemonset.yaml keeps the agent's confinement (audit A-17): the
//! runtime's default seccomp filter, a read-only root, and of the host only
//! xlb's own BPF directory and its state directory, mounted where the agent
//! pins (`XLB_BPFFS`/xlb).

use serde_yaml::Value;

fn daemonset() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("deploy/daemonset.yaml"))
        .expect("daemonset.yaml parses")
}

#[test]
fn the_agent_runs_confined_and_sees_only_its_own_host_paths() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "no RuntimeDefault seccomp profile"
    );
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    let security = &agent["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(
        security["capabilities"]["add"],
        serde_yaml::from_str::<Value>("[BPF, NET_ADMIN, PERFMON]").unwrap()
    );

    // Host paths: exactly xlb's BPF directory and its state directory.
    let mut host_paths: Vec<(&str, &str)> = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    host_paths.sort();
    assert_eq!(
        host_paths,
        [("bpffs", "/sys/fs/bpf/xlb"), ("state", "/run/xlb")]
    );

    // The BPF directory is mounted where the agent pins: <XLB_BPFFS>/xlb.
    let env_value = |name: &str| {
        agent["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    let mount = |name: &str| {
        agent["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["mountPath"].as_str())
            .map(str::to_string)
    };
    let bpffs = env_value("XLB_BPFFS").expect("XLB_BPFFS set");
    assert_eq!(mount("bpffs"), Some(format!("{bpffs}/xlb")));
    assert_eq!(mount("state"), Some("/run/xlb".to_string()));
}

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// deploy/crds.yaml is what `xlb crd` prints from the Rust types, so the
/// schema the API server enforces is the one the agent reads.
#[test]
fn crds_yaml_is_generated_from_the_address_pool_and_bgp_peer_types() {
    assert_eq!(
        deploy_file("crds.yaml"),
        xlb::crds_yaml().unwrap(),
        "deploy/crds.yaml is stale: run `xlb crd > deploy/crds.yaml`"
    );
}

/// The example pool reads as an AddressPool (unknown fields rejected, as
/// the CRD's structural schema prunes them) and is usable as it stands.
#[test]
fn the_example_pool_is_a_valid_usable_address_pool() {
    let text = deploy_file("examples/address-pool.yaml");
    let value: Value = serde_yaml::from_str(&text).unwrap();
    let pool: xlb::pools::AddressPool = serde_yaml::from_value(value.clone()).unwrap();
    // Every field written survives the round trip: nothing is silently
    // ignored.
    let back: Value = serde_yaml::to_value(&pool).unwrap();
    assert_eq!(back["spec"], value["spec"]);
    let pools = xlb::pools::Pools::new(&[pool]);
    assert!(pools.problems.is_empty(), "{:?}", pools.problems);
    assert_eq!(pools.usable.len(), 1);
}
