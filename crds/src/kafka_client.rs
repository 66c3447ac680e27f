//! The security part of every Kafka client kpipe creates — the worker's consumer, its dead-letter and forward
//! producers, and the operator's lag probe and offset keeper — derived in one place from `spec.source.auth` and
//! the values of the Secrets it references.
//!
//! The result is a list of librdkafka properties (CONFIGURATION.md of librdkafka 2.12): `security.protocol`,
//! `sasl.*`, `sasl.oauthbearer.*` and `ssl.*`. The worker passes TLS material as files (the Secret volumes of
//! [`crate::worker_contract`]), the operator as PEM strings read from the Secrets; both get the same properties
//! otherwise. Values of [`Credentials`] are never printed by its `Debug` implementation.

use std::fmt;

use crate::v1alpha1::{Auth, SaslMechanism};

/// How a piece of TLS material reaches the client.
#[derive(Clone, PartialEq, Eq)]
pub enum Material {
    /// A file path (librdkafka `*.location`).
    File(String),
    /// PEM text (librdkafka `*.pem`).
    Pem(String),
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Pem(_) => f.write_str("Pem(..)"),
        }
    }
}

/// The secret values `auth` refers to, as read from the referenced Secrets (or their projection into a pod).
/// A value that is missing leaves its property out, so the client fails to authenticate (and says so) instead of
/// authenticating as someone else.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// SASL username (`PLAIN`, `SCRAM-*`).
    pub username: Option<String>,
    /// SASL password (`PLAIN`, `SCRAM-*`).
    pub password: Option<String>,
    /// OIDC client id (`OAUTHBEARER`).
    pub client_id: Option<String>,
    /// OIDC client secret (`OAUTHBEARER`).
    pub client_secret: Option<String>,
    /// CA certificate(s) that signed the brokers' certificates. `None`: the system trust store.
    pub ca: Option<Material>,
    /// Client certificate for mutual TLS.
    pub client_cert: Option<Material>,
    /// Private key of the client certificate.
    pub client_key: Option<Material>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username.is_some())
            .field("password", &self.password.is_some())
            .field("client_id", &self.client_id.is_some())
            .field("client_secret", &self.client_secret.is_some())
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key.as_ref().map(|_| ".."))
            .finish()
    }
}

/// librdkafka `security.protocol` for `auth`: SASL and TLS as configured, PLAINTEXT without `auth`.
pub fn security_protocol(auth: Option<&Auth>) -> &'static str {
    let sasl = auth.is_some_and(|a| a.sasl.is_some());
    let tls = auth.is_some_and(|a| a.tls.is_some());
    match (sasl, tls) {
        (true, true) => "SASL_SSL",
        (true, false) => "SASL_PLAINTEXT",
        (false, true) => "SSL",
        (false, false) => "PLAINTEXT",
    }
}

/// The librdkafka security properties for `auth` with the secret values `creds`, in a fixed order.
///
/// - always `security.protocol` ([`security_protocol`]);
/// - SASL: `sasl.mechanism`; `PLAIN`/`SCRAM-*` add `sasl.username`, `sasl.password`; `OAUTHBEARER` adds
///   `sasl.oauthbearer.method=oidc`, `sasl.oauthbearer.token.endpoint.url`, `sasl.oauthbearer.client.id`,
///   `sasl.oauthbearer.client.secret`, and when set `sasl.oauthbearer.scope` and `sasl.oauthbearer.extensions`
///   (`key=value` pairs joined by `,`, keys sorted);
/// - TLS: `ssl.ca.location`/`ssl.ca.pem`, and for mutual TLS `ssl.certificate.*` + `ssl.key.*` (both or
///   neither). Material given for an `auth` without `tls` is ignored. Host-name verification stays librdkafka's
///   default (`ssl.endpoint.identification.algorithm=https`; `spec.source.config` may set `none`).
pub fn properties(auth: Option<&Auth>, creds: &Credentials) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| out.push((k.to_string(), v.to_string()));
    set("security.protocol", security_protocol(auth));
    let Some(auth) = auth else { return out };
    if let Some(sasl) = &auth.sasl {
        set("sasl.mechanism", sasl.mechanism.as_str());
        match sasl.mechanism {
            SaslMechanism::OAuthBearer => {
                set("sasl.oauthbearer.method", "oidc");
                if let Some(oidc) = &sasl.oidc {
                    set("sasl.oauthbearer.token.endpoint.url", &oidc.token_endpoint_url);
                }
                if let Some(id) = &creds.client_id {
                    set("sasl.oauthbearer.client.id", id);
                }
                if let Some(secret) = &creds.client_secret {
                    set("sasl.oauthbearer.client.secret", secret);
                }
                if let Some(oidc) = &sasl.oidc {
                    if let Some(scope) = &oidc.scope {
                        set("sasl.oauthbearer.scope", scope);
                    }
                    if !oidc.extensions.is_empty() {
                        let ext: Vec<String> = oidc.extensions.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        set("sasl.oauthbearer.extensions", &ext.join(","));
                    }
                }
            }
            SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
                if let Some(u) = &creds.username {
                    set("sasl.username", u);
                }
                if let Some(p) = &creds.password {
                    set("sasl.password", p);
                }
            }
        }
    }
    if auth.tls.is_some() {
        match &creds.ca {
            Some(Material::File(path)) => set("ssl.ca.location", path),
            Some(Material::Pem(pem)) => set("ssl.ca.pem", pem),
            None => {}
        }
        match (&creds.client_cert, &creds.client_key) {
            (Some(Material::File(cert)), Some(Material::File(key))) => {
                set("ssl.certificate.location", cert);
                set("ssl.key.location", key);
            }
            (Some(Material::Pem(cert)), Some(Material::Pem(key))) => {
                set("ssl.certificate.pem", cert);
                set("ssl.key.pem", key);
            }
            (Some(Material::File(cert)), Some(Material::Pem(key))) => {
                set("ssl.certificate.location", cert);
                set("ssl.key.pem", key);
            }
            (Some(Material::Pem(cert)), Some(Material::File(key))) => {
                set("ssl.certificate.pem", cert);
                set("ssl.key.location", key);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(json: serde_json::Value) -> Auth {
        serde_json::from_value(json).unwrap()
    }

    fn files() -> Credentials {
        Credentials {
            username: Some("alice".into()),
            password: Some("pw".into()),
            client_id: Some("kpipe".into()),
            client_secret: Some("cs".into()),
            ca: Some(Material::File("/ca/ca.crt".into())),
            client_cert: Some(Material::File("/c/tls.crt".into())),
            client_key: Some(Material::File("/c/tls.key".into())),
        }
    }

    fn pems() -> Credentials {
        Credentials {
            ca: Some(Material::Pem("CA".into())),
            client_cert: Some(Material::Pem("CRT".into())),
            client_key: Some(Material::Pem("KEY".into())),
            ..files()
        }
    }

    fn props(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sasl(mechanism: &str) -> serde_json::Value {
        serde_json::json!({"mechanism": mechanism, "secretRef": {"name": "user"}})
    }

    fn oidc() -> serde_json::Value {
        serde_json::json!({"mechanism": "OAUTHBEARER", "oidc": {
            "tokenEndpointUrl": "https://idp/token", "clientSecretRef": {"name": "oidc"},
            "scope": "kafka read", "extensions": {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"}
        }})
    }

    /// Every combination of SASL mechanism (none, each username/password one, OAUTHBEARER) and TLS (none,
    /// system trust, own CA, own CA + client certificate), with material as files and as PEM.
    #[test]
    fn protocol_matrix() {
        let none = Credentials::default();
        assert_eq!(properties(None, &files()), props(&[("security.protocol", "PLAINTEXT")]));
        assert_eq!(properties(Some(&Auth::default()), &none), props(&[("security.protocol", "PLAINTEXT")]));

        let tls_variants: Vec<(&str, serde_json::Value)> = vec![
            ("none", serde_json::Value::Null),
            ("system", serde_json::json!({})),
            ("ca", serde_json::json!({"caSecretRef": {"name": "ca"}})),
            ("mtls", serde_json::json!({"caSecretRef": {"name": "ca"}, "clientCertSecretRef": {"name": "c"}})),
        ];
        let sasl_variants: Vec<(&str, serde_json::Value)> = vec![
            ("none", serde_json::Value::Null),
            ("PLAIN", sasl("PLAIN")),
            ("SCRAM-SHA-256", sasl("SCRAM-SHA-256")),
            ("SCRAM-SHA-512", sasl("SCRAM-SHA-512")),
            ("OAUTHBEARER", oidc()),
        ];
        for (sasl_name, sasl_json) in &sasl_variants {
            for (tls_name, tls_json) in &tls_variants {
                for (material, creds) in [("file", files()), ("pem", pems())] {
                    let mut a = serde_json::Map::new();
                    if !sasl_json.is_null() {
                        a.insert("sasl".into(), sasl_json.clone());
                    }
                    if !tls_json.is_null() {
                        a.insert("tls".into(), tls_json.clone());
                    }
                    let a = auth(serde_json::Value::Object(a));
                    // Only the material the auth references reaches the client.
                    let mut creds = creds.clone();
                    if *tls_name == "system" {
                        creds.ca = None;
                    }
                    if *tls_name != "mtls" {
                        creds.client_cert = None;
                        creds.client_key = None;
                    }
                    let mut want: Vec<(&str, String)> = Vec::new();
                    let protocol = match (*sasl_name != "none", *tls_name != "none") {
                        (true, true) => "SASL_SSL",
                        (true, false) => "SASL_PLAINTEXT",
                        (false, true) => "SSL",
                        (false, false) => "PLAINTEXT",
                    };
                    want.push(("security.protocol", protocol.into()));
                    match *sasl_name {
                        "none" => {}
                        "OAUTHBEARER" => {
                            want.push(("sasl.mechanism", "OAUTHBEARER".into()));
                            want.push(("sasl.oauthbearer.method", "oidc".into()));
                            want.push(("sasl.oauthbearer.token.endpoint.url", "https://idp/token".into()));
                            want.push(("sasl.oauthbearer.client.id", "kpipe".into()));
                            want.push(("sasl.oauthbearer.client.secret", "cs".into()));
                            want.push(("sasl.oauthbearer.scope", "kafka read".into()));
                            want.push((
                                "sasl.oauthbearer.extensions",
                                "identityPoolId=pool-2,logicalCluster=lkc-1".into(),
                            ));
                        }
                        mechanism => {
                            want.push(("sasl.mechanism", mechanism.into()));
                            want.push(("sasl.username", "alice".into()));
                            want.push(("sasl.password", "pw".into()));
                        }
                    }
                    let (loc, pem) = (material == "file", material == "pem");
                    if matches!(*tls_name, "ca" | "mtls") {
                        if loc {
                            want.push(("ssl.ca.location", "/ca/ca.crt".into()));
                        }
                        if pem {
                            want.push(("ssl.ca.pem", "CA".into()));
                        }
                    }
                    if *tls_name == "mtls" {
                        if loc {
                            want.push(("ssl.certificate.location", "/c/tls.crt".into()));
                            want.push(("ssl.key.location", "/c/tls.key".into()));
                        } else {
                            want.push(("ssl.certificate.pem", "CRT".into()));
                            want.push(("ssl.key.pem", "KEY".into()));
                        }
                    }
                    let want: Vec<(String, String)> = want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    assert_eq!(properties(Some(&a), &creds), want, "sasl {sasl_name}, tls {tls_name}, {material}");
                }
            }
        }
    }

    #[test]
    fn missing_values_leave_properties_out_and_tls_material_needs_tls() {
        let a = auth(serde_json::json!({"sasl": sasl("SCRAM-SHA-512")}));
        let got = properties(Some(&a), &Credentials { password: Some("pw".into()), ..Default::default() });
        assert_eq!(
            got,
            props(&[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.password", "pw")
            ])
        );
        // A client certificate without its key (or material without `tls`) configures nothing.
        let got = properties(Some(&a), &Credentials { ca: Some(Material::Pem("CA".into())), ..Default::default() });
        assert!(got.iter().all(|(k, _)| !k.starts_with("ssl.")), "{got:?}");
        let t = auth(serde_json::json!({"tls": {}}));
        let got =
            properties(Some(&t), &Credentials { client_cert: Some(Material::Pem("C".into())), ..Default::default() });
        assert_eq!(got, props(&[("security.protocol", "SSL")]));
    }

    #[test]
    fn debug_never_shows_secret_values() {
        let text = format!("{:?}", pems());
        for secret in ["alice", "pw", "cs", "CA", "CRT", "KEY"] {
            assert!(!text.contains(&format!("\"{secret}\"")), "{secret} in {text}");
        }
        assert!(!format!("{:?}", Material::Pem("-----BEGIN".into())).contains("BEGIN"));
    }
}
