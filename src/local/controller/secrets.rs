//! Rotation in local mode: the controller reads the token and the superuser password from
//! `<dir>/secrets/` again every [`SECRETS_POLL`], like the agents do. A new token is sent from
//! then on, the previous one tried once on a 401 (an agent that has not read the file yet); a
//! new superuser password is used for new sessions, the previous one tried when refused (the
//! primary's agent has not changed the role yet). No restart of the cluster is needed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::secret_watch::SECRETS_POLL;
use crate::local::layout::{Layout, LocalConfig};
use crate::postgres::probe::PostgresTls;
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
pub(super) async fn watch(
    shared: Arc<Shared>,
    layout: Layout,
    mut token: String,
    mut password: String,
    tls: PostgresTls,
) {
    let mut previous_token: Option<(String, tokio::time::Instant)> = None;
    let mut previous_password: Option<(String, tokio::time::Instant)> = None;
    // What the clients and sessions were made with (the controller's start made the first).
    let mut applied_tokens = Some((token.clone(), None));
    let mut applied_passwords = Some((password.clone(), None));
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
        if let Some(new) = read(&layout.superuser_password())
            && new != password
        {
            previous_password = Some((
                std::mem::replace(&mut password, new),
                tokio::time::Instant::now(),
            ));
            tracing::info!(
                "the superuser password changed; the previous one stays a fallback for 5 minutes"
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
        let passwords = (password.clone(), recent(&previous_password));
        if applied_passwords.as_ref() != Some(&passwords) {
            shared
                .sessions
                .set_targets(super::platform::session_targets(
                    &shared.config,
                    &passwords.0,
                    passwords.1.clone(),
                    &tls,
                ));
            applied_passwords = Some(passwords);
        }
    }
}
