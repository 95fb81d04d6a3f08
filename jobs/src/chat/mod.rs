//! The chat pipeline (../shared/SPEC-CHAT.md). Built so far:
//! - [`credits`]: the credits ledger, the pricing formula, tiers, the pre-call checks
//!   and the exactly-once charge (`longshore credits grant|balance`).
//!
//! Not yet (issue 7): the `llm_call` job, provider routing and fallback over
//! async-openai, `llm_attempts`, the echo provider for dev.

pub mod credits;
