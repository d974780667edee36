//! One sequence's generation loop: prefill, then decode one token per step with the sampler,
//! streaming text deltas, until a stop token, a stop string or the token limit.

use crate::model::decoder::{Decoder, LogitsFor};
use crate::sampling::{logprobs, Sampler, SamplingParams, TokenLogprob};
use crate::stop::StopChecker;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-generation tokens (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// Number of top alternatives to report per token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Most tokens speculative decoding may propose per step for this request (Some(0): none;
    /// None: the engine's setting, which also caps this).
    pub num_speculative_tokens: Option<usize>,
}

impl GenerateRequest {
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        GenerateRequest {
            prompt_ids,
            max_tokens,
            sampling,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            num_speculative_tokens: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled: the client left or the server shut down.
    Abort,
}

/// One generated token as it is streamed.
pub struct TokenEvent<'a> {
    /// None for the final flush of held-back text.
    pub id: Option<u32>,
    /// Text this token completes (may be empty while a character or stop string is pending).
    pub text: &'a str,
    pub logprob: Option<&'a TokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    #[serde(skip)]
    pub prefill_time: Duration,
    #[serde(skip)]
    pub decode_time: Duration,
}

pub fn generate(
    model: &mut Decoder,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_token: impl FnMut(TokenEvent),
) -> Result<GenerateOutput> {
    let n_prompt = req.prompt_ids.len();
    if n_prompt == 0 {
        bail!("the prompt is empty");
    }
    let ctx = model.config().max_context;
    if n_prompt + req.max_tokens > ctx {
        bail!(
            "prompt ({n_prompt} tokens) + max_tokens ({}) exceeds the model's context length ({ctx})",
            req.max_tokens
        );
    }
    let vocab = model.config().vocab_size;
    let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt_ids, vocab)?;
    let mut stops = StopChecker::new(&req.stop);
    let mut cache = model.new_cache(n_prompt + req.max_tokens);
    let mut detok = StreamDecoder::new(true);
    let mut logits = Vec::new();
    let mut out = GenerateOutput {
        prompt_ids: req.prompt_ids.clone(),
        output_ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        logprobs: Vec::new(),
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
    };
    let t0 = Instant::now();
    model.forward(&req.prompt_ids, &mut cache, LogitsFor::Last, &mut logits)?;
    out.prefill_time = t0.elapsed();
    let t1 = Instant::now();
    while out.output_ids.len() < req.max_tokens {
        // Logprobs are of the raw model distribution, before penalties and temperature.
        let raw = req.logprobs.map(|n| (logits.clone(), n));
        let token = sampler.sample(&mut logits);
        let lp = raw.map(|(raw, n)| logprobs(&raw, token, n));
        sampler.accept(token);
        let is_stop_token = !req.ignore_eos && (tok.is_stop_token(token) || req.stop_token_ids.contains(&token));
        if is_stop_token {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        out.output_ids.push(token);
        let delta = detok.push(tok, token)?;
        let (emit, hit) = stops.push(&delta);
        out.text.push_str(&emit);
        on_token(TokenEvent { id: Some(token), text: &emit, logprob: lp.as_ref() });
        out.logprobs.extend(lp);
        if hit {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.output_ids.len() == req.max_tokens {
            break;
        }
        model.forward(&[token], &mut cache, LogitsFor::Last, &mut logits)?;
    }
    if !stops.matched() {
        let tail = stops.finish(&detok.flush(tok)?);
        if !tail.is_empty() {
            out.text.push_str(&tail);
            on_token(TokenEvent { id: None, text: &tail, logprob: None });
        }
    }
    out.decode_time = t1.elapsed();
    Ok(out)
}
