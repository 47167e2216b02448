//! What the control loop carries from one round to the next and persists before it acts on it:
//! the engine's memory (last primary position, recorded sync quorum, switchover plan), former
//! primaries, the `synchronous_standby_names` applied per primary, the last holder seen.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::engine::{Memory, SyncSet};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlState {
    pub memory: Memory,
    /// Instances seen running as primary while not holding the lease since their last rejoin:
    /// they rejoin (rewind or re-clone) rather than merely follow.
    pub former_primaries: BTreeSet<String>,
    /// `synchronous_standby_names` last applied per primary.
    pub applied_sync: BTreeMap<String, SyncSet>,
    /// The last lease holder seen.
    pub last_holder: Option<String>,
}

impl ControlState {
    /// Parses a persisted state; the error names what is wrong.
    pub fn from_json(text: &str) -> Result<ControlState, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Forgets instances that left the cluster.
    pub fn retain(&mut self, instances: &[String]) {
        self.former_primaries.retain(|n| instances.contains(n));
        self.applied_sync.retain(|n, _| instances.contains(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_its_json_and_bad_json_is_an_error() {
        let mut state = ControlState::default();
        state.memory.recorded_sync = SyncSet {
            k: 1,
            members: vec!["b".into(), "c".into()],
        };
        state.former_primaries.insert("a".into());
        state.last_holder = Some("b".into());
        let back = ControlState::from_json(&state.to_json()).expect("parses");
        assert_eq!(back, state);
        assert!(ControlState::from_json("{\"memory\": 3}").is_err());
        // The file local mode wrote before this module existed has the same shape.
        let old = r#"{"memory":{"last_primary":null,"recorded_sync":{"k":0,"members":[]},"switchover":null},"formerPrimaries":["x"],"appliedSync":{},"lastHolder":"y"}"#;
        let parsed = ControlState::from_json(old).expect("old format");
        assert!(parsed.former_primaries.contains("x"));
    }
}
