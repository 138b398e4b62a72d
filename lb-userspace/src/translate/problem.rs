//! What the translation could not use, named by the object it comes from,
//! so that a source can log it and post it as a Kubernetes Event on that
//! very object.

use std::fmt;

use k8s_openapi::api::core::v1::ObjectReference;

use super::objects::namespace_of;

/// The `reason` of the Event that reports a [`Problem`], as Kubernetes
/// means it: a CamelCase word a client can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventReason {
    /// A field xlb cannot use; that part of the object is skipped.
    InvalidSpec,
    /// Two Services ask for the same frontend; the later one loses it.
    AddressConflict,
    /// Node mode: the later of two Services on one port stays pending.
    PortConflict,
    /// Writing a frontend into a node's maps failed; the node retries.
    ProgrammingFailed,
    /// Node mode: another controller keeps overwriting the status xlb
    /// writes; xlb backs off.
    StatusFoughtOver,
    /// Pool mode: a Service got (new) addresses. The one Normal Event.
    IpAllocated,
    /// Pool mode: a Service asks for addresses it cannot have.
    AllocationFailed,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::InvalidSpec => "InvalidSpec",
            EventReason::AddressConflict => "AddressConflict",
            EventReason::PortConflict => "PortConflict",
            EventReason::ProgrammingFailed => "ProgrammingFailed",
            EventReason::StatusFoughtOver => "StatusFoughtOver",
            EventReason::IpAllocated => "IPAllocated",
            EventReason::AllocationFailed => "AllocationFailed",
        }
    }

    /// Whether the Event is a Warning (all but [`EventReason::IpAllocated`]).
    pub fn is_warning(self) -> bool {
        self != EventReason::IpAllocated
    }
}

impl fmt::Display for EventReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A part of an object that could not be translated and was skipped.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{} {}/{}: {message}", kind(&self.object), namespace(&self.object), name(&self.object))]
pub struct Problem {
    /// The object concerned, as its own metadata names it.
    pub object: ObjectReference,
    pub reason: EventReason,
    pub message: String,
}

impl Problem {
    pub fn new(object: ObjectReference, reason: EventReason, message: String) -> Self {
        Problem {
            object,
            reason,
            message,
        }
    }
}

/// A reference to `object` for Events, in `default` when it names no
/// namespace (a manifest file), as the API server would place it.
pub fn reference_to<K>(object: &K) -> ObjectReference
where
    K: kube::Resource<DynamicType = ()>,
{
    let mut reference = object.object_ref(&());
    reference.namespace = Some(namespace_of(object.meta()).to_owned());
    reference
}

fn kind(object: &ObjectReference) -> &str {
    object.kind.as_deref().unwrap_or_default()
}

fn namespace(object: &ObjectReference) -> &str {
    object.namespace.as_deref().unwrap_or_default()
}

fn name(object: &ObjectReference) -> &str {
    object.name.as_deref().unwrap_or("(unnamed)")
}
