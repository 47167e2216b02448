//! SQL probes: connecting to an instance and reading its replication state.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use crate::postgres::lsn::Lsn;
pub use crate::postgres::states::{SenderState, SyncState, WalReceiverState};

/// Where and as whom to connect. The password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Tried when `password` is refused: the previous value during a password rotation.
    pub fallback_password: Option<String>,
    pub dbname: String,
    /// TLS (`None` = plain, e.g. a Unix socket or loopback): `sslmode=verify-full` against
    /// the cluster CA, SCRAM with `channel_binding=require`.
    pub tls: Option<PostgresTls>,
}

/// How a TLS session to postgres is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTls {
    /// The cluster CA (PEM): the only root the server's certificate may chain to.
    pub ca_pem: String,
    /// The name the server's certificate must carry. A target given by IP is dialed through
    /// `hostaddr` and verified against this name.
    pub server_name: String,
}

impl std::fmt::Debug for ConnectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("tls", &self.tls.as_ref().map(|t| &t.server_name))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("failed to connect to postgres at {host}:{port} as {user}: {source}")]
    Connect {
        host: String,
        port: u16,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to set up TLS to postgres at {host}:{port}: {source}")]
    Tls {
        host: String,
        port: u16,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("timed out connecting to postgres at {host}:{port}")]
    ConnectTimeout { host: String, port: u16 },
    #[error("postgres did not answer the probe within {timeout:?}")]
    QueryTimeout { timeout: Duration },
    #[error("failed to query postgres ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("postgres returned an unparsable LSN: {0}")]
    Lsn(#[from] crate::postgres::lsn::LsnParseError),
}

impl ProbeError {
    /// The server refused the password (SQLSTATE 28P01).
    pub fn is_wrong_password(&self) -> bool {
        match self {
            ProbeError::Connect { source, .. } => {
                source.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
            }
            _ => false,
        }
    }

    /// The server's message (e.g. "password authentication failed for user ...") when there is
    /// one, else the client-side cause.
    pub fn cause(&self) -> String {
        let source = match self {
            ProbeError::Connect { source, .. } | ProbeError::Query { source, .. } => source,
            _ => return self.to_string(),
        };
        match source.as_db_error() {
            Some(db) => db.message().to_string(),
            None => match std::error::Error::source(source) {
                Some(inner) => inner.to_string(),
                None => source.to_string(),
            },
        }
    }
}

/// Connects with `target.password` and, when the server refuses it as a wrong password, with
/// `target.fallback_password` (a rotation in progress).
pub async fn connect(target: &ConnectTarget, timeout: Duration) -> Result<Client, ProbeError> {
    let refused = match connect_with(target, &target.password, timeout).await {
        Ok(client) => return Ok(client),
        Err(error) => error,
    };
    match &target.fallback_password {
        Some(fallback) if refused.is_wrong_password() => {
            tracing::debug!(host = %target.host, user = %target.user, "password refused; trying the previous one of a rotation");
            connect_with(target, fallback, timeout).await
        }
        _ => Err(refused),
    }
}

async fn connect_with(
    target: &ConnectTarget,
    password: &str,
    timeout: Duration,
) -> Result<Client, ProbeError> {
    let mut config = tokio_postgres::Config::new();
    config
        .port(target.port)
        .user(&target.user)
        .password(password)
        .dbname(&target.dbname)
        .application_name("pgrs-agent")
        .connect_timeout(timeout);
    let failed = |source| ProbeError::Connect {
        host: target.host.clone(),
        port: target.port,
        user: target.user.clone(),
        source,
    };
    let timed_out = |_| ProbeError::ConnectTimeout {
        host: target.host.clone(),
        port: target.port,
    };
    let (client, connection) = match &target.tls {
        None => {
            config.host(&target.host);
            let connecting = config.connect(NoTls);
            let (client, connection) = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(timed_out)?
                .map_err(failed)?;
            (client, connection.boxed())
        }
        Some(tls) => {
            match target.host.parse::<std::net::IpAddr>() {
                Ok(ip) => config.host(&tls.server_name).hostaddr(ip),
                Err(_) => config.host(&target.host),
            };
            config
                .ssl_mode(tokio_postgres::config::SslMode::Require)
                .channel_binding(tokio_postgres::config::ChannelBinding::Require);
            let rustls =
                crate::tls::client_config(&tls.ca_pem, None).map_err(|source| ProbeError::Tls {
                    host: target.host.clone(),
                    port: target.port,
                    source,
                })?;
            let connecting = config.connect(crate::tls::postgres_connector(rustls));
            let (client, connection) = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(timed_out)?
                .map_err(failed)?;
            (client, connection.boxed())
        }
    };
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection ended");
        }
    });
    Ok(client)
}

/// One row of `pg_stat_replication` on a primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationPeer {
    /// `application_name`: the replica agent's instance name.
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: SenderState,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// `write_lag`, `flush_lag`, `replay_lag` in seconds. PostgreSQL resets them to NULL when the
    /// standby is caught up on an idle primary, so `None` with equal LSNs means 0 lag.
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    pub replay_lag_seconds: Option<f64>,
    /// `pg_current_wal_lsn() - replay_lsn` in bytes, measured in the same query.
    pub replay_lag_bytes: Option<u64>,
    /// `None` when PostgreSQL reported a word this version does not know.
    pub sync_state: Option<SyncState>,
    pub sync_priority: i32,
}

/// `pg_stat_wal_receiver` on a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalReceiver {
    pub status: WalReceiverState,
    pub sender_host: Option<String>,
    pub sender_port: Option<i32>,
    pub slot_name: Option<String>,
    /// Timeline of the WAL last received.
    pub received_tli: Option<u32>,
    /// Last WAL position flushed to disk by the receiver.
    pub flushed_lsn: Option<Lsn>,
    /// Last WAL position reported by the sender.
    pub latest_end_lsn: Option<Lsn>,
    pub last_msg_receipt_time: Option<DateTime<Utc>>,
}

/// What one probe of a running instance saw.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceProbe {
    pub in_recovery: bool,
    pub system_identifier: String,
    pub timeline: Option<u32>,
    pub current_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub last_replay_timestamp: Option<DateTime<Utc>>,
    pub replication: Vec<ReplicationPeer>,
    pub wal_receiver: Option<WalReceiver>,
}

fn query_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ProbeError {
    move |source| ProbeError::Query { what, source }
}

fn parse_lsn(text: Option<String>) -> Result<Option<Lsn>, ProbeError> {
    Ok(text.map(|t| t.parse()).transpose()?)
}

fn from_epoch(seconds: Option<f64>) -> Option<DateTime<Utc>> {
    let seconds = seconds?;
    let whole = seconds.floor();
    DateTime::from_timestamp(whole as i64, ((seconds - whole) * 1e9) as u32)
}

/// Reads roles, positions and replication state (superuser connection).
pub async fn probe_instance(client: &Client) -> Result<InstanceProbe, ProbeError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    (SELECT timeline_id FROM pg_control_checkpoint())::int4",
            &[],
        )
        .await
        .map_err(query_error("recovery state"))?;
    let in_recovery: bool = row.get(0);
    let system_identifier: String = row.get(1);
    let checkpoint_timeline: Option<i32> = row.get(2);
    let mut probe = InstanceProbe {
        in_recovery,
        system_identifier,
        timeline: checkpoint_timeline.map(|t| t as u32),
        current_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        last_replay_timestamp: None,
        replication: Vec::new(),
        wal_receiver: None,
    };
    if in_recovery {
        let row = client
            .query_one(
                "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                        extract(epoch from pg_last_xact_replay_timestamp())::float8",
                &[],
            )
            .await
            .map_err(query_error("replay positions"))?;
        probe.receive_lsn = parse_lsn(row.get(0))?;
        probe.replay_lsn = parse_lsn(row.get(1))?;
        probe.last_replay_timestamp = from_epoch(row.get(2));
        let receiver = client
            .query_opt(
                "SELECT status, sender_host, sender_port, slot_name, received_tli::int4, \
                        flushed_lsn::text, latest_end_lsn::text, \
                        extract(epoch from last_msg_receipt_time)::float8 \
                 FROM pg_stat_wal_receiver",
                &[],
            )
            .await
            .map_err(query_error("pg_stat_wal_receiver"))?;
        if let Some(row) = receiver {
            let received_tli: Option<i32> = row.get(4);
            probe.wal_receiver = Some(WalReceiver {
                status: WalReceiverState::parse(row.get::<_, Option<&str>>(0).unwrap_or_default()),
                sender_host: row.get(1),
                sender_port: row.get(2),
                slot_name: row.get(3),
                received_tli: received_tli.map(|t| t as u32),
                flushed_lsn: parse_lsn(row.get(5))?,
                latest_end_lsn: parse_lsn(row.get(6))?,
                last_msg_receipt_time: from_epoch(row.get(7)),
            });
            if let Some(tli) = received_tli.filter(|t| *t > 0) {
                probe.timeline = Some(tli as u32);
            }
        }
    } else {
        // The WAL file name starts with the timeline: exact right after a promotion, unlike the
        // control file's checkpoint timeline.
        let row = client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                        ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int4",
                &[],
            )
            .await
            .map_err(query_error("current WAL position"))?;
        probe.current_lsn = parse_lsn(row.get(0))?;
        let timeline: i32 = row.get(1);
        probe.timeline = Some(timeline as u32);
        let rows = client
            .query(
                "SELECT application_name, host(client_addr), state, sent_lsn::text, \
                        write_lsn::text, flush_lsn::text, replay_lsn::text, \
                        extract(epoch from write_lag)::float8, \
                        extract(epoch from flush_lag)::float8, \
                        extract(epoch from replay_lag)::float8, \
                        (pg_current_wal_lsn() - replay_lsn)::int8, \
                        sync_state, sync_priority \
                 FROM pg_stat_replication ORDER BY application_name",
                &[],
            )
            .await
            .map_err(query_error("pg_stat_replication"))?;
        for row in rows {
            let lag_bytes: Option<i64> = row.get(10);
            probe.replication.push(ReplicationPeer {
                application_name: row.get(0),
                client_addr: row.get(1),
                state: SenderState::parse(row.get::<_, Option<&str>>(2).unwrap_or_default()),
                sent_lsn: parse_lsn(row.get(3))?,
                write_lsn: parse_lsn(row.get(4))?,
                flush_lsn: parse_lsn(row.get(5))?,
                replay_lsn: parse_lsn(row.get(6))?,
                write_lag_seconds: row.get(7),
                flush_lag_seconds: row.get(8),
                replay_lag_seconds: row.get(9),
                replay_lag_bytes: lag_bytes.map(|b| b.max(0) as u64),
                sync_state: row.get::<_, Option<&str>>(11).and_then(SyncState::parse),
                sync_priority: row.get::<_, Option<i32>>(12).unwrap_or_default(),
            });
        }
    }
    Ok(probe)
}
