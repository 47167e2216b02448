//! PostgreSQL's own state words, typed: `pg_stat_wal_receiver.status`,
//! `pg_stat_replication.state` and `pg_stat_replication.sync_state`. They travel unchanged
//! (lowercase) in the agent's status; a word a newer server adds reads as `Unknown`, never as
//! a state it is not.

use serde::{Deserialize, Serialize};

/// `pg_stat_wal_receiver.status` on a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalReceiverState {
    Streaming,
    Starting,
    Waiting,
    Restarting,
    Stopping,
    Stopped,
    #[serde(other)]
    Unknown,
}

impl WalReceiverState {
    pub fn parse(text: &str) -> Self {
        match text {
            "streaming" => Self::Streaming,
            "starting" => Self::Starting,
            "waiting" => Self::Waiting,
            "restarting" => Self::Restarting,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            _ => Self::Unknown,
        }
    }

    pub fn is_streaming(self) -> bool {
        self == Self::Streaming
    }
}

/// `pg_stat_replication.state`: what a WAL sender on the primary is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SenderState {
    Startup,
    Catchup,
    Streaming,
    Backup,
    Stopping,
    #[serde(other)]
    Unknown,
}

impl SenderState {
    pub fn parse(text: &str) -> Self {
        match text {
            "startup" => Self::Startup,
            "catchup" => Self::Catchup,
            "streaming" => Self::Streaming,
            "backup" => Self::Backup,
            "stopping" => Self::Stopping,
            _ => Self::Unknown,
        }
    }
}

/// How a standby is treated by the primary's `synchronous_standby_names`
/// (`pg_stat_replication.sync_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    Async,
    Potential,
    Sync,
    Quorum,
}

impl SyncState {
    /// `None` for a word PostgreSQL does not use.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "async" => Some(Self::Async),
            "potential" => Some(Self::Potential),
            "sync" => Some(Self::Sync),
            "quorum" => Some(Self::Quorum),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Potential => "potential",
            Self::Sync => "sync",
            Self::Quorum => "quorum",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_json_and_unknown_words_stay_unknown() {
        for word in [
            "streaming",
            "starting",
            "waiting",
            "restarting",
            "stopping",
            "stopped",
        ] {
            let state = WalReceiverState::parse(word);
            assert_ne!(state, WalReceiverState::Unknown, "{word}");
            assert_eq!(serde_json::to_value(state).unwrap(), word);
        }
        let later: WalReceiverState = serde_json::from_value("paused".into()).unwrap();
        assert_eq!(later, WalReceiverState::Unknown);
        assert_eq!(SenderState::parse("catchup"), SenderState::Catchup);
        assert_eq!(SenderState::parse("elsewhere"), SenderState::Unknown);
        for word in ["async", "potential", "sync", "quorum"] {
            assert_eq!(SyncState::parse(word).map(SyncState::as_str), Some(word));
        }
        assert_eq!(SyncState::parse(""), None);
    }
}
