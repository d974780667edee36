//! `POST /v1/chat/completions`: messages rendered with the model's own chat template.

use super::choices::{self, finish_reason, ChunkFormat, Head};
use super::error::ApiError;
use super::extract::JsonBody;
use super::openai::{chat_messages, ChatRequest};
use super::{logprobs, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use tern_core::chat_template::ChatMessage;
use tern_core::generation::FinishReason;
use tern_core::sampling::TokenLogprob;
use tern_core::tokenizer::Tokenizer;

/// Token ids of a rendered conversation (the template writes any BOS itself, as `tern
/// generate --chat` does).
pub fn render(s: &AppState, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>, ApiError> {
    let template =
        s.template.as_ref().ok_or_else(|| ApiError::invalid("this model has no chat template", Some("messages")))?;
    let text = template
        .render(messages, add_generation_prompt)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))?;
    s.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))
}

pub async fn chat_completions(
    State(s): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    s.check_model(req.common.model.as_deref())?;
    let params = req.common.validate()?;
    req.check_supported()?;
    let logprobs = req.logprobs()?;
    let messages = chat_messages(&req.messages)?;
    let ids = render(&s, &messages, req.add_generation_prompt.unwrap_or(true))?;
    // By default the reply may fill the rest of the context (as vLLM).
    let max_tokens = req.max_tokens()?.unwrap_or_else(|| s.max_model_len.saturating_sub(ids.len()).max(1));
    let choices = choices::submit(&s.engine, vec![(ids, max_tokens)], &params, logprobs)?;
    let fmt = ChatChunks { head: s.head("chatcmpl"), tokenizer: s.tokenizer.clone() };
    if params.stream {
        return Ok(choices::sse(choices, params.include_usage, fmt));
    }
    let (outputs, usage) = choices::collect(choices).await?;
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, o)| {
            let lps: Vec<TokenLogprob> = o.logprobs.iter().map(|(lp, _)| lp.clone()).collect();
            json!({
                "index": index,
                "message": { "role": "assistant", "content": o.text },
                "logprobs": logprobs.map(|_| logprobs::chat(&fmt.tokenizer, &lps)),
                "finish_reason": finish_reason(o.finished.reason),
            })
        })
        .collect();
    let mut body = fmt.head.json("chat.completion");
    body["choices"] = choices.into();
    body["usage"] = usage;
    Ok(Json(body).into_response())
}

struct ChatChunks {
    head: Head,
    tokenizer: Arc<Tokenizer>,
}

impl ChatChunks {
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Value) -> Value {
        let mut c = self.head.json("chat.completion.chunk");
        c["choices"] = json!([{ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish }]);
        c
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&self, index: usize) -> Option<Value> {
        Some(self.chunk(index, json!({ "role": "assistant", "content": "" }), Value::Null, Value::Null))
    }

    fn delta(&self, index: usize, text: &str, logprob: Option<(&TokenLogprob, usize)>) -> Value {
        let lp = logprob.map_or(Value::Null, |(lp, _)| logprobs::chat(&self.tokenizer, std::slice::from_ref(lp)));
        self.chunk(index, json!({ "content": text }), lp, Value::Null)
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Value {
        self.chunk(index, json!({}), Value::Null, finish_reason(reason).into())
    }

    fn usage(&self, usage: Value) -> Value {
        let mut c = self.head.json("chat.completion.chunk");
        c["choices"] = json!([]);
        c["usage"] = usage;
        c
    }
}
