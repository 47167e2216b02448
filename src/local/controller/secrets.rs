//! Rotation in local mode: the controller reads the token from `<dir>/secrets/` again every
//! [`SECRETS_POLL`], like the agents do. A new token is sent from then on, the previous one
//! tried once on a 401 (an agent that has not read the file yet). No restart of the cluster is
//! needed. (The controller has no SQL session: a superuser password rotation is the agents'.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::secret_watch::SECRETS_POLL;
use crate::local::layout::{Layout, LocalConfig};
use crate::protocol::client::AgentClient;

use super::{Shared, lock};

/// How long a rotated value stays the fallback (the agents' window too).
const FALLBACK_FOR: Duration = crate::agent::rotation::ROTATION_WINDOW;

/// A client per node with `token`, and `previous` tried on a 401.
pub(super) fn agent_clients(
    config: &LocalConfig,
    token: &str,
    previous: Option<String>,
) -> anyhow::Result<HashMap<String, Arc<AgentClient>>> {
    config
        .nodes
        .iter()
        .map(|n| {
            let client = AgentClient::new(config.agent_url(n), Some(token.to_string()))?
                .with_action_timeout(Duration::from_secs(300))
                .with_fallback_token(previous.clone());
            Ok((n.name.clone(), Arc::new(client)))
        })
        .collect()
}

fn read(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
}

/// Follows the secret files for as long as the controller runs.
pub(super) async fn watch(shared: Arc<Shared>, layout: Layout, mut token: String) {
    let mut previous_token: Option<(String, tokio::time::Instant)> = None;
    // What the clients were made with (the controller's start made the first).
    let mut applied_tokens = Some((token.clone(), None));
    loop {
        tokio::time::sleep(SECRETS_POLL).await;
        let recent = |previous: &Option<(String, tokio::time::Instant)>| {
            previous
                .as_ref()
                .filter(|(_, at)| at.elapsed() < FALLBACK_FOR)
                .map(|(value, _)| value.clone())
        };
        if let Some(new) = read(&layout.token())
            && new != token
        {
            previous_token = Some((
                std::mem::replace(&mut token, new),
                tokio::time::Instant::now(),
            ));
            tracing::info!(
                "the agent token changed; the previous one stays a fallback for 5 minutes"
            );
        }
        // Only a change (a new value, or a fallback's window over) makes new clients: kept
        // ones keep their connections.
        let tokens = (token.clone(), recent(&previous_token));
        if applied_tokens.as_ref() != Some(&tokens) {
            match agent_clients(&shared.config, &tokens.0, tokens.1.clone()) {
                Ok(clients) => {
                    *lock(&shared.clients) = clients;
                    applied_tokens = Some(tokens);
                }
                Err(error) => tracing::warn!(%error, "cannot make the agent clients again"),
            }
        }
    }
}
