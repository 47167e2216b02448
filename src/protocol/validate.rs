//! Bounds on every request body of the agent API, checked after the JSON was parsed and before
//! anything runs: a refused request changes nothing. Pure; the agent answers a violation with
//! `400` and an [`ErrorResponse`](crate::protocol::api::ErrorResponse) naming the field.

use crate::protocol::api::{
    FenceRequest, FollowRequest, ParametersRequest, PromoteRequest, RejoinRequest, StopRequest,
};
use crate::protocol::failsafe::{ConfirmRequest, FailsafeMember, FailsafeMembersRequest};

/// The longest `wait_seconds` of a promotion (an hour: a promotion that takes longer failed).
pub const MAX_PROMOTE_WAIT_SECONDS: u64 = 3600;
/// A DNS name is at most 253 characters; an IPv6 literal much less.
pub const MAX_HOST_LEN: usize = 253;
/// PostgreSQL's `NAMEDATALEN - 1` (replication slot names).
pub const MAX_SLOT_LEN: usize = 63;
/// A fence reason, an instance name, an agent URL.
pub const MAX_TEXT_LEN: usize = 1024;
pub const MAX_PARAMETERS: usize = 1000;
pub const MAX_PARAMETER_NAME_LEN: usize = 128;
pub const MAX_PARAMETER_VALUE_LEN: usize = 8192;
pub const MAX_FAILSAFE_MEMBERS: usize = 64;
/// `deadline_unix_ms` must lie between the epoch and the year 9999 (so that comparing it with
/// a clock can never overflow).
pub const MAX_UNIX_MS: i64 = 253_402_300_799_999;

/// A request field outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {problem}")]
pub struct FieldError {
    /// The field's path in the body (`wait_seconds`, `members[2].postgres_port`).
    pub field: String,
    pub problem: String,
}

pub(crate) fn refuse(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A request body that knows its bounds.
pub trait Validate {
    fn validate(&self) -> Result<(), FieldError>;
}

fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(refuse(
            field,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(refuse(field, "contains control characters"));
    }
    Ok(())
}

fn non_empty_text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(refuse(field, "must not be empty"));
    }
    text(field, value, max)
}

fn host(field: &str, value: &str) -> Result<(), FieldError> {
    non_empty_text(field, value, MAX_HOST_LEN)?;
    if value.chars().any(char::is_whitespace) {
        return Err(refuse(field, "contains whitespace"));
    }
    Ok(())
}

fn port(field: &str, value: u16) -> Result<(), FieldError> {
    if value == 0 {
        return Err(refuse(field, "port 0 is not a port"));
    }
    Ok(())
}

/// A replication slot name, when given: 1 to [`MAX_SLOT_LEN`] lower-case letters, digits and
/// underscores.
pub(crate) fn slot(field: &str, value: Option<&str>) -> Result<(), FieldError> {
    let Some(value) = value else {
        return Ok(());
    };
    if value.is_empty() || value.len() > MAX_SLOT_LEN {
        return Err(refuse(
            field,
            format!("must be 1 to {MAX_SLOT_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(refuse(
            field,
            "may contain only lower-case letters, digits and underscores",
        ));
    }
    Ok(())
}

impl Validate for PromoteRequest {
    fn validate(&self) -> Result<(), FieldError> {
        match self.wait_seconds {
            Some(0) => Err(refuse("wait_seconds", "must be at least 1")),
            Some(seconds) if seconds > MAX_PROMOTE_WAIT_SECONDS => Err(refuse(
                "wait_seconds",
                format!("{seconds} is over the limit of {MAX_PROMOTE_WAIT_SECONDS}"),
            )),
            _ => Ok(()),
        }
    }
}

fn upstream(host_: &str, port_: u16, slot_: Option<&str>) -> Result<(), FieldError> {
    host("host", host_)?;
    port("port", port_)?;
    slot("slot", slot_)
}

impl Validate for FollowRequest {
    fn validate(&self) -> Result<(), FieldError> {
        upstream(&self.host, self.port, self.slot.as_deref())
    }
}

impl Validate for RejoinRequest {
    fn validate(&self) -> Result<(), FieldError> {
        upstream(&self.host, self.port, self.slot.as_deref())
    }
}

impl Validate for StopRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

impl Validate for FenceRequest {
    fn validate(&self) -> Result<(), FieldError> {
        match &self.reason {
            Some(reason) => text("reason", reason, MAX_TEXT_LEN),
            None => Ok(()),
        }
    }
}

impl Validate for ParametersRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.parameters.len() > MAX_PARAMETERS {
            return Err(refuse(
                "parameters",
                format!(
                    "{} parameters, at most {MAX_PARAMETERS} allowed",
                    self.parameters.len()
                ),
            ));
        }
        for (name, value) in &self.parameters {
            let field = format!("parameters.{}", printable(name));
            non_empty_text(&field, name, MAX_PARAMETER_NAME_LEN)?;
            text(&field, value, MAX_PARAMETER_VALUE_LEN)?;
        }
        Ok(())
    }
}

/// A name as it may appear in an error message: control characters escaped, cut short.
fn printable(name: &str) -> String {
    let escaped: String = name.chars().flat_map(char::escape_default).collect();
    match escaped.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped,
    }
}

impl Validate for FailsafeMembersRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.members.len() > MAX_FAILSAFE_MEMBERS {
            return Err(refuse(
                "members",
                format!(
                    "{} members, at most {MAX_FAILSAFE_MEMBERS} allowed",
                    self.members.len()
                ),
            ));
        }
        self.members
            .iter()
            .enumerate()
            .try_for_each(|(i, m)| member(i, m))
    }
}

fn member(i: usize, member: &FailsafeMember) -> Result<(), FieldError> {
    let field = |name: &str| format!("members[{i}].{name}");
    non_empty_text(&field("name"), &member.name, MAX_TEXT_LEN)?;
    non_empty_text(&field("agent_url"), &member.agent_url, MAX_TEXT_LEN)?;
    host(&field("postgres_host"), &member.postgres_host)?;
    port(&field("postgres_port"), member.postgres_port)
}

impl Validate for ConfirmRequest {
    fn validate(&self) -> Result<(), FieldError> {
        non_empty_text("primary", &self.primary, MAX_TEXT_LEN)?;
        host("host", &self.host)?;
        port("port", self.port)?;
        match self.deadline_unix_ms {
            Some(ms) if !(0..=MAX_UNIX_MS).contains(&ms) => Err(refuse(
                "deadline_unix_ms",
                format!("{ms} is outside 0..={MAX_UNIX_MS}"),
            )),
            _ => Ok(()),
        }
    }
}

/// Bodies of `POST /v1/start` and `POST /v1/restart`: nothing (or `{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

impl Validate for EmptyRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::StopMode;

    fn field_of<T: Validate>(request: &T) -> Option<String> {
        request.validate().err().map(|e| e.field)
    }

    #[test]
    fn promote_wait_is_bounded() {
        let wait = |w| PromoteRequest { wait_seconds: w };
        assert_eq!(field_of(&wait(None)), None);
        assert_eq!(field_of(&wait(Some(60))), None);
        assert_eq!(field_of(&wait(Some(MAX_PROMOTE_WAIT_SECONDS))), None);
        assert_eq!(field_of(&wait(Some(0))).as_deref(), Some("wait_seconds"));
        let error = wait(Some(u64::MAX)).validate().unwrap_err();
        assert_eq!(error.field, "wait_seconds");
        assert!(
            error.to_string().contains("18446744073709551615"),
            "{error}"
        );
    }

    #[test]
    fn upstreams_need_a_host_a_port_and_a_valid_slot() {
        let follow = |host: &str, port, slot: Option<&str>| FollowRequest {
            host: host.into(),
            port,
            slot: slot.map(Into::into),
        };
        assert_eq!(field_of(&follow("10.0.0.1", 5432, None)), None);
        assert_eq!(field_of(&follow("db-0.db", 5432, Some("pgrs_db_1"))), None);
        assert_eq!(field_of(&follow("", 5432, None)).as_deref(), Some("host"));
        assert_eq!(
            field_of(&follow("a b", 5432, None)).as_deref(),
            Some("host")
        );
        assert_eq!(
            field_of(&follow("a\nport=1", 5432, None)).as_deref(),
            Some("host")
        );
        assert_eq!(
            field_of(&follow(&"h".repeat(300), 5432, None)).as_deref(),
            Some("host")
        );
        assert_eq!(field_of(&follow("h", 0, None)).as_deref(), Some("port"));
        for bad in ["", "Upper", "x'y", &"s".repeat(64)] {
            assert_eq!(
                field_of(&follow("h", 5432, Some(bad))).as_deref(),
                Some("slot"),
                "{bad}"
            );
        }
        let rejoin = RejoinRequest {
            host: "h".into(),
            port: 0,
            slot: None,
        };
        assert_eq!(field_of(&rejoin).as_deref(), Some("port"));
    }

    #[test]
    fn texts_are_bounded() {
        assert_eq!(
            field_of(&StopRequest {
                mode: StopMode::Fast
            }),
            None
        );
        let fence = |r: &str| FenceRequest {
            reason: Some(r.into()),
        };
        assert_eq!(field_of(&fence("the operator said so")), None);
        assert_eq!(
            field_of(&fence(&"x".repeat(MAX_TEXT_LEN + 1))).as_deref(),
            Some("reason")
        );
        let parameters = |name: &str, value: &str| ParametersRequest {
            parameters: [(name.to_string(), value.to_string())].into(),
        };
        assert_eq!(field_of(&parameters("work_mem", "4MB")), None);
        assert_eq!(
            field_of(&parameters("work_mem", "4MB\nport = 1")).as_deref(),
            Some("parameters.work_mem")
        );
        assert_eq!(
            field_of(&parameters("a\nb", "1")).as_deref(),
            Some("parameters.a\\nb")
        );
        let many = ParametersRequest {
            parameters: (0..=MAX_PARAMETERS)
                .map(|i| (format!("p{i}"), "1".to_string()))
                .collect(),
        };
        assert_eq!(field_of(&many).as_deref(), Some("parameters"));
    }

    #[test]
    fn failsafe_requests_are_bounded() {
        let member = |port| FailsafeMember {
            name: "pg-1".into(),
            agent_url: "http://10.0.0.2:8008".into(),
            postgres_host: "10.0.0.2".into(),
            postgres_port: port,
        };
        let members = FailsafeMembersRequest {
            enabled: true,
            members: vec![member(5432), member(0)],
        };
        assert_eq!(
            field_of(&members).as_deref(),
            Some("members[1].postgres_port")
        );
        let confirm = |deadline| ConfirmRequest {
            primary: "pg-0".into(),
            host: "10.0.0.1".into(),
            port: 5432,
            deadline_unix_ms: deadline,
        };
        assert_eq!(field_of(&confirm(None)), None);
        assert_eq!(field_of(&confirm(Some(1_700_000_000_000))), None);
        for bad in [i64::MIN, -1, i64::MAX] {
            assert_eq!(
                field_of(&confirm(Some(bad))).as_deref(),
                Some("deadline_unix_ms")
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_every_request() {
        fn refused<T: serde::de::DeserializeOwned>(json: &str) -> String {
            match serde_json::from_str::<T>(json) {
                Ok(_) => panic!("{json} was accepted"),
                Err(error) => error.to_string(),
            }
        }
        assert!(refused::<PromoteRequest>(r#"{"wait_second": 5}"#).contains("wait_second"));
        assert!(refused::<FollowRequest>(r#"{"host":"h","port":1,"x":1}"#).contains("`x`"));
        assert!(refused::<RejoinRequest>(r#"{"host":"h","port":1,"x":1}"#).contains("`x`"));
        assert!(refused::<StopRequest>(r#"{"mod":"fast"}"#).contains("mod"));
        assert!(refused::<FenceRequest>(r#"{"reasons":"x"}"#).contains("reasons"));
        assert!(refused::<ParametersRequest>(r#"{"parameters":{},"x":1}"#).contains("`x`"));
        assert!(refused::<EmptyRequest>(r#"{"now":true}"#).contains("now"));
        assert!(
            refused::<FailsafeMembersRequest>(r#"{"enabled":true,"members":[],"x":1}"#)
                .contains("`x`")
        );
        assert!(
            refused::<FailsafeMembersRequest>(
                r#"{"enabled":true,"members":[{"name":"a","agent_url":"u","postgres_host":"h","postgres_port":1,"x":1}]}"#
            )
            .contains("`x`")
        );
        assert!(
            refused::<ConfirmRequest>(r#"{"primary":"p","host":"h","port":1,"x":1}"#)
                .contains("`x`")
        );
        // A number too large for its type is refused by the parser.
        assert!(refused::<PromoteRequest>(r#"{"wait_seconds": 1e400}"#).contains("number"));
        refused::<PromoteRequest>(r#"{"wait_seconds": 184467440737095516150}"#);
        refused::<PromoteRequest>(r#"{"wait_seconds": -1}"#);
        refused::<FollowRequest>(r#"{"host":"h","port":70000}"#);
    }
}
