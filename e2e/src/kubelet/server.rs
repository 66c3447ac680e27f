//! The kubelet's HTTPS endpoint (port 10250): serves `/containerLogs/{ns}/{pod}/{container}` from the pod log files so
//! `kubectl logs [-f] [--tail N]` works through the kube-apiserver, plus `/healthz`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tracing::{debug, warn};

use super::KubeletError;

/// A TLS listener for `axum::serve` (handshakes run inline with a timeout; fine for a test bed).
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "kubelet server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                Err(_) => debug!("TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig, KubeletError> {
    let bad = |path: &Path, e: String| KubeletError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(cert, e.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    follow: Option<bool>,
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
}

/// Bytes of the last `n` lines of `data`.
fn tail_offset(data: &[u8], n: usize) -> usize {
    if n == 0 {
        return data.len();
    }
    let mut seen = 0;
    let end = if data.last() == Some(&b'\n') { data.len() - 1 } else { data.len() };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

async fn container_logs(
    State(dir): State<Arc<PathBuf>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let unsafe_part = |s: &str| s.contains('/') || s.contains("..");
    if unsafe_part(&ns) || unsafe_part(&pod) || unsafe_part(&container) {
        return (StatusCode::BAD_REQUEST, "bad path").into_response();
    }
    let path = dir.join(format!("{ns}_{pod}_{container}.log"));
    let data = match tokio::fs::read(&path).await {
        Ok(d) => d,
        Err(_) => return (StatusCode::NOT_FOUND, format!("no logs for {ns}/{pod}/{container}")).into_response(),
    };
    let start = q.tail_lines.map(|n| tail_offset(&data, n)).unwrap_or(0);
    let mut first = data[start..].to_vec();
    if let Some(limit) = q.limit_bytes {
        first.truncate(limit);
    }
    if !q.follow.unwrap_or(false) {
        return first.into_response();
    }
    // follow: send what is there, then poll the file for appended bytes until the client goes away.
    let offset = u64::try_from(data.len()).unwrap_or(0);
    let stream = futures::stream::unfold((Some(first), path, offset), |(first, path, offset)| async move {
        if let Some(f) = first {
            return Some((Ok::<_, std::io::Error>(Bytes::from(f)), (None, path, offset)));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(mut file) = tokio::fs::File::open(&path).await else { return None };
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            if len > offset {
                let mut buf = Vec::new();
                if file.seek(std::io::SeekFrom::Start(offset)).await.is_err()
                    || file.read_to_end(&mut buf).await.is_err()
                {
                    return None;
                }
                let next = offset + u64::try_from(buf.len()).unwrap_or(0);
                return Some((Ok(Bytes::from(buf)), (None, path, next)));
            }
        }
    });
    Body::from_stream(stream).into_response()
}

/// Serves the kubelet endpoint on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, cert: &Path, key: &Path, log_dir: PathBuf) -> Result<(), KubeletError> {
    let config = tls_config(cert, key)?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| KubeletError::Io { path: PathBuf::from(addr.to_string()), source })?;
    let listener = TlsListener { tcp, acceptor: TlsAcceptor::from(Arc::new(config)) };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .with_state(Arc::new(log_dir));
    axum::serve(listener, app)
        .await
        .map_err(|source| KubeletError::Io { path: PathBuf::from(addr.to_string()), source })
}

#[cfg(test)]
mod tests {
    use super::tail_offset;

    #[test]
    fn tails_lines() {
        let d = b"a\nb\nc\n";
        assert_eq!(&d[tail_offset(d, 1)..], b"c\n");
        assert_eq!(&d[tail_offset(d, 2)..], b"b\nc\n");
        assert_eq!(&d[tail_offset(d, 9)..], b"a\nb\nc\n");
        assert_eq!(&d[tail_offset(d, 0)..], b"");
        assert_eq!(&b"x\ny"[tail_offset(b"x\ny", 1)..], b"y");
    }
}
