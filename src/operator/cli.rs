//! `pgrs operator`: command line, health and metrics endpoints, and the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;

use crate::operator::controller::{self, Context, Settings};
use crate::operator::leader::{self, ElectionSettings, Elector, Leadership};

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Image of the database pods when a PgReplicaSet sets no `spec.image` and its
    /// `postgresVersion` is 15 (normally the operator's own image). For another major without
    /// `--postgres-image`, this image's tag with `-pg<major>` appended.
    #[arg(
        long,
        env = "PGRS_DEFAULT_IMAGE",
        default_value = "ghcr.io/pgrs-dev/pgrs:latest"
    )]
    pub default_image: String,
    /// Image of the database pods of one PostgreSQL major, `MAJOR=IMAGE` (repeatable), when a
    /// PgReplicaSet sets no `spec.image`.
    #[arg(long = "postgres-image", value_name = "MAJOR=IMAGE", value_parser = parse_postgres_image)]
    pub postgres_images: Vec<(u32, String)>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PGRS_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "PGRS_HEALTH_LISTEN", default_value = "0.0.0.0:8080")]
    pub health_listen: SocketAddr,
    /// Elect a leader among operator replicas on a Lease: only the leader reconciles. With
    /// `--leader-elect=false` this process reconciles at once (one replica only!).
    #[arg(long, env = "PGRS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader election Lease (default: the pod's namespace from
    /// `POD_NAMESPACE`, else `--namespace`, else `default`).
    #[arg(long, env = "PGRS_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader election Lease.
    #[arg(long, env = "PGRS_LEADER_ELECTION_LEASE", default_value = leader::DEFAULT_LEASE_NAME)]
    pub leader_election_lease: String,
    /// This replica's identity in the Lease (default: `POD_NAME`, else `<hostname>-<pid>`).
    #[arg(long, env = "PGRS_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,
    /// Seconds a waiting replica sees the Lease unchanged before it takes over.
    #[arg(
        long,
        env = "PGRS_LEADER_ELECTION_LEASE_DURATION",
        default_value_t = 15
    )]
    pub leader_election_lease_duration: u64,
    /// Seconds a leader keeps leading without a successful renewal (< the lease duration).
    #[arg(
        long,
        env = "PGRS_LEADER_ELECTION_RENEW_DEADLINE",
        default_value_t = 10
    )]
    pub leader_election_renew_deadline: u64,
    /// Seconds between renewals, and between attempts of a waiting replica.
    #[arg(long, env = "PGRS_LEADER_ELECTION_RETRY_PERIOD", default_value_t = 2)]
    pub leader_election_retry_period: u64,
}

impl OperatorArgs {
    fn election(&self) -> ElectionSettings {
        let namespace = self
            .leader_election_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty())
            })
            .or_else(|| self.namespace.clone())
            .unwrap_or_else(|| "default".to_string());
        ElectionSettings {
            namespace,
            lease_name: self.leader_election_lease.clone(),
            identity: self
                .leader_election_identity
                .clone()
                .unwrap_or_else(leader::default_identity),
            lease_duration: Duration::from_secs(self.leader_election_lease_duration),
            renew_deadline: Duration::from_secs(self.leader_election_renew_deadline),
            retry_period: Duration::from_secs(self.leader_election_retry_period),
        }
    }
}

/// What the web endpoints read.
#[derive(Clone)]
struct Web {
    context: Arc<Context>,
    /// `None` without leader election.
    leadership: Option<Arc<Leadership>>,
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once the controller runs, or while waiting as a standby (ready to take over: a
/// Deployment with several replicas must roll out); the body says which.
async fn readyz(State(web): State<Web>) -> (StatusCode, String) {
    match &web.leadership {
        Some(leadership) if leadership.is_leader() => (StatusCode::OK, "ok: leader".to_string()),
        Some(leadership) => (
            StatusCode::OK,
            format!(
                "ok: standby, the leader is {}",
                leadership.holder().as_deref().unwrap_or("unknown")
            ),
        ),
        None if web.context.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok".to_string()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting".to_string()),
    }
}

async fn metrics(State(web): State<Web>) -> String {
    let mut text = web.context.metrics.render();
    if let Some(leadership) = &web.leadership {
        text.push_str("# TYPE pgrs_operator_leader gauge\n");
        text.push_str(&format!(
            "pgrs_operator_leader {}\n",
            u8::from(leadership.is_leader())
        ));
        text.push_str("# TYPE pgrs_operator_leader_acquisitions_total counter\n");
        text.push_str(&format!(
            "pgrs_operator_leader_acquisitions_total {}\n",
            leadership.acquisitions.load(Ordering::Relaxed)
        ));
    }
    text
}

/// SIGINT or SIGTERM.
async fn termination() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// `--postgres-image MAJOR=IMAGE`.
fn parse_postgres_image(text: &str) -> Result<(u32, String), String> {
    let (major, image) = text
        .split_once('=')
        .ok_or_else(|| format!("expected MAJOR=IMAGE, got {text:?}"))?;
    let major: u32 = major
        .trim()
        .parse()
        .map_err(|_| format!("{major:?} is not a PostgreSQL major"))?;
    crate::postgres::version::check_supported(major, std::path::Path::new(image)).map_err(
        |_| {
            format!(
                "PostgreSQL {major} is not supported (supported: {})",
                crate::postgres::version::supported_text()
            )
        },
    )?;
    if image.trim().is_empty() {
        return Err(format!("no image for PostgreSQL {major}"));
    }
    Ok((major, image.trim().to_string()))
}

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let context = Context::new(
        client,
        Settings {
            default_image: args.default_image.clone(),
            postgres_images: args.postgres_images.iter().cloned().collect(),
            namespace: args.namespace.clone(),
        },
    );
    let elector = if args.leader_elect {
        Some(Elector::new(context.client.clone(), args.election())?)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(args.health_listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.health_listen))?;
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Web {
            context: context.clone(),
            leadership: elector.as_ref().map(|e| e.leadership.clone()),
        })
        // The dashboard (`/`, `/api/clusters`) of every PgReplicaSet watched; served by
        // standbys too (it only reads).
        .merge(crate::dashboard::operator_router(
            context.client.clone(),
            args.namespace.clone(),
        ));
    let web = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(health = %args.health_listen, namespace = ?args.namespace, image = %args.default_image, leader_election = ?elector.as_ref().map(Elector::settings), "operator starting");
    let result = match &elector {
        None => {
            controller::run(context).await;
            Ok(())
        }
        Some(elector) => {
            let leading = tokio::select! {
                () = elector.acquire() => true,
                () = termination() => false,
            };
            if leading {
                // A lost Lease ends the process (as controller-runtime does): another replica
                // may already reconcile, and dropping the controller stops this one's rounds.
                tokio::select! {
                    () = controller::run(context) => {
                        elector.release().await;
                        Ok(())
                    }
                    lost = elector.hold() => {
                        tracing::error!(%lost, "lost the leader election: exiting");
                        Err(anyhow::anyhow!("lost the leader election: {lost}"))
                    }
                }
            } else {
                Ok(())
            }
        }
    };
    web.abort();
    tracing::info!("operator stopped");
    result
}
