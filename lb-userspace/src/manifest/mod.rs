//! The manifest directory source: Services, EndpointSlices and Nodes read
//! from files ([`parse`](mod@parse)), re-read whenever the directory changes
//! ([`source`]), and translated in full each time.

pub mod parse;
pub mod source;

pub use parse::{DirectoryUnreadable, Format, ManifestError, list_dir, load_dir, load_file, parse};
pub use source::ManifestSource;
