//! The agent actions that run one SQL statement on the agent's own postgres over its local
//! (Unix socket) superuser session, for controllers that have no superuser login to the
//! instances (`spec.enableSuperuserAccess: false`):
//!
//! - `POST /v1/checkpoint` (empty body or `{}`) → [`StatementResponse`]: a `CHECKPOINT` (before
//!   a planned demotion), bounded by [`CHECKPOINT_LIMIT`].
//! - `POST /v1/synchronous-standby-names` [`SynchronousStandbyNamesRequest`] →
//!   [`StatementResponse`]: `ALTER SYSTEM SET synchronous_standby_names` to `ANY k (members)`
//!   (or empty) and a reload, bounded by [`SYNC_NAMES_LIMIT`].
//! - `POST /v1/drop-slots` [`DropSlotsRequest`] → [`DropSlotsResponse`]: drop the physical
//!   replication slots of removed instances (`409` while one of them is active: none is
//!   dropped), bounded by [`SYNC_NAMES_LIMIT`].
//! - `POST /v1/superuser-access` [`SuperuserAccessRequest`] → [`StatementResponse`]: allow or
//!   refuse remote superuser logins (`pg_hba.conf` rendered again and reloaded; no restart).
//!
//! Both are behind the bearer token, refuse unknown fields, and answer `409` when postgres is
//! not running, `500` when the statement failed and `503` past their bound, each with an
//! [`ErrorResponse`](crate::protocol::api::ErrorResponse).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::validate::{FieldError, Validate, refuse, slot};

pub const CHECKPOINT_PATH: &str = "/v1/checkpoint";
pub const SYNCHRONOUS_STANDBY_NAMES_PATH: &str = "/v1/synchronous-standby-names";
pub const DROP_SLOTS_PATH: &str = "/v1/drop-slots";
pub const SUPERUSER_ACCESS_PATH: &str = "/v1/superuser-access";

/// How long the agent lets a `CHECKPOINT` run (the controller's own bound before a demotion is
/// shorter: the checkpoint is only an optimisation of the shutdown that follows).
pub const CHECKPOINT_LIMIT: Duration = Duration::from_secs(60);
/// How long the agent lets `ALTER SYSTEM` and the reload take.
pub const SYNC_NAMES_LIMIT: Duration = Duration::from_secs(5);
/// Members of a quorum: as many as a cluster may have instances.
pub const MAX_SYNC_MEMBERS: usize = 64;
/// `application_name` is cut at `NAMEDATALEN - 1` bytes: a longer name would never match.
pub const MAX_MEMBER_LEN: usize = 63;

/// `POST /v1/synchronous-standby-names`: the quorum `ANY k (members)`; `k == 0` with no
/// members is asynchronous replication (an empty setting).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynchronousStandbyNamesRequest {
    pub k: u32,
    /// Instance names (the standbys' `application_name`).
    pub members: Vec<String>,
}

impl SynchronousStandbyNamesRequest {
    /// The setting's value: `ANY k ("a", "b")`, each name double-quoted (a `"` doubled), or
    /// empty. Call on a validated request.
    pub fn value(&self) -> String {
        if self.k == 0 {
            return String::new();
        }
        let quoted: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("\"{}\"", m.replace('"', "\"\"")))
            .collect();
        format!("ANY {} ({})", self.k, quoted.join(", "))
    }
}

/// An instance name as a standby's `application_name`: 1 to 63 bytes of ASCII letters,
/// digits, `-`, `_` and `.` (what Kubernetes and local mode name instances with).
fn member_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_MEMBER_LEN {
        return Err(refuse(
            field,
            format!("must be 1 to {MAX_MEMBER_LEN} bytes"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(refuse(
            field,
            "may contain only ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

impl Validate for SynchronousStandbyNamesRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.members.len() > MAX_SYNC_MEMBERS {
            return Err(refuse(
                "members",
                format!(
                    "{} members, at most {MAX_SYNC_MEMBERS} allowed",
                    self.members.len()
                ),
            ));
        }
        for (i, name) in self.members.iter().enumerate() {
            member_name(&format!("members[{i}]"), name)?;
            if self.members[..i].contains(name) {
                return Err(refuse(format!("members[{i}]"), "named twice"));
            }
        }
        if self.k as usize > self.members.len() {
            return Err(refuse(
                "k",
                format!("{} is more than the {} members", self.k, self.members.len()),
            ));
        }
        if self.k == 0 && !self.members.is_empty() {
            return Err(refuse(
                "k",
                "must be at least 1 with members (no members: asynchronous)",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/drop-slots`: the physical slots to drop (those of removed instances).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropSlotsRequest {
    pub slots: Vec<String>,
}

impl Validate for DropSlotsRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.slots.is_empty() || self.slots.len() > MAX_SYNC_MEMBERS {
            return Err(refuse(
                "slots",
                format!("must name 1 to {MAX_SYNC_MEMBERS} slots"),
            ));
        }
        for (i, name) in self.slots.iter().enumerate() {
            slot(&format!("slots[{i}]"), Some(name))?;
        }
        Ok(())
    }
}

/// `POST /v1/superuser-access`: whether the superuser may log in from other hosts
/// (`spec.enableSuperuserAccess`); otherwise only over the socket and loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuperuserAccessRequest {
    pub enabled: bool,
}

impl Validate for SuperuserAccessRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// Reply to `POST /v1/drop-slots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropSlotsResponse {
    /// The slots that existed and were dropped (a slot already gone is not named).
    pub dropped: Vec<String>,
}

/// Reply to the checkpoint and synchronous standby actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementResponse {
    /// What was done, for humans.
    pub message: String,
    /// How long the statements took on the agent, in milliseconds.
    pub elapsed_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(k: u32, members: &[&str]) -> SynchronousStandbyNamesRequest {
        SynchronousStandbyNamesRequest {
            k,
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn the_value_quotes_every_member() {
        assert_eq!(request(0, &[]).value(), "");
        assert_eq!(
            request(1, &["db-1", "db-2"]).value(),
            "ANY 1 (\"db-1\", \"db-2\")"
        );
        assert_eq!(request(1, &["a\"b"]).value(), "ANY 1 (\"a\"\"b\")");
    }

    #[test]
    fn members_and_k_are_bounded() {
        let field = |r: SynchronousStandbyNamesRequest| r.validate().err().map(|e| e.field);
        assert_eq!(field(request(0, &[])), None);
        assert_eq!(field(request(2, &["a", "b.c-d_e"])), None);
        assert_eq!(field(request(3, &["a", "b"])).as_deref(), Some("k"));
        assert_eq!(field(request(0, &["a"])).as_deref(), Some("k"));
        assert_eq!(
            field(request(1, &["a", "a"])).as_deref(),
            Some("members[1]")
        );
        for bad in ["", "a\"b", "a b", "a'b", "a,b", "é", &"x".repeat(64)] {
            assert_eq!(
                field(request(1, &[bad])).as_deref(),
                Some("members[0]"),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_SYNC_MEMBERS).map(|i| format!("m{i}")).collect();
        let too_many = SynchronousStandbyNamesRequest {
            k: 1,
            members: many,
        };
        assert_eq!(field(too_many).as_deref(), Some("members"));
    }

    #[test]
    fn slots_to_drop_are_slot_names() {
        let field = |slots: &[&str]| {
            DropSlotsRequest {
                slots: slots.iter().map(|s| s.to_string()).collect(),
            }
            .validate()
            .err()
            .map(|e| e.field)
        };
        assert_eq!(field(&["pgrs_db_2"]), None);
        assert_eq!(field(&[]).as_deref(), Some("slots"));
        assert_eq!(field(&["ok", "Bad"]).as_deref(), Some("slots[1]"));
        assert_eq!(field(&["a'b"]).as_deref(), Some("slots[0]"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let parsed = serde_json::from_str::<SynchronousStandbyNamesRequest>(
            r#"{"k": 1, "members": ["a"], "value": "*"}"#,
        );
        assert!(parsed.is_err());
    }
}
