//! `kpipe-kubelet`: the test bed's process kubelet (runs Pods as local processes). Started by e2e/testbed/up.sh.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kpipe_e2e::kubelet::{self, KubeletConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, Parser)]
#[command(about = "kpipe process kubelet: registers a Node and runs bound Pods as local processes")]
struct Args {
    /// Admin kubeconfig used by the kubelet itself.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long, default_value = "kpipe-node")]
    node_name: String,
    /// Test-bed run folder (pod folders and logs go to <run-dir>/pods).
    #[arg(long)]
    run_dir: PathBuf,
    #[arg(long, default_value = "kpipe0")]
    bridge: String,
    #[arg(long, default_value = "10.244.0.1")]
    bridge_ip: Ipv4Addr,
    #[arg(long, default_value_t = 24)]
    prefix_len: u8,
    /// API server URL written into pod kubeconfigs.
    #[arg(long)]
    pod_apiserver: String,
    /// API server CA file written into pod kubeconfigs.
    #[arg(long)]
    ca_file: PathBuf,
    /// Image map (see e2e/testbed/images.conf).
    #[arg(long)]
    images: PathBuf,
    #[arg(long)]
    repo_root: PathBuf,
    #[arg(long)]
    target_dir: PathBuf,
    #[arg(long, default_value_t = 1000)]
    backoff_initial_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
    /// Serving certificate of the kubelet endpoint (enables `kubectl logs`).
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 10250)]
    port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let kc = Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(config)?;
    let cfg = KubeletConfig {
        node_name: args.node_name,
        run_dir: args.run_dir,
        bridge: args.bridge,
        bridge_ip: args.bridge_ip,
        prefix_len: args.prefix_len,
        pod_apiserver: args.pod_apiserver,
        ca_file: args.ca_file,
        images: args.images,
        repo_root: args.repo_root,
        target_dir: args.target_dir,
        backoff_initial: Duration::from_millis(args.backoff_initial_ms),
        backoff_max: Duration::from_millis(args.backoff_max_ms),
        server: match (args.tls_cert_file, args.tls_key_file) {
            (Some(cert), Some(key)) => Some(kubelet::ServerTls { cert, key, port: args.port }),
            _ => None,
        },
    };
    kubelet::run(client, cfg).await?;
    Ok(())
}
