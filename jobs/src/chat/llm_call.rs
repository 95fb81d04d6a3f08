//! `llm_call {request_id, user_id, messages, hint?, max_tokens?}`: one LLM call for the
//! chat API, routed to a provider with fallback, charged exactly once.
//!
//! The run, in order:
//! 1. **A stored answer?** If `llm_answers` holds one for `request_id` (a retry after a
//!    crash between the answer and the charge, or the same request sent again), no
//!    provider is called: go to 4.
//! 2. **Pre-call checks** against the first provider's price at the effective max
//!    output tokens (`max_tokens`, capped by the tier): `request_too_expensive` (413)
//!    and `insufficient_credits` (402). A fallback provider is tried only if the
//!    balance also covers its own worst case.
//! 3. **Attempts** along the route (hint or default first, then its fallback chain).
//!    Every attempt is written to `llm_attempts` as it ends, failed ones included, in
//!    its own transaction (they stand whatever becomes of the job). A 429, 5xx,
//!    timeout, stalled stream, malformed answer, connection failure or a provider-setup
//!    4xx moves on; a 4xx that is the request's fault (400/413/422) ends the call with
//!    `provider_rejected_request`; when all fail, `all_providers_failed` lists each
//!    attempt's reason. The first answer is stored in `llm_answers` at once, in its
//!    own transaction, **before** the charge.
//! 4. **Charge and complete together**: the actual cost (the provider's usage, the
//!    provider's price) is charged once per `request_id` in the job's completion
//!    transaction, so the charge and the acknowledgement commit or roll back as one.
//!    A repeated request returns the same answer and charges nothing more.
//!
//! Refusals and provider failures are answers to the chat API, not faults of the fleet:
//! the job is done with `{"error": {code, status, message, …}}` as its result (the chat
//! API is waiting on it; a retry minutes later would answer nobody). Only a fault of
//! the fleet itself (the database) is retried.
//!
//! Two jobs of one `request_id` running at the same moment (the chat API re-sent it
//! without an `Idempotency-Key`, so the ingress made two jobs) may both call a provider;
//! the first stored answer wins, both return it, and it is charged once. With the
//! request_id as the Idempotency-Key (as docs/chat.md asks) there is one job.
//!
//! If the balance no longer covers the cost when the answer arrives (other calls of the
//! same user were charged meanwhile), the answer is withheld with
//! `insufficient_credits` and stays stored: the same `request_id` after a top-up gets it
//! without a second provider call. A balance never goes below zero.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::config::{Chat, Hint};
use super::credits::{self, Charge, Refusal};
use crate::clients::llm::{ChatRequest, Completion, Message, ProviderError};

/// The conversation: at least one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Message>", into = "Vec<Message>")]
pub struct Messages(Vec<Message>);

impl TryFrom<Vec<Message>> for Messages {
    type Error = &'static str;
    fn try_from(v: Vec<Message>) -> Result<Self, Self::Error> {
        if v.is_empty() {
            return Err("messages must hold at least one message");
        }
        Ok(Messages(v))
    }
}

impl From<Messages> for Vec<Message> {
    fn from(m: Messages) -> Self {
        m.0
    }
}

impl Messages {
    pub fn as_slice(&self) -> &[Message] {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmCall {
    /// The idempotency key of the call: one answer and one charge per request_id.
    pub request_id: Uuid,
    pub user_id: Uuid,
    pub messages: Messages,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<Hint>,
    /// At most the tier's limit; the tier's limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<NonZeroU32>,
}

impl JobArgs for LlmCall {
    const KIND: &'static str = "llm_call";
    const PUBLIC: bool = true;
}

/// The result of an answered call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmAnswer {
    pub provider: String,
    pub model: String,
    pub content: String,
    pub input_tokens: i32,
    pub output_tokens: i32,
    pub credits_charged: i64,
    /// The user's balance after the charge.
    pub balance: i64,
    pub usage_estimated: bool,
    pub finish_reason: Option<String>,
}

/// One failed attempt, as the result lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptFailure {
    pub provider: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub error: String,
}

pub struct LlmCallHandler(pub Arc<Chat>);

/// A stored answer (`llm_answers`).
#[derive(Debug, Clone, sqlx::FromRow)]
struct Stored {
    user_id: Uuid,
    provider: String,
    model: String,
    content: String,
    input_tokens: i32,
    output_tokens: i32,
    usage_estimated: bool,
    finish_reason: Option<String>,
}

fn error_result(code: &str, status: u16, message: String, extra: Value) -> Value {
    let mut e = json!({"code": code, "status": status, "message": message});
    if let (Value::Object(e), Value::Object(x)) = (&mut e, extra) {
        e.extend(x);
    }
    json!({ "error": e })
}

/// Completes with `result` and releases the call's hold, in the job's transaction.
async fn released(
    ctx: &mut JobContext,
    user: Uuid,
    request_id: Uuid,
    result: Value,
) -> Result<Outcome, JobError> {
    credits::release(ctx.tx().await?, user, request_id).await?;
    Outcome::done_with(result)
}

fn user_forbidden(request_id: Uuid, principal: &str) -> Value {
    tracing::warn!(%request_id, principal, "llm_call for a user of another caller refused");
    error_result(
        "user_forbidden",
        403,
        "this user_id belongs to another caller".into(),
        json!({}),
    )
}

fn refusal_result(r: &Refusal) -> Value {
    error_result(
        r.code,
        r.status,
        r.message.clone(),
        json!({"balance": r.balance, "required": r.required}),
    )
}

async fn stored_answer(pool: &PgPool, request_id: Uuid) -> Result<Option<Stored>, sqlx::Error> {
    sqlx::query_as(
        r#"SELECT user_id, provider, model, content, input_tokens, output_tokens, usage_estimated, finish_reason
         FROM llm_answers WHERE request_id = $1"#,
    )
    .bind(request_id)
    .fetch_optional(pool)
    .await
}

struct Attempt<'a> {
    provider: &'a str,
    model: &'a str,
    outcome: Result<&'a Completion, &'a ProviderError>,
    latency_ms: i32,
}

/// Writes one attempt in its own transaction; returns its id.
async fn record_attempt(
    pool: &PgPool,
    a: &LlmCall,
    job_id: i64,
    at: &Attempt<'_>,
) -> Result<i64, sqlx::Error> {
    let (status, http, tokens, error) = match at.outcome {
        Ok(c) => (
            "ok",
            None,
            Some((
                i32::try_from(c.input_tokens).unwrap_or(i32::MAX),
                i32::try_from(c.output_tokens).unwrap_or(i32::MAX),
            )),
            None,
        ),
        Err(e) => (
            e.failure.as_str(),
            e.http_status.map(i32::from),
            None,
            Some(e.message.as_str()),
        ),
    };
    metrics::counter!(crate::telemetry::LLM_ATTEMPTS, "provider" => at.provider.to_string(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::telemetry::LLM_ATTEMPT_SECONDS, "provider" => at.provider.to_string())
        .record(f64::from(at.latency_ms) / 1000.0);
    sqlx::query_scalar(
        r#"INSERT INTO llm_attempts (request_id, job_id, provider, model, status, http_status, input_tokens, output_tokens, latency_ms, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id"#,
    )
    .bind(a.request_id)
    .bind(job_id)
    .bind(at.provider)
    .bind(at.model)
    .bind(status)
    .bind(http)
    .bind(tokens.map(|t| t.0))
    .bind(tokens.map(|t| t.1))
    .bind(at.latency_ms)
    .bind(error)
    .fetch_one(pool)
    .await
}

/// Stores the answer before anything is charged. A concurrent run of the same request
/// may have stored one first: that one stands, and is returned.
async fn store_answer(
    pool: &PgPool,
    a: &LlmCall,
    provider: &str,
    c: &Completion,
    attempt_id: i64,
) -> Result<Stored, sqlx::Error> {
    // With its tombstone (llm_requests), which outlives the answer's retention.
    sqlx::query(
        r#"WITH answer AS (
           INSERT INTO llm_answers (request_id, user_id, provider, model, content, input_tokens, output_tokens, usage_estimated, finish_reason, attempt_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (request_id) DO NOTHING
           RETURNING request_id, user_id)
         INSERT INTO llm_requests (request_id, user_id) SELECT request_id, user_id FROM answer
         ON CONFLICT (request_id) DO NOTHING"#,
    )
    .bind(a.request_id)
    .bind(a.user_id)
    .bind(provider)
    .bind(&c.model)
    .bind(&c.content)
    .bind(i32::try_from(c.input_tokens).unwrap_or(i32::MAX))
    .bind(i32::try_from(c.output_tokens).unwrap_or(i32::MAX))
    .bind(c.usage_estimated)
    .bind(&c.finish_reason)
    .bind(attempt_id)
    .execute(pool)
    .await?;
    stored_answer(pool, a.request_id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

impl LlmCallHandler {
    /// Step 4: charge the stored answer once and complete, in the job's transaction.
    async fn settle(
        &self,
        a: &LlmCall,
        s: Stored,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        let cfg = &self.0.cfg.credits;
        if s.user_id != a.user_id {
            return Outcome::done_with(error_result(
                "request_id_conflict",
                409,
                "this request_id was answered for another user".into(),
                json!({}),
            ));
        }
        let price = cfg
            .prices
            .get(&s.provider)
            .ok_or_else(|| JobError::fail(format!("provider {:?} has no price", s.provider)))?;
        let cost = price.credits(s.input_tokens as u32, s.output_tokens as u32);
        let units = json!({"input_tokens": s.input_tokens, "output_tokens": s.output_tokens});
        let tx = ctx.tx().await?;
        // The charge is the actual cost (the provider's usage at its price), not clamped
        // to the hold: the hold's input side is an estimate, and clamping would leave
        // real input unbilled. It never takes the balance below zero nor what other
        // calls hold (else the answer is withheld until a top-up). The hold then gives
        // way in the same transaction (the account is locked first, as at the
        // pre-check, so the two cannot deadlock).
        let charged =
            credits::charge(tx, cfg, a.user_id, a.request_id, cost, &s.provider, units).await?;
        credits::release(tx, a.user_id, a.request_id).await?;
        let (credits_charged, balance) = match charged {
            Charge::Charged { credits, balance } => {
                metrics::counter!(crate::telemetry::LLM_CREDITS_CHARGED, "provider" => s.provider.clone())
                    .increment(credits as u64);
                (credits, balance)
            }
            // A repeat: the balance is read now (the charge was earlier).
            Charge::AlreadyCharged { credits } => (credits, credits::balance(tx, a.user_id).await?),
            Charge::Insufficient { balance, credits } => {
                tracing::warn!(request_id = %a.request_id, balance, credits, "the balance no longer covers the answer; it is withheld");
                return Outcome::done_with(error_result(
                    "insufficient_credits",
                    402,
                    format!(
                        "the answer costs {credits} credits and the balance is {balance}; it is kept for this request_id until the balance covers it"
                    ),
                    json!({"balance": balance, "required": credits}),
                ));
            }
        };
        Outcome::done_with(LlmAnswer {
            provider: s.provider,
            model: s.model,
            content: s.content,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            credits_charged,
            balance,
            usage_estimated: s.usage_estimated,
            finish_reason: s.finish_reason,
        })
    }
}

impl Handler for LlmCallHandler {
    type Args = LlmCall;

    async fn handle(&self, a: LlmCall, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let chat = &self.0;
        chat.describe_once();
        let pool = ctx.pool().clone();
        // 0. Another caller's user: not its answers, not its balance, not its credits.
        if let Some(p) = &ctx.principal {
            let owner: Option<Option<String>> =
                sqlx::query_scalar("SELECT owner FROM credit_accounts WHERE user_id = $1")
                    .bind(a.user_id)
                    .fetch_optional(&pool)
                    .await?;
            if let Some(Some(o)) = owner
                && o != *p
            {
                return Outcome::done_with(user_forbidden(a.request_id, p));
            }
        }
        // 1. An answer from an earlier run.
        if let Some(s) = stored_answer(&pool, a.request_id).await? {
            tracing::info!(request_id = %a.request_id, provider = %s.provider, "answer already stored; not calling a provider again");
            return self.settle(&a, s, ctx).await;
        }
        // An answer pruned after its retention: the request was served (and charged)
        // then. Calling again would be a free answer, for its user or anyone else.
        let tombstone: Option<(Uuid, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT user_id, answered_at FROM llm_requests WHERE request_id = $1")
                .bind(a.request_id)
                .fetch_optional(&pool)
                .await?;
        if let Some((user, at)) = tombstone {
            return Outcome::done_with(if user == a.user_id {
                error_result(
                    "request_expired",
                    410,
                    format!(
                        "this request_id was answered at {at} and its answer is past the retention; send a new request_id"
                    ),
                    json!({}),
                )
            } else {
                error_result(
                    "request_id_conflict",
                    409,
                    "this request_id was answered for another user".into(),
                    json!({}),
                )
            });
        }
        // 2. The pre-call checks (the account is opened with its bonus on first use),
        // and the hold: under the account's lock, the worst case is checked against
        // the balance less what other calls in flight hold, and held, so parallel
        // calls cannot all pass on the same credits.
        let cfg = &chat.cfg.credits;
        let mut tx = pool.begin().await?;
        let tier = credits::open_account(&mut tx, a.user_id, cfg).await?;
        // A user is its first ingress caller's: another caller can neither spend its
        // credits nor see its balance.
        if let Some(p) = &ctx.principal
            && !credits::owned_by(&mut tx, a.user_id, p).await?
        {
            tx.rollback().await?;
            return Outcome::done_with(user_forbidden(a.request_id, p));
        }
        let balance = credits::balance(&mut tx, a.user_id).await?;
        let available = balance
            - credits::held_by_others(&mut tx, a.user_id, a.request_id, cfg.hold_ttl).await?;
        let tier_max = cfg.max_output_tokens.max_output_tokens(tier);
        let max_tokens = a.max_tokens.map_or(tier_max, |m| m.get().min(tier_max));
        let req = ChatRequest {
            messages: a.messages.as_slice(),
            max_tokens,
        };
        let input_estimate = req.estimated_input_tokens();
        let route = chat.cfg.route(a.hint);
        let worst = |name: &str| cfg.prices[name].credits(input_estimate, max_tokens);
        if let Err(r) = credits::check(
            cfg,
            &cfg.prices[route[0]],
            available,
            input_estimate,
            max_tokens,
        ) {
            tx.rollback().await?;
            tracing::info!(request_id = %a.request_id, code = r.code, "llm call refused before calling");
            return Outcome::done_with(refusal_result(&r));
        }
        // Enough for the dearest provider of the route the credits cover (fallbacks
        // beyond it are skipped).
        let held = route
            .iter()
            .map(|n| worst(n))
            .filter(|w| *w <= available && *w <= cfg.max_per_request)
            .fold(worst(route[0]), i64::max);
        credits::hold(&mut tx, a.user_id, a.request_id, held).await?;
        tx.commit().await?;
        // 3. The attempts.
        let mut failures: Vec<AttemptFailure> = Vec::new();
        for (i, name) in route.iter().enumerate() {
            if i > 0 && worst(name) > held {
                failures.push(AttemptFailure {
                    provider: name.to_string(),
                    status: "skipped",
                    http_status: None,
                    error: format!(
                        "not tried: its worst case of {} credits is more than the {held} the balance could hold",
                        worst(name)
                    ),
                });
                continue;
            }
            let provider = &chat.providers[*name];
            let started = Instant::now();
            let outcome = tokio::select! {
                r = provider.complete(&req) => r,
                _ = ctx.cancel.cancelled() => {
                    return Err(JobError::retry("cancelled during a provider call (shutdown, lost lease or an operator's cancel)"));
                }
            };
            let latency_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
            let attempt = Attempt {
                provider: name,
                model: outcome
                    .as_ref()
                    .map_or(provider.model(), |c| c.model.as_str()),
                outcome: outcome.as_ref(),
                latency_ms,
            };
            let attempt_id = record_attempt(&pool, &a, ctx.job_id, &attempt).await?;
            match outcome {
                Ok(c) => {
                    let s = store_answer(&pool, &a, name, &c, attempt_id).await?;
                    return self.settle(&a, s, ctx).await;
                }
                Err(e) => {
                    tracing::warn!(request_id = %a.request_id, provider = name, error = %e, "llm attempt failed");
                    let rejected = !e.failure.falls_back();
                    failures.push(AttemptFailure {
                        provider: name.to_string(),
                        status: e.failure.as_str(),
                        http_status: e.http_status,
                        error: e.message.clone(),
                    });
                    if rejected {
                        return released(
                            ctx,
                            a.user_id,
                            a.request_id,
                            error_result(
                                "provider_rejected_request",
                                e.http_status.unwrap_or(400),
                                format!("{name} rejected the request: {}", e.message),
                                json!({"attempts": failures}),
                            ),
                        )
                        .await;
                    }
                }
            }
        }
        let summary = failures
            .iter()
            .map(|f| format!("{}: {}", f.provider, f.status))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(request_id = %a.request_id, %summary, "all providers failed");
        released(
            ctx,
            a.user_id,
            a.request_id,
            error_result(
                "all_providers_failed",
                502,
                format!("every provider failed ({summary})"),
                json!({"attempts": failures}),
            ),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_are_checked_at_the_door() {
        let ok = json!({
            "request_id": "7d8f4e2a-1111-4c3b-9a57-0f7c1d2e3f40",
            "user_id": "0b7e0a52-2222-4c3b-9a57-0f7c1d2e3f40",
            "messages": [{"role": "user", "content": "hi"}],
            "hint": "deep",
            "max_tokens": 200,
        });
        let a: LlmCall = serde_json::from_value(ok.clone()).unwrap();
        assert_eq!(a.hint, Some(Hint::Deep));
        assert_eq!(serde_json::to_value(&a).unwrap(), ok, "round trip");
        let bad = |patch: Value, want: &str| {
            let mut v = ok.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = serde_json::from_value::<LlmCall>(v)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(json!({"messages": []}), "at least one message");
        bad(
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "unknown variant",
        );
        bad(json!({"hint": "fast"}), "unknown variant");
        bad(json!({"max_tokens": 0}), "nonzero");
        bad(json!({"request_id": "42"}), "UUID");
        // Unknown fields are refused at the door by the registry's strict check and
        // ignored by workers (tests/settling.rs), not by the type itself.
        let mut extra = ok.clone();
        extra["extra"] = json!(1);
        assert!(serde_json::from_value::<LlmCall>(extra).is_ok());
    }

    #[test]
    fn error_results_carry_code_status_and_detail() {
        let v = error_result(
            "all_providers_failed",
            502,
            "m".into(),
            json!({"attempts": []}),
        );
        assert_eq!(
            v,
            json!({"error": {"code": "all_providers_failed", "status": 502, "message": "m", "attempts": []}})
        );
    }
}
