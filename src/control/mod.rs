//! The control loop, between the platforms and the engine, once for both: *observe* (agent
//! reports → the engine's input), *decide* (`engine::decide`), *persist* (the state the
//! decision relies on, before acting), *act* (the actions, bounded). Local mode and the
//! operator are adapters that implement [`Platform`].

pub mod actuate;
pub mod failsafe;
pub mod observe;
pub mod platform;
pub mod reports;
pub mod round;
pub mod state;

#[cfg(test)]
mod tests;

pub use actuate::{ActError, Bounds, Completed, Shared};
pub use observe::{Addresses, observed_role, standby_lag, upstream_of};
pub use platform::{
    AgentApi, CallError, Clock, ControlEvent, MonotonicClock, PersistError, Platform,
};
pub use reports::{Report, Reports};
pub use round::{ControlLoop, Observation, Outcome, RoundError, is_urgent};
pub use state::ControlState;
