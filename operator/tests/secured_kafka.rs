#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The operator's Kafka clients on secured listeners of a real broker: the lag probe and the offset keeper's
//! writer (the committed-offsets client of secured clusters) authenticate with SCRAM-SHA-512 over TLS, with client
//! certificates and with OAUTHBEARER tokens of the bed's OIDC issuer (settings from
//! `kpipe_api::kafka_client::properties`, as the workers use); a wrong password, an untrusted CA and an expired
//! client certificate are each named.
//!
//! Needs the bed's secured listeners (env file keys `KAFKA_SCRAM_BOOTSTRAP`, `KAFKA_MTLS_BOOTSTRAP`,
//! `KAFKA_OAUTH_BOOTSTRAP`, `KPIPE_OIDC_TOKEN_URL`, `KAFKA_SECURITY_DIR`; the same process env vars win, e.g. for a
//! broker from `e2e/testbed/kafka-security.sh run`).
//! Kafka only (no apiserver objects): `cargo test -p kpipe-operator --test secured_kafka`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpipe_api::kafka_client::{self, Credentials, Material};
use kpipe_api::v1alpha1::Auth;
use kpipe_e2e::testbed::TestBed;
use kpipe_operator::group_offsets::Commit;
use kpipe_operator::probe::{Cluster, LagProbe};
use kpipe_operator::secured_offsets::OffsetClient;
use kpipe_test_support::unique_name as unique;

struct Listeners {
    bed: TestBed,
    dir: PathBuf,
    scram: String,
    mtls: String,
    oauth: String,
    token_url: String,
}

async fn listeners() -> Listeners {
    let bed = TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .or_else(|| bed.var(k).map(str::to_string))
            .unwrap_or_else(|| panic!("{k} not set: the bed predates its secured listeners"))
    };
    Listeners {
        dir: PathBuf::from(var("KAFKA_SECURITY_DIR")),
        scram: var("KAFKA_SCRAM_BOOTSTRAP"),
        mtls: var("KAFKA_MTLS_BOOTSTRAP"),
        oauth: var("KAFKA_OAUTH_BOOTSTRAP"),
        token_url: var("KPIPE_OIDC_TOKEN_URL"),
        bed,
    }
}

impl Listeners {
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }

    fn scram(&self, password: Option<&str>, ca: &str) -> Cluster {
        let auth: Auth = serde_json::from_value(serde_json::json!({
            "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "s"}}, "tls": {"caSecretRef": {"name": "c"}}
        }))
        .unwrap();
        let credentials = Credentials {
            username: Some(self.file("scram-user").trim().to_string()),
            password: Some(
                password.map(str::to_string).unwrap_or_else(|| self.file("scram-password").trim().to_string()),
            ),
            ca: Some(Material::Pem(self.file(ca))),
            ..Default::default()
        };
        Cluster { bootstrap_servers: vec![self.scram.clone()], auth: Some(auth), credentials }
    }

    fn mtls(&self, client: &str) -> Cluster {
        let auth: Auth = serde_json::from_value(serde_json::json!({
            "tls": {"caSecretRef": {"name": "c"}, "clientCertSecretRef": {"name": "k"}}
        }))
        .unwrap();
        let credentials = Credentials {
            ca: Some(Material::Pem(self.file("ca.crt"))),
            client_cert: Some(Material::Pem(self.file(&format!("{client}.crt")))),
            client_key: Some(Material::Pem(self.file(&format!("{client}.key")))),
            ..Default::default()
        };
        Cluster { bootstrap_servers: vec![self.mtls.clone()], auth: Some(auth), credentials }
    }

    fn oidc(&self) -> Cluster {
        let auth: Auth = serde_json::from_value(serde_json::json!({
            "sasl": {"mechanism": "OAUTHBEARER", "oidc": {"tokenEndpointUrl": self.token_url,
                                                          "clientSecretRef": {"name": "o"}}},
            "tls": {"caSecretRef": {"name": "c"}}
        }))
        .unwrap();
        let credentials = Credentials {
            client_id: Some(self.file("oidc-client-id").trim().to_string()),
            client_secret: Some(self.file("oidc-client-secret").trim().to_string()),
            ca: Some(Material::Pem(self.file("ca.crt"))),
            ..Default::default()
        };
        Cluster { bootstrap_servers: vec![self.oauth.clone()], auth: Some(auth), credentials }
    }

    /// The bed's Kafka helpers through `cluster`'s listener and security settings.
    fn kafka(&self, cluster: &Cluster) -> TestBed {
        self.bed.kafka_via(
            &cluster.bootstrap_servers[0],
            kafka_client::properties(cluster.auth.as_ref(), &cluster.credentials),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_and_offset_keeper_work_through_scram_mtls_and_oauthbearer() {
    let l = listeners().await;
    for (name, cluster) in
        [("SCRAM-SHA-512", l.scram(None, "ca.crt")), ("mTLS", l.mtls("client")), ("OAUTHBEARER/OIDC", l.oidc())]
    {
        let kafka = l.kafka(&cluster);
        let topic = unique("secured-probe");
        kafka.create_topic(&topic, 2).await.unwrap();
        kafka.produce(&topic, 20).await.unwrap();
        let group = unique("secured-group");

        // The keeper's writer commits as a client outside the (empty) group, metadata unchanged.
        let keeper = OffsetClient::for_cluster(&cluster, Duration::from_secs(10));
        assert!(matches!(keeper, OffsetClient::Secured(_)));
        let commits = vec![
            ((topic.clone(), 0), Commit { offset: 3, metadata: "kpipe-test".into() }),
            ((topic.clone(), 1), Commit { offset: 1, metadata: String::new() }),
        ];
        tokio::task::block_in_place(|| keeper.commit_empty(&group, &commits)).unwrap();
        let parts = vec![(topic.clone(), 0), (topic.clone(), 1)];
        let read = tokio::task::block_in_place(|| keeper.committed(&group, &parts)).unwrap();
        assert_eq!(read.get(&(topic.clone(), 0)).cloned().flatten(), Some(commits[0].1.clone()));
        assert_eq!(read.get(&(topic.clone(), 1)).cloned().flatten().map(|c| c.offset), Some(1));
        let retention = tokio::task::block_in_place(|| keeper.offsets_retention(&group)).unwrap();
        assert_eq!(retention, Duration::from_secs(7 * 24 * 3600), "the broker's default offsets.retention.minutes");

        // The lag probe sees the same commits through the same settings.
        let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
        let offs = probe.offsets(cluster.clone(), vec![topic.clone()], group.clone()).await.unwrap();
        let committed: Vec<Option<i64>> = offs.iter().map(|o| o.committed).collect();
        assert_eq!(committed, vec![Some(3), Some(1)], "{offs:?}");
        assert_eq!(offs.iter().map(|o| o.log_end).sum::<i64>(), 20);
        println!("{name}: keeper commit/read/retention and probe offsets OK");
    }
}

/// Each failure is named within one probe (the probe timeout is 5 s) and a fixed credential works at once.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_untrusted_ca_and_expired_certificate_are_named() {
    let l = listeners().await;
    let good = l.scram(None, "ca.crt");
    let topic = unique("secured-fail");
    l.kafka(&good).create_topic(&topic, 1).await.unwrap();
    let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
    for (what, cluster, reason) in [
        ("wrong password", l.scram(Some("not-the-password"), "ca.crt"), "KafkaAuthenticationFailed"),
        ("untrusted CA", l.scram(None, "other-ca.crt"), "KafkaCertificateVerifyFailed"),
    ] {
        let started = Instant::now();
        let err = probe.offsets(cluster, vec![topic.clone()], unique("g")).await.unwrap_err();
        println!("{what}: {} after {:?}: {err}", err.reason(), started.elapsed());
        assert_eq!(err.reason(), reason, "{what}: {err}");
        assert!(!err.to_string().contains("not-the-password"), "the error text carries no credential");
    }
    // An expired *client* certificate: the broker refuses it with a `certificate_unknown` alert, named by the
    // certificate's own validity (an expired *broker* certificate is named by the client's own verification).
    let started = Instant::now();
    let err = probe.offsets(l.mtls("expired-client"), vec![topic.clone()], unique("g")).await.unwrap_err();
    println!("expired client certificate: {} after {:?}: {err}", err.reason(), started.elapsed());
    assert_eq!(err.reason(), "KafkaCertificateExpired", "{err}");
    // The right credentials get a new client (keyed by credentials) and work right away.
    let offs = probe.offsets(good, vec![topic], unique("g")).await.unwrap();
    assert_eq!(offs.len(), 1);
}
