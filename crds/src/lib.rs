//! The kpipe API: the `ConsumerPipeline` custom resource (`kpipe.io/v1alpha1`), its typed
//! durations and byte sizes, and the schema rules the apiserver enforces.
//!
//! This crate holds types only (no client code) and enables no k8s-openapi version feature of its
//! own beyond the workspace's pinned one.

pub mod corpus;
mod duration;
pub mod offsets;
mod quantity;
pub mod rules;
pub mod v1alpha1;
pub mod worker_contract;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use duration::{DURATION_PATTERN, Duration, DurationParseError};
pub use quantity::{BYTE_SIZE_PATTERN, ByteSize, ByteSizeParseError};

/// Every CRD kpipe installs.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![v1alpha1::ConsumerPipeline::crd()]
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
