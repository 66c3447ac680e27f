//! The contract between the operator and the worker pods it renders: the worker configuration
//! document (stored in the pipeline's ConfigMap) and the environment/paths credentials arrive by.
//!
//! Credentials are never part of the configuration document: the operator passes them as env vars
//! from the referenced Secrets (`secretKeyRef`) and as Secret volumes.

use serde::{Deserialize, Serialize};

use crate::v1alpha1::ConsumerPipelineSpec;

/// Key of the configuration document in the worker ConfigMap.
pub const CONFIG_KEY: &str = "pipeline.json";
/// Directory where the worker ConfigMap is mounted in worker pods.
pub const CONFIG_DIR: &str = "/etc/kpipe/config";
/// Env var (and `--config` flag default) holding the path of the configuration document.
pub const ENV_CONFIG: &str = "KPIPE_CONFIG";
/// Env var with the address the worker's HTTP server (metrics, health) listens on.
pub const ENV_LISTEN: &str = "KPIPE_LISTEN";
/// Port of the worker's HTTP server (`/metrics`, `/healthz`, `/readyz`).
pub const WORKER_HTTP_PORT: u16 = 9090;
/// Env var with the pod name (downward API); used for `group.instance.id` and logs.
pub const ENV_POD_NAME: &str = "KPIPE_POD_NAME";
/// Env var with the pod namespace (downward API).
pub const ENV_POD_NAMESPACE: &str = "KPIPE_POD_NAMESPACE";
/// Env vars with the SASL credentials (from the referenced Secret).
pub const ENV_SASL_USERNAME: &str = "KPIPE_SASL_USERNAME";
pub const ENV_SASL_PASSWORD: &str = "KPIPE_SASL_PASSWORD";
/// Env vars with the OIDC client credentials for SASL OAUTHBEARER (from the referenced Secret).
pub const ENV_OIDC_CLIENT_ID: &str = "KPIPE_OIDC_CLIENT_ID";
pub const ENV_OIDC_CLIENT_SECRET: &str = "KPIPE_OIDC_CLIENT_SECRET";
/// Directory of the TLS CA Secret volume; the CA file is `<dir>/<key>`.
pub const TLS_CA_DIR: &str = "/etc/kpipe/tls-ca";
/// Directory of the client-certificate Secret volume (`tls.crt`, `tls.key`).
pub const TLS_CLIENT_DIR: &str = "/etc/kpipe/tls-client";
/// Env var overriding the shutdown deadline the worker uses after SIGTERM (e.g. "25s"); the
/// operator derives it from the batch/retry budget and sets the pod's grace period above it.
pub const ENV_SHUTDOWN_TIMEOUT: &str = "KPIPE_SHUTDOWN_TIMEOUT";

/// The configuration document a worker reads at start-up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Namespace of the ConsumerPipeline.
    pub namespace: String,
    /// Name of the ConsumerPipeline (goes into `kpipe.pipeline` DLQ headers and metric labels).
    pub pipeline: String,
    /// The consumer group id (defaulted by the operator).
    pub group_id: String,
    /// Path of the CA file inside the pod, when TLS with a custom CA is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<String>,
    /// Paths of the client certificate and key inside the pod, for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_key_file: Option<String>,
    /// When the pipeline started consuming, in milliseconds since the Unix epoch: the operator
    /// writes the pipeline's `metadata.creationTimestamp`. Under `startOffset: latest`, a partition
    /// the group never committed on starts at its first record with a timestamp at or after this
    /// instant (Kafka offsets-for-times; see [`crate::offsets::start_point`]), so records produced
    /// while the pipeline was scaled to zero, and every record of a partition added later, are
    /// consumed. `None` (a worker run by hand): such partitions start at their log end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    /// The pipeline spec as admitted by the apiserver (defaults filled in).
    pub spec: ConsumerPipelineSpec,
}
