//! PATCH bodies: the media types kube-apiserver accepts, served with the
//! `json-patch` crate (RFC 7386 merge patch, RFC 6902 JSON patch).

use serde_json::Value;

use super::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    /// RFC 7386; strategic merge is served the same way (lists are replaced
    /// rather than merged by key).
    Merge,
    /// Server-side apply, served as a merge patch (no field ownership).
    Apply,
    /// RFC 6902.
    Json,
}

pub(crate) fn patch_type(content_type: Option<&str>) -> Result<PatchType, ApiError> {
    let media_type = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" => Ok(PatchType::Apply),
        "application/json-patch+json" => Ok(PatchType::Json),
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml (got {media_type:?})"
            ),
        )),
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, and
/// anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 JSON patch on a copy of `target`: all operations apply or none
/// do.
pub(crate) fn apply_json_patch(target: &Value, operations: &Value) -> Result<Value, String> {
    let operations: json_patch::Patch = serde_json::from_value(operations.clone())
        .map_err(|e| format!("a JSON patch must be an array of operations: {e}"))?;
    let mut document = target.clone();
    json_patch::patch(&mut document, &operations).map_err(|e| format!("JSON patch: {e}"))?;
    Ok(document)
}
