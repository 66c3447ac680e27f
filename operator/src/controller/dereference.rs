//! Step 1, dereference: read the Secrets a pipeline references (the only objects besides its own
//! children that a reconcile reads), for validation, the config hash and the lag probe's credentials.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kpipe_api::v1alpha1::ConsumerPipelineSpec;
use kube::Client;
use kube::api::Api;

use crate::build::{self, SecretKeys};
use kpipe_api::kafka_client::{Credentials, Material};

use crate::probe::Cluster;
use crate::status::Problem;

/// Secrets a pipeline references: key names and versions (for validation and the config hash) and the
/// values the lag probe needs (kept in memory only, never logged or written anywhere).
#[derive(Default)]
pub struct Dereferenced {
    pub keys: SecretKeys,
    /// Secret name → `resourceVersion` (a rotated Secret changes the config hash and rolls the workers).
    pub versions: BTreeMap<String, String>,
    /// Secret name → key → value.
    pub data: BTreeMap<String, BTreeMap<String, String>>,
}

/// Read the Secrets `spec` references in `ns`. A missing Secret is left out (validation names it); a
/// failed read is a [`Problem::KubernetesApi`] naming the Secret, reported in status like any other.
pub async fn dereference(client: &Client, ns: &str, spec: &ConsumerPipelineSpec) -> Result<Dereferenced, Problem> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = Dereferenced::default();
    for name in build::referenced_secrets(spec).into_keys() {
        let secret = api
            .get_opt(&name)
            .await
            .map_err(|e| Problem::KubernetesApi { message: format!("reading Secret {ns}/{name}: {e}") })?;
        let Some(secret) = secret else { continue };
        let mut keys = BTreeSet::new();
        let mut values = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            keys.insert(k.clone());
            values.insert(k, String::from_utf8_lossy(&v.0).into_owned());
        }
        for (k, v) in secret.string_data.unwrap_or_default() {
            keys.insert(k.clone());
            values.insert(k, v);
        }
        out.versions.insert(name.clone(), secret.metadata.resource_version.unwrap_or_default());
        out.keys.insert(name.clone(), keys);
        out.data.insert(name, values);
    }
    Ok(out)
}

/// The Kafka connection settings of `spec` with the credentials from `d`: the secret values
/// [`kpipe_api::kafka_client::properties`] needs, TLS material as PEM.
pub fn cluster_for(spec: &ConsumerPipelineSpec, d: &Dereferenced) -> Cluster {
    let get = |secret: &str, key: &str| d.data.get(secret).and_then(|m| m.get(key)).cloned();
    let auth = spec.source.auth.as_ref();
    let sasl = auth.and_then(|a| a.sasl.as_ref());
    let password = sasl.and_then(|s| s.secret_ref.as_ref());
    let oidc = sasl.and_then(|s| s.oidc.as_ref()).map(|o| &o.client_secret_ref);
    let tls = auth.and_then(|a| a.tls.as_ref());
    let client = tls.and_then(|t| t.client_cert_secret_ref.as_ref());
    let credentials = Credentials {
        username: password.and_then(|r| get(&r.name, &r.username_key)),
        password: password.and_then(|r| get(&r.name, &r.password_key)),
        client_id: oidc.and_then(|r| get(&r.name, &r.client_id_key)),
        client_secret: oidc.and_then(|r| get(&r.name, &r.client_secret_key)),
        ca: tls.and_then(|t| t.ca_secret_ref.as_ref()).and_then(|c| get(&c.name, &c.key)).map(Material::Pem),
        client_cert: client.and_then(|c| get(&c.name, "tls.crt")).map(Material::Pem),
        client_key: client.and_then(|c| get(&c.name, "tls.key")).map(Material::Pem),
    };
    Cluster { bootstrap_servers: spec.source.bootstrap_servers.clone(), auth: auth.cloned(), credentials }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_credentials_come_from_the_referenced_secrets() {
        let spec: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {
                "bootstrapServers": ["b:9096"], "topics": ["t"],
                "auth": {
                    "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "user", "usernameKey": "u"}},
                    "tls": {"caSecretRef": {"name": "ca"}, "clientCertSecretRef": {"name": "client"}}
                }
            },
            "processor": {"noop": {}}
        }))
        .unwrap();
        let mut d = Dereferenced::default();
        d.data.insert("user".into(), BTreeMap::from([("u".into(), "alice".into()), ("password".into(), "pw".into())]));
        d.data.insert("ca".into(), BTreeMap::from([("ca.crt".into(), "CA".into())]));
        d.data
            .insert("client".into(), BTreeMap::from([("tls.crt".into(), "C".into()), ("tls.key".into(), "K".into())]));
        let c = cluster_for(&spec, &d);
        let props = c.security_properties();
        let get = |k: &str| props.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        assert_eq!(get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(
            (get("sasl.mechanism"), get("sasl.username"), get("sasl.password")),
            (Some("SCRAM-SHA-512"), Some("alice"), Some("pw"))
        );
        assert_eq!(
            (get("ssl.ca.pem"), get("ssl.certificate.pem"), get("ssl.key.pem")),
            (Some("CA"), Some("C"), Some("K"))
        );
        let oidc: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {
                "bootstrapServers": ["b:9096"], "topics": ["t"],
                "auth": {"sasl": {"mechanism": "OAUTHBEARER", "oidc": {
                    "tokenEndpointUrl": "https://idp/token", "clientSecretRef": {"name": "oidc", "clientIdKey": "id"}
                }}, "tls": {}}
            },
            "processor": {"noop": {}}
        }))
        .unwrap();
        d.data.insert(
            "oidc".into(),
            BTreeMap::from([("id".into(), "kpipe".into()), ("clientSecret".into(), "cs".into())]),
        );
        let props = cluster_for(&oidc, &d).security_properties();
        let get = |k: &str| props.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        assert_eq!(
            (get("sasl.oauthbearer.client.id"), get("sasl.oauthbearer.client.secret"), get("sasl.username")),
            (Some("kpipe"), Some("cs"), None)
        );
        let plain: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"bootstrapServers": ["b:9092"], "topics": ["t"]}, "processor": {"noop": {}}
        }))
        .unwrap();
        let c = cluster_for(&plain, &Dereferenced::default());
        assert!(!c.is_secured());
    }
}
