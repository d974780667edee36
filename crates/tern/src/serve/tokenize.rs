//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes.

use super::chat::render;
use super::error::ApiError;
use super::extract::JsonBody;
use super::openai::{chat_messages, Message};
use super::AppState;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Either `prompt` (with `add_special_tokens`, default true) or chat `messages` (rendered
/// with the chat template, with `add_generation_prompt`, default true).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
}

pub async fn tokenize(
    State(s): State<Arc<AppState>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    s.check_model(req.model.as_deref())?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => s
            .tokenizer
            .encode(prompt, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("prompt")))?,
        (None, Some(messages)) => render(&s, &chat_messages(messages)?, req.add_generation_prompt.unwrap_or(true))?,
        _ => return Err(ApiError::invalid("give either prompt or messages", Some("prompt"))),
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": s.max_model_len,
        "tokens": tokens,
        "token_strs": null,
    })))
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(
    State(s): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    s.check_model(req.model.as_deref())?;
    let vocab = s.engine.model_config().vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} is out of range (vocabulary of {vocab})"),
            Some("tokens"),
        ));
    }
    let prompt =
        s.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::invalid(format!("{e:#}"), Some("tokens")))?;
    Ok(Json(json!({ "prompt": prompt })))
}
