//! `tern generate` and `tern chat`.

use crate::args::{EngineArgs, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::io::{BufRead, Write};
use tern_core::chat_template::{ChatMessage, ChatTemplate};
use tern_core::engine::{EngineHandle, Event, Finished, MAX_TOP_LOGPROBS};
use tern_core::generation::{FinishReason, GenerateRequest};
use tern_core::sampling::TokenLogprob;
use tern_core::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Report log-probabilities with this many top alternatives per token.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Print one JSON object (prompt ids, output ids, text, finish reason, logprobs).
    #[arg(long)]
    pub json: bool,
    pub prompt: String,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub system: Option<String>,
}

/// What `generate --json` prints.
#[derive(Serialize)]
struct Output {
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
    text: String,
    finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    logprobs: Vec<TokenLogprob>,
    #[serde(skip)]
    finished: Option<Finished>,
}

/// Runs one request through the engine, passing each text delta to `on_text`.
fn run_request(engine: &EngineHandle, req: GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<Output> {
    let mut out = Output {
        prompt_ids: req.prompt_ids.clone(),
        output_ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        logprobs: Vec::new(),
        finished: None,
    };
    let mut stream = engine.submit(req)?;
    loop {
        match stream.blocking_next() {
            Some(Event::Token { id, text, logprob }) => {
                out.output_ids.extend(id);
                out.logprobs.extend(logprob);
                on_text(&text);
                out.text.push_str(&text);
            }
            Some(Event::Finished(f)) => {
                out.finish_reason = f.reason;
                out.finished = Some(f);
                return Ok(out);
            }
            Some(Event::Error(e)) => bail!("{e}"),
            None => bail!("the engine stopped unexpectedly"),
        }
    }
}

fn chat_template(tok: &Tokenizer) -> Result<ChatTemplate> {
    let source = tok.chat_template.as_deref().context("this model has no chat template")?;
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    ChatTemplate::new(source, &text(tok.bos), &text(tok.eos))
}

/// Token ids of a rendered chat: the template writes any BOS itself.
pub fn encode_chat(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let text = chat_template(tok)?.render(messages, true)?;
    let ids = tok.encode(&text, false)?;
    Ok(ids)
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling.params()?;
    if a.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        bail!("--logprobs must be at most {MAX_TOP_LOGPROBS}");
    }
    let (weights, tok) = a.model.weights()?;
    let tok = tok.context("this model has no tokenizer: generate needs one (see --tokenizer)")?;
    let engine_config = a.engine.config(a.model.threads()?, a.model.device()?, Some(&tok))?;
    let prompt_ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        encode_chat(&tok, &messages)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    let engine = EngineHandle::start(weights, Some(tok), engine_config)?;
    let req = GenerateRequest {
        stop: a.sampling.stop.clone(),
        ignore_eos: a.sampling.ignore_eos,
        logprobs: a.logprobs,
        ..GenerateRequest::new(prompt_ids, a.sampling.max_tokens, params)
    };
    let stdout = std::io::stdout();
    let out = run_request(&engine, req, |text| {
        if !a.json {
            let mut s = stdout.lock();
            let _ = s.write_all(text.as_bytes());
            let _ = s.flush();
        }
    })?;
    let f = out.finished.clone().expect("finished");
    let decode = f.total_time - f.time_to_first_token;
    if a.json {
        let n_out = out.output_ids.len();
        let mut v = serde_json::to_value(&out)?;
        v["usage"] = serde_json::json!({ "prompt_tokens": out.prompt_ids.len(), "completion_tokens": n_out });
        v["timings"] = serde_json::json!({
            "prefill_ms": f.time_to_first_token.as_secs_f64() * 1e3,
            "decode_ms": decode.as_secs_f64() * 1e3,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, first token after {:.0} ms, {} tokens at {:.1} tok/s, finish: {:?}]",
            out.prompt_ids.len(),
            f.time_to_first_token.as_secs_f64() * 1e3,
            out.output_ids.len(),
            out.output_ids.len().saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9),
            out.finish_reason
        );
    }
    Ok(())
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let (weights, tok) = a.model.weights()?;
    let tok = tok.context("this model has no tokenizer: chat needs one (see --tokenizer)")?;
    chat_template(&tok)?;
    let engine_config = a.engine.config(a.model.threads()?, a.model.device()?, Some(&tok))?;
    // Each turn re-sends the whole conversation; the prefix cache keeps the earlier turns' KV.
    let engine = EngineHandle::start(weights, Some(tok.clone()), engine_config)?;
    let system: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let mut messages = system.clone();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!("tern chat: type a message; /reset clears the conversation, /exit quits");
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = system.clone();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let prompt_ids = encode_chat(&tok, &messages)?;
        let req = GenerateRequest {
            stop: a.sampling.stop.clone(),
            ..GenerateRequest::new(prompt_ids, a.sampling.max_tokens, params.clone())
        };
        let result = run_request(&engine, req, |text| {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        });
        println!();
        match result {
            Ok(out) => messages.push(ChatMessage::new("assistant", &out.text)),
            Err(e) => {
                eprintln!("error: {e:#}");
                messages.pop();
            }
        }
    }
    Ok(())
}
