//! `kpipe-test-oidc`: the test bed's OpenID Connect issuer (see `kpipe_e2e::oidc`): a client-credentials token
//! endpoint (`POST /token`) and the JWKS (`GET /jwks`) the broker's OAUTHBEARER listener validates tokens with.
//!
//! Started by `e2e/testbed/up.sh` (and `kafka-security.sh run`); tests start their own copy (same key, same client)
//! when they need to stop and restart a token endpoint. The client secret and the key are read from files, never
//! taken on the command line; tokens are never logged. SIGTERM/SIGINT stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;
use kpipe_e2e::oidc::{Client, Issuer, now_secs};

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: SocketAddr,
    /// RSA signing key, PKCS#8 PEM.
    #[arg(long)]
    key: PathBuf,
    /// The registered client's id (the tokens' `sub`).
    #[arg(long)]
    client_id: String,
    /// File holding the registered client's secret (surrounding whitespace ignored).
    #[arg(long)]
    client_secret_file: PathBuf,
    /// `iss` of the tokens; default `http://<listen>`.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` of the tokens.
    #[arg(long, default_value = "kafka")]
    audience: String,
    /// `scope` of a token whose request names none.
    #[arg(long, default_value = "kafka")]
    default_scope: String,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    lifetime_secs: u64,
}

struct App {
    issuer: Issuer,
    clients: Vec<Client>,
    base: String,
    issued: AtomicU64,
    refused: AtomicU64,
}

async fn token(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> impl IntoResponse {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let r = app.issuer.token_response(&app.clients, authorization, &body, now_secs());
    if r.status == 200 {
        let n = app.issued.fetch_add(1, Ordering::Relaxed) + 1;
        println!("token issued (#{n}, scope {})", r.body["scope"].as_str().unwrap_or(""));
    } else {
        let n = app.refused.fetch_add(1, Ordering::Relaxed) + 1;
        println!("token refused (#{n}): {} {}", r.status, r.body["error"].as_str().unwrap_or(""));
    }
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(r.body))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key = std::fs::read_to_string(&args.key).with_context(|| format!("reading {}", args.key.display()))?;
    let secret = std::fs::read_to_string(&args.client_secret_file)
        .with_context(|| format!("reading {}", args.client_secret_file.display()))?;
    let base = format!("http://{}", args.listen);
    let issuer = Issuer::new(
        args.issuer.clone().unwrap_or_else(|| base.clone()),
        args.audience.clone(),
        args.default_scope.clone(),
        args.lifetime_secs,
        &key,
    )?;
    let app = Arc::new(App {
        clients: vec![Client { id: args.client_id.clone(), secret: secret.trim().to_string() }],
        issuer,
        base,
        issued: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/token", post(token))
        .route("/jwks", get(|State(app): State<Arc<App>>| async move { axum::Json(app.issuer.jwks()) }))
        .route(
            "/.well-known/openid-configuration",
            get(|State(app): State<Arc<App>>| async move { axum::Json(app.issuer.discovery(&app.base)) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app.clone());
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    println!("OIDC issuer {} (kid {}) listening on {}", app.issuer.issuer, app.issuer.kid(), args.listen);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
