//! Outside services, each behind a trait with a production client and a dev simulator.

pub mod chain;
#[cfg(feature = "solana-rpc")]
pub mod chain_rpc;
pub mod chain_sim;
pub mod cryptometer;
pub mod kingfisher;
pub mod market;
pub mod market_sim;
