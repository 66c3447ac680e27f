//! The kpipe API: the `ConsumerPipeline` custom resource (`kpipe.io/v1alpha1`), its typed
//! durations and byte sizes, and the schema rules the apiserver enforces.
//!
//! This crate holds types only (no client code) and enables no k8s-openapi version feature of its
//! own beyond the workspace's pinned one.

pub mod commit_metadata;
pub mod corpus;
mod duration;
pub mod kafka_client;
pub mod offsets;
mod quantity;
pub mod replay;
pub mod rules;
pub mod v1alpha1;
pub mod worker_contract;

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSONSchemaProps};
use kube::CustomResourceExt;

pub use duration::{DURATION_PATTERN, Duration, DurationParseError};
pub use quantity::{BYTE_SIZE_PATTERN, BYTE_SIZE_SYNTAX, ByteSize, ByteSizeParseError};

/// Every CRD kpipe installs.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![consumer_pipeline_crd()]
}

/// The ConsumerPipeline CRD: the derived one, plus the bound on `metadata.name` (the one part of
/// metadata a CRD schema may restrict): the name is a label value and the prefix of child names.
fn consumer_pipeline_crd() -> CustomResourceDefinition {
    let mut crd = v1alpha1::ConsumerPipeline::crd();
    for version in &mut crd.spec.versions {
        let Some(root) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else { continue };
        let name = JSONSchemaProps {
            type_: Some("string".into()),
            max_length: Some(rules::MAX_PIPELINE_NAME_LEN as i64),
            ..Default::default()
        };
        let metadata = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some(BTreeMap::from([("name".to_string(), name)])),
            ..Default::default()
        };
        root.properties.get_or_insert_with(BTreeMap::new).insert("metadata".into(), metadata);
    }
    crd
}

/// The DeadLetterReplay CRD as the YAML document committed at `crds/deadletterreplay.yaml` (a file of its own:
/// the chart renders each CRD file as one document).
pub fn replay_crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    Ok(format!("---\n{}", serde_saphyr::to_string(&v1alpha1::DeadLetterReplay::crd())?))
}

/// The CRDs as the YAML document committed at `crds/consumerpipeline.yaml`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
