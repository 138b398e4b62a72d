//! Where Service status is written. Node mode's status writer: while this
//! agent holds the leader Lease, keep `status.loadBalancer.ingress` of
//! every Service xlb handles equal to
//! [`node_mode::desired_ingress`], re-checking whenever the watched objects
//! change (Services, EndpointSlices, Nodes) and when leadership is won.
//!
//! Only the addresses are compared, so fields the API server defaults
//! (`ipMode`) do not cause rewrites; a write is a merge patch of
//! `/status`, which replaces the list as a whole.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::watch::Stores;
use crate::translate::{ServiceKey, handles_class, node_mode};

/// Status patches in flight at once.
const CONCURRENT_WRITES: usize = 8;
/// After a failed write, try again this much later.
const RETRY: Duration = Duration::from_secs(5);

/// Starts the writer; it acts only while `leading` is true, and looks again
/// when `changed` is notified.
pub fn spawn(
    client: Client,
    stores: Stores,
    classes: Vec<String>,
    mut leading: watch::Receiver<bool>,
    changed: Arc<Notify>,
) {
    tokio::spawn(async move {
        // What we wrote, and the Service's resourceVersion we wrote over: until
        // the watch delivers the new version, the store still shows the old
        // status, and that must not cause the same write again.
        let mut written: HashMap<ServiceKey, (Vec<Ipv4Addr>, Option<String>)> = HashMap::new();
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.notified() => {}
                result = leading.changed() => if result.is_err() { return },
                _ = retry => {}
            }
            retry_at = None;
            if !*leading.borrow() {
                written.clear();
                continue;
            }
            let failed = write_pass(&client, &stores, &classes, &leading, &mut written).await;
            if failed > 0 {
                tracing::warn!(
                    failed,
                    retry_s = RETRY.as_secs(),
                    "some Service status writes failed; retrying"
                );
                retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
    });
}

/// One pass over every handled Service; returns how many writes failed.
async fn write_pass(
    client: &Client,
    stores: &Stores,
    classes: &[String],
    leading: &watch::Receiver<bool>,
    written: &mut HashMap<ServiceKey, (Vec<Ipv4Addr>, Option<String>)>,
) -> usize {
    let services = stores.services();
    let services: Vec<&Service> = services
        .iter()
        .map(|s| &**s)
        .filter(|s| handles_class(s, classes))
        .collect();
    let slices = stores.endpoint_slices();
    let slices: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
    let desired = node_mode::desired_ingress(&services, &slices, &stores.nodes());
    let mut todo = Vec::new();
    for service in services {
        let key = ServiceKey::of(service);
        let Some(want) = desired.get(&key) else {
            continue;
        };
        let version = service.metadata.resource_version.clone();
        if let Some((wrote, over)) = written.get(&key)
            && wrote == want
            && *over == version
        {
            continue;
        }
        if node_mode::current_ingress(service).as_ref() == Some(want) {
            written.remove(&key);
            continue;
        }
        todo.push((key, want.clone(), version));
    }
    written.retain(|key, _| desired.contains_key(key));
    if todo.is_empty() {
        return 0;
    }

    let results: Vec<_> = futures::stream::iter(todo)
        .map(|(key, want, version)| async move {
            // Leadership can end during a long pass: stop writing then.
            if !*leading.borrow() {
                return (key, want, version, Ok(false));
            }
            let result = patch(client, &key, &want).await.map(|()| true);
            (key, want, version, result)
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect()
        .await;
    let mut failed = 0;
    for (key, want, version, result) in results {
        match result {
            Ok(true) => {
                tracing::info!(service = %key, ingress = ?want,
                    "wrote status.loadBalancer.ingress");
                written.insert(key, (want, version));
            }
            Ok(false) => {}
            Err(error) => {
                // Deleted meanwhile: nothing to write any more.
                if let kube::Error::Api(status) = &error
                    && status.is_not_found()
                {
                    continue;
                }
                tracing::warn!(service = %key, error = %error,
                    "writing status.loadBalancer.ingress failed");
                failed += 1;
            }
        }
    }
    failed
}

async fn patch(client: &Client, key: &ServiceKey, ingress: &[Ipv4Addr]) -> kube::Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
    let ingress: Vec<_> = ingress
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let body = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}
