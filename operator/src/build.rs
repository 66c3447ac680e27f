//! Reconcile as build steps: referenced objects → [`validate`] (pure) → [`ValidatedPipeline`] →
//! children built by pure functions ([`config_map`], [`deployment`]).
//!
//! Credentials never enter the ConfigMap: SASL username/password reach the worker as
//! `secretKeyRef` env vars, TLS material as Secret volumes (paths in the worker contract).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kpipe_api::v1alpha1::{ConsumerPipeline, ConsumerPipelineSpec, Processor};
use kpipe_api::worker_contract::{self as wc, WorkerConfig};
use sha2::{Digest, Sha256};

/// Value of `app.kubernetes.io/managed-by` and the default field manager.
pub const MANAGER: &str = "kpipe-operator";
/// Annotation on the pod template carrying the config hash (a change rolls the pods).
pub const CONFIG_HASH_ANNOTATION: &str = "kpipe.io/config-hash";
/// Label keys.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// Container name of the worker.
pub const CONTAINER: &str = "worker";
const HTTP_PORT_NAME: &str = "http";
/// The non-root user the worker runs as.
pub const WORKER_UID: i64 = 65532;

/// Operator-wide defaults for the worker pods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerDefaults {
    pub image: String,
    pub resources: Option<ResourceRequirements>,
    pub image_pull_policy: Option<String>,
}

/// Key names (never values) of the Secrets a pipeline references, as found in its namespace.
pub type SecretKeys = BTreeMap<String, BTreeSet<String>>;

/// Spec problems the schema cannot catch. All are permanent until the user or the cluster changes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("object has no {0}")]
    MissingMetadata(&'static str),
    #[error("name {0:?} is longer than 63 characters and cannot be used as a label value")]
    NameTooLong(String),
    /// A rule of the API schema is broken (an object admitted before the rule existed).
    #[error("{0}")]
    InvalidField(kpipe_api::rules::FieldError),
    #[error("Secret {0:?} not found in the pipeline's namespace")]
    SecretNotFound(String),
    #[error("Secret {secret:?} has no key {key:?}")]
    SecretKeyMissing { secret: String, key: String },
    #[error("cannot serialise the worker configuration: {0}")]
    Serialize(String),
}

impl ValidationError {
    /// CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) | Self::NameTooLong(_) | Self::InvalidField(_) | Self::Serialize(_) => {
                "InvalidSpec"
            }
            Self::SecretNotFound(_) => "SecretNotFound",
            Self::SecretKeyMissing { .. } => "SecretKeyMissing",
        }
    }
}

/// Everything the builders need, resolved once.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedPipeline {
    pub name: String,
    pub namespace: String,
    pub spec: ConsumerPipelineSpec,
    pub group_id: String,
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub owner: OwnerReference,
    pub config_json: String,
    /// sha256 over the config document, the image and the referenced Secrets' versions.
    pub config_hash: String,
    /// Worker shutdown deadline after SIGTERM, in seconds.
    pub shutdown_timeout_secs: i64,
    pub termination_grace_secs: i64,
}

impl ValidatedPipeline {
    /// Name of the Deployment and ConfigMap.
    pub fn child_name(&self) -> String {
        child_name(&self.name)
    }

    /// Labels on every child object and the worker pods.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.selector_labels();
        l.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
        l.insert(LABEL_PART_OF.into(), "kpipe".into());
        l
    }

    /// Labels selecting the worker pods.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        selector_labels(&self.name)
    }
}

/// Name of a pipeline's Deployment and ConfigMap.
pub fn child_name(pipeline: &str) -> String {
    format!("{pipeline}-worker")
}

/// Labels selecting a pipeline's worker pods.
pub fn selector_labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "kpipe-worker".to_string()),
        (LABEL_INSTANCE.to_string(), pipeline.to_string()),
        (LABEL_COMPONENT.to_string(), "worker".to_string()),
    ])
}

/// `.status.selector` for the scale subresource.
pub fn selector_string(pipeline: &str) -> String {
    selector_labels(pipeline).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The Secrets (name → keys needed) a spec references.
pub fn referenced_secrets(spec: &ConsumerPipelineSpec) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if let Some(auth) = &spec.source.auth {
        if let Some(sasl) = &auth.sasl {
            if let Some(r) = &sasl.secret_ref {
                let keys = out.entry(r.name.clone()).or_default();
                keys.insert(r.username_key.clone());
                keys.insert(r.password_key.clone());
            }
            if let Some(o) = &sasl.oidc {
                let r = &o.client_secret_ref;
                let keys = out.entry(r.name.clone()).or_default();
                keys.insert(r.client_id_key.clone());
                keys.insert(r.client_secret_key.clone());
            }
        }
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                out.entry(ca.name.clone()).or_default().insert(ca.key.clone());
            }
            if let Some(client) = &tls.client_cert_secret_ref {
                let keys = out.entry(client.name.clone()).or_default();
                keys.insert("tls.crt".into());
                keys.insert("tls.key".into());
            }
        }
    }
    out
}

/// Worker shutdown deadline: one processor attempt plus the batch wait, plus time to commit and
/// leave the group. Retries in backoff are abandoned (uncommitted) at shutdown, so they don't count.
pub fn shutdown_budget_secs(spec: &ConsumerPipelineSpec) -> i64 {
    let attempt = match &spec.processor.kind {
        Processor::Http(h) => h.timeout.as_secs_f64(),
        Processor::Kafka(_) => 10.0,
        Processor::Noop(_) => 0.0,
    };
    let secs = (attempt + spec.batch.max_wait.as_secs_f64()).ceil() as i64 + 5;
    secs.clamp(10, 300)
}

/// Validate a pipeline against what exists (pure).
pub fn validate(
    cp: &ConsumerPipeline,
    secrets: &SecretKeys,
    secret_versions: &BTreeMap<String, String>,
    defaults: &WorkerDefaults,
) -> Result<ValidatedPipeline, ValidationError> {
    let name = cp.metadata.name.clone().ok_or(ValidationError::MissingMetadata("metadata.name"))?;
    let namespace = cp.metadata.namespace.clone().ok_or(ValidationError::MissingMetadata("metadata.namespace"))?;
    let uid = cp.metadata.uid.clone().ok_or(ValidationError::MissingMetadata("metadata.uid"))?;
    if name.len() > 63 {
        return Err(ValidationError::NameTooLong(name));
    }
    // The schema's rules again: a pipeline stored under an older CRD must not render children that
    // fail to apply or a worker that fails to start.
    kpipe_api::rules::check(&name, &cp.spec).map_err(ValidationError::InvalidField)?;
    for (secret, keys) in referenced_secrets(&cp.spec) {
        let found = secrets.get(&secret).ok_or_else(|| ValidationError::SecretNotFound(secret.clone()))?;
        if let Some(key) = keys.iter().find(|k| !found.contains(*k)) {
            return Err(ValidationError::SecretKeyMissing { secret, key: key.clone() });
        }
    }
    let group_id = cp.spec.source.effective_group_id(&namespace, &name);
    let tls = cp.spec.source.auth.as_ref().and_then(|a| a.tls.as_ref());
    let config = WorkerConfig {
        namespace: namespace.clone(),
        pipeline: name.clone(),
        group_id: group_id.clone(),
        tls_ca_file: tls.and_then(|t| t.ca_secret_ref.as_ref()).map(|ca| format!("{}/{}", wc::TLS_CA_DIR, ca.key)),
        tls_client_cert_file: tls
            .and_then(|t| t.client_cert_secret_ref.as_ref())
            .map(|_| format!("{}/tls.crt", wc::TLS_CLIENT_DIR)),
        tls_client_key_file: tls
            .and_then(|t| t.client_cert_secret_ref.as_ref())
            .map(|_| format!("{}/tls.key", wc::TLS_CLIENT_DIR)),
        // "Started consuming" for `startOffset: latest` is the pipeline's creation (docs/api.md, "Offsets and topic
        // lifecycle"): stable across restarts, scale-to-zero and re-renders, so the config hash does not churn.
        started_at_ms: cp.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond()),
        spec: cp.spec.clone(),
    };
    let config_json = serde_json::to_string_pretty(&config).map_err(|e| ValidationError::Serialize(e.to_string()))?;
    let image = cp.spec.worker.image.clone().unwrap_or_else(|| defaults.image.clone());
    let resources = cp.spec.worker.resources.clone().or_else(|| defaults.resources.clone());
    let mut hasher = Sha256::new();
    hasher.update(config_json.as_bytes());
    hasher.update(b"\0");
    hasher.update(image.as_bytes());
    // The operator's defaults shape the pod too: a changed default (e.g. after `helm upgrade`) must roll the workers.
    hasher.update(b"\0");
    hasher.update(serde_json::to_string(&resources).unwrap_or_default().as_bytes());
    hasher.update(b"\0");
    hasher.update(defaults.image_pull_policy.as_deref().unwrap_or_default().as_bytes());
    for (secret, version) in secret_versions {
        hasher.update(format!("\0{secret}={version}").as_bytes());
    }
    let config_hash = hex::encode(&hasher.finalize()[..16]);
    let shutdown_timeout_secs = shutdown_budget_secs(&cp.spec);
    Ok(ValidatedPipeline {
        owner: OwnerReference {
            api_version: "kpipe.io/v1alpha1".into(),
            kind: "ConsumerPipeline".into(),
            name: name.clone(),
            uid,
            controller: Some(true),
            // No blockOwnerDeletion: it would need update on consumerpipelines/finalizers
            // (OwnerReferencesPermissionEnforcement) for no benefit to background deletion.
            block_owner_deletion: None,
        },
        name,
        namespace,
        group_id,
        image,
        image_pull_policy: defaults.image_pull_policy.clone(),
        resources,
        config_json,
        config_hash,
        shutdown_timeout_secs,
        termination_grace_secs: shutdown_timeout_secs + 10,
        spec: cp.spec.clone(),
    })
}

fn meta(v: &ValidatedPipeline) -> ObjectMeta {
    ObjectMeta {
        name: Some(v.child_name()),
        namespace: Some(v.namespace.clone()),
        labels: Some(v.labels()),
        owner_references: Some(vec![v.owner.clone()]),
        ..Default::default()
    }
}

/// The worker ConfigMap: the `WorkerConfig` document under `pipeline.json`.
pub fn config_map(v: &ValidatedPipeline) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), v.config_hash.clone())])),
            ..meta(v)
        },
        data: Some(BTreeMap::from([(wc::CONFIG_KEY.to_string(), v.config_json.clone())])),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The worker Deployment with `replicas` replicas.
pub fn deployment(v: &ValidatedPipeline, replicas: i32) -> Deployment {
    let w = &v.spec.worker;
    let mut env_vars = vec![
        env(wc::ENV_CONFIG, format!("{}/{}", wc::CONFIG_DIR, wc::CONFIG_KEY)),
        env(wc::ENV_LISTEN, format!("0.0.0.0:{}", wc::WORKER_HTTP_PORT)),
        field_env(wc::ENV_POD_NAME, "metadata.name"),
        field_env(wc::ENV_POD_NAMESPACE, "metadata.namespace"),
        env(wc::ENV_SHUTDOWN_TIMEOUT, format!("{}s", v.shutdown_timeout_secs)),
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: wc::CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: v.child_name(), ..Default::default() }),
            ..Default::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
    if let Some(auth) = &v.spec.source.auth {
        if let Some(sasl) = &auth.sasl {
            if let Some(r) = &sasl.secret_ref {
                env_vars.push(secret_env(wc::ENV_SASL_USERNAME, &r.name, &r.username_key));
                env_vars.push(secret_env(wc::ENV_SASL_PASSWORD, &r.name, &r.password_key));
            }
            if let Some(o) = &sasl.oidc {
                let r = &o.client_secret_ref;
                env_vars.push(secret_env(wc::ENV_OIDC_CLIENT_ID, &r.name, &r.client_id_key));
                env_vars.push(secret_env(wc::ENV_OIDC_CLIENT_SECRET, &r.name, &r.client_secret_key));
            }
        }
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                mounts.push(VolumeMount {
                    name: "tls-ca".into(),
                    mount_path: wc::TLS_CA_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
                volumes.push(Volume {
                    name: "tls-ca".into(),
                    secret: Some(SecretVolumeSource { secret_name: Some(ca.name.clone()), ..Default::default() }),
                    ..Default::default()
                });
            }
            if let Some(client) = &tls.client_cert_secret_ref {
                mounts.push(VolumeMount {
                    name: "tls-client".into(),
                    mount_path: wc::TLS_CLIENT_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
                volumes.push(Volume {
                    name: "tls-client".into(),
                    secret: Some(SecretVolumeSource { secret_name: Some(client.name.clone()), ..Default::default() }),
                    ..Default::default()
                });
            }
        }
    }
    // User env may not shadow the contract's variables.
    let reserved: BTreeSet<String> = env_vars.iter().map(|e| e.name.clone()).collect();
    let mut user_env: Vec<EnvVar> = w.env.iter().filter(|e| !reserved.contains(&e.name)).cloned().collect();
    let mut seen = BTreeSet::new();
    user_env.retain(|e| seen.insert(e.name.clone()));
    let mut all_env = user_env;
    all_env.extend(env_vars);

    let mut pod_labels = w.pod_labels.clone();
    pod_labels.extend(v.labels());
    let mut pod_annotations = w.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), v.config_hash.clone());

    let container = Container {
        name: CONTAINER.into(),
        image: Some(v.image.clone()),
        image_pull_policy: v.image_pull_policy.clone(),
        env: Some(all_env),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: i32::from(wc::WORKER_HTTP_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        resources: v.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        service_account_name: w.service_account_name.clone(),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(v.termination_grace_secs),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        node_selector: (!w.node_selector.is_empty()).then(|| w.node_selector.clone()),
        tolerations: (!w.tolerations.is_empty()).then(|| w.tolerations.clone()),
        affinity: w.affinity.clone(),
        ..Default::default()
    };
    Deployment {
        metadata: meta(v),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            revision_history_limit: Some(3),
            selector: LabelSelector { match_labels: Some(v.selector_labels()), match_expressions: None },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(yaml: &str) -> ConsumerPipeline {
        let doc = yaml.split("\n---\n").find(|d| d.contains("kind: ConsumerPipeline")).unwrap();
        let mut cp: ConsumerPipeline = serde_saphyr::from_str(doc).unwrap();
        cp.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
        cp
    }

    fn defaults() -> WorkerDefaults {
        WorkerDefaults {
            image: "kpipe/worker:0.1.0".into(),
            resources: None,
            image_pull_policy: Some("IfNotPresent".into()),
        }
    }

    fn example(name: &str) -> String {
        std::fs::read_to_string(format!("{}/../crds/examples/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn secrets_for(cp: &ConsumerPipeline) -> SecretKeys {
        referenced_secrets(&cp.spec)
    }

    /// Compare with `operator/testdata/<name>.json`; `UPDATE_GOLDEN=1` rewrites the files.
    fn golden(name: &str, value: &serde_json::Value) {
        let path = format!("{}/testdata/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let text = serde_json::to_string_pretty(value).unwrap() + "\n";
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(format!("{}/testdata", env!("CARGO_MANIFEST_DIR"))).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(text, want, "golden {path} differs (UPDATE_GOLDEN=1 to accept)");
    }

    #[test]
    fn golden_children_for_every_example() {
        for file in ["http-dlq-scale-to-zero.yaml", "kafka-forwarder-key-ordering.yaml", "sasl-scram-tls.yaml"] {
            let cp = pipeline(&example(file));
            let v = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap();
            let stem = file.trim_end_matches(".yaml");
            golden(&format!("{stem}.configmap"), &serde_json::to_value(config_map(&v)).unwrap());
            golden(&format!("{stem}.deployment"), &serde_json::to_value(deployment(&v, 2)).unwrap());
        }
    }

    #[test]
    fn the_circuit_breaker_reaches_the_worker_config() {
        let mut cp = pipeline(&example("http-dlq-scale-to-zero.yaml"));
        let cb = kpipe_api::v1alpha1::CircuitBreaker {
            minimum_calls: Some(3),
            failure_rate_threshold: 80,
            open_duration: kpipe_api::Duration::from_secs(2),
            ..Default::default()
        };
        cp.spec.processor.circuit_breaker = Some(cb);
        let v = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap();
        let doc = &config_map(&v).data.unwrap()[wc::CONFIG_KEY];
        let parsed: WorkerConfig = serde_json::from_str(doc).unwrap();
        assert_eq!(parsed.spec.processor.circuit_breaker, Some(cb), "{doc}");
        assert_eq!(parsed.spec.processor.kind, cp.spec.processor.kind);
    }

    #[test]
    fn the_group_protocol_reaches_the_worker_config() {
        let mut cp = pipeline(&example("http-dlq-scale-to-zero.yaml"));
        let doc = |cp: &ConsumerPipeline| {
            let v = validate(cp, &secrets_for(cp), &BTreeMap::new(), &defaults()).unwrap();
            config_map(&v).data.unwrap()[wc::CONFIG_KEY].clone()
        };
        // The default is left out, so pipelines rendered before the field existed keep their config hash.
        assert!(!doc(&cp).contains("groupProtocol"));
        cp.spec.source.group_protocol = kpipe_api::v1alpha1::GroupProtocol::Consumer;
        let text = doc(&cp);
        let parsed: WorkerConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.spec.source.group_protocol, kpipe_api::v1alpha1::GroupProtocol::Consumer, "{text}");
        // With it, the broker owns the session timeout: a pipeline stored under an older CRD is refused.
        cp.spec.source.config.insert("session.timeout.ms".into(), "30000".into());
        let err = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap_err().to_string();
        assert!(err.contains("source.config.session.timeout.ms"), "{err}");
    }

    #[test]
    fn deployment_meets_restricted_pod_security() {
        let cp = pipeline(&example("sasl-scram-tls.yaml"));
        let v = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap();
        let d = deployment(&v, 3);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
        assert_eq!(pod.termination_grace_period_seconds, Some(v.termination_grace_secs));
        assert!(v.termination_grace_secs > v.shutdown_timeout_secs);
        // Credentials: secretKeyRef env and Secret volumes only.
        let env = c.env.clone().unwrap();
        let pw = env.iter().find(|e| e.name == wc::ENV_SASL_PASSWORD).unwrap();
        assert!(pw.value.is_none() && pw.value_from.as_ref().unwrap().secret_key_ref.is_some());
        let cm = config_map(&v);
        let doc = &cm.data.unwrap()[wc::CONFIG_KEY];
        assert!(!doc.to_lowercase().contains("password\":\""), "no secret values in the ConfigMap");
        let parsed: WorkerConfig = serde_json::from_str(doc).unwrap();
        assert_eq!(parsed.spec, cp.spec);
        // Owner reference and labels.
        let owner = &d.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("ConsumerPipeline", Some(true)));
        let labels = d.metadata.labels.unwrap();
        for key in [LABEL_NAME, LABEL_INSTANCE, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_PART_OF] {
            assert!(labels.contains_key(key), "{key}");
        }
    }

    #[test]
    fn spec_change_changes_the_hash_and_replicas_do_not() {
        let cp = pipeline(&example("http-dlq-scale-to-zero.yaml"));
        let v1 = validate(&cp, &BTreeMap::new(), &BTreeMap::new(), &defaults()).unwrap();
        let mut cp2 = cp.clone();
        cp2.spec.batch.max_records = 7;
        let v2 = validate(&cp2, &BTreeMap::new(), &BTreeMap::new(), &defaults()).unwrap();
        assert_ne!(v1.config_hash, v2.config_hash);
        let a = deployment(&v1, 1).spec.unwrap().template;
        let b = deployment(&v1, 5).spec.unwrap().template;
        assert_eq!(a, b, "scaling must not roll pods");
        let rotated = BTreeMap::from([("kafka-user".to_string(), "42".to_string())]);
        let v3 = validate(&cp, &BTreeMap::new(), &rotated, &defaults()).unwrap();
        assert_ne!(v1.config_hash, v3.config_hash, "a rotated Secret rolls the pods");
        let mut bigger = defaults();
        bigger.resources = serde_json::from_value(serde_json::json!({"limits": {"memory": "300Mi"}})).unwrap();
        let v4 = validate(&cp, &BTreeMap::new(), &BTreeMap::new(), &bigger).unwrap();
        assert_ne!(v1.config_hash, v4.config_hash, "new operator defaults (helm upgrade) roll the pods");
    }

    #[test]
    fn validation_errors() {
        let cp = pipeline(&example("sasl-scram-tls.yaml"));
        let err = validate(&cp, &BTreeMap::new(), &BTreeMap::new(), &defaults()).unwrap_err();
        assert!(matches!(err, ValidationError::SecretNotFound(_)), "{err}");
        assert_eq!(err.reason(), "SecretNotFound");
        let mut secrets = secrets_for(&cp);
        let (name, keys) = secrets.iter_mut().next().unwrap();
        let name = name.clone();
        let key = keys.pop_first().unwrap();
        let err = validate(&cp, &secrets, &BTreeMap::new(), &defaults()).unwrap_err();
        assert_eq!(err, ValidationError::SecretKeyMissing { secret: name, key });
        let mut long = cp.clone();
        long.metadata.name = Some("x".repeat(64));
        assert!(matches!(
            validate(&long, &secrets_for(&cp), &BTreeMap::new(), &defaults()),
            Err(ValidationError::NameTooLong(_))
        ));
        let mut old = cp.clone();
        old.spec.source.bootstrap_servers = vec!["fd00::1:9092".into()];
        let err = validate(&old, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(err.to_string().starts_with("spec.source.bootstrapServers[0]: "), "{err}");
    }

    #[test]
    fn user_env_cannot_shadow_contract_vars_and_image_defaults() {
        let mut cp = pipeline(&example("http-dlq-scale-to-zero.yaml"));
        cp.spec.worker.env = vec![env(wc::ENV_LISTEN, "0.0.0.0:1"), env("EXTRA", "1")];
        let v = validate(&cp, &BTreeMap::new(), &BTreeMap::new(), &defaults()).unwrap();
        let d = deployment(&v, 1);
        let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
        let env = c.env.clone().unwrap();
        let listen: Vec<_> = env.iter().filter(|e| e.name == wc::ENV_LISTEN).collect();
        assert_eq!(listen.len(), 1);
        assert_eq!(listen[0].value.as_deref(), Some("0.0.0.0:9090"));
        assert!(env.iter().any(|e| e.name == "EXTRA"));
        assert_eq!(c.image.as_deref(), Some(cp.spec.worker.image.as_deref().unwrap_or("kpipe/worker:0.1.0")));
    }

    /// `startOffset: latest` means "records produced after the pipeline started": the worker gets the pipeline's
    /// creation time, and a re-render (any reconcile) keeps the config hash.
    #[test]
    fn workers_get_the_pipeline_creation_time() {
        let mut cp = pipeline(&example("http-dlq-scale-to-zero.yaml"));
        let created: jiff::Timestamp = "2025-03-04T05:06:07Z".parse().unwrap();
        cp.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
        let v = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap();
        let config: WorkerConfig = serde_json::from_str(&v.config_json).unwrap();
        assert_eq!(config.started_at_ms, Some(created.as_millisecond()));
        let again = validate(&cp, &secrets_for(&cp), &BTreeMap::new(), &defaults()).unwrap();
        assert_eq!(v.config_hash, again.config_hash);
    }

    #[test]
    fn selector_string_matches_labels() {
        assert_eq!(
            selector_string("p"),
            "app.kubernetes.io/component=worker,app.kubernetes.io/instance=p,app.kubernetes.io/name=kpipe-worker"
        );
    }
}
