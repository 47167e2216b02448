//! HTTPS serving of an axum router: a TCP accept loop, a rustls handshake per connection (bounded
//! by [`HANDSHAKE_TIMEOUT`]), then hyper-util's HTTP/1 + HTTP/2 server, like `axum::serve` but
//! behind TLS.
//!
//! A failed or slow handshake only drops that connection. The certificate comes from the server
//! configuration (see [`super::server_config`] and [`super::CertResolver`]), so a renewed one is
//! served to new connections without restarting the listener.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` over TLS (`config`) on `listener` until `shutdown` completes; then stops
/// accepting, lets in-flight requests finish (idle connections close at once) and returns.
pub async fn serve_https(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    // Connections hold a receiver; a send asks them to close, and `closed` tells when all have.
    let (close_tx, close_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(
            acceptor.clone(),
            stream,
            peer,
            app.clone(),
            close_rx.clone(),
        ));
    }
    drop(close_rx);
    drop(listener);
    close_tx.send_replace(());
    close_tx.closed().await;
    Ok(())
}

/// One connection: the TLS handshake (bounded), then HTTP until the peer is done or `close`
/// fires (then in-flight requests finish first).
async fn serve_connection(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    mut close: watch::Receiver<()>,
) {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    %peer,
                    timeout_secs = HANDSHAKE_TIMEOUT.as_secs(),
                    "TLS handshake timed out"
                );
                return;
            }
        },
        _ = close.changed() => return,
    };
    let builder = Builder::new(TokioExecutor::new());
    let service = TowerToHyperService::new(app);
    let mut connection = pin!(builder.serve_connection_with_upgrades(TokioIo::new(tls), service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = close.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTPS connection ended with an error");
    }
}

/// After a failed `accept`: per-connection errors are retried at once; others (e.g. out of file
/// descriptors) after a pause, so the loop does not spin.
async fn accept_failed(error: &io::Error) {
    let per_connection = matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    );
    if per_connection {
        tracing::debug!(%error, "failed to accept a connection");
    } else {
        tracing::warn!(%error, "failed to accept connections; retrying in a second");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use axum::routing::get;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::oneshot;

    use super::*;
    use crate::tls::{Authority, CertResolver, CertifiedKey, http_client_builder, server_config};

    const DAY: Duration = Duration::from_secs(86_400);

    struct Server {
        addr: SocketAddr,
        resolver: Arc<CertResolver>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    async fn start(server: &CertifiedKey) -> Server {
        let resolver = Arc::new(CertResolver::new(server).unwrap());
        let config = server_config(Arc::clone(&resolver)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/hello", get(|| async { "hello" }));
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_https(listener, config, app, shutdown));
        Server {
            addr,
            resolver,
            stop,
            task,
        }
    }

    /// GETs /hello at `host` (resolved to the server) with a fresh client (a new connection)
    /// pinned to `ca_pem`.
    async fn get_hello(ca_pem: &str, host: &str, addr: SocketAddr) -> Result<String, String> {
        let client = http_client_builder(ca_pem, Duration::from_secs(5))
            .unwrap()
            .resolve(host, addr)
            .build()
            .unwrap();
        let url = format!("https://{host}:{}/hello", addr.port());
        let response = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
        assert!(response.status().is_success());
        response.text().await.map_err(|e| format!("{e:?}"))
    }

    fn issue(ca: &Authority, name: &str, ips: &[IpAddr]) -> CertifiedKey {
        ca.issue_server(name, &[name.to_string()], ips, DAY)
            .unwrap()
    }

    #[tokio::test]
    async fn pinned_client_round_trip() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        let server = start(&issue(&ca, "db-0.example", &[localhost])).await;
        let addr = server.addr;

        let body = get_hello(ca.cert_pem(), "db-0.example", addr)
            .await
            .unwrap();
        assert_eq!(body, "hello");
        // The IP SAN works too.
        let body = get_hello(ca.cert_pem(), "127.0.0.1", addr).await.unwrap();
        assert_eq!(body, "hello");

        // Pinned to another CA (even of the same name): refused.
        let other = Authority::generate("test CA", DAY).unwrap();
        let error = get_hello(other.cert_pem(), "db-0.example", addr)
            .await
            .unwrap_err();
        // Same issuer name, so webpki tries its key: the signature does not verify.
        assert!(
            error.contains("InvalidCertificate(BadSignature)"),
            "{error}"
        );

        // A name the certificate does not carry: refused (verify-full).
        let error = get_hello(ca.cert_pem(), "db-1.example", addr)
            .await
            .unwrap_err();
        assert!(error.contains("NotValidForName"), "{error}");

        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn failed_handshakes_do_not_stop_the_server() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let server = start(&issue(&ca, "db-0.example", &[])).await;
        // Plain text instead of a ClientHello, and a connection that never says anything.
        let mut garbage = TcpStream::connect(server.addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _silent = TcpStream::connect(server.addr).await.unwrap();

        let body = get_hello(ca.cert_pem(), "db-0.example", server.addr).await;
        assert_eq!(body.unwrap(), "hello");
        // Shutting down does not wait for the silent connection's handshake timeout.
        server.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_renewed_certificate_reaches_new_connections() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let server = start(&issue(&ca, "db-0.example", &[])).await;
        let addr = server.addr;
        assert!(get_hello(ca.cert_pem(), "db-0.example", addr).await.is_ok());

        // Re-issued for another name (and key), by a new CA.
        let new_ca = Authority::generate("new CA", DAY).unwrap();
        server
            .resolver
            .set(&issue(&new_ca, "db-1.example", &[]))
            .unwrap();
        let body = get_hello(new_ca.cert_pem(), "db-1.example", addr).await;
        assert_eq!(body.unwrap(), "hello");
        let error = get_hello(ca.cert_pem(), "db-0.example", addr)
            .await
            .unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");

        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }
}
