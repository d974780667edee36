//! Running a request's choices on the engine: submit them all, then either gather each one's
//! output (plain responses) or turn their events into Server-Sent Events as they arrive.
//!
//! Cancellation is by ownership: the handler future (plain) or the response body (streaming)
//! owns the `RequestStream`s, so a client that goes away drops them and the engine aborts
//! the requests at its next step.

use super::error::ApiError;
use super::openai::{Params, MAX_CHOICES};
use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use tern_core::engine::{EngineHandle, Event, Finished, RequestStream};
use tern_core::generation::FinishReason;
use tern_core::sampling::TokenLogprob;

/// What every response and chunk of one request repeats.
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Head {
    pub fn json(&self, object: &str) -> Value {
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model })
    }
}

/// The choices of one API request, `n` per prompt, prompt-major.
pub struct Choices {
    streams: Vec<RequestStream>,
    prompt_lens: Vec<usize>,
    n: usize,
}

/// Submits `n` requests per prompt (each prompt with its `max_tokens`). On any error the
/// requests already submitted are dropped, which cancels them.
pub fn submit(
    engine: &EngineHandle,
    prompts: Vec<(Vec<u32>, usize)>,
    params: &Params,
    logprobs: Option<usize>,
) -> Result<Choices, ApiError> {
    let n = params.n;
    if prompts.len().saturating_mul(n) > MAX_CHOICES {
        return Err(ApiError::invalid(
            format!("at most {MAX_CHOICES} choices per request (prompts × n), got {} × {n}", prompts.len()),
            Some("n"),
        ));
    }
    let prompt_lens = prompts.iter().map(|(ids, _)| ids.len()).collect();
    let mut streams = Vec::with_capacity(prompts.len() * n);
    for (ids, max_tokens) in prompts {
        for choice in 0..n {
            streams.push(engine.submit(params.request(ids.clone(), max_tokens, logprobs, choice))?);
        }
    }
    Ok(Choices { streams, prompt_lens, n })
}

/// OpenAI's usage object. Prompt tokens count once per prompt, whatever `n`.
fn usage(prompt_lens: &[usize], n: usize, finished: &[Option<Finished>]) -> Value {
    let prompt: usize = prompt_lens.iter().sum();
    let completion: usize = finished.iter().flatten().map(|f| f.completion_tokens).sum();
    let cached: usize = finished.iter().step_by(n.max(1)).flatten().map(|f| f.cached_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// One choice, complete.
pub struct ChoiceOutput {
    pub text: String,
    /// Each token's logprobs and the character offset of its text in `text`.
    pub logprobs: Vec<(TokenLogprob, usize)>,
    pub finished: Finished,
}

/// Waits for every choice to finish; returns them in order, with the usage object.
pub async fn collect(choices: Choices) -> Result<(Vec<ChoiceOutput>, Value), ApiError> {
    let mut outputs = Vec::with_capacity(choices.streams.len());
    // The engine runs them all at once; waiting in order costs nothing.
    for mut s in choices.streams {
        outputs.push(drain(&mut s).await?);
    }
    let finished: Vec<Option<Finished>> = outputs.iter().map(|o| Some(o.finished.clone())).collect();
    Ok((outputs, usage(&choices.prompt_lens, choices.n, &finished)))
}

async fn drain(stream: &mut RequestStream) -> Result<ChoiceOutput, ApiError> {
    let (mut text, mut chars, mut logprobs) = (String::new(), 0, Vec::new());
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token { text: t, logprob, .. } => {
                logprobs.extend(logprob.map(|lp| (lp, chars)));
                chars += t.chars().count();
                text.push_str(&t);
            }
            Event::Finished(finished) => return Ok(ChoiceOutput { text, logprobs, finished }),
            Event::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine stopped before the request finished"))
}

/// How an endpoint writes its stream chunks.
pub trait ChunkFormat: Send + 'static {
    /// Sent for each choice before its first token (chat: the assistant role).
    fn opening(&self, _index: usize) -> Option<Value> {
        None
    }
    /// New text of choice `index`, with the logprobs of the token that produced it and the
    /// text's character offset within the choice.
    fn delta(&self, index: usize, text: &str, logprob: Option<(&TokenLogprob, usize)>) -> Value;
    fn finish(&self, index: usize, reason: FinishReason) -> Value;
    /// The final chunk carrying `usage` (with `stream_options.include_usage`).
    fn usage(&self, usage: Value) -> Value;
}

enum Phase {
    Start,
    Running,
    Done,
}

struct SseState<F> {
    events: SelectAll<BoxStream<'static, (usize, Event)>>,
    fmt: F,
    chars: Vec<usize>,
    finished: Vec<Option<Finished>>,
    prompt_lens: Vec<usize>,
    n: usize,
    include_usage: bool,
    phase: Phase,
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl<F: ChunkFormat> SseState<F> {
    /// The next piece of the body: one or more `data:` events; None after `[DONE]`.
    async fn next_chunk(&mut self) -> Option<String> {
        match self.phase {
            Phase::Done => return None,
            Phase::Start => {
                self.phase = Phase::Running;
                let opening: String =
                    (0..self.chars.len()).filter_map(|i| self.fmt.opening(i)).map(|v| sse_data(&v)).collect();
                if !opening.is_empty() {
                    return Some(opening);
                }
            }
            Phase::Running => {}
        }
        loop {
            let Some((i, ev)) = self.events.next().await else {
                self.phase = Phase::Done;
                let mut out = String::new();
                if self.include_usage {
                    out += &sse_data(&self.fmt.usage(usage(&self.prompt_lens, self.n, &self.finished)));
                }
                out += "data: [DONE]\n\n";
                return Some(out);
            };
            match ev {
                Event::Token { text, logprob, .. } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let chunk = self.fmt.delta(i, &text, logprob.as_ref().map(|lp| (lp, self.chars[i])));
                    self.chars[i] += text.chars().count();
                    return Some(sse_data(&chunk));
                }
                Event::Finished(f) => {
                    let chunk = self.fmt.finish(i, f.reason);
                    self.finished[i] = Some(f);
                    return Some(sse_data(&chunk));
                }
                Event::Error(message) => return Some(sse_data(&ApiError::internal(message).body())),
            }
        }
    }
}

/// A `text/event-stream` response whose body owns the choices' streams.
pub fn sse<F: ChunkFormat>(choices: Choices, include_usage: bool, fmt: F) -> Response {
    let total = choices.streams.len();
    let per_choice = choices.streams.into_iter().enumerate().map(|(i, rs)| {
        stream::unfold(rs, move |mut rs| async move {
            let ev = rs.next().await?;
            Some(((i, ev), rs))
        })
        .boxed()
    });
    let state = SseState {
        events: stream::select_all(per_choice),
        fmt,
        chars: vec![0; total],
        finished: vec![None; total],
        prompt_lens: choices.prompt_lens,
        n: choices.n,
        include_usage,
        phase: Phase::Start,
    };
    let body = stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), st))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
