//! The failsafe's part of the agent API (issue 13): a primary that cannot reach the lease store
//! keeps serving only while every other member confirms, over these endpoints, that it still
//! follows it; a member that confirmed refuses promotion until its confirmation expires.
//!
//! Paths (JSON, bearer token like every action; unknown fields and values out of bounds are
//! refused with `400`, see [`crate::protocol::validate`]):
//! - `POST /v1/failsafe/members` [`FailsafeMembersRequest`] → [`FailsafeStatus`]: the
//!   controller tells an agent whether the failsafe is on and who the members are.
//! - `POST /v1/failsafe/confirm` [`ConfirmRequest`] → [`ConfirmResponse`] (409 with an
//!   `ErrorResponse` when the member does not follow the asking primary, or is being promoted).

use serde::{Deserialize, Serialize};

pub const FAILSAFE_MEMBERS_PATH: &str = "/v1/failsafe/members";
pub const FAILSAFE_CONFIRM_PATH: &str = "/v1/failsafe/confirm";

/// One member of the cluster, as the primary must reach it during a lease-store outage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailsafeMember {
    /// The instance name (the lease holder identity).
    pub name: String,
    /// Base URL of its agent (`http://10.1.0.7:8008`).
    pub agent_url: String,
    /// Where its postgres is reached by the other members (what a replica's `primary_conninfo`
    /// names when it follows this member).
    pub postgres_host: String,
    pub postgres_port: u16,
}

/// `POST /v1/failsafe/members`: every member of the cluster, this agent included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailsafeMembersRequest {
    pub enabled: bool,
    pub members: Vec<FailsafeMember>,
}

/// `POST /v1/failsafe/confirm`: "do you still follow me?", from the primary `primary`, whose
/// postgres is at `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    pub primary: String,
    pub host: String,
    pub port: u16,
    /// When the primary stops waiting for the answer (Unix milliseconds, its wall clock): a
    /// request that reaches a member much later (the member was frozen) is refused, so that a
    /// primary's abandoned question does not block the member's promotion.
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// The member follows the asking primary and refuses any promotion for `valid_ms` (its lease
/// duration, on its own clock, from when it answered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmResponse {
    pub member: String,
    pub valid_ms: u64,
}

/// The failsafe as one agent sees it (part of `GET /v1/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeStatus {
    pub enabled: bool,
    /// The member names the controller gave (sorted).
    pub members: Vec<String>,
    /// Digest of the member list as given (names, addresses) and `enabled`: a controller
    /// compares it with what it would send.
    pub digest: String,
    /// Primary: the member list is written in the lease, so the failsafe may be used.
    pub armed: bool,
    /// Primary: serving on the members' confirmations (the lease store is unreachable) for
    /// this long; `None` while the lease renews normally.
    pub serving_on_confirmations_ms: Option<u64>,
    /// Primary: why the last round of confirmations failed.
    pub last_round_error: Option<String>,
    /// Replica: the primary it confirmed, and for how much longer it refuses promotion.
    pub confirmed_primary: Option<String>,
    pub confirmation_remaining_ms: Option<u64>,
}

impl FailsafeMembersRequest {
    /// A stable digest of the request (the order of members does not matter).
    pub fn digest(&self) -> String {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(String::new(), self.enabled.to_string());
        for m in &self.members {
            fields.insert(
                m.name.clone(),
                format!("{}\t{}\t{}", m.agent_url, m.postgres_host, m.postgres_port),
            );
        }
        crate::protocol::names::parameters_hash(&fields)
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&FailsafeMember> {
        self.members.iter().find(|m| m.name == name)
    }
}
