//! tern-core: models, kernels, tokenizer, sampling and generation, and the serving engine.
pub mod chat_template;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod generation;
pub mod gguf;
pub mod gguf_write;
pub mod kernels;
pub mod model;
pub mod perplexity;
pub mod quantize;
pub mod rng;
pub mod sampling;
pub mod speculative;
pub mod stop;
pub mod tokenizer;
