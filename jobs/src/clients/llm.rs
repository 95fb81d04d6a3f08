//! LLM providers: OpenAI-compatible chat completions (`POST {base_url}/chat/completions`)
//! through `async-openai`, behind the [`ChatProvider`] trait that the echo simulator
//! ([`super::llm_echo`]) also implements.
//!
//! - Any OpenAI-compatible server works by configuration alone: xAI, OpenAI,
//!   Anthropic's OpenAI-compatible endpoint, vLLM, a local fake.
//! - Streaming (the default) asks for `stream_options.include_usage`, so the provider's
//!   own token counts arrive in the last chunk. Three clocks bound a call:
//!   `first_token_timeout` (a server that accepts and then says nothing),
//!   `token_timeout` between two chunks (a stalled stream) and `timeout` for the whole
//!   answer. Without streaming, `first_token_timeout` bounds the whole answer.
//! - async-openai's default transport retries 429 and 5xx three times with backoff; it is
//!   replaced by the bare transport (`ReqwestService`), so a failure is returned at
//!   once, classified as a [`Failure`], and the router moves to the next provider. The
//!   fallback chain is the retry policy.
//! - The API key goes only into the `Authorization` header. Errors carry the provider's
//!   message and status, never the key or the request; `Debug` shows the base URL's
//!   origin only.

use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, FinishReason,
};
use async_trait::async_trait;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::chat::credits::estimate_input_tokens;

/// Who wrote a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One call: the conversation and the most output tokens to generate.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    pub messages: &'a [Message],
    pub max_tokens: u32,
}

impl ChatRequest<'_> {
    /// Input tokens as [`estimate_input_tokens`] counts them.
    pub fn estimated_input_tokens(&self) -> u32 {
        let chars: usize = self.messages.iter().map(|m| m.content.len()).sum();
        estimate_input_tokens(chars, self.messages.len())
    }
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub model: String,
    pub content: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// The provider reported no usage; the counts are estimates (chars / 4).
    pub usage_estimated: bool,
    pub finish_reason: Option<String>,
}

/// Why an attempt failed. Everything but [`Failure::Rejected`] moves on to the next
/// provider; a rejected request would be rejected by any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 429.
    RateLimited,
    /// 5xx.
    ServerError,
    /// No first token (or, without streaming, no answer) in time; a 408; the whole
    /// call over its limit.
    Timeout,
    /// The stream stopped between two tokens for longer than `token_timeout`.
    Stalled,
    /// The answer is not a chat completion (bad JSON, an unknown event, no content).
    Malformed,
    /// Connection refused or reset, DNS, TLS.
    Unavailable,
    /// A 4xx that is the provider's setup, not the request: 401, 403, 404 (model), 409.
    Refused,
    /// A 4xx that is the request's fault (400, 413, 422): no fallback.
    Rejected,
}

impl Failure {
    /// The `llm_attempts.status` of this failure.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::RateLimited => "rate_limited",
            Failure::ServerError => "server_error",
            Failure::Timeout => "timeout",
            Failure::Stalled => "stalled",
            Failure::Malformed => "malformed",
            Failure::Unavailable => "unavailable",
            Failure::Refused => "refused",
            Failure::Rejected => "rejected",
        }
    }

    pub fn falls_back(self) -> bool {
        self != Failure::Rejected
    }

    /// The class of an HTTP error status.
    pub fn of_status(status: u16) -> Failure {
        match status {
            429 => Failure::RateLimited,
            408 => Failure::Timeout,
            400 | 413 | 422 => Failure::Rejected,
            500..=599 => Failure::ServerError,
            _ => Failure::Refused,
        }
    }
}

/// A failed attempt: its class, the HTTP status if there was one, and what the
/// provider said (shortened).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}: {message}", .failure.as_str(), .http_status.map(|s| format!(" ({s})")).unwrap_or_default())]
pub struct ProviderError {
    pub failure: Failure,
    pub http_status: Option<u16>,
    pub message: String,
}

impl ProviderError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        ProviderError {
            failure,
            http_status: None,
            message: shorten(message.into()),
        }
    }
}

/// Provider messages can be long (a whole HTML error page); 300 characters say enough.
fn shorten(mut s: String) -> String {
    const MAX: usize = 300;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A chat-completions provider.
#[async_trait]
pub trait ChatProvider: Send + Sync {
    /// For the start-up log: what it is and where it points (no secrets).
    fn describe(&self) -> String;
    /// The configured model name.
    fn model(&self) -> &str;
    async fn complete(&self, req: &ChatRequest<'_>) -> Result<Completion, ProviderError>;
}

/// How a provider is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// An OpenAI-compatible server at `base_url`.
    Openai,
    /// The built-in echo simulator (`longshore dev`): answers with the last user message.
    Echo,
}

fn yes() -> bool {
    true
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
fn d_first_token() -> Duration {
    secs(30)
}
fn d_token() -> Duration {
    secs(15)
}
fn d_total() -> Duration {
    secs(120)
}

/// `[chat.providers.<name>]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// `https://api.x.ai/v1`; the path `/chat/completions` is appended.
    #[serde(default)]
    pub base_url: String,
    /// `LONGSHORE__CHAT__PROVIDERS__<NAME>__API_KEY`. Never logged.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    pub model: String,
    /// Stream the answer (needed for the per-token timeout).
    #[serde(default = "yes")]
    pub stream: bool,
    #[serde(default = "d_first_token", with = "humantime_serde")]
    pub first_token_timeout: Duration,
    #[serde(default = "d_token", with = "humantime_serde")]
    pub token_timeout: Duration,
    #[serde(default = "d_total", with = "humantime_serde")]
    pub timeout: Duration,
    /// Echo only: how long the simulator takes to answer.
    #[serde(default, with = "humantime_serde")]
    pub echo_delay: Duration,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("base_url", &super::url_origin(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("model", &self.model)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// An OpenAI-compatible provider over async-openai.
pub struct OpenAiProvider {
    name: String,
    client: Client<OpenAIConfig>,
    origin: String,
    model: String,
    stream: bool,
    first_token_timeout: Duration,
    token_timeout: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// async-openai's reqwest is built without a TLS crypto provider of its own; the
/// process uses ring (as our other HTTP clients do). Installing it twice is harmless.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl OpenAiProvider {
    pub fn new(name: &str, cfg: &ProviderConfig) -> Result<Self, String> {
        let base = cfg.base_url.trim().trim_end_matches('/').to_string();
        let origin = super::url_origin(&base)
            .filter(|_| base.starts_with("http://") || base.starts_with("https://"))
            .ok_or("base_url is not an http(s) URL")?;
        if cfg.model.trim().is_empty() {
            return Err("model is empty".into());
        }
        let key = cfg
            .api_key
            .as_ref()
            .map(|k| k.expose_secret().to_string())
            .unwrap_or_default();
        // It goes into a header: anything but visible ASCII would be refused there.
        if !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err("api_key holds characters that cannot go into a header".into());
        }
        if key.is_empty() {
            // Info, not a warning: the defaults name the real providers without keys, and
            // a worker started on the defaults must not warn about itself. A call made
            // without a key that needs one fails as a 401 attempt, which is recorded.
            tracing::info!(provider = name, %origin, "no api_key for this provider; calls go without one (fine for a local server)");
        }
        install_crypto_provider();
        // Explicit org and project (empty): OpenAIConfig::new() would read OPENAI_* from
        // the environment and send them to every provider.
        let config = OpenAIConfig::new()
            .with_api_base(base)
            .with_api_key(key)
            .with_org_id("")
            .with_project_id("");
        Ok(OpenAiProvider {
            name: name.to_string(),
            client: Client::with_config(config).with_http_service(ReqwestService::default()),
            origin,
            model: cfg.model.clone(),
            stream: cfg.stream,
            first_token_timeout: cfg.first_token_timeout,
            token_timeout: cfg.token_timeout,
            timeout: cfg.timeout,
        })
    }

    fn request(&self, req: &ChatRequest<'_>) -> CreateChatCompletionRequest {
        let messages = req
            .messages
            .iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestMessage::System(
                    ChatCompletionRequestSystemMessage::from(m.content.as_str()),
                ),
                Role::User => ChatCompletionRequestMessage::User(
                    ChatCompletionRequestUserMessage::from(m.content.as_str()),
                ),
                Role::Assistant => ChatCompletionRequestMessage::Assistant(
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()),
                ),
            })
            .collect();
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            max_completion_tokens: Some(req.max_tokens),
            stream_options: self.stream.then_some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn call_json(
        &self,
        body: CreateChatCompletionRequest,
        req: &ChatRequest<'_>,
    ) -> Result<Completion, ProviderError> {
        let limit = self.first_token_timeout.min(self.timeout);
        let r = tokio::time::timeout(limit, self.client.chat().create(body))
            .await
            .map_err(|_| {
                ProviderError::new(Failure::Timeout, format!("no answer within {limit:?}"))
            })?
            .map_err(classify)?;
        let choice =
            r.choices.into_iter().next().ok_or_else(|| {
                ProviderError::new(Failure::Malformed, "the answer has no choices")
            })?;
        let content = choice.message.content.unwrap_or_default();
        finish(
            r.model,
            content,
            r.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            choice.finish_reason.map(finish_reason),
            req,
        )
    }

    async fn call_stream(
        &self,
        body: CreateChatCompletionRequest,
        req: &ChatRequest<'_>,
    ) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let end = started + self.timeout;
        let first_by = started + self.first_token_timeout.min(self.timeout);
        let no_first = || {
            ProviderError::new(
                Failure::Timeout,
                format!("no first token within {:?}", self.first_token_timeout),
            )
        };
        let mut stream =
            tokio::time::timeout_at(first_by.into(), self.client.chat().create_stream(body))
                .await
                .map_err(|_| no_first())?
                .map_err(classify)?;
        let (mut content, mut model, mut usage, mut finish_r) =
            (String::new(), String::new(), None, None);
        let mut chunks = 0usize;
        loop {
            let by = if chunks == 0 {
                first_by
            } else {
                (Instant::now() + self.token_timeout).min(end)
            };
            let next = match tokio::time::timeout_at(by.into(), stream.next()).await {
                Ok(n) => n,
                Err(_) if chunks == 0 => return Err(no_first()),
                Err(_) if Instant::now() >= end => {
                    return Err(ProviderError::new(
                        Failure::Timeout,
                        format!("the answer took longer than {:?}", self.timeout),
                    ));
                }
                Err(_) => {
                    return Err(ProviderError::new(
                        Failure::Stalled,
                        format!(
                            "the stream stalled for {:?} after {chunks} chunks",
                            self.token_timeout
                        ),
                    ));
                }
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(classify)?;
            chunks += 1;
            if model.is_empty() {
                model = chunk.model;
            }
            if let Some(u) = chunk.usage {
                usage = Some((u.prompt_tokens, u.completion_tokens));
            }
            for c in chunk.choices.into_iter().filter(|c| c.index == 0) {
                if let Some(t) = c.delta.content {
                    content.push_str(&t);
                }
                if let Some(f) = c.finish_reason {
                    finish_r = Some(finish_reason(f));
                }
            }
        }
        // A stream that ends without a finish_reason was cut off: a partial answer is
        // not an answer.
        if finish_r.is_none() {
            return Err(ProviderError::new(
                Failure::Malformed,
                format!("the stream ended after {chunks} chunks without a finish_reason"),
            ));
        }
        finish(model, content, usage, finish_r, req)
    }
}

fn finish_reason(f: FinishReason) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The most tokens a reported usage may count: what the ledger stores (a Postgres
/// `integer`). Anything above is not a real answer's usage.
pub const MAX_REPORTED_TOKENS: u32 = i32::MAX as u32;

/// A completion from what arrived; token counts are estimated when usage is missing.
/// A usage no answer can have (beyond [`MAX_REPORTED_TOKENS`]) makes the answer
/// malformed: the next provider is tried, and nothing is stored or charged from it.
fn finish(
    model: String,
    content: String,
    usage: Option<(u32, u32)>,
    finish_reason: Option<String>,
    req: &ChatRequest<'_>,
) -> Result<Completion, ProviderError> {
    if let Some((i, o)) = usage
        && (i > MAX_REPORTED_TOKENS || o > MAX_REPORTED_TOKENS)
    {
        return Err(ProviderError::new(
            Failure::Malformed,
            format!("the provider reported a usage of {i} input and {o} output tokens"),
        ));
    }
    let (input_tokens, output_tokens, usage_estimated) = match usage {
        Some((i, o)) => (i, o, false),
        None => (
            req.estimated_input_tokens(),
            u32::try_from(content.len().div_ceil(4)).unwrap_or(u32::MAX),
            true,
        ),
    };
    Ok(Completion {
        model,
        content,
        input_tokens: input_tokens.min(MAX_REPORTED_TOKENS),
        output_tokens: output_tokens.min(MAX_REPORTED_TOKENS),
        usage_estimated,
        finish_reason,
    })
}

/// async-openai's error as a [`Failure`]. reqwest errors are stripped of their URL.
fn classify(e: OpenAIError) -> ProviderError {
    match e {
        OpenAIError::ApiError(r) => {
            let status = r.status_code.as_u16();
            ProviderError {
                failure: Failure::of_status(status),
                http_status: Some(status),
                message: shorten(r.api_error.message),
            }
        }
        OpenAIError::Reqwest(e) => {
            let failure = if e.is_timeout() {
                Failure::Timeout
            } else if e.is_decode() {
                Failure::Malformed
            } else {
                Failure::Unavailable
            };
            let status = e.status().map(|s| s.as_u16());
            ProviderError {
                failure,
                http_status: status,
                message: shorten(e.without_url().to_string()),
            }
        }
        OpenAIError::JSONDeserialize(e, _) => ProviderError::new(
            Failure::Malformed,
            format!("the answer is not a chat completion: {e}"),
        ),
        OpenAIError::StreamError(e) => match *e {
            async_openai::error::StreamError::UnknownEvent(_) => {
                ProviderError::new(Failure::Malformed, "an unknown event in the stream")
            }
            other => ProviderError::new(Failure::Unavailable, format!("the stream broke: {other}")),
        },
        OpenAIError::InvalidArgument(m) => ProviderError::new(Failure::Rejected, m),
        other => ProviderError::new(Failure::Unavailable, other.to_string()),
    }
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn describe(&self) -> String {
        format!(
            "{} ({}, model {}{})",
            self.name,
            self.origin,
            self.model,
            if self.stream { ", streaming" } else { "" }
        )
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(&self, req: &ChatRequest<'_>) -> Result<Completion, ProviderError> {
        let body = self.request(req);
        if self.stream {
            self.call_stream(body, req).await
        } else {
            self.call_json(body, req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_spec_says() {
        for (s, f) in [
            (429, Failure::RateLimited),
            (500, Failure::ServerError),
            (502, Failure::ServerError),
            (503, Failure::ServerError),
            (408, Failure::Timeout),
            (400, Failure::Rejected),
            (413, Failure::Rejected),
            (422, Failure::Rejected),
            (401, Failure::Refused),
            (403, Failure::Refused),
            (404, Failure::Refused),
        ] {
            assert_eq!(Failure::of_status(s), f, "{s}");
            assert_eq!(f.falls_back(), f != Failure::Rejected, "{s}");
        }
    }

    #[test]
    fn long_messages_are_shortened_on_a_char_boundary() {
        let s = shorten("é".repeat(400));
        assert!(s.len() <= 303 && s.ends_with('…'), "{}", s.len());
        assert_eq!(shorten("short".into()), "short");
        let e = ProviderError {
            failure: Failure::RateLimited,
            http_status: Some(429),
            message: "slow down".into(),
        };
        assert_eq!(e.to_string(), "rate_limited (429): slow down");
    }

    #[test]
    fn config_debug_hides_the_key_and_the_path() {
        let cfg: ProviderConfig = serde_json::from_value(serde_json::json!({
            "kind": "openai",
            "base_url": "https://user:pw@api.example/v1?token=abc",
            "api_key": "sk-canary-123",
            "model": "m",
        }))
        .unwrap();
        let d = format!("{cfg:?}");
        assert!(!d.contains("sk-canary-123") && !d.contains("token=abc") && !d.contains("pw"));
        assert!(d.contains("https://api.example"), "{d}");
        assert!(cfg.stream, "streaming is the default");
        assert_eq!(cfg.first_token_timeout, Duration::from_secs(30));
        let p = OpenAiProvider::new("x", &cfg).unwrap();
        assert!(!format!("{p:?}").contains("sk-canary-123"));
        assert_eq!(p.describe(), "x (https://api.example, model m, streaming)");
    }

    #[test]
    fn bad_provider_settings_are_refused() {
        let mut cfg: ProviderConfig = serde_json::from_value(serde_json::json!({
            "kind": "openai", "base_url": "ftp://x", "model": "m",
        }))
        .unwrap();
        assert!(OpenAiProvider::new("x", &cfg).is_err());
        cfg.base_url = "http://127.0.0.1:1/v1".into();
        cfg.api_key = Some(SecretString::from("bad key\n".to_string()));
        let e = OpenAiProvider::new("x", &cfg).unwrap_err();
        assert!(e.contains("header") && !e.contains("bad key"), "{e}");
        cfg.api_key = None;
        cfg.model = " ".into();
        assert!(OpenAiProvider::new("x", &cfg).is_err());
    }
}
