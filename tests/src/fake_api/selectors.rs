//! Label and field selectors, and the filter a list or watch applies: a
//! label change seen through a selector watch becomes ADDED or DELETED.

use serde_json::{Map, Value};

use super::{
    http::Request,
    status::ApiError,
    store::{Change, ChangeType, metadata_mut, metadata_str},
};

#[derive(Debug, PartialEq)]
pub(crate) enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    pub(crate) fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |key: &str| labels.and_then(|labels| labels.get(key)?.as_str());
        match self {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::NotExists(key) => label(key).is_none(),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|found| values.iter().any(|value| value == found))
            }
            LabelRequirement::NotIn(key, values) => {
                !label(key).is_some_and(|found| values.iter().any(|value| value == found))
            }
        }
    }
}

/// Parses the label selector grammar of kube-apiserver: `k=v`, `k==v`,
/// `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by commas.
pub(crate) fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let invalid = |term: &str| {
        ApiError::bad_request(format!(
            "unable to parse requirement: {term:?} in label selector {selector:?}"
        ))
    };
    let mut terms = Vec::new();
    let mut depth = 0_i32;
    let mut start = 0;
    for (index, character) in selector.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let valid_key = |key: &str| !key.is_empty() && !key.contains(char::is_whitespace);
    let mut requirements = Vec::new();
    for term in terms {
        let term = term.trim();
        let requirement = if let Some(open) = term.find('(') {
            let inner = term[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| invalid(term))?;
            let values = inner
                .split(',')
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_string)
                .collect();
            let mut words = term[..open].split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(key), Some("in"), None) => LabelRequirement::In(key.into(), values),
                (Some(key), Some("notin"), None) => LabelRequirement::NotIn(key.into(), values),
                _ => return Err(invalid(term)),
            }
        } else if let Some((key, value)) = term.split_once("!=") {
            LabelRequirement::NotEquals(key.trim().into(), value.trim().into())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(key.trim().into(), value.trim().into())
        } else if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::NotExists(key.trim().into())
        } else {
            LabelRequirement::Exists(term.into())
        };
        let key = match &requirement {
            LabelRequirement::Equals(key, _)
            | LabelRequirement::NotEquals(key, _)
            | LabelRequirement::Exists(key)
            | LabelRequirement::NotExists(key)
            | LabelRequirement::In(key, _)
            | LabelRequirement::NotIn(key, _) => key,
        };
        if !valid_key(key) {
            return Err(invalid(term));
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

#[derive(Debug, PartialEq)]
pub(crate) struct FieldRequirement {
    pub(crate) path: String,
    pub(crate) value: String,
    pub(crate) equal: bool,
}

impl FieldRequirement {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let found = match self
            .path
            .split('.')
            .try_fold(object, |current, part| current.get(part))
        {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        (found == self.value) == self.equal
    }
}

/// `path=value`, `path==value` and `path!=value` terms joined by commas.
/// Any dotted path is accepted, where kube-apiserver knows a fixed set per
/// resource (always `metadata.name` and `metadata.namespace`).
pub(crate) fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, ApiError> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|term| {
            let (path, value, equal) = if let Some((path, value)) = term.split_once("!=") {
                (path, value, false)
            } else if let Some((path, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (path, value, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?} has no operator"
                )));
            };
            Ok(FieldRequirement {
                path: path.trim().into(),
                value: value.trim().into(),
                equal,
            })
        })
        .collect()
}

/// What a list or watch selects: one resource, maybe one namespace, and the
/// request's selectors.
pub(crate) struct Filter {
    pub(crate) resource: usize,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: Vec<LabelRequirement>,
    pub(crate) fields: Vec<FieldRequirement>,
}

impl Filter {
    pub(crate) fn from_request(
        request: &Request,
        resource: usize,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Filter, ApiError> {
        let mut fields = parse_field_selector(request.param("fieldSelector").unwrap_or_default())?;
        if let Some(name) = name {
            fields.push(FieldRequirement {
                path: "metadata.name".into(),
                value: name.into(),
                equal: true,
            });
        }
        Ok(Filter {
            resource,
            namespace: namespace.map(str::to_string),
            labels: parse_label_selector(request.param("labelSelector").unwrap_or_default())?,
            fields,
        })
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace
            && metadata_str(object, "namespace") != Some(namespace.as_str())
        {
            return false;
        }
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        self.labels.iter().all(|label| label.matches(labels))
            && self.fields.iter().all(|field| field.matches(object))
    }

    /// The event this watch reports for `change`, if any. Like the watch
    /// cache, an object entering the selection is ADDED and one leaving it
    /// is DELETED (in its last matching state, at the change's version).
    pub(crate) fn translate(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.matches(&change.object);
        match change.change_type {
            ChangeType::Added => now.then(|| ("ADDED", change.object.clone())),
            ChangeType::Deleted => now.then(|| ("DELETED", change.object.clone())),
            ChangeType::Modified => {
                let before = change
                    .previous
                    .as_ref()
                    .is_some_and(|previous| self.matches(previous));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", change.object.clone())),
                    (false, true) => Some(("ADDED", change.object.clone())),
                    (true, false) => {
                        let mut gone = change.previous.clone()?;
                        metadata_mut(&mut gone).insert(
                            "resourceVersion".into(),
                            change.resource_version.to_string().into(),
                        );
                        Some(("DELETED", gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}
