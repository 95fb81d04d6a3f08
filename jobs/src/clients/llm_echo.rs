//! The echo simulator: a [`ChatProvider`] for `longshore dev` that answers with the last
//! user message, after `echo_delay`. Its token counts are the estimates the credits
//! checks use (chars / 4), reported as usage, so charges in dev follow the real formula.

use std::time::Duration;

use async_trait::async_trait;

use super::llm::{ChatProvider, ChatRequest, Completion, ProviderError, Role};

pub struct EchoProvider {
    name: String,
    model: String,
    delay: Duration,
}

impl EchoProvider {
    pub fn new(name: &str, model: &str, delay: Duration) -> Self {
        EchoProvider {
            name: name.to_string(),
            model: model.to_string(),
            delay,
        }
    }
}

#[async_trait]
impl ChatProvider for EchoProvider {
    fn describe(&self) -> String {
        format!("{} (echo simulator, model {})", self.name, self.model)
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(&self, req: &ChatRequest<'_>) -> Result<Completion, ProviderError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let last = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        // As a model would, stop at the token limit (4 characters a token).
        let mut content = format!("echo: {last}");
        let max_chars = (req.max_tokens as usize).saturating_mul(4);
        let finish = if content.len() > max_chars {
            let mut cut = max_chars;
            while !content.is_char_boundary(cut) {
                cut -= 1;
            }
            content.truncate(cut);
            "length"
        } else {
            "stop"
        };
        Ok(Completion {
            model: self.model.clone(),
            input_tokens: req.estimated_input_tokens(),
            output_tokens: u32::try_from(content.len().div_ceil(4)).unwrap_or(u32::MAX),
            content,
            usage_estimated: false,
            finish_reason: Some(finish.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::llm::Message;

    #[tokio::test]
    async fn echoes_the_last_user_message_within_the_token_limit() {
        let p = EchoProvider::new("grok", "echo-1", Duration::ZERO);
        let msgs = [
            Message {
                role: Role::System,
                content: "be brief".into(),
            },
            Message {
                role: Role::User,
                content: "hello there".into(),
            },
        ];
        let c = p
            .complete(&ChatRequest {
                messages: &msgs,
                max_tokens: 100,
            })
            .await
            .unwrap();
        assert_eq!(c.content, "echo: hello there");
        assert_eq!((c.input_tokens, c.output_tokens), (5 + 8, 5));
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let c = p
            .complete(&ChatRequest {
                messages: &msgs,
                max_tokens: 2,
            })
            .await
            .unwrap();
        assert_eq!(
            (c.content.as_str(), c.finish_reason.as_deref()),
            ("echo: he", Some("length"))
        );
        assert!(p.describe().contains("echo simulator"));
    }
}
