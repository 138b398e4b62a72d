//! The HTTP endpoint of `--metrics-addr`: `/metrics` (OpenMetrics text, which
//! Prometheus scrapes natively), `/healthz`, `/readyz`. hyper's HTTP/1
//! server, one task per connection.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

use super::Telemetry;
use crate::dataplane::{PinDir, attach};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` before anything touches the kernel, so an address in use
/// is reported before the datapath is attached.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the endpoint answers from.
pub struct Endpoint {
    pub registry: Registry,
    pub telemetry: &'static Telemetry,
    /// Where the interfaces' links are pinned, for `/readyz`.
    pub pins: PinDir,
    pub ifaces: Vec<String>,
}

/// Serves `endpoint` on `listener` until the runtime stops.
pub fn spawn(listener: std::net::TcpListener, endpoint: Endpoint) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving /metrics, /healthz, /readyz");
    let endpoint = Arc::new(endpoint);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, Infallible>(endpoint.answer(&request)) }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %error, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

impl Endpoint {
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match request.uri().path() {
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut response = text(StatusCode::OK, body);
                        response
                            .headers_mut()
                            .insert(CONTENT_TYPE, OPENMETRICS.parse().expect("a valid header"));
                        response
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding the metrics failed\n".into(),
                    ),
                }
            }
            "/healthz" => {
                let stale = self.telemetry.health.stale(Instant::now());
                if stale.is_empty() {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    let lines: Vec<String> = stale
                        .iter()
                        .map(|(name, age)| format!("loop {name} last beat {:.0?} ago\n", age))
                        .collect();
                    text(StatusCode::SERVICE_UNAVAILABLE, lines.concat())
                }
            }
            "/readyz" => {
                let mut missing = Vec::new();
                if !self.telemetry.health.synced() {
                    missing.push("the first sync is not programmed yet\n".to_string());
                }
                for iface in &self.ifaces {
                    if !attach::fully_attached(&self.pins, iface) {
                        missing.push(format!("{iface} is not attached\n"));
                    }
                }
                if missing.is_empty() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, missing.concat())
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /healthz or /readyz\n".into(),
            ),
        }
    }
}

/// Opens the node's pinned maps for the datapath's counters and serves
/// the endpoint on `listener` (from [`bind`]).
pub fn start(
    listener: std::net::TcpListener,
    bpffs: &std::path::Path,
    node_name: &str,
    ifaces: &[String],
) -> Result<()> {
    let telemetry = super::telemetry();
    let maps = super::datapath::PinnedMaps::open(bpffs, node_name, ifaces, telemetry)?;
    spawn(
        listener,
        Endpoint {
            registry: telemetry.registry(super::datapath::DatapathCollector::new(maps)),
            telemetry,
            pins: PinDir::new(bpffs, node_name),
            ifaces: ifaces.to_vec(),
        },
    )
}
