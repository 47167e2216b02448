//! Example application on pgrs-router: notes written through the primary, read through
//! replicas with read-your-writes, and `GET /health/db` for load balancers.
//!
//! ```text
//! cargo run -p pgrs-router --example notes -- \
//!     --endpoint 'host=127.0.0.1 port=5432 user=postgres' \
//!     --endpoint 'host=127.0.0.1 port=5433 user=postgres'
//! ```
//! Endpoints may be nodes (roles are detected) or the operator's `-rw`/`-ro` Services.

mod app;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use pgrs_router::{Router, RouterConfig};

#[derive(Parser)]
struct Args {
    /// A connection string (URL or key=value); repeat for every node or Service.
    #[arg(
        long = "endpoint",
        required = true,
        env = "PGRS_ENDPOINTS",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Replicas further behind leave the read set.
    #[arg(long, default_value_t = 30.0)]
    max_lag_seconds: f64,
    /// Reads of a user go to the primary this long after that user's write.
    #[arg(long, default_value_t = 2.0)]
    sticky_seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = RouterConfig::new(args.endpoints);
    config.max_lag = Some(Duration::from_secs_f64(args.max_lag_seconds));
    config.sticky_window = Duration::from_secs_f64(args.sticky_seconds);
    let db = Router::connect(config)
        .await
        .context("failed to build the router")?;
    if let Err(error) = app::ensure_schema(&db).await {
        tracing::warn!(%error, "could not create the notes table (read-only mode?)");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, "notes app serving");
    axum::serve(listener, app::router(app::AppState { db }))
        .await
        .context("failed to serve HTTP")
}
