//! The chat pipeline (../shared/SPEC-CHAT.md): LLM calls handed over by the chat API.
//! - [`llm_call`]: the job: routing, fallback, attempts, the stored answer and the
//!   exactly-once charge.
//! - [`config`]: `[chat]`, the providers and routes.
//! - [`prune_llm`]: the retention of attempts and stored answers.
//! - [`credits`]: the ledger, prices, tiers, pre-call checks and the charge
//!   (`longshore credits grant|balance`).
//!
//! Providers are in `clients::llm` (OpenAI-compatible, async-openai) and
//! `clients::llm_echo` (the dev simulator).

pub mod config;
pub mod credits;
pub mod llm_call;
pub mod prune_llm;
