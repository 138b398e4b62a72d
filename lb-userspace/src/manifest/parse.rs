//! Parsing Kubernetes objects from a directory of manifest files, the way
//! `kubectl apply -f DIR` would see them: `*.yaml` / `*.yml` (possibly several
//! documents separated by `---`) and `*.json`, each document one object or a
//! `List` of objects.
//!
//! Loading never stops at the first problem: every file, document and list
//! item is read on its own, so one bad document is reported and the rest of
//! the directory still takes effect.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use crate::translate::{Objects, objects::DEFAULT_NAMESPACE};

/// A file, document or object that could not be read. The rest of the file
/// and of the directory is still used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based position of the document in a YAML file (a JSON file has one
    /// document); 0 when the whole file (or directory) could not be read.
    pub document: usize,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{} (document {}): {}",
                self.file.display(),
                self.document,
                self.reason
            )
        }
    }
}

/// The directory itself could not be read or listed (removed, replaced,
/// EACCES, EIO): nothing is known about what it holds, so the caller keeps
/// what it read before rather than taking this for "no Services".
#[derive(Debug, thiserror::Error)]
#[error("cannot read the manifest directory {}: {source}", dir.display())]
pub struct DirectoryUnreadable {
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// How a manifest file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// The format a manifest file's name announces, or `None` for a file the
    /// directory loader skips: other extensions, hidden files (including
    /// editor swap files such as `.web.yaml.swp` and the `..data` links of a
    /// mounted ConfigMap) and backups ending in `~`.
    pub fn of_file(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?;
        if name.starts_with('.') || name.ends_with('~') {
            return None;
        }
        let (_, extension) = name.rsplit_once('.')?;
        if extension.eq_ignore_ascii_case("yaml") || extension.eq_ignore_ascii_case("yml") {
            Some(Format::Yaml)
        } else if extension.eq_ignore_ascii_case("json") {
            Some(Format::Json)
        } else {
            None
        }
    }
}

/// Reads every manifest file directly in `dir` (not in subdirectories), in
/// the order of their names, so the result does not depend on the order the
/// file system lists them in. A file that cannot be read is reported and
/// skipped; a directory that cannot be listed completely is an error.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<ManifestError>), DirectoryUnreadable> {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for (path, format) in list_dir(dir)? {
        // fs::metadata follows symbolic links: the files of a mounted
        // ConfigMap are links into its `..data` directory.
        match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => {}
            Ok(_) => {
                tracing::debug!(file = %path.display(), "skipping manifest path that is not a file");
                continue;
            }
            Err(error) => {
                errors.push(whole_file_error(
                    &path,
                    format!("cannot read file: {error}"),
                ));
                continue;
            }
        }
        let (file_objects, file_errors) = load_file(&path, format);
        objects.append(file_objects);
        errors.extend(file_errors);
    }
    Ok((objects, errors))
}

/// The manifest files directly in `dir`, in the order of their names. A
/// directory that cannot be listed completely is an error.
pub fn list_dir(dir: &Path) -> Result<Vec<(PathBuf, Format)>, DirectoryUnreadable> {
    let unreadable = |source| DirectoryUnreadable {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        // A listing cut short would drop the files after the cut.
        let path = entry.map_err(unreadable)?.path();
        if let Some(format) = Format::of_file(&path) {
            files.push((path, format));
        }
    }
    files.sort_by(|(left, _), (right, _)| left.file_name().cmp(&right.file_name()));
    Ok(files)
}

/// Reads one manifest file.
pub fn load_file(path: &Path, format: Format) -> (Objects, Vec<ManifestError>) {
    match fs::read_to_string(path) {
        Ok(text) => parse(path, format, &text),
        Err(error) => (
            Objects::default(),
            vec![whole_file_error(path, format!("cannot read file: {error}"))],
        ),
    }
}

/// Parses the text of a manifest file; `file` only names it in errors.
pub fn parse(file: &Path, format: Format, text: &str) -> (Objects, Vec<ManifestError>) {
    // Editors on Windows may start a file with a byte order mark, which
    // would hide a leading `---` and which serde_json rejects.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    let mut report = |document: usize, reasons: Vec<String>| {
        errors.extend(reasons.into_iter().map(|reason| ManifestError {
            file: file.to_path_buf(),
            document,
            reason,
        }));
    };
    match format {
        Format::Yaml => {
            for document in split_yaml_documents(text) {
                match serde_yaml::from_str::<Value>(&document.text) {
                    // A document holding nothing but comments.
                    Ok(Value::Null) => {}
                    Ok(value) => {
                        let reasons = add_object(value, None, file, document.number, &mut objects);
                        report(document.number, reasons);
                    }
                    Err(error) => report(
                        document.number,
                        vec![format!(
                            "invalid YAML: {}",
                            yaml_error(&error, document.lines_before)
                        )],
                    ),
                }
            }
        }
        Format::Json => {
            if text.trim().is_empty() {
                return (objects, errors);
            }
            // Into the YAML value type, so both formats share one path.
            match serde_json::from_str::<Value>(text) {
                Ok(value) => {
                    let reasons = add_object(value, None, file, 1, &mut objects);
                    report(1, reasons);
                }
                Err(error) => report(1, vec![format!("invalid JSON: {error}")]),
            }
        }
    }
    (objects, errors)
}

pub(crate) fn whole_file_error(file: &Path, reason: String) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        document: 0,
        reason,
    }
}

/// One document of a YAML stream, with its 1-based position and the number
/// of file lines before it (to report parser errors at the file's lines).
pub(crate) struct RawDocument {
    pub(crate) number: usize,
    pub(crate) lines_before: usize,
    pub(crate) text: String,
}

/// serde_yaml's message with its line number moved from the document's to
/// the file's.
pub(crate) fn yaml_error(error: &serde_yaml::Error, lines_before: usize) -> String {
    let message = error.to_string();
    match error.location() {
        Some(location) if lines_before > 0 => message.replace(
            &format!("at line {} column", location.line()),
            &format!("at line {} column", location.line() + lines_before),
        ),
        _ => message,
    }
}

/// Splits a YAML stream at its document markers (`---` starts a document,
/// `...` ends one), so that a syntax error in one document cannot hide the
/// others: serde_yaml's own multi-document reader stops at the first one.
/// YAML forbids both markers at the start of a line inside a document
/// (YAML 1.2, "c-forbidden"), so splitting on lines is exact.
///
/// Each document remembers how many lines precede it, so parser errors can
/// name the file's line (padding the text with empty lines instead would make
/// a file of n documents cost O(n²)).
pub(crate) fn split_yaml_documents(text: &str) -> Vec<RawDocument> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut lines_before = 0;
    // Whether the current document was opened by `---`: such a document
    // counts even when empty; text before the first marker or after `...`
    // counts only if it holds more than comments and directives.
    let mut opened_by_marker = false;
    let mut finish = |current: &mut String, opened_by_marker: bool, lines_before: usize| {
        let text = std::mem::take(current);
        if opened_by_marker || has_content(&text) {
            documents.push(RawDocument {
                number: documents.len() + 1,
                lines_before,
                text,
            });
        }
    };
    for (line_index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            finish(&mut current, opened_by_marker, lines_before);
            lines_before = line_index;
            current.push_str(line);
            opened_by_marker = true;
        } else if is_marker(bare, "...") {
            current.push_str(line);
            finish(&mut current, opened_by_marker, lines_before);
            lines_before = line_index + 1;
            opened_by_marker = false;
        } else {
            current.push_str(line);
        }
    }
    finish(&mut current, opened_by_marker, lines_before);
    documents
}

/// `---` or `...` alone or followed by white space (`--- # comment`,
/// `--- {a: 1}`), but not `----` or `---x`.
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Whether text outside explicit documents holds anything but blank lines,
/// comments, `%` directives and end markers.
fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let trimmed = line.trim();
        !(trimmed.is_empty()
            || trimmed.starts_with('#')
            || line.starts_with('%')
            || is_marker(line, "..."))
    })
}

/// What `apiVersion` and `kind` items of a typed list (`ServiceList`, ...)
/// take when they omit them, as the API server's list responses do.
struct ItemType {
    api_version: &'static str,
    kind: &'static str,
}

/// Adds one object, or every item of a list, to `objects`. Returns why any
/// part of it was rejected; an item's reason says which item.
fn add_object(
    value: Value,
    item_type: Option<&ItemType>,
    file: &Path,
    document: usize,
    objects: &mut Objects,
) -> Vec<String> {
    let mut mapping = match value {
        Value::Mapping(mapping) => mapping,
        other => {
            return vec![format!(
                "expected an object (a mapping), found {}",
                value_kind(&other)
            )];
        }
    };
    if let Some(item_type) = item_type {
        for (key, default) in [
            ("apiVersion", item_type.api_version),
            ("kind", item_type.kind),
        ] {
            if !mapping.contains_key(key) {
                mapping.insert(key.into(), default.into());
            }
        }
    }
    let api_version = match string_field(&mapping, "apiVersion") {
        Ok(api_version) => api_version,
        Err(reason) => return vec![reason],
    };
    let kind = match string_field(&mapping, "kind") {
        Ok(kind) => kind,
        Err(reason) => return vec![reason],
    };
    let name = object_name(&kind, &mapping);
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => typed(mapping).map(|service| objects.services.push(service)),
        ("v1", "Node") => typed(mapping).map(|node| objects.nodes.push(node)),
        ("v1", "Namespace") => typed(mapping).map(|namespace| objects.namespaces.push(namespace)),
        ("xlb.dev/v1alpha1", "AddressPool") => typed(mapping).map(|pool| objects.pools.push(pool)),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(mapping).map(|slice| objects.endpoint_slices.push(slice))
        }
        (_, "List") => return add_list_items(mapping, None, file, document, objects),
        ("v1", "ServiceList") => {
            let item_type = ItemType {
                api_version: "v1",
                kind: "Service",
            };
            return add_list_items(mapping, Some(&item_type), file, document, objects);
        }
        ("v1", "NodeList") => {
            let item_type = ItemType {
                api_version: "v1",
                kind: "Node",
            };
            return add_list_items(mapping, Some(&item_type), file, document, objects);
        }
        ("discovery.k8s.io/v1", "EndpointSliceList") => {
            let item_type = ItemType {
                api_version: "discovery.k8s.io/v1",
                kind: "EndpointSlice",
            };
            return add_list_items(mapping, Some(&item_type), file, document, objects);
        }
        _ => {
            tracing::debug!(
                file = %file.display(),
                document,
                api_version,
                object = %name,
                "ignoring object of a kind xlb does not use"
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => Vec::new(),
        Err(error) => vec![format!("{name}: {error}")],
    }
}

fn add_list_items(
    mut list: Mapping,
    item_type: Option<&ItemType>,
    file: &Path,
    document: usize,
    objects: &mut Objects,
) -> Vec<String> {
    let items = match list.remove("items") {
        Some(Value::Sequence(items)) => items,
        // `items: null` or absent: an empty list.
        Some(Value::Null) | None => return Vec::new(),
        Some(other) => {
            return vec![format!(
                "list items must be a sequence, found {}",
                value_kind(&other)
            )];
        }
    };
    let mut reasons = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        for reason in add_object(item, item_type, file, document, objects) {
            reasons.push(format!("items[{index}]: {reason}"));
        }
    }
    reasons
}

fn typed<T: DeserializeOwned>(mapping: Mapping) -> Result<T, serde_yaml::Error> {
    serde_yaml::from_value(Value::Mapping(mapping))
}

fn string_field(mapping: &Mapping, key: &str) -> Result<String, String> {
    match mapping.get(key) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(format!("missing {key}")),
        Some(other) => Err(format!(
            "{key} must be a string, found {}",
            value_kind(other)
        )),
    }
}

/// `Service shop/web`, read before the typed parse so that a failing parse
/// can still name its object. Manifests without a namespace land in
/// `default`, as with `kubectl apply`.
fn object_name(kind: &str, mapping: &Mapping) -> String {
    let metadata = mapping.get("metadata");
    let field = |key: &str| {
        metadata
            .and_then(|metadata| metadata.get(key))
            .and_then(Value::as_str)
    };
    let name = field("name").unwrap_or("(unnamed)");
    // Nodes, Namespaces and AddressPools are not namespaced.
    if matches!(kind, "Node" | "Namespace" | "AddressPool") {
        format!("{kind} {name}")
    } else {
        format!(
            "{kind} {}/{name}",
            field("namespace").unwrap_or(DEFAULT_NAMESPACE)
        )
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_yaml(text: &str) -> (Objects, Vec<ManifestError>) {
        parse(Path::new("deploy/test.yaml"), Format::Yaml, text)
    }

    fn service_names(objects: &Objects) -> Vec<String> {
        objects
            .services
            .iter()
            .map(|service| service.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    const SERVICE_A: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n";

    #[test]
    fn multi_document_yaml_with_one_bad_document_loads_the_others() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Service\nmetadata: [unclosed\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: c\n"
        );
        let (objects, errors) = parse_yaml(&text);
        assert_eq!(service_names(&objects), ["a", "c"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].document, 2);
        assert!(
            errors[0].reason.starts_with("invalid YAML"),
            "{}",
            errors[0]
        );
        assert!(
            errors[0]
                .to_string()
                .starts_with("deploy/test.yaml (document 2): invalid YAML"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn syntax_error_reports_the_files_line_number() {
        let text = format!("{SERVICE_A}---\nkind: Service\n  bad: indentation\n");
        let (_, errors) = parse_yaml(&text);
        assert_eq!(errors.len(), 1);
        // The offending line is line 7 of the file, not line 3 of document 2.
        assert!(errors[0].reason.contains("line 7"), "{}", errors[0]);
    }

    #[test]
    fn empty_and_comment_only_documents_are_skipped() {
        let text = format!("# leading comment\n---\n---\n# only a comment\n---\n{SERVICE_A}...\n");
        let (objects, errors) = parse_yaml(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(service_names(&objects), ["a"]);
    }

    #[test]
    fn document_numbers_count_from_the_first_marker_when_nothing_precedes_it() {
        let text = format!("---\n{SERVICE_A}---\nkind: Service\n");
        let (_, errors) = parse_yaml(&text);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 2);
        assert_eq!(errors[0].reason, "missing apiVersion");
    }

    #[test]
    fn byte_order_mark_and_crlf_line_ends_are_accepted() {
        let service_b = SERVICE_A.replace("a\n", "b\n");
        let text = format!("\u{feff}---\n{SERVICE_A}---\n{service_b}").replace('\n', "\r\n");
        let (objects, errors) = parse_yaml(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(service_names(&objects), ["a", "b"]);
    }

    #[test]
    fn document_that_is_not_a_mapping_is_reported() {
        let (objects, errors) = parse_yaml(&format!("- a\n- b\n---\n{SERVICE_A}"));
        assert_eq!(service_names(&objects), ["a"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 1);
        assert!(
            errors[0].reason.contains("found a sequence"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn missing_kind_is_reported() {
        let (_, errors) = parse_yaml("apiVersion: v1\nmetadata:\n  name: a\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].reason, "missing kind");
    }

    #[test]
    fn typed_parse_failure_names_the_object() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n\
                    spec:\n  ports:\n  - port: eighty\n";
        let (objects, errors) = parse_yaml(text);
        assert!(objects.services.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].reason.starts_with("Service shop/web: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_kinds_are_ignored() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n---\n\
             apiVersion: v2\nkind: Service\nmetadata:\n  name: future\n---\n{SERVICE_A}"
        );
        let (objects, errors) = parse_yaml(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(service_names(&objects), ["a"]);
    }

    #[test]
    fn every_supported_kind_is_dispatched() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n\
             addressType: IPv4\nendpoints: []\n"
        );
        let (objects, errors) = parse_yaml(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.nodes.len(), 1);
        assert_eq!(objects.endpoint_slices.len(), 1);
    }

    #[test]
    fn list_kind_in_yaml_loads_items_and_reports_bad_ones() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
                    - apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n\
                    - apiVersion: v1\n  metadata:\n    name: b\n\
                    - apiVersion: v1\n  kind: Service\n  metadata:\n    name: c\n";
        let (objects, errors) = parse_yaml(text);
        assert_eq!(service_names(&objects), ["a", "c"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].reason, "items[1]: missing kind");
    }

    #[test]
    fn typed_list_items_inherit_their_kind() {
        let text = "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata:\n    name: a\n";
        let (objects, errors) = parse_yaml(text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(service_names(&objects), ["a"]);
    }

    #[test]
    fn json_object_and_json_list() {
        let object = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}"#;
        let (objects, errors) = parse(Path::new("a.json"), Format::Json, object);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(service_names(&objects), ["a"]);

        let list = format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{object}, 3]}}"#);
        let (objects, errors) = parse(Path::new("list.json"), Format::Json, &list);
        assert_eq!(service_names(&objects), ["a"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "list.json (document 1): items[1]: expected an object (a mapping), found a number"
        );
    }

    #[test]
    fn invalid_json_is_reported() {
        let (objects, errors) = parse(Path::new("bad.json"), Format::Json, "{\"kind\": ");
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].reason.starts_with("invalid JSON"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn file_names_select_the_format() {
        let format = |name: &str| Format::of_file(Path::new(name));
        assert_eq!(format("web.yaml"), Some(Format::Yaml));
        assert_eq!(format("web.yml"), Some(Format::Yaml));
        assert_eq!(format("web.json"), Some(Format::Json));
        assert_eq!(format("web.yaml~"), None);
        assert_eq!(format(".web.yaml.swp"), None);
        assert_eq!(format(".web.yaml"), None);
        assert_eq!(format("README.md"), None);
        assert_eq!(format("yaml"), None);
    }

    /// A directory under the system temporary directory, removed on drop.
    struct TemporaryDirectory(PathBuf);

    impl TemporaryDirectory {
        fn new(test: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("xlb-manifest-{test}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temporary directory");
            TemporaryDirectory(path)
        }

        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).expect("write manifest");
        }
    }

    impl Drop for TemporaryDirectory {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_dir_reads_manifests_in_name_order_and_skips_the_rest() {
        let directory = TemporaryDirectory::new("order");
        let service =
            |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n");
        directory.write("b.yaml", &service("b"));
        directory.write("a.yml", &service("a"));
        directory.write(
            "c.json",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}}"#,
        );
        directory.write(".d.yaml.swp", "garbage: [");
        directory.write("e.yaml~", &service("backup"));
        directory.write("notes.txt", "not a manifest");
        directory.write("f.yaml", "kind: [");
        fs::create_dir(directory.0.join("nested.yaml")).expect("create nested directory");
        fs::create_dir(directory.0.join("sub")).expect("create sub directory");
        fs::write(directory.0.join("sub/g.yaml"), service("nested")).expect("write nested");

        let (objects, errors) = load_dir(&directory.0).expect("a readable directory");
        assert_eq!(service_names(&objects), ["a", "b", "c"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, directory.0.join("f.yaml"));
        assert_eq!(errors[0].document, 1);
    }

    #[test]
    fn load_dir_of_a_missing_or_replaced_directory_is_an_error_not_emptiness() {
        let missing = std::env::temp_dir().join("xlb-manifest-does-not-exist");
        let error = load_dir(&missing).expect_err("a missing directory read as empty");
        assert_eq!(error.source.kind(), std::io::ErrorKind::NotFound);
        assert!(
            error
                .to_string()
                .contains("cannot read the manifest directory"),
            "{error}"
        );
        let directory = TemporaryDirectory::new("replaced");
        directory.write("web.yaml", "kind: Service\n");
        let error =
            load_dir(&directory.0.join("web.yaml")).expect_err("a file read as an empty directory");
        assert_eq!(error.source.kind(), std::io::ErrorKind::NotADirectory);
    }
}
