//! A local stand-in for the apiserver's validation of a ConsumerPipeline: the OpenAPI schema
//! (types, enums, bounds, patterns, required), strict unknown-field checks, and the CEL rules
//! (evaluated with kube-cel). The e2e suite replays the same corpus against a real apiserver.

use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

/// A rejection: the field path it names and its message.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub field: String,
    pub message: String,
}

pub fn crd_schema() -> Value {
    // Generating the CRD is the bulk of one validation in a debug build (~150 ms); property tests validate hundreds.
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let crd = kpipe_api::all_crds().remove(0);
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("CRD has a schema");
            serde_json::to_value(schema).expect("schema serialises")
        })
        .clone()
}

fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<Rejection>) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            for (key, child) in map {
                let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (props, schema.get("additionalProperties")) {
                    (Some(props), _) => match props.get(key) {
                        Some(child_schema) => unknown_fields(child_schema, child, &child_path, out),
                        None if !preserve => out.push(Rejection { field: child_path, message: "unknown field".into() }),
                        None => {}
                    },
                    (None, Some(additional)) => unknown_fields(additional, child, &child_path, out),
                    (None, None) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Drops `null` values of fields that are not nullable, as the apiserver does before validating
/// (so `noop:` with no value is as if `noop` were absent).
fn prune_nulls(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let child_schema =
                |key: &str| props.and_then(|p| p.get(key)).or_else(|| schema.get("additionalProperties")).cloned();
            map.retain(|key, v| {
                !v.is_null() || child_schema(key).is_some_and(|s| s.get("nullable") == Some(&Value::Bool(true)))
            });
            for (key, v) in map.iter_mut() {
                if let Some(s) = child_schema(key) {
                    prune_nulls(&s, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune_nulls(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// `x-kubernetes-list-type: set`: the apiserver rejects a repeated item as `Duplicate value`.
fn duplicate_set_items(schema: &Value, value: &Value, path: &str, out: &mut Vec<Rejection>) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for (key, child) in map {
                let child_schema = props.and_then(|p| p.get(key)).or_else(|| schema.get("additionalProperties"));
                if let Some(s) = child_schema {
                    let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    duplicate_set_items(s, child, &child_path, out);
                }
            }
        }
        Value::Array(items) => {
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        out.push(Rejection {
                            field: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {item}"),
                        });
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    duplicate_set_items(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Everything wrong with `manifest` (empty when it would be accepted).
pub fn rejections(manifest: &Value) -> Vec<Rejection> {
    let schema = crd_schema();
    let mut out = Vec::new();
    let mut manifest = manifest.clone();
    prune_nulls(&schema, &mut manifest);
    let manifest = &manifest;
    duplicate_set_items(&schema, manifest, "", &mut out);
    let validator = jsonschema::draft4::new(&schema).expect("CRD schema compiles as JSON schema");
    for err in validator.iter_errors(manifest) {
        let base = pointer_to_field(err.instance_path.as_str());
        let field = match &err.kind {
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                if base.is_empty() { name.to_string() } else { format!("{base}.{name}") }
            }
            _ => base,
        };
        out.push(Rejection { field, message: err.to_string() });
    }
    // apiVersion, kind and metadata are the apiserver's own business; spec and status are ours.
    for root in ["spec", "status"] {
        if let (Some(s), Some(v)) = (schema["properties"].get(root), manifest.get(root)) {
            unknown_fields(s, v, root, &mut out);
        }
    }
    if let Err(errors) = kube::core::cel::Validator::new().validate(&schema, manifest, None) {
        for e in errors.into_vec() {
            out.push(Rejection { field: e.field_path.trim_start_matches('.').to_string(), message: e.message });
        }
    }
    out
}
