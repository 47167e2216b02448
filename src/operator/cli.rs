//! `pgrs operator`: command line, health and metrics endpoints, and the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;

use crate::operator::controller::{self, Context, Settings};

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Image of the database pods when a PgReplicaSet sets no `spec.image` (normally the
    /// operator's own image).
    #[arg(
        long,
        env = "PGRS_DEFAULT_IMAGE",
        default_value = "ghcr.io/pgrs-dev/pgrs:latest"
    )]
    pub default_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PGRS_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "PGRS_HEALTH_LISTEN", default_value = "0.0.0.0:8080")]
    pub health_listen: SocketAddr,
    /// Run the database pods without `runAsUser`/`fsGroup`: the agent starts as root and runs
    /// postgres as the `postgres` user. For runtimes without `fsGroup` support (the test bed).
    #[arg(long, env = "PGRS_DATABASE_AS_ROOT")]
    pub database_as_root: bool,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(context): State<Arc<Context>>) -> (StatusCode, &'static str) {
    if context.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(context): State<Arc<Context>>) -> String {
    context.metrics.render()
}

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let context = Context::new(
        client,
        Settings {
            default_image: args.default_image.clone(),
            database_as_root: args.database_as_root,
            namespace: args.namespace.clone(),
        },
    );
    let listener = tokio::net::TcpListener::bind(args.health_listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.health_listen))?;
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(context.clone());
    let web = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(health = %args.health_listen, namespace = ?args.namespace, image = %args.default_image, "operator starting");
    controller::run(context).await;
    web.abort();
    tracing::info!("operator stopped");
    Ok(())
}
