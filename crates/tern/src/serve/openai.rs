//! OpenAI request bodies and their validation into engine requests. Parameters follow OpenAI
//! (and vLLM's extensions: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos; and
//! tern's `num_speculative_tokens`: 0 turns speculative decoding off for the request).
//! Polymorphic fields (prompt, stop, message content) are read from JSON values by hand so
//! that a wrong shape gets a message naming the parameter.

use super::error::ApiError;
use serde::Deserialize;
use serde_json::Value;
use tern_core::chat_template::ChatMessage;
use tern_core::generation::GenerateRequest;
use tern_core::sampling::SamplingParams;

/// As OpenAI's `top_logprobs` (the engine's limit too).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per prompt, and per request over all prompts.
pub const MAX_N: usize = 128;
pub const MAX_CHOICES: usize = 1024;
/// OpenAI's default `max_tokens` for completions (chat fills the context instead).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Parameters shared by completions and chat completions.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub num_speculative_tokens: Option<i64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// Checked common parameters: everything a choice's `GenerateRequest` needs but its prompt,
/// length and logprobs.
#[derive(Debug, Clone)]
pub struct Params {
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    num_speculative_tokens: Option<usize>,
}

impl CommonParams {
    pub fn validate(&self) -> Result<Params, ApiError> {
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
            Some(n) => return Err(ApiError::invalid(format!("n must be between 1 and {MAX_N}, got {n}"), Some("n"))),
        };
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid("logit_bias is not supported", Some("logit_bias")));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("top_k must be -1 or 0 (disabled) or at least 1, got {k}"),
                    Some("top_k"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            // Negative seeds are accepted as their two's-complement bits.
            seed: self.seed.map(|s| s as u64),
        };
        if let Err(e) = sampling.validate() {
            // The engine's messages start with the parameter's name.
            let message = e.to_string();
            let param = message.split_whitespace().next().map(str::to_string);
            return Err(ApiError { param, ..ApiError::invalid(message, None) });
        }
        let num_speculative_tokens = match self.num_speculative_tokens {
            None => None,
            Some(k) if (0..=32).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("num_speculative_tokens must be between 0 and 32, got {k}"),
                    Some("num_speculative_tokens"),
                ))
            }
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        Ok(Params {
            n,
            stream,
            include_usage,
            sampling,
            stop: parse_stop(self.stop.as_ref())?,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            num_speculative_tokens,
        })
    }
}

impl Params {
    /// The engine request of choice `choice` (0..n) of one prompt: with a seed, choice i
    /// samples with seed + i so that the choices differ but the request is reproducible.
    pub fn request(
        &self,
        prompt_ids: Vec<u32>,
        max_tokens: usize,
        logprobs: Option<usize>,
        choice: usize,
    ) -> GenerateRequest {
        let mut sampling = self.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice as u64));
        GenerateRequest {
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs,
            num_speculative_tokens: self.num_speculative_tokens,
            ..GenerateRequest::new(prompt_ids, max_tokens, sampling)
        }
    }
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop must be a string or a list of strings", Some("stop"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items.iter().map(|i| i.as_str().map(str::to_string).ok_or_else(bad)).collect(),
        Some(_) => Err(bad()),
    }
}

/// A `max_tokens`-like count: absent, or at least 1.
pub fn positive(v: Option<i64>, name: &str) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if k >= 1 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
        Some(k) => Err(ApiError::invalid(format!("{name} must be at least 1, got {k}"), Some(name))),
    }
}

/// A top-N logprobs count within 0..=MAX_TOP_LOGPROBS.
pub fn top_n(v: i64, name: &str) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS as i64).contains(&v) {
        Ok(v as usize)
    } else {
        Err(ApiError::invalid(format!("{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {v}"), Some(name)))
    }
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    pub max_tokens: Option<i64>,
    /// Top-N alternatives per token (OpenAI allows 5; the engine 20).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// One prompt of a completion request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionRequest {
    /// The prompts: a string, a list of token ids, a list of strings or of token-id lists.
    pub fn prompts(&self) -> Result<Vec<Prompt>, ApiError> {
        let bad = || {
            ApiError::invalid(
                "prompt must be a string, a list of token ids, a list of strings or a list of token-id lists",
                Some("prompt"),
            )
        };
        match &self.prompt {
            Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
            Value::Array(items) if items.is_empty() => Err(ApiError::invalid("prompt is empty", Some("prompt"))),
            Value::Array(items) if items.iter().all(Value::is_number) => Ok(vec![Prompt::Ids(token_ids(items)?)]),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    Value::Array(ids) => Ok(Prompt::Ids(token_ids(ids)?)),
                    _ => Err(bad()),
                })
                .collect(),
            _ => Err(bad()),
        }
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                ApiError::invalid(format!("token ids must be integers in 0..2^32, got {v}"), Some("prompt"))
            })
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
    /// vLLM's extension: end the rendered prompt with the assistant's header (default true).
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

impl ChatRequest {
    /// Features this server does not have, rejected rather than ignored.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools are not supported by this server", Some("tools")));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::invalid(
                    "only response_format {\"type\": \"text\"} is supported",
                    Some("response_format"),
                ));
            }
        }
        Ok(())
    }

    /// Top-N alternatives per token, if logprobs are asked for.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.map(|k| top_n(k, "top_logprobs")).transpose()?;
        match (self.logprobs.unwrap_or(false), top) {
            (true, top) => Ok(Some(top.unwrap_or(0))),
            (false, Some(k)) if k > 0 => {
                Err(ApiError::invalid("top_logprobs needs logprobs set to true", Some("top_logprobs")))
            }
            (false, _) => Ok(None),
        }
    }

    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        match self.max_completion_tokens {
            Some(k) => positive(Some(k), "max_completion_tokens"),
            None => positive(self.max_tokens, "max_tokens"),
        }
    }
}

/// Messages as the chat template sees them: text content (a string, or the text parts of a
/// list of content parts, joined by newlines).
pub fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", Some("messages")));
    }
    messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                Value::Array(parts) => {
                    let texts: Option<Vec<&str>> = parts
                        .iter()
                        .map(|p| match p.get("type").and_then(Value::as_str) {
                            Some("text") => p.get("text").and_then(Value::as_str),
                            _ => None,
                        })
                        .collect();
                    texts
                        .ok_or_else(|| ApiError::invalid("only text content parts are supported", Some("messages")))?
                        .join("\n")
                }
                _ => {
                    return Err(ApiError::invalid(
                        "message content must be a string or a list of content parts",
                        Some("messages"),
                    ))
                }
            };
            Ok(ChatMessage { role: m.role.clone(), content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(v: Value) -> CompletionRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn prompts_of_every_shape() {
        let p = |v: Value| completion(json!({ "prompt": v })).prompts();
        assert_eq!(p(json!("hi")).unwrap(), vec![Prompt::Text("hi".into())]);
        assert_eq!(p(json!([1, 2])).unwrap(), vec![Prompt::Ids(vec![1, 2])]);
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(p(json!([[1], [2, 3]])).unwrap(), vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])]);
        for bad in [json!([]), json!(3), json!([-1]), json!([1.5]), json!([{}]), json!(null), json!([[1], "a", 2])] {
            let e = p(bad.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
    }

    #[test]
    fn common_params_validate_with_param_names() {
        let params = |extra: Value| {
            let mut v = json!({ "prompt": "x" });
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            completion(v).common.validate()
        };
        let ok = params(json!({ "n": 3, "seed": 5, "stop": "\n", "top_k": -1 })).unwrap();
        assert_eq!(ok.n, 3);
        let r = ok.request(vec![1], 4, None, 2);
        assert_eq!(r.sampling.seed, Some(7));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        for (v, param) in [
            (json!({ "n": 0 }), "n"),
            (json!({ "temperature": -1 }), "temperature"),
            (json!({ "top_p": 0 }), "top_p"),
            (json!({ "top_k": -5 }), "top_k"),
            (json!({ "presence_penalty": 3 }), "presence_penalty"),
            (json!({ "stop": [1] }), "stop"),
            (json!({ "logit_bias": { "1": 5 } }), "logit_bias"),
        ] {
            assert_eq!(params(v.clone()).unwrap_err().param.as_deref(), Some(param), "{v}");
        }
    }

    #[test]
    fn chat_content_parts_and_logprobs() {
        let req: ChatRequest = serde_json::from_value(json!({
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": "a" }, { "type": "text", "text": "b" }] }],
            "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 7,
        }))
        .unwrap();
        assert_eq!(chat_messages(&req.messages).unwrap()[0].content, "a\nb");
        assert_eq!(req.logprobs().unwrap(), Some(3));
        assert_eq!(req.max_tokens().unwrap(), Some(7));
        let bad: ChatRequest = serde_json::from_value(json!({ "messages": [], "top_logprobs": 2 })).unwrap();
        assert!(chat_messages(&bad.messages).is_err());
        assert_eq!(bad.logprobs().unwrap_err().param.as_deref(), Some("top_logprobs"));
    }
}
