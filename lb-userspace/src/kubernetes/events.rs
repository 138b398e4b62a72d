//! Where Events are posted: a Warning Event on each object the agent had to
//! skip, once per distinct problem (a re-sync does not repeat it), so that
//! `kubectl describe` shows why a Service has no effect.

use std::collections::HashSet;

use kube::{Client, runtime::events};

use crate::translate::{EventReason, Problem};

/// One problem as the sink remembers it: the object by kind and name (not
/// by `resourceVersion`, which every update of it changes), reason and
/// message.
#[derive(PartialEq, Eq, Hash)]
struct Reported {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    reason: EventReason,
    message: String,
}

pub struct EventSink {
    recorder: events::Recorder,
    reported: HashSet<Reported>,
}

impl EventSink {
    pub fn new(client: Client, node_name: &str) -> Self {
        let reporter = events::Reporter {
            controller: "xlb".into(),
            instance: Some(node_name.to_string()),
        };
        Self {
            recorder: events::Recorder::new(client, reporter),
            reported: HashSet::new(),
        }
    }

    /// Posts `problem` on the object it names, unless it was posted before.
    pub fn report(&mut self, problem: &Problem) {
        let object = &problem.object;
        let seen = Reported {
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            reason: problem.reason,
            message: problem.message.clone(),
        };
        if !self.reported.insert(seen) {
            return;
        }
        let event = events::Event {
            type_: if problem.reason.is_warning() {
                events::EventType::Warning
            } else {
                events::EventType::Normal
            },
            reason: problem.reason.as_str().into(),
            note: Some(problem.message.chars().take(1000).collect()),
            action: "Program".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reference = problem.object.clone();
        let object = problem.to_string();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::debug!(problem = %object, error = %error, "posting an Event failed");
            }
        });
    }

    /// Posts a Normal Event `L2Announcing` on the Service: this node now
    /// answers ARP/NDP for `address` (the announcer, for `kubectl
    /// describe`). Every take-over is posted; a Service with many
    /// addresses moving often posts as many Events.
    pub fn announcing(
        &self,
        service: k8s_openapi::api::core::v1::ObjectReference,
        address: std::net::IpAddr,
        node: &str,
    ) {
        let event = events::Event {
            type_: events::EventType::Normal,
            reason: "L2Announcing".into(),
            note: Some(format!(
                "node {node} announces {address} (answers ARP/NDP for it)"
            )),
            action: "Announce".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &service).await {
                tracing::debug!(%address, error = %error, "posting the L2Announcing Event failed");
            }
        });
    }
}
