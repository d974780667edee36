//! Helpers of the engine-level tests: models, greedy requests, the single-sequence reference
//! loop (the oracle), and running requests through an engine.

use tern_core::engine::{EngineHandle, Event, Finished, RequestStream};
use tern_core::generation::{generate, GenerateRequest};
use tern_core::model::decoder::Decoder;
use tern_core::model::{self, LoadedModel, ModelSource};
use tern_core::sampling::SamplingParams;

/// A known model, pulled with tern's own pull code if needed.
pub fn load(key: &str) -> LoadedModel {
    model::load(&ModelSource::Gguf(super::model_path(key))).expect("model loads")
}

/// One greedy request per prompt (BOS as the model wants it).
pub fn greedy_requests(m: &LoadedModel, prompts: &[impl AsRef<str>], max_tokens: usize) -> Vec<GenerateRequest> {
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    prompts
        .iter()
        .map(|p| GenerateRequest::new(tok.encode(p.as_ref(), true).unwrap(), max_tokens, SamplingParams::greedy()))
        .collect()
}

/// Greedy tokens of each request from the reference loop, one request at a time.
pub fn oracle(m: &LoadedModel, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    let mut dec = Decoder::new(m.weights.clone(), 2).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    reqs.iter().map(|r| generate(&mut dec, tok, r, |_| {}).unwrap().output_ids).collect()
}

/// Submits every request at once; returns each one's tokens and final event.
pub fn run_engine(engine: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<(Vec<u32>, Finished)> {
    let streams: Vec<_> = reqs.iter().map(|r| engine.submit(r.clone()).expect("submit")).collect();
    streams.into_iter().map(collect).collect()
}

/// A stream's tokens and its final event (panics on an engine error).
pub fn collect(mut s: RequestStream) -> (Vec<u32>, Finished) {
    let mut ids = Vec::new();
    loop {
        match s.blocking_next().expect("stream ends with Finished") {
            Event::Token { id, .. } => ids.extend(id),
            Event::Finished(f) => return (ids, f),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}
