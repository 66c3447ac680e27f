//! Kafka security on the local test bed, as users run it (`minReplicas: 0`, a dead-letter topic): pipelines that
//! reach the broker only through its secured listeners — SASL_SSL with SCRAM-SHA-512, SSL with client certificates
//! (mutual TLS), and SASL_SSL with OAUTHBEARER tokens from the bed's OIDC issuer — scale from zero, deliver,
//! dead-letter and scale back to zero, while the PLAINTEXT listener refuses their topics and groups (ACLs); a
//! password rotated mid-stream loses nothing; a wrong password, an untrusted CA, an expired client certificate and
//! a token endpoint that is down are named in status and recover once fixed; no pod log and no Event of these runs
//! contains a secret value (passwords, private keys, the OIDC client secret, tokens).
//!
//! The listeners and their material come from the bed (e2e/testbed/kafka-security.sh via up.sh; env file keys
//! `KAFKA_SCRAM_BOOTSTRAP`, `KAFKA_MTLS_BOOTSTRAP`, `KAFKA_OAUTH_BOOTSTRAP`, `KAFKA_SECURITY_DIR`,
//! `KPIPE_OIDC_ISSUER`, `KPIPE_OIDC_TOKEN_URL`, `KAFKA_SECURED_PREFIX`, and `KAFKA_BOOTSTRAP` for the PLAINTEXT
//! listener). The same variables in the process environment take precedence (a private secured broker started with
//! `kafka-security.sh run`).
//!
//! Run: `cargo test -p kpipe-e2e --test security -- --test-threads=1 --nocapture` (needs the bed and release
//! builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kpipe_api::kafka_client::{self, Credentials, Material};
use kpipe_api::v1alpha1::Auth;
use kpipe_api::v1alpha1::condition::DEGRADED;
use kpipe_e2e::scenario::{
    self, Install, Sink, apply_pipeline, condition, events_for, id_records, pipeline_manifest, pipeline_status,
    unique_topic, wait_delivered, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TempNamespace, TestBed};
use kube::api::{Api, Patch, PatchParams};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use serde_json::json;

/// The bed's secured listeners, the material they trust and its OIDC issuer.
struct Secured {
    bed: TestBed,
    dir: PathBuf,
    /// The PLAINTEXT listener (which must refuse the secured pipelines' topics and groups).
    plain: String,
    scram: String,
    mtls: String,
    oauth: String,
    /// Base URL of the bed's OIDC issuer (the `iss` the broker expects).
    issuer: String,
    token_url: String,
    /// Topics and groups named with this are closed to unauthenticated clients (the bed's ACLs).
    prefix: String,
}

impl Secured {
    async fn connect() -> Self {
        let bed = TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"));
        let var = |k: &str| {
            std::env::var(k).ok().or_else(|| bed.var(k).map(str::to_string)).unwrap_or_else(|| {
                panic!("{k} is not set: the bed predates its secured listeners (run e2e/testbed/up.sh on a fresh bed)")
            })
        };
        Self {
            dir: PathBuf::from(var("KAFKA_SECURITY_DIR")),
            plain: var("KAFKA_BOOTSTRAP"),
            scram: var("KAFKA_SCRAM_BOOTSTRAP"),
            mtls: var("KAFKA_MTLS_BOOTSTRAP"),
            oauth: var("KAFKA_OAUTH_BOOTSTRAP"),
            issuer: var("KPIPE_OIDC_ISSUER"),
            token_url: var("KPIPE_OIDC_TOKEN_URL"),
            prefix: var("KAFKA_SECURED_PREFIX"),
            bed,
        }
    }

    /// A topic name under the secured prefix, unique to this run.
    fn topic(&self, what: &str) -> String {
        unique_topic(&format!("{}{what}", self.prefix))
    }

    fn oidc_client(&self) -> (String, String) {
        (self.file("oidc-client-id").trim().to_string(), self.file("oidc-client-secret").trim().to_string())
    }

    /// Secrets `kafka-oidc` (keys `clientId`, `clientSecret`: the bed's OIDC client) and `kafka-ca` (`ca.crt`) in
    /// `ns`; returns the client secret.
    async fn put_oidc_secrets(&self, ns: &str) -> String {
        let (client_id, client_secret) = self.oidc_client();
        put_secret(&self.bed, ns, "kafka-oidc", json!({"clientId": client_id, "clientSecret": client_secret})).await;
        put_secret(&self.bed, ns, "kafka-ca", json!({"ca.crt": self.file("ca.crt")})).await;
        client_secret
    }

    /// The bed's Kafka helpers going through the OAUTHBEARER listener with tokens of the bed's issuer.
    fn oidc_admin(&self) -> TestBed {
        let auth: Auth = serde_json::from_value(json!({
            "sasl": {"mechanism": "OAUTHBEARER", "oidc": {"tokenEndpointUrl": self.token_url,
                                                          "clientSecretRef": {"name": "x"}}},
            "tls": {"caSecretRef": {"name": "x"}}
        }))
        .unwrap();
        let (client_id, client_secret) = self.oidc_client();
        let creds = Credentials {
            client_id: Some(client_id),
            client_secret: Some(client_secret),
            ca: Some(Material::Pem(self.file("ca.crt"))),
            ..Default::default()
        };
        self.bed.kafka_via(&self.oauth, kafka_client::properties(Some(&auth), &creds))
    }

    /// A token of the bed's issuer, fetched as librdkafka does (client-credentials grant, HTTP Basic).
    async fn fetch_token(&self) -> String {
        let (id, secret) = self.oidc_client();
        let r = reqwest::Client::new()
            .post(&self.token_url)
            .basic_auth(id, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=kafka")
            .send()
            .await
            .expect("token request");
        assert!(r.status().is_success(), "token endpoint: {}", r.status());
        let body: serde_json::Value = r.json().await.expect("token response");
        body["access_token"].as_str().expect("access_token").to_string()
    }

    /// Asserts that an unauthenticated client on the PLAINTEXT listener is refused `topics` (metadata and produce)
    /// and `group` (a consumer of it); returns the refusals as text.
    async fn assert_plaintext_refused(&self, topics: &[&str], group: &str) -> Vec<String> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.plain).set("message.timeout.ms", "10000");
        let mut seen = Vec::new();
        for topic in topics {
            let (t, c) = (topic.to_string(), config.clone());
            let md_err = tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = c.create().expect("consumer");
                let md = consumer.fetch_metadata(Some(&t), Duration::from_secs(10)).expect("metadata");
                md.topics().iter().find(|m| m.name() == t).and_then(|m| m.error())
            })
            .await
            .unwrap();
            assert_eq!(
                md_err,
                Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
                "PLAINTEXT metadata of {topic}"
            );
            let producer: FutureProducer = config.create().expect("producer");
            let sent = producer
                .send(FutureRecord::to(topic).key("plaintext").payload("must not land"), Duration::from_secs(10))
                .await;
            match sent {
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed), _)) => {}
                other => panic!("PLAINTEXT produce to {topic}: {:?}", other.map_err(|(e, _)| e)),
            }
            seen.push(format!("{topic}: TOPIC_AUTHORIZATION_FAILED (metadata, produce)"));
        }
        // A consumer of the group: librdkafka reports the group's refusal (FindCoordinator/JoinGroup answered
        // GROUP_AUTHORIZATION_FAILED) as a consumer error or through its error callback.
        let (g, mut c, t) = (group.to_string(), config.clone(), topics[0].to_string());
        let codes = tokio::task::spawn_blocking(move || {
            let context = ErrorCodes::default();
            let consumer: BaseConsumer<ErrorCodes> =
                c.set("group.id", &g).create_with_context(context.clone()).expect("consumer");
            consumer.subscribe(&[&t]).expect("subscribe");
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until && !context.seen(RDKafkaErrorCode::GroupAuthorizationFailed) {
                if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                    context.push(e.rdkafka_error_code());
                }
            }
            context.codes()
        })
        .await
        .unwrap();
        assert!(
            codes.contains(&RDKafkaErrorCode::GroupAuthorizationFailed),
            "PLAINTEXT consumer of group {group}: no GROUP_AUTHORIZATION_FAILED, only {codes:?}"
        );
        seen.push(format!("group {group}: GROUP_AUTHORIZATION_FAILED (consumer)"));
        seen
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", self.dir.join(name).display()))
    }

    fn scram_user(&self) -> (String, String) {
        (self.file("scram-user").trim().to_string(), self.file("scram-password").trim().to_string())
    }

    /// The bed's Kafka helpers going through the SCRAM listener as the bed's SCRAM user (the security properties
    /// come from the function the operator and workers use).
    fn admin(&self) -> TestBed {
        let auth: Auth = serde_json::from_value(json!({
            "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "x"}}, "tls": {"caSecretRef": {"name": "x"}}
        }))
        .unwrap();
        let (username, password) = self.scram_user();
        let creds = Credentials {
            username: Some(username),
            password: Some(password),
            ca: Some(Material::Pem(self.file("ca.crt"))),
            ..Default::default()
        };
        self.bed.kafka_via(&self.scram, kafka_client::properties(Some(&auth), &creds))
    }

    /// Sets `user`'s SCRAM-SHA-512 password with Kafka's ConfigCommand through the SCRAM listener.
    fn set_scram_password(&self, user: &str, password: &str) {
        let (admin_user, admin_password) = self.scram_user();
        let config = std::env::temp_dir().join(format!("kpipe-e2e-scram-{}.properties", rand::random::<u32>()));
        std::fs::write(
            &config,
            format!(
                "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=org.apache.kafka.common.\
                 security.scram.ScramLoginModule required username=\"{admin_user}\" password=\"{admin_password}\";\n\
                 ssl.truststore.type=PEM\nssl.truststore.location={}\n",
                self.dir.join("ca.crt").display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(self.bed.kafka_tool("kafka-configs"))
            .args(["--bootstrap-server", &self.scram, "--command-config"])
            .arg(&config)
            .args(["--alter", "--entity-type", "users", "--entity-name", user, "--add-config"])
            .arg(format!("SCRAM-SHA-512=[iterations=4096,password={password}]"))
            .output()
            .expect("kafka-configs");
        let _ = std::fs::remove_file(&config);
        assert!(out.status.success(), "kafka-configs: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A librdkafka client context that keeps the codes of the errors it reports.
#[derive(Clone, Default)]
struct ErrorCodes(std::sync::Arc<std::sync::Mutex<Vec<RDKafkaErrorCode>>>);

impl ErrorCodes {
    fn push(&self, code: Option<RDKafkaErrorCode>) {
        self.0.lock().unwrap().extend(code);
    }
    fn seen(&self, code: RDKafkaErrorCode) -> bool {
        self.0.lock().unwrap().contains(&code)
    }
    fn codes(&self) -> Vec<RDKafkaErrorCode> {
        self.0.lock().unwrap().clone()
    }
}

impl rdkafka::ClientContext for ErrorCodes {
    fn error(&self, error: KafkaError, _reason: &str) {
        self.push(error.rdkafka_error_code());
    }
}

impl rdkafka::consumer::ConsumerContext for ErrorCodes {}

/// Creates or replaces a Secret with `data` in `ns`.
async fn put_secret(bed: &TestBed, ns: &str, name: &str, data: serde_json::Value) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": data,
    }))
    .unwrap();
    Api::<Secret>::namespaced(bed.client(), ns)
        .patch(name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&secret))
        .await
        .expect("secret");
}

/// `(key, value)` records.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn ids(prefix: &str, range: std::ops::Range<usize>) -> (Records, BTreeSet<String>) {
    let records = id_records(prefix, range, 20);
    let expected = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    (records, expected)
}

/// Asserts that no pod log of `ns` and no Event in it contains any of `secrets` (trimmed, non-empty).
async fn assert_no_secret_values(bed: &TestBed, ns: &str, secrets: &[String]) {
    let logs = bed.pod_logs(ns);
    let events = events_for_all(bed, ns).await;
    assert!(!logs.is_empty(), "no pod logs found for {ns} under {}", bed.pod_log_dir().display());
    for secret in secrets.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        assert!(!logs.contains(secret), "a secret value appears in a pod log of {ns}");
        assert!(!events.contains(secret), "a secret value appears in an Event of {ns}");
    }
    println!("secret values: none in {} bytes of pod logs and {} bytes of Events", logs.len(), events.len());
}

/// Every Event of `ns` (reason + note), as text.
async fn events_for_all(bed: &TestBed, ns: &str) -> String {
    use k8s_openapi::api::events::v1::Event;
    let list = Api::<Event>::namespaced(bed.client(), ns).list(&Default::default()).await.expect("events");
    list.items
        .iter()
        .map(|e| format!("{} {}\n", e.reason.as_deref().unwrap_or(""), e.note.as_deref().unwrap_or("")))
        .collect()
}

/// Scale from zero, deliver (1% poison records dead-lettered), scale back to zero, through `kafka`; then the
/// PLAINTEXT listener refuses the pipeline's topics and group.
async fn deliver_dead_letter_and_scale_to_zero(
    sec: &Secured,
    kafka: &TestBed,
    ns: &TempNamespace,
    sink: &Sink,
    auth: serde_json::Value,
) {
    let topic = sec.topic("dlq");
    let dlq = format!("{topic}-dlq");
    kafka.create_topic(&topic, 3).await.expect("topic");
    kafka.create_topic(&dlq, 1).await.expect("dlq");
    apply_pipeline(
        kafka,
        ns.name(),
        pipeline_manifest(
            "secured",
            kafka,
            &topic,
            sink,
            json!({"source": {"auth": auth, "groupId": topic}, "onFailure": "deadLetter", "deadLetter": {"topic": dlq},
                   "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "20ms"}}),
        ),
    )
    .await
    .expect("apply");
    // Idle: no pods.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(worker_replicas(kafka, ns.name(), "secured").await.unwrap(), 0, "pods before any record");
    let records: Records = (0..600)
        .map(|i| {
            let v = if i % 100 == 7 { format!("poison-{i:06}") } else { format!("good-{i:06}") };
            (format!("k{}", i % 20).into_bytes(), v.into_bytes())
        })
        .collect();
    let good: BTreeSet<String> =
        records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).filter(|v| v.starts_with("good-")).collect();
    let started = Instant::now();
    kafka.produce_records(&topic, records).await.expect("produce");
    let delivered = wait_delivered(sink, &good, Duration::from_secs(120)).await.unwrap_or_else(|e| {
        kafka.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let delivered_in = started.elapsed();
    let dead = wait_for("6 dead letters", Duration::from_secs(60), || async {
        let n: i64 = kafka.end_offsets(&dlq).await.ok()?.values().sum();
        (n >= 6).then_some(n)
    })
    .await
    .expect("dead letters");
    let zero = Instant::now();
    wait_for("scaled to zero", Duration::from_secs(120), || async {
        (worker_replicas(kafka, ns.name(), "secured").await.ok()? == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let s = pipeline_status(kafka, ns.name(), "secured").await.expect("status");
    println!(
        "{} good records delivered in {delivered_in:?} ({} duplicates), {dead} dead-lettered, scaled to zero {:?} later; \
         Degraded {:?}",
        good.len(),
        delivered.iter().filter(|v| v.starts_with("good-")).count() - good.len(),
        zero.elapsed(),
        condition(&s, DEGRADED)
    );
    assert_eq!(dead, 6, "exactly the poison records are dead-lettered");
    assert_eq!(condition(&s, DEGRADED).map(|c| c.0), Some("False".to_string()));
    let refused = sec.assert_plaintext_refused(&[&topic, &dlq], &topic).await;
    println!("PLAINTEXT listener: {refused:?}");
}

#[tokio::test]
async fn scram_pipeline_scales_from_zero_delivers_dead_letters_and_scales_to_zero() {
    let sec = Secured::connect().await;
    let kafka = sec.admin();
    let (ns, sink) =
        scenario::setup_with_sink(&sec.bed, "e2e-sec-scram", &Install::default(), &["--poison-prefix", "poison-"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let (user, password) = sec.scram_user();
    put_secret(&sec.bed, ns.name(), "kafka-user", json!({"username": user, "password": password})).await;
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    let auth = json!({"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}},
                      "tls": {"caSecretRef": {"name": "kafka-ca"}}});
    deliver_dead_letter_and_scale_to_zero(&sec, &kafka, &ns, &sink, auth).await;
    assert_no_secret_values(&sec.bed, ns.name(), &[password]).await;
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn mtls_pipeline_scales_from_zero_delivers_dead_letters_and_scales_to_zero() {
    let sec = Secured::connect().await;
    let kafka = sec.admin().kafka_via(&sec.mtls, {
        let auth: Auth = serde_json::from_value(
            json!({"tls": {"caSecretRef": {"name": "x"}, "clientCertSecretRef": {"name": "x"}}}),
        )
        .unwrap();
        let creds = Credentials {
            ca: Some(Material::Pem(sec.file("ca.crt"))),
            client_cert: Some(Material::Pem(sec.file("client.crt"))),
            client_key: Some(Material::Pem(sec.file("client.key"))),
            ..Default::default()
        };
        kafka_client::properties(Some(&auth), &creds)
    });
    let (ns, sink) =
        scenario::setup_with_sink(&sec.bed, "e2e-sec-mtls", &Install::default(), &["--poison-prefix", "poison-"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    put_secret(
        &sec.bed,
        ns.name(),
        "kafka-client",
        json!({"tls.crt": sec.file("client.crt"), "tls.key": sec.file("client.key")}),
    )
    .await;
    let auth = json!({"tls": {"caSecretRef": {"name": "kafka-ca"}, "clientCertSecretRef": {"name": "kafka-client"}}});
    deliver_dead_letter_and_scale_to_zero(&sec, &kafka, &ns, &sink, auth).await;
    // The key's base64 body lines are the secret part of the PEM.
    let key_lines: Vec<String> = sec
        .file("client.key")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 40)
        .map(str::to_string)
        .collect();
    assert_no_secret_values(&sec.bed, ns.name(), &key_lines).await;
    ns.delete().await.expect("delete");
}

/// Waits until `Degraded` is True with `reason`; returns how long that took.
async fn wait_degraded(bed: &TestBed, ns: &str, name: &str, reason: &str, within: Duration) -> Duration {
    let started = Instant::now();
    wait_for(&format!("Degraded={reason}"), within, || async {
        let s = pipeline_status(bed, ns, name).await.ok()?;
        (condition(&s, DEGRADED) == Some(("True".into(), reason.into()))).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns);
        panic!("{e}")
    });
    started.elapsed()
}

async fn wait_not_degraded(bed: &TestBed, ns: &str, name: &str) -> Duration {
    let started = Instant::now();
    wait_for("Degraded=False", Duration::from_secs(90), || async {
        let s = pipeline_status(bed, ns, name).await.ok()?;
        (condition(&s, DEGRADED).map(|c| c.0) == Some("False".into())).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    started.elapsed()
}

#[tokio::test]
async fn wrong_password_and_untrusted_ca_are_named_in_status_and_recover_when_the_secret_is_fixed() {
    let sec = Secured::connect().await;
    let kafka = sec.admin();
    let (ns, sink) = scenario::setup_with_sink(&sec.bed, "e2e-sec-fail", &Install::default(), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = sec.topic("fail");
    kafka.create_topic(&topic, 2).await.expect("topic");
    let (user, password) = sec.scram_user();
    let wrong = format!("wrong-{:08x}", rand::random::<u32>());
    put_secret(&sec.bed, ns.name(), "kafka-user", json!({"username": user, "password": wrong})).await;
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    let poll = Duration::from_secs(5);
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "sec",
            &kafka,
            &topic,
            &sink,
            json!({"source": {"auth": {"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}},
                                        "tls": {"caSecretRef": {"name": "kafka-ca"}}}, "groupId": topic},
                   "onFailure": "drop", "scaling": {"pollInterval": "5s"}}),
        ),
    )
    .await
    .expect("apply");
    // Two polls, plus one probe timeout for the first failing request.
    let within = poll * 2 + Duration::from_secs(12);
    let auth_failed = wait_degraded(&kafka, ns.name(), "sec", "KafkaAuthenticationFailed", within).await;
    put_secret(&sec.bed, ns.name(), "kafka-user", json!({"username": user, "password": password})).await;
    let auth_recovered = wait_not_degraded(&kafka, ns.name(), "sec").await;

    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("other-ca.crt")})).await;
    let ca_failed = wait_degraded(&kafka, ns.name(), "sec", "KafkaCertificateVerifyFailed", within).await;
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    let ca_recovered = wait_not_degraded(&kafka, ns.name(), "sec").await;

    // Delivery works after both repairs.
    let (records, expected) = ids("sec", 0..200);
    kafka.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let events = events_for(&kafka, ns.name(), "sec").await.expect("events");
    let warnings: BTreeSet<&str> = events.iter().filter(|e| e.0 == "Warning").map(|e| e.1.as_str()).collect();
    println!(
        "wrong password: KafkaAuthenticationFailed after {auth_failed:?}, recovered {auth_recovered:?} after the fix; \
         untrusted CA: KafkaCertificateVerifyFailed after {ca_failed:?}, recovered {ca_recovered:?} after the fix; \
         Warning Events {warnings:?}"
    );
    assert!(warnings.contains("KafkaAuthenticationFailed"), "no Warning Event KafkaAuthenticationFailed: {events:?}");
    assert!(
        warnings.contains("KafkaCertificateVerifyFailed"),
        "no Warning Event KafkaCertificateVerifyFailed: {events:?}"
    );
    assert_no_secret_values(&sec.bed, ns.name(), &[password, wrong]).await;
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_password_rotated_mid_stream_loses_nothing() {
    let sec = Secured::connect().await;
    let kafka = sec.admin();
    let (ns, sink) = scenario::setup_with_sink(&sec.bed, "e2e-sec-rotate", &Install::default(), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A user of this test's own, so the bed's user keeps its password.
    let user = format!("rotate-{:08x}", rand::random::<u32>());
    let (old, new) = (format!("old-{:016x}", rand::random::<u64>()), format!("new-{:016x}", rand::random::<u64>()));
    sec.set_scram_password(&user, &old);
    let topic = sec.topic("rotate");
    kafka.create_topic(&topic, 3).await.expect("topic");
    put_secret(&sec.bed, ns.name(), "kafka-user", json!({"username": user, "password": old})).await;
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "rotate",
            &kafka,
            &topic,
            &sink,
            json!({"source": {"auth": {"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}},
                                        "tls": {"caSecretRef": {"name": "kafka-ca"}}}, "groupId": topic},
                   "onFailure": "drop", "scaling": {"minReplicas": 0, "lagThreshold": 200}}),
        ),
    )
    .await
    .expect("apply");
    let mut expected = BTreeSet::new();
    let mut rotated_at = None;
    let mut before = BTreeSet::new();
    let started = Instant::now();
    for batch in 0..20 {
        let (records, batch_ids) = ids("rotate", batch * 200..(batch + 1) * 200);
        kafka.produce_records(&topic, records).await.expect("produce");
        expected.extend(batch_ids);
        if batch == 6 {
            before = scenario::worker_pods(&kafka, ns.name(), "rotate").await.into_iter().collect();
            // Rotate: the broker first, then the Secret (new connections fail in between, as in production).
            sec.set_scram_password(&user, &new);
            tokio::time::sleep(Duration::from_secs(2)).await;
            put_secret(&sec.bed, ns.name(), "kafka-user", json!({"username": user, "password": new})).await;
            rotated_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let delivered = wait_delivered(&sink, &expected, Duration::from_secs(180)).await.unwrap_or_else(|e| {
        sec.bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let s = pipeline_status(&kafka, ns.name(), "rotate").await.expect("status");
    let after: BTreeSet<String> = scenario::worker_pods(&kafka, ns.name(), "rotate").await.into_iter().collect();
    println!(
        "rotation at {rotated_at:?}: {} records, all delivered ({} duplicates) {:?} after the start; Degraded {:?}; \
         worker pods before the rotation {before:?}, after {after:?}",
        expected.len(),
        delivered.len() - expected.len(),
        started.elapsed(),
        condition(&s, DEGRADED)
    );
    assert!(!before.is_empty(), "no worker ran when the password was rotated: the rotation proved nothing");
    assert!(after.iter().any(|p| !before.contains(p)), "the rotated Secret did not roll the workers");
    wait_not_degraded(&kafka, ns.name(), "rotate").await;
    assert_no_secret_values(&sec.bed, ns.name(), &[old, new]).await;
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn oidc_pipeline_scales_from_zero_delivers_dead_letters_and_scales_to_zero() {
    let sec = Secured::connect().await;
    let kafka = sec.oidc_admin();
    let (ns, sink) =
        scenario::setup_with_sink(&sec.bed, "e2e-sec-oidc", &Install::default(), &["--poison-prefix", "poison-"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let client_secret = sec.put_oidc_secrets(ns.name()).await;
    let auth = json!({"sasl": {"mechanism": "OAUTHBEARER",
                               "oidc": {"tokenEndpointUrl": sec.token_url, "clientSecretRef": {"name": "kafka-oidc"},
                                        "scope": "kafka"}},
                      "tls": {"caSecretRef": {"name": "kafka-ca"}}});
    deliver_dead_letter_and_scale_to_zero(&sec, &kafka, &ns, &sink, auth).await;
    let token = sec.fetch_token().await;
    assert_no_secret_values(&sec.bed, ns.name(), &[client_secret, token.clone(), token_header(&token)]).await;
    ns.delete().await.expect("delete");
}

/// The JOSE header segment and its `.` (`eyJ…`): the same in every token of the bed's issuer (one key, one `kid`), so
/// finding it anywhere means a token leaked, whichever token it was.
fn token_header(token: &str) -> String {
    format!("{}.", token.split('.').next().unwrap_or_default())
}

/// A copy of the bed's OIDC issuer (same key, client and `iss`, so the broker accepts its tokens) on a port of its
/// own, which a test stops and starts: a token endpoint that goes down and comes back.
struct PrivateIssuer {
    args: Vec<String>,
    url: String,
    child: Option<tokio::process::Child>,
}

impl PrivateIssuer {
    fn new(sec: &Secured, lifetime: Duration) -> Self {
        let host = sec.issuer.trim_start_matches("http://").rsplit_once(':').map(|(h, _)| h.to_string()).unwrap();
        // A free port on the address pods reach.
        let port = std::net::TcpListener::bind((host.as_str(), 0)).unwrap().local_addr().unwrap().port();
        let args = vec![
            format!("--listen={host}:{port}"),
            format!("--key={}", sec.dir.join("oidc-key.pem").display()),
            format!("--client-id={}", sec.oidc_client().0),
            format!("--client-secret-file={}", sec.dir.join("oidc-client-secret").display()),
            format!("--issuer={}", sec.issuer),
            format!("--lifetime-secs={}", lifetime.as_secs()),
        ];
        Self { args, url: format!("http://{host}:{port}/token"), child: None }
    }

    async fn start(&mut self) {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kpipe-test-oidc"))
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("kpipe-test-oidc");
        self.child = Some(child);
        let health = self.url.replace("/token", "/healthz");
        wait_for("the private OIDC issuer", Duration::from_secs(10), || async {
            reqwest::get(&health).await.ok()?.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill issuer");
        }
    }
}

#[tokio::test]
async fn a_token_endpoint_that_is_down_is_named_in_status_and_recovers_when_it_is_back() {
    let sec = Secured::connect().await;
    let kafka = sec.oidc_admin();
    let (ns, sink) = scenario::setup_with_sink(&sec.bed, "e2e-sec-token", &Install::default(), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = sec.topic("token");
    kafka.create_topic(&topic, 2).await.expect("topic");
    // Tokens of 20 s: a client that cannot renew its token loses its connections when the token expires (the
    // OAUTHBEARER listener re-authenticates sessions, KIP-368).
    let lifetime = Duration::from_secs(20);
    let mut issuer = PrivateIssuer::new(&sec, lifetime);
    let client_secret = sec.put_oidc_secrets(ns.name()).await;
    let poll = Duration::from_secs(5);
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "oidc",
            &kafka,
            &topic,
            &sink,
            json!({"source": {"auth": {"sasl": {"mechanism": "OAUTHBEARER",
                                                "oidc": {"tokenEndpointUrl": issuer.url,
                                                         "clientSecretRef": {"name": "kafka-oidc"}}},
                                       "tls": {"caSecretRef": {"name": "kafka-ca"}}},
                              "groupId": topic},
                   "onFailure": "drop", "scaling": {"pollInterval": "5s"}}),
        ),
    )
    .await
    .expect("apply");
    // 1. Down from the start: no client gets a token. Two polls, plus one probe timeout for the first request.
    let within = poll * 2 + Duration::from_secs(12);
    let down_at_start = wait_degraded(&kafka, ns.name(), "oidc", "TokenEndpointUnreachable", within).await;
    // 2. Back: recovers by itself and delivers.
    issuer.start().await;
    let recovered = wait_not_degraded(&kafka, ns.name(), "oidc").await;
    let (records, mut expected) = ids("token", 0..200);
    kafka.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    // 3. Down while running: named once the tokens the clients hold expire (they work until then).
    issuer.stop().await;
    let down_running = wait_degraded(&kafka, ns.name(), "oidc", "TokenEndpointUnreachable", lifetime + within).await;
    // 4. Back again: recovers, and records produced meanwhile are delivered.
    let (records, more) = ids("token", 200..400);
    kafka.produce_records(&topic, records).await.expect("produce");
    expected.extend(more);
    issuer.start().await;
    let recovered_again = wait_not_degraded(&kafka, ns.name(), "oidc").await;
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| {
        sec.bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    issuer.stop().await;
    let events = events_for(&kafka, ns.name(), "oidc").await.expect("events");
    let warnings: BTreeSet<&str> = events.iter().filter(|e| e.0 == "Warning").map(|e| e.1.as_str()).collect();
    println!(
        "token endpoint down at the start: TokenEndpointUnreachable after {down_at_start:?}, recovered \
         {recovered:?} after it came back; down while running (tokens of {lifetime:?}): named after \
         {down_running:?}, recovered {recovered_again:?} after it came back; 400 records delivered; Warning Events \
         {warnings:?}"
    );
    assert!(warnings.contains("TokenEndpointUnreachable"), "no Warning Event TokenEndpointUnreachable: {events:?}");
    let token = sec.fetch_token().await;
    assert_no_secret_values(&sec.bed, ns.name(), &[client_secret, token_header(&token)]).await;
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn an_expired_client_certificate_is_named_in_status_and_recovers_when_renewed() {
    let sec = Secured::connect().await;
    let (ns, sink) = scenario::setup_with_sink(&sec.bed, "e2e-sec-expired", &Install::default(), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client =
        |name: &str| json!({"tls.crt": sec.file(&format!("{name}.crt")), "tls.key": sec.file(&format!("{name}.key"))});
    let kafka = sec.admin();
    let topic = sec.topic("expired");
    kafka.create_topic(&topic, 2).await.expect("topic");
    put_secret(&sec.bed, ns.name(), "kafka-ca", json!({"ca.crt": sec.file("ca.crt")})).await;
    put_secret(&sec.bed, ns.name(), "kafka-client", client("expired-client")).await;
    let mtls = kafka.kafka_via(&sec.mtls, Vec::new());
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "expired",
            &mtls,
            &topic,
            &sink,
            json!({"source": {"auth": {"tls": {"caSecretRef": {"name": "kafka-ca"},
                                               "clientCertSecretRef": {"name": "kafka-client"}}},
                              "groupId": topic},
                   "onFailure": "drop", "scaling": {"pollInterval": "5s"}}),
        ),
    )
    .await
    .expect("apply");
    let within = Duration::from_secs(5) * 2 + Duration::from_secs(12);
    let named = wait_degraded(&kafka, ns.name(), "expired", "KafkaCertificateExpired", within).await;
    // Renewed: the valid certificate of the same CA.
    put_secret(&sec.bed, ns.name(), "kafka-client", client("client")).await;
    let recovered = wait_not_degraded(&kafka, ns.name(), "expired").await;
    let (records, expected) = ids("expired", 0..200);
    kafka.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let events = events_for(&kafka, ns.name(), "expired").await.expect("events");
    let warnings: BTreeSet<&str> = events.iter().filter(|e| e.0 == "Warning").map(|e| e.1.as_str()).collect();
    println!(
        "expired client certificate: KafkaCertificateExpired after {named:?}, recovered {recovered:?} after the \
         renewal; 200 records delivered; Warning Events {warnings:?}"
    );
    assert!(warnings.contains("KafkaCertificateExpired"), "no Warning Event KafkaCertificateExpired: {events:?}");
    ns.delete().await.expect("delete");
}
