//! The Kubernetes API source, all its I/O in one place: the watches that
//! read Services, EndpointSlices and Nodes ([`watch`]), the Lease that
//! elects one agent to speak for the cluster ([`lease`]), the Events it
//! posts ([`events`]) and the Service status it writes in node mode
//! ([`status`]); [`source`] wires them to the translation.

pub mod events;
pub mod lease;
pub mod node_lease;
pub mod source;
pub mod status;
pub mod watch;

pub use lease::LeaseConfig;
pub use source::ClusterSource;
pub use watch::client;
