//! Loading the worker configuration document and the environment it runs in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kpipe_api::v1alpha1::{OnFailure, Processor};
use kpipe_api::worker_contract::WorkerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid {var}={value:?}: {message}")]
    Env { var: &'static str, value: String, message: String },
}

/// Parses a configuration document. JSON (what the operator writes) or YAML (for humans, chosen
/// by a `.yaml`/`.yml` extension). Errors name the offending field.
pub fn parse_config(path: &Path, text: &str) -> Result<WorkerConfig, ConfigError> {
    let is_yaml = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e == "yaml" || e == "yml");
    let config: WorkerConfig = if is_yaml {
        serde_saphyr::from_str(text)
            .map_err(|e| ConfigError::Invalid { path: path.to_owned(), message: e.to_string() })?
    } else {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Field {
            path: path.to_owned(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?
    };
    validate(path, &config)?;
    Ok(config)
}

/// Rules the apiserver enforces too, re-checked because the worker can be run by hand.
fn validate(path: &Path, c: &WorkerConfig) -> Result<(), ConfigError> {
    let field = |field: &str, message: &str| ConfigError::Field {
        path: path.to_owned(),
        field: field.to_owned(),
        message: message.to_owned(),
    };
    if c.spec.source.bootstrap_servers.is_empty() {
        return Err(field("spec.source.bootstrapServers", "at least one broker is required"));
    }
    if c.spec.source.topics.is_empty() {
        return Err(field("spec.source.topics", "at least one topic is required"));
    }
    if c.group_id.is_empty() {
        return Err(field("groupId", "must not be empty"));
    }
    if c.spec.effective_on_failure() == OnFailure::DeadLetter && c.spec.dead_letter.is_none() {
        return Err(field("spec.deadLetter", "required when onFailure is deadLetter"));
    }
    if let Some(dl) = &c.spec.dead_letter
        && c.spec.source.topics.contains(&dl.topic)
    {
        return Err(field("spec.deadLetter.topic", "must not be one of the source topics"));
    }
    if let Processor::Kafka(k) = &c.spec.processor.kind
        && c.spec.source.topics.contains(&k.topic)
    {
        return Err(field("spec.processor.kafka.topic", "must not be one of the source topics"));
    }
    let concurrency = c.spec.effective_concurrency();
    if concurrency.per_partition == 0 || concurrency.per_worker == 0 {
        return Err(field("spec.concurrency", "limits must be at least 1"));
    }
    if c.spec.batch.max_records == 0 {
        return Err(field("spec.batch.maxRecords", "must be at least 1"));
    }
    if let Some((f, message)) =
        kpipe_api::rules::group_protocol_problems(c.spec.source.group_protocol, &c.spec.source.config).first()
    {
        return Err(field(f, message));
    }
    Ok(())
}

pub fn load_config(path: &Path) -> Result<WorkerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_config(path, &text)
}

/// Parses a duration env value like "25s" (the API's duration syntax).
pub fn parse_duration_env(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    value.parse::<kpipe_api::Duration>().map(|d| d.as_std()).map_err(|e| ConfigError::Env {
        var,
        value: value.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "namespace": "shop", "pipeline": "orders", "groupId": "shop.orders",
        "spec": {
            "source": {"bootstrapServers": ["localhost:9092"], "topics": ["orders"]},
            "processor": {"http": {"url": "http://sink:8080/records", "timeout": "2s"}},
            "batch": {"maxRecords": 10, "maxBytes": "64Ki", "maxWait": "20ms"},
            "retry": {"maxAttempts": 3, "initialBackoff": "10ms", "maxBackoff": "1s", "multiplier": 2},
            "deadLetter": {"topic": "orders-dlq"}
        }
    }"#;

    #[test]
    fn parses_the_operator_document() {
        let c = parse_config(Path::new("pipeline.json"), GOOD).unwrap();
        assert_eq!(c.pipeline, "orders");
        assert_eq!(c.spec.batch.max_bytes.as_u64(), 64 * 1024);
        assert_eq!(c.spec.effective_on_failure(), OnFailure::DeadLetter);
    }

    #[test]
    fn malformed_field_is_named() {
        let bad = GOOD.replace(r#""maxWait": "20ms""#, r#""maxWait": "soon""#);
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("spec.batch.maxWait"), "{err}");
        let bad = GOOD.replace(r#""maxRecords": 10"#, r#""maxRecords": -1"#);
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("spec.batch.maxRecords"), "{err}");
        let bad = GOOD.replace(r#""groupId""#, r#""groupid""#);
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("groupid"), "{err}");
    }

    #[test]
    fn semantic_errors_are_named() {
        let bad = GOOD.replace(r#""topic": "orders-dlq""#, r#""topic": "orders""#);
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("spec.deadLetter.topic"), "{err}");
        let bad = GOOD.replace(r#""deadLetter": {"topic": "orders-dlq"}"#, r#""onFailure": "deadLetter""#);
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("spec.deadLetter"), "{err}");
        let bad = GOOD.replace(
            r#""topics": ["orders"]"#,
            r#""topics": ["orders"], "groupProtocol": "consumer", "config": {"session.timeout.ms": "30000"}"#,
        );
        let err = parse_config(Path::new("pipeline.json"), &bad).unwrap_err().to_string();
        assert!(err.contains("spec.source.config.session.timeout.ms"), "{err}");
    }

    #[test]
    fn yaml_for_humans() {
        let yaml = "namespace: shop\npipeline: orders\ngroupId: g\nspec:\n  source:\n    bootstrapServers: [\"k:9092\"]\n    topics: [orders]\n  processor:\n    noop: {}\n  onFailure: drop\n";
        let c = parse_config(Path::new("p.yaml"), yaml).unwrap();
        assert_eq!(c.spec.effective_on_failure(), OnFailure::Drop);
    }

    #[test]
    fn durations_from_env() {
        assert_eq!(parse_duration_env("X", "25s").unwrap(), Duration::from_secs(25));
        assert!(parse_duration_env("X", "soon").is_err());
    }
}
