//! The manifest directory source: Services, EndpointSlices and Nodes read
//! from files ([`parse`](mod@parse)); the files inotify names are read again
//! and only the Services whose objects in them changed are translated again
//! ([`source`]).

pub mod parse;
pub mod source;

pub use parse::{DirectoryUnreadable, Format, ManifestError, list_dir, load_dir, load_file, parse};
pub use source::ManifestSource;
