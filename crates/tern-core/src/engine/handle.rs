//! The engine thread and the channels front ends use to reach it.

use super::core::Engine;
use super::metrics::Metrics;
use super::{EngineConfig, Event};
use crate::generation::GenerateRequest;
use crate::model::config::ModelConfig;
use crate::model::Weights;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Front end → engine thread.
pub(crate) enum Command {
    Submit {
        id: u64,
        req: Box<GenerateRequest>,
        events: UnboundedSender<Event>,
    },
    Cancel(u64),
    /// Cancel everything in flight (their streams end with `FinishReason::Abort`).
    AbortAll,
    /// Finish what is in flight, then exit the thread.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request can never run (bad parameters, too long for the context or the KV pool).
    #[error("{message}")]
    Invalid { message: String, param: Option<&'static str> },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl SubmitError {
    pub(crate) fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        SubmitError::Invalid { message: message.into(), param }
    }
}

struct Shared {
    commands: Mutex<mpsc::Sender<Command>>,
    metrics: Arc<Metrics>,
    model: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
    limits: super::core::Limits,
    description: String,
    weight_bytes_per_token: usize,
    accepting: AtomicBool,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    /// The last handle is gone (no front end, no stream): the engine drains and exits, and its
    /// thread is joined, so a device runner frees its memory before the process exits.
    fn drop(&mut self) {
        let _ = self.commands.get_mut().unwrap_or_else(|e| e.into_inner()).send(Command::Shutdown);
        if let Some(t) = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts the engine thread, which builds the runner (weights on the device, KV pool) and
    /// then serves requests; returns once the runner is ready, or with its error.
    pub fn start(weights: impl Into<Weights>, tokenizer: Option<Tokenizer>, config: EngineConfig) -> Result<Self> {
        let weights = weights.into();
        let tokenizer = tokenizer.map(Arc::new);
        let model = weights.config().clone();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tok, m) = (tokenizer.clone(), metrics.clone());
        let thread = std::thread::Builder::new()
            .name("tern-engine".into())
            .spawn(move || match Engine::new(weights, tok, config, m) {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok((engine.limits(), engine.describe(), engine.weight_bytes_per_token())));
                    engine.run(rx)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("cannot start the engine thread")?;
        let (limits, description, weight_bytes_per_token) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the engine thread died while starting");
            }
        };
        Ok(EngineHandle {
            shared: Arc::new(Shared {
                commands: Mutex::new(tx),
                metrics,
                model,
                tokenizer,
                limits,
                description,
                weight_bytes_per_token,
                accepting: AtomicBool::new(true),
                next_id: AtomicU64::new(1),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The device and what it holds (for logs).
    pub fn describe(&self) -> &str {
        &self.shared.description
    }

    /// Weight bytes one decode step reads, as the device holds them.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.shared.weight_bytes_per_token
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.model
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.shared.tokenizer.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Total tokens the KV pool holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.shared.limits.kv_tokens
    }

    /// Validates a request and queues it; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        self.shared.limits.validate(&req, &self.shared.model)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = unbounded_channel();
        self.send(Command::Submit { id, req: Box::new(req), events: events_tx })
            .map_err(|_| SubmitError::ShuttingDown)?;
        Ok(RequestStream { id, events: events_rx, engine: self.clone(), finished: false })
    }

    fn send(&self, cmd: Command) -> Result<(), mpsc::SendError<Command>> {
        self.shared.commands.lock().unwrap_or_else(|e| e.into_inner()).send(cmd)
    }

    /// Stops accepting requests; the engine finishes what is in flight, then its thread exits.
    pub fn shutdown(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        let _ = self.send(Command::Shutdown);
    }

    /// Ends every in-flight request now (their streams finish with reason `abort`).
    pub fn abort_all(&self) {
        let _ = self.send(Command::AbortAll);
    }

    /// Waits for the engine thread to exit (after `shutdown`).
    pub fn join(&self) {
        let thread = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// One request's events. Dropping it before the end cancels the request: the engine frees its
/// KV blocks at its next step.
pub struct RequestStream {
    id: u64,
    events: UnboundedReceiver<Event>,
    engine: EngineHandle,
    finished: bool,
}

impl RequestStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; None after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.events.recv().await;
        self.note(&ev);
        ev
    }

    /// `next` for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        let ev = self.events.blocking_recv();
        self.note(&ev);
        ev
    }

    fn note(&mut self, ev: &Option<Event>) {
        if matches!(ev, None | Some(Event::Finished(_)) | Some(Event::Error(_))) {
            self.finished = true;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.engine.send(Command::Cancel(self.id));
        }
    }
}
