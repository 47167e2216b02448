//! The stable write endpoint: a TCP forwarder on a fixed port that always forwards to the
//! current lease holder's postgres, and refuses connections (accept, then close at once) while
//! there is none. When the target changes, connections to the old one are cut, so clients
//! reconnect and land on the new primary instead of lingering on a deposed one.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("failed to listen on {addr} for the write endpoint: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the write endpoint points; `None` refuses connections.
pub type TargetSender = watch::Sender<Option<SocketAddr>>;

pub struct Forwarder {
    pub local_addr: SocketAddr,
    pub target: TargetSender,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forwarder {
    pub async fn bind(addr: SocketAddr) -> Result<Forwarder, ForwarderError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ForwarderError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ForwarderError::Bind { addr, source })?;
        let (target, receiver) = watch::channel(None);
        let task = tokio::spawn(accept_loop(listener, receiver));
        Ok(Forwarder {
            local_addr,
            target,
            task,
        })
    }
}

async fn accept_loop(listener: TcpListener, target: watch::Receiver<Option<SocketAddr>>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "write endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let current = *target.borrow();
        let Some(upstream) = current else {
            tracing::debug!(%peer, "write endpoint: no primary, refusing");
            drop(client);
            continue;
        };
        tokio::spawn(forward(client, upstream, target.clone()));
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut target: watch::Receiver<Option<SocketAddr>>,
) {
    let _ = client.set_nodelay(true);
    let mut server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(%upstream, %error, "write endpoint: primary not accepting");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let moved = async {
        loop {
            if target.changed().await.is_err() {
                return;
            }
            if *target.borrow_and_update() != Some(upstream) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = moved => {
            tracing::debug!(%upstream, "write endpoint: primary changed, cutting the connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    async fn roundtrip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut buf = vec![0u8; text.len()];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn refuses_without_target_forwards_with_one_and_cuts_on_change() {
        let forwarder = Forwarder::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let (first, _t1) = echo_server().await;
        let (second, _t2) = echo_server().await;

        // No primary: the connection is closed without a byte.
        let mut refused = TcpStream::connect(forwarder.local_addr)
            .await
            .expect("connect");
        let mut buf = [0u8; 1];
        assert_eq!(refused.read(&mut buf).await.expect("eof"), 0);

        forwarder.target.send_replace(Some(first));
        let mut client = TcpStream::connect(forwarder.local_addr)
            .await
            .expect("connect");
        assert_eq!(
            roundtrip(&mut client, b"hello").await.expect("echo"),
            b"hello"
        );

        // The primary moves: the old connection is cut, a new one reaches the new target.
        forwarder.target.send_replace(Some(second));
        let cut = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut buf = [0u8; 8];
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(cut.is_ok(), "the old connection was not cut");
        let mut client = TcpStream::connect(forwarder.local_addr)
            .await
            .expect("connect");
        assert_eq!(
            roundtrip(&mut client, b"again").await.expect("echo"),
            b"again"
        );
    }
}
