//! Former primaries: instances that must rejoin (pg_rewind or re-clone) rather than merely
//! follow, because they may hold WAL the new primary never received. Pure; both controllers (local
//! and the operator) carry the set from one round to the next.

use std::collections::BTreeSet;

use super::model::{EngineInput, ObservedRole};

/// Updates `former_primaries` from what this round saw: a holder that lost the lease, or an
/// instance running as primary while another one holds it. The current holder is never a former
/// primary. `last_holder` is the holder seen in an earlier round.
pub fn track_former_primaries(
    former_primaries: &mut BTreeSet<String>,
    last_holder: &mut Option<String>,
    input: &EngineInput,
) {
    let holder = input.lease.holder.clone();
    if let Some(previous) = last_holder.clone()
        && holder.as_ref() != Some(&previous)
    {
        former_primaries.insert(previous);
    }
    if holder.is_some() {
        last_holder.clone_from(&holder);
    }
    for instance in &input.instances {
        if instance.role == ObservedRole::Primary
            && instance.reachable
            && holder.is_some()
            && holder.as_deref() != Some(&instance.name)
        {
            former_primaries.insert(instance.name.clone());
        }
    }
    if let Some(holder) = &holder {
        former_primaries.remove(holder);
    }
}
