//! `kpipe-test-http`: a tiny program the e2e tests run as pods.
//!
//! * `serve` (default): HTTP on `0.0.0.0:$PORT` (default 8080) with `/healthz` (200) and `/` (pod name). On SIGTERM it
//!   appends `SIGTERM <pod> <pid>` to `$SIGTERM_FILE` (if set) and to stdout, then exits 0.
//! * `kube-get <path>`: GETs an API path with the pod's credentials (`KUBECONFIG` or in-cluster), prints
//!   `KUBE_STATUS=<http code>` and exits 0; useful to prove RBAC is enforced for pods.
//! * `http-get <url>`: prints `HTTP <code> <body>` once the URL answers 2xx (retries for 30 s).
//! * `tcp-connect <host:port>`: prints `TCP_OK <addr>` if a TCP connection succeeds (network reachability from pods).
//! * `show --file <path> --env <NAME>`: prints file contents and env values (volume / valueFrom checks).

use std::io::Write;

use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve /healthz until SIGTERM.
    Serve,
    /// GET a Kubernetes API path and print the HTTP status code.
    KubeGet {
        /// e.g. /api/v1/namespaces/default/secrets
        path: String,
    },
    /// GET `url` (retrying up to 30 s until a 2xx) and print `HTTP <code> <body>` (or `HTTP_FAIL <error>`).
    HttpGet { url: String },
    /// Open a TCP connection to `addr` (host:port) and print `TCP_OK <addr>` or `TCP_FAIL <addr> <error>`.
    TcpConnect { addr: String },
    /// Print `FILE <path> <content>` for a file and `ENV <name>=<value>` for env vars (for volume/env tests).
    Show {
        #[arg(long)]
        file: Vec<String>,
        #[arg(long)]
        env: Vec<String>,
    },
}

fn pod_name() -> String {
    std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "unknown".into())
}

async fn serve() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let name = pod_name();
    let app = Router::new().route("/healthz", get(|| async { "ok" })).route("/", get(move || async move { name }));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
            let line = format!("SIGTERM {} {}", pod_name(), std::process::id());
            println!("{line}");
            if let Ok(path) = std::env::var("SIGTERM_FILE") {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                match f {
                    Ok(mut f) => {
                        let _ = writeln!(f, "{line}");
                    }
                    Err(e) => eprintln!("cannot write {path}: {e}"),
                }
            }
        })
        .await?;
    Ok(())
}

async fn kube_get(path: &str) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let req = http::Request::get(path).body(Vec::new())?;
    let code = match client.request_text(req).await {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => return Err(e.into()),
    };
    println!("KUBE_STATUS={code}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve().await,
        Cmd::KubeGet { path } => kube_get(&path).await,
        Cmd::HttpGet { url } => {
            let client = reqwest::Client::builder().no_proxy().timeout(std::time::Duration::from_secs(5)).build()?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let code = r.status().as_u16();
                        println!("HTTP {code} {}", r.text().await.unwrap_or_default());
                        return Ok(());
                    }
                    other if std::time::Instant::now() >= deadline => {
                        match other {
                            Ok(r) => println!("HTTP {} {}", r.status().as_u16(), r.text().await.unwrap_or_default()),
                            Err(e) => println!("HTTP_FAIL {e}"),
                        }
                        return Ok(());
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
                }
            }
        }
        Cmd::TcpConnect { addr } => {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(_) => println!("TCP_OK {addr}"),
                Err(e) => println!("TCP_FAIL {addr} {e}"),
            }
            Ok(())
        }
        Cmd::Show { file, env } => {
            for f in file {
                match std::fs::read_to_string(&f) {
                    Ok(c) => println!("FILE {f} {}", c.trim()),
                    Err(e) => println!("FILE {f} ERROR {e}"),
                }
            }
            for e in env {
                println!("ENV {e}={}", std::env::var(&e).unwrap_or_else(|_| "<unset>".into()));
            }
            Ok(())
        }
    }
}
