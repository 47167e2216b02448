//! Polling until a condition holds, for tests against the test bed.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` every 200 ms until it returns `Ok`, or fails after `timeout` with
/// `what` and the last reason `check` gave.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(reason) if Instant::now() > deadline => {
                return Err(format!(
                    "{what}: not true after {timeout:?}; last: {reason}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
