//! Where the desired state comes from: ordinary Kubernetes objects (Services,
//! EndpointSlices, Nodes), read from manifest files or from the API, and
//! translated into a [`crate::model::DesiredState`] the way a node agent for
//! `type: LoadBalancer` Services does.

pub mod kube;
pub mod leader;
pub mod manifest;
pub mod node_mode;
pub mod status;
pub mod translate;

pub use manifest::{Format, ManifestError, Objects, load_dir, load_file, parse};
pub use translate::{AddressMode, TranslateError, node_address_of, translate};
