//! The guards on a real socket (no supervisor: the handlers answer at once or sleep).

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::{Router, middleware};

use super::guard::{self, ApiJson, Limit, NoBody};
use crate::protocol::api::{
    ErrorResponse, MAX_BODY_BYTES, PROMOTE_PATH, PromoteRequest, START_PATH,
};

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn checked() -> Router {
    Router::new()
        .route(
            PROMOTE_PATH,
            post(|ApiJson(request): ApiJson<PromoteRequest>| async move {
                format!("{:?}", request.wait_seconds)
            }),
        )
        .route(START_PATH, post(|_: NoBody| async { "started" }))
        .layer(middleware::from_fn(guard::check_body))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Status and error message of a POST of `body` (`None`: no Content-Type).
async fn post_raw(url: &str, content_type: Option<&str>, body: String) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let message = match serde_json::from_str::<ErrorResponse>(&text) {
        Ok(error) => error.error,
        Err(_) if status < 400 => text,
        Err(_) => panic!("error reply {status} is not an ErrorResponse: {text}"),
    };
    (status, message)
}

async fn post_json(url: &str, body: &str) -> (u16, String) {
    post_raw(url, Some("application/json"), body.to_string()).await
}

#[tokio::test]
async fn bodies_are_refused_with_the_field_named() {
    let base = serve(checked()).await;
    let promote = format!("{base}{PROMOTE_PATH}");
    assert_eq!(
        post_json(&promote, r#"{"wait_seconds": 5}"#).await,
        (200, "Some(5)".into())
    );
    assert_eq!(post_json(&promote, "{}").await, (200, "None".into()));

    let (status, message) = post_json(&promote, r#"{"wait_seconds": 5"#).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("malformed request body"), "{message}");

    let (status, message) = post_json(&promote, r#"{"wait_secs": 5}"#).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("wait_secs"), "{message}");

    let (status, message) = post_json(&promote, r#"{"wait_seconds": "soon"}"#).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("wait_seconds"), "{message}");

    for huge in ["18446744073709551615", "184467440737095516160", "1e300"] {
        let (status, message) =
            post_json(&promote, &format!(r#"{{"wait_seconds": {huge}}}"#)).await;
        assert_eq!(status, 400, "{huge}: {message}");
        assert!(message.contains("wait_seconds"), "{huge}: {message}");
    }

    let (status, message) = post_raw(&promote, None, "{}".into()).await;
    assert_eq!(status, 415, "{message}");
    let (status, message) = post_raw(&promote, Some("text/plain"), "{}".into()).await;
    assert_eq!(status, 415, "{message}");

    let big = format!(
        r#"{{"wait_seconds": 5, "pad": "{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let (status, message) = post_json(&promote, &big).await;
    assert_eq!(status, 413, "{message}");
    assert!(message.contains(&MAX_BODY_BYTES.to_string()), "{message}");
}

#[tokio::test]
async fn empty_actions_take_nothing_or_an_empty_object() {
    let base = serve(checked()).await;
    let start = format!("{base}{START_PATH}");
    assert_eq!(post_raw(&start, None, String::new()).await.0, 200);
    assert_eq!(post_json(&start, "{}").await.0, 200);
    let (status, message) = post_json(&start, r#"{"now": true}"#).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("now"), "{message}");
}

#[tokio::test]
async fn excess_requests_are_refused_and_slow_ones_cut() {
    let app = Router::new()
        .route(
            PROMOTE_PATH,
            post(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        )
        .layer(middleware::from_fn_with_state(
            Limit::new("action", 1),
            guard::concurrency_limit,
        ))
        .layer(middleware::from_fn_with_state(
            Duration::from_millis(300),
            guard::time_limit,
        ));
    let base = serve(app).await;
    let url = format!("{base}{PROMOTE_PATH}");
    let (first, second) = tokio::join!(post_json(&url, "{}"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post_json(&url, "{}").await
    });
    assert_eq!(first.0, 503, "{}", first.1);
    assert!(first.1.contains("took longer"), "{}", first.1);
    assert_eq!(second.0, 503, "{}", second.1);
    assert!(second.1.contains("busy"), "{}", second.1);
}
