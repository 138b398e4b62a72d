//! Manifests and expectations shared by the translation's tests.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use super::{AddressMode, Objects, translate};
use crate::manifest::{Format, parse};
use crate::model::{Backend, DesiredState, Frontend, Protocol};

pub(super) const NODE: &str = "node-1";

/// Parses YAML through the manifest loader, as the agent does.
pub(super) fn objects(yaml: &str) -> Objects {
    let (objects, errors) = parse(Path::new("test.yaml"), Format::Yaml, yaml);
    assert!(errors.is_empty(), "manifest errors: {errors:?}");
    objects
}

pub(super) fn run(yaml: &str) -> (DesiredState, Vec<String>) {
    let (state, errors) = translate(&objects(yaml), NODE, AddressMode::Status);
    (state, errors.iter().map(ToString::to_string).collect())
}

pub(super) fn frontend(address: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(Ipv4Addr::from(address)),
        port,
        protocol,
    }
}

pub(super) fn backend(address: [u8; 4], port: u16, local: bool, terminating: bool) -> Backend {
    Backend {
        addr: IpAddr::V4(Ipv4Addr::from(address)),
        port,
        local,
        terminating,
    }
}

/// A LoadBalancer Service `shop/web` at 192.0.2.10; `spec` is extra
/// spec lines (indented 2 spaces), `ports` the port list lines.
pub(super) fn service(name: &str, spec: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n\
         spec:\n  type: LoadBalancer\n{spec}  ports:\n{ports}\
         status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.10\n---\n"
    )
}

pub(super) const HTTP_PORT: &str = "  - name: http\n    port: 80\n    targetPort: 8080\n";

/// An EndpointSlice of `shop/<service>` with one port and the given
/// endpoint lines.
pub(super) fn slice(name: &str, service: &str, port: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n\
         \x20 namespace: shop\n  labels:\n    kubernetes.io/service-name: {service}\n\
         addressType: IPv4\nports:\n{port}endpoints:\n{endpoints}---\n"
    )
}

pub(super) const SLICE_HTTP_PORT: &str = "- name: http\n  port: 8080\n  protocol: TCP\n";

pub(super) fn endpoint(address: &str, node: &str, conditions: &str) -> String {
    format!("- addresses: [{address}]\n  nodeName: {node}\n  conditions: {conditions}\n")
}

pub(super) fn web_frontend() -> Frontend {
    frontend([192, 0, 2, 10], 80, Protocol::Tcp)
}
