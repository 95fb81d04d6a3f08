//! Outside services, each behind a trait with a production client and a dev simulator.

pub mod chain;
pub mod chain_sim;
