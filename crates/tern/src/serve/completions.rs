//! `POST /v1/completions`.

use super::choices::{self, finish_reason, ChunkFormat, Head};
use super::error::ApiError;
use super::extract::JsonBody;
use super::openai::{positive, top_n, CompletionRequest, Prompt, DEFAULT_COMPLETION_MAX_TOKENS};
use super::{logprobs, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use tern_core::generation::FinishReason;
use tern_core::sampling::TokenLogprob;
use tern_core::tokenizer::Tokenizer;

pub async fn completions(
    State(s): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(req.common.model.as_deref())?;
    let params = req.common.validate()?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    if req.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", Some("suffix")));
    }
    if req.best_of.is_some_and(|b| b != params.n as i64) {
        return Err(ApiError::invalid("best_of is not supported (other than best_of = n)", Some("best_of")));
    }
    let logprobs = req.logprobs.map(|k| top_n(k, "logprobs")).transpose()?;
    let max_tokens = positive(req.max_tokens, "max_tokens")?.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
    let prompts = req
        .prompts()?
        .into_iter()
        .map(|p| match p {
            Prompt::Ids(ids) => Ok((ids, max_tokens)),
            Prompt::Text(text) => match s.tokenizer.encode(&text, true) {
                Ok(ids) => Ok((ids, max_tokens)),
                Err(e) => Err(ApiError::invalid(format!("{e:#}"), Some("prompt"))),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    let choices = choices::submit(&s.engine, prompts, &params, logprobs)?;
    let head = s.head("cmpl");
    let fmt = CompletionChunks { head, tokenizer: s.tokenizer.clone() };
    if params.stream {
        return Ok(choices::sse(choices, params.include_usage, fmt));
    }
    let (outputs, usage) = choices::collect(choices).await?;
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, o)| {
            json!({
                "index": index,
                "text": o.text,
                "logprobs": logprobs.map(|_| logprobs::completion(&fmt.tokenizer, &o.logprobs)),
                "finish_reason": finish_reason(o.finished.reason),
            })
        })
        .collect();
    let mut body = fmt.head.json("text_completion");
    body["choices"] = choices.into();
    body["usage"] = usage;
    Ok(Json(body).into_response())
}

struct CompletionChunks {
    head: Head,
    tokenizer: Arc<Tokenizer>,
}

impl CompletionChunks {
    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Value) -> Value {
        let mut c = self.head.json("text_completion");
        c["choices"] = json!([{ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish }]);
        c
    }
}

impl ChunkFormat for CompletionChunks {
    fn delta(&self, index: usize, text: &str, logprob: Option<(&TokenLogprob, usize)>) -> Value {
        let lp =
            logprob.map_or(Value::Null, |(lp, offset)| logprobs::completion(&self.tokenizer, &[(lp.clone(), offset)]));
        self.chunk(index, text, lp, Value::Null)
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Value {
        self.chunk(index, "", Value::Null, finish_reason(reason).into())
    }

    fn usage(&self, usage: Value) -> Value {
        let mut c = self.head.json("text_completion");
        c["choices"] = json!([]);
        c["usage"] = usage;
        c
    }
}
