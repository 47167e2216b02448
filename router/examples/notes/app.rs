//! The notes application: a small resource written through the primary and read through
//! replicas with read-your-writes, plus `GET /health/db`. Shared by `main.rs` and the
//! integration tests (`#[path]`), so the tests exercise exactly this code.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgrs_router::{Consistency, Need, RouterError, WalToken};
use serde::Deserialize;
use serde_json::json;

/// Header carrying the read-your-writes WAL token (strength b) back and forth.
pub const TOKEN_HEADER: &str = "x-pgrs-wal-token";
/// Header naming the user (the stickiness key, strength a).
pub const USER_HEADER: &str = "x-user";

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (\
     id bigserial PRIMARY KEY, author text NOT NULL, body text NOT NULL, \
     created_at timestamptz NOT NULL DEFAULT now())";

#[derive(Clone)]
pub struct AppState {
    pub db: pgrs_router::Router,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/db", get(health_db))
        .route("/notes", axum::routing::post(create_note).get(list_notes))
        .route("/notes/{id}", get(get_note))
        .with_state(state)
}

/// Create the table if a primary is reachable (best effort at start-up).
pub async fn ensure_schema(db: &pgrs_router::Router) -> Result<(), RouterError> {
    let client = db.write().await?;
    client
        .batch_execute(SCHEMA)
        .await
        .map_err(|source| RouterError::Query {
            node: client.node().to_owned(),
            source,
        })
}

#[derive(Deserialize)]
struct HealthQuery {
    need: Option<String>,
}

/// 200 when what `need` requires works (default: reads and writes), 503 otherwise; the body
/// is the router's health report either way.
async fn health_db(State(state): State<AppState>, Query(query): Query<HealthQuery>) -> Response {
    let need = match query.need.as_deref() {
        Some("read") => Need::Read,
        _ => Need::ReadWrite,
    };
    let report = state.db.health();
    let status =
        StatusCode::from_u16(report.http_status(need)).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (status, Json(&*report)).into_response()
}

#[derive(Deserialize)]
struct NewNote {
    author: String,
    body: String,
}

async fn create_note(State(state): State<AppState>, Json(note): Json<NewNote>) -> Response {
    let result = async {
        let client = state.db.write().await?;
        let query_error = |source| RouterError::Query {
            node: client.node().to_owned(),
            source,
        };
        let insert = "INSERT INTO notes (author, body) VALUES ($1, $2) RETURNING id";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&note.author, &note.body];
        let row = match client.query_one(insert, &params).await {
            // Started during an outage: the table is created with the first write.
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                client.batch_execute(SCHEMA).await.map_err(query_error)?;
                client.query_one(insert, &params).await
            }
            other => other,
        }
        .map_err(query_error)?;
        let id: i64 = row.get(0);
        let token = client.wal_token().await?;
        state.db.record_write(&note.author);
        Ok::<_, RouterError>((id, token))
    }
    .await;
    match result {
        Ok((id, token)) => {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&token.to_string()) {
                headers.insert(HeaderName::from_static(TOKEN_HEADER), value);
            }
            let body = json!({ "id": id, "token": token.to_string() });
            (StatusCode::CREATED, headers, Json(body)).into_response()
        }
        Err(error) => error_response(&state, &error),
    }
}

async fn get_note(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    let token = header_text(&headers, TOKEN_HEADER).and_then(|t| t.parse::<WalToken>().ok());
    let user = header_text(&headers, USER_HEADER);
    let consistency = match (&token, user) {
        (Some(token), _) => Consistency::Token(token),
        (None, Some(user)) => Consistency::Key(user),
        (None, None) => Consistency::Eventual,
    };
    let result = async {
        let client = state.db.read(consistency).await?;
        let rows = client
            .query(
                "SELECT id, author, body, pg_is_in_recovery() FROM notes WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|source| RouterError::Query {
                node: client.node().to_owned(),
                source,
            })?;
        Ok::<_, RouterError>((rows, client.node().to_owned()))
    }
    .await;
    match result {
        Ok((rows, node)) => match rows.first() {
            Some(row) => Json(json!({
                "id": row.get::<_, i64>(0),
                "author": row.get::<_, String>(1),
                "body": row.get::<_, String>(2),
                "served_by": node,
                "served_by_replica": row.get::<_, bool>(3),
            }))
            .into_response(),
            None => (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "no such note" })),
            )
                .into_response(),
        },
        Err(error) => error_response(&state, &error),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    author: String,
}

async fn list_notes(State(state): State<AppState>, Query(query): Query<ListQuery>) -> Response {
    // Automatic routing: the classifier sends this SELECT to a replica; the author's own
    // stickiness window sends it to the primary right after their write.
    let result = state
        .db
        .query(
            "SELECT id, body FROM notes WHERE author = $1 ORDER BY id",
            &[&query.author],
            Consistency::Key(&query.author),
        )
        .await;
    match result {
        Ok(rows) => {
            let notes: Vec<_> = rows
                .iter()
                .map(|row| json!({ "id": row.get::<_, i64>(0), "body": row.get::<_, String>(1) }))
                .collect();
            Json(json!({ "notes": notes })).into_response()
        }
        Err(error) => error_response(&state, &error),
    }
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Read-only mode and unreachable nodes are 503 with `Retry-After`; anything else is 500.
fn error_response(state: &AppState, error: &RouterError) -> Response {
    let unavailable = matches!(
        error,
        RouterError::ReadOnly { .. }
            | RouterError::NoNodeAvailable
            | RouterError::CausalReadUnavailable { .. }
            | RouterError::Pool { .. }
    );
    let message = error_chain(error);
    if unavailable {
        let retry_after = match error {
            RouterError::ReadOnly { retry_after } => *retry_after,
            _ => state.db.retry_after(),
        };
        let seconds = retry_after.as_secs().max(1).to_string();
        tracing::warn!(error = %message, "database unavailable for this request");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, seconds)],
            Json(json!({ "error": message })),
        )
            .into_response()
    } else {
        tracing::error!(error = %message, "request failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": message })),
        )
            .into_response()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
