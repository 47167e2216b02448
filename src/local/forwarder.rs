//! The stable write endpoint: a TCP forwarder on a fixed port that always forwards to the
//! current lease holder's postgres, and refuses connections (accept, then close at once) while
//! there is none. When the target changes, connections to the old one are cut, so clients
//! reconnect and land on the new primary instead of lingering on a deposed one.
//!
//! While a handover is under way (`hold`), a connection that arrives without a target is held
//! for up to [`HOLD_LIMIT`] and forwarded the moment the new primary serves: the client sees a
//! slow connect instead of an error, a retry pause and a second connect.

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

/// How long a connection arriving during a handover waits for the new primary.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Forwarder {
    pub local_addr: SocketAddr,
    pub target: TargetSender,
    /// A handover is under way: hold target-less connections (bounded) instead of closing them.
    pub hold: watch::Sender<bool>,
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
        let (hold, holding) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, receiver, holding));
        Ok(Forwarder {
            local_addr,
            target,
            hold,
            task,
        })
    }
}

/// Waits (at most [`HOLD_LIMIT`], and only while `holding`) for a target to appear.
async fn wait_for_target(
    mut target: watch::Receiver<Option<SocketAddr>>,
    mut holding: watch::Receiver<bool>,
) -> Option<SocketAddr> {
    let wait = async {
        loop {
            if let Some(upstream) = *target.borrow_and_update() {
                return Some(upstream);
            }
            if !*holding.borrow_and_update() {
                return None;
            }
            tokio::select! {
                changed = target.changed() => changed.ok()?,
                changed = holding.changed() => changed.ok()?,
            }
        }
    };
    tokio::time::timeout(HOLD_LIMIT, wait).await.ok().flatten()
}

async fn accept_loop(
    listener: TcpListener,
    target: watch::Receiver<Option<SocketAddr>>,
    holding: watch::Receiver<bool>,
) {
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
        match current {
            Some(upstream) => {
                tokio::spawn(forward(client, upstream, target.clone()));
            }
            None if *holding.borrow() => {
                let (target, holding) = (target.clone(), holding.clone());
                tokio::spawn(async move {
                    match wait_for_target(target.clone(), holding).await {
                        Some(upstream) => forward(client, upstream, target).await,
                        None => {
                            tracing::debug!(%peer, "write endpoint: no primary after the hold, refusing");
                        }
                    }
                });
            }
            None => {
                tracing::debug!(%peer, "write endpoint: no primary, refusing");
                drop(client);
            }
        }
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

    #[tokio::test]
    async fn holds_connections_during_a_handover() {
        let forwarder = Forwarder::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let (upstream, _t) = echo_server().await;

        // Held without a target, forwarded once one appears.
        forwarder.hold.send_replace(true);
        let mut held = TcpStream::connect(forwarder.local_addr)
            .await
            .expect("connect");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        forwarder.target.send_replace(Some(upstream));
        assert_eq!(roundtrip(&mut held, b"held").await.expect("echo"), b"held");

        // Held, then closed when no primary comes within the limit.
        forwarder.target.send_replace(None);
        let mut refused = TcpStream::connect(forwarder.local_addr)
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(HOLD_LIMIT * 5, refused.read(&mut buf))
            .await
            .expect("closed after the hold limit");
        assert_eq!(read.expect("eof"), 0);
        assert!(
            started.elapsed() >= HOLD_LIMIT / 2,
            "closed before the hold"
        );
    }
}
