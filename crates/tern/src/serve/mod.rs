//! `tern serve`: an OpenAI-compatible HTTP server over the engine. This file holds start-up
//! (load, engine, warm-up, bind), the router and graceful shutdown.

mod chat;
mod choices;
mod completions;
mod error;
mod extract;
mod logprobs;
mod openai;
mod tokenize;

use crate::args::{parse_bytes, EngineArgs, ModelArgs};
use crate::registry;
use anyhow::{bail, Context, Result};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use choices::Head;
use clap::Args;
use error::ApiError;
use serde_json::{json, Value};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_core::chat_template::ChatTemplate;
use tern_core::engine::{EngineHandle, Event};
use tern_core::generation::GenerateRequest;
use tern_core::sampling::SamplingParams;
use tern_core::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is logged).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize
    /// (default: $TERN_API_KEY if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Model name clients use (default: the model key, or the file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest accepted request body, e.g. 1MiB.
    #[arg(long, default_value = "1MiB")]
    pub max_request_bytes: String,
    /// Seconds that in-flight requests get to finish after SIGINT/SIGTERM before they are aborted.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

/// What every handler shares.
pub struct AppState {
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    model_name: String,
    /// Longest prompt + completion a request may have: the model's context, or the KV pool if smaller.
    max_model_len: usize,
    /// SHA-256 of the API key, if one is required.
    api_key: Option<[u8; 32]>,
    max_request_bytes: usize,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// Requests may leave `model` out; if they name one, it must be ours.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    fn head(&self, prefix: &str) -> Head {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Head { id: format!("{prefix}-{n}"), created: unix_time(), model: self.model_name.clone() }
    }
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn default_model_name(model: &str) -> String {
    if registry::find(model).is_some() {
        return model.to_string();
    }
    let path = std::path::Path::new(model.strip_prefix("dummy:").unwrap_or(model));
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map_or_else(|| model.to_string(), |n| n.to_string_lossy().into_owned())
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout must be a number of seconds >= 0");
    }
    let max_request_bytes = usize::try_from(parse_bytes(&a.max_request_bytes)?).context("--max-request-bytes")?;
    let api_key = a.api_key.clone().or_else(|| std::env::var("TERN_API_KEY").ok()).filter(|k| !k.is_empty());
    let (weights, tokenizer) = a.model.weights()?;
    let tokenizer = tokenizer.context("this model has no tokenizer: serve needs one (see --tokenizer)")?;
    let config = a.engine.config(a.model.threads()?, a.model.device()?, Some(&tokenizer))?;
    let template = match tokenizer.chat_template.as_deref() {
        None => None,
        Some(source) => {
            let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            match ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.eos)) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("tern serve: warning: chat completions disabled: {e:#}");
                    None
                }
            }
        }
    };
    let engine = EngineHandle::start(weights, Some(tokenizer), config)?;
    eprintln!("tern serve: {}", engine.describe());
    let tokenizer = engine.tokenizer().context("the engine has no tokenizer")?.clone();
    let max_model_len = engine.model_config().max_context.min(engine.kv_capacity_tokens());
    let state = Arc::new(AppState {
        engine: engine.clone(),
        tokenizer,
        template,
        model_name: a.served_model_name.clone().unwrap_or_else(|| default_model_name(&a.model.model)),
        max_model_len,
        api_key: api_key.as_deref().map(extract::key_digest),
        max_request_bytes,
        created: unix_time(),
        next_id: AtomicU64::new(1),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(serve(state, &a.host, a.port, Duration::from_secs_f64(a.shutdown_timeout)));
    // Whatever happened, the engine thread must not outlive us mid-request.
    engine.shutdown();
    engine.abort_all();
    engine.join();
    result
}

/// Runs one tiny request through the engine so the first client does not pay for cold pages.
async fn warm_up(s: &AppState) -> Result<()> {
    let ids = s.tokenizer.encode("Hello", true)?;
    let mut stream = s.engine.submit(GenerateRequest::new(ids, 1, SamplingParams::greedy()))?;
    while let Some(ev) = stream.next().await {
        if let Event::Error(e) = ev {
            bail!("warm-up request failed: {e}");
        }
    }
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), extract::require_api_key));
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn serve(state: Arc<AppState>, host: &str, port: u16, shutdown_timeout: Duration) -> Result<()> {
    warm_up(&state).await?;
    let mut signals = Signals::new()?;
    let listener =
        tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let graceful = async move {
        let _ = stop_rx.wait_for(|&stop| stop).await;
    };
    let mut server =
        tokio::spawn(axum::serve(listener, router(state.clone())).with_graceful_shutdown(graceful).into_future());
    eprintln!("tern serve: listening on http://{addr}");

    tokio::select! {
        _ = signals.recv() => {}
        r = &mut server => {
            r.context("the server task failed")?.context("the server failed")?;
            bail!("the server stopped unexpectedly");
        }
    }
    let m = state.engine.metrics();
    let in_flight = m.running.load(Ordering::Relaxed) + m.waiting.load(Ordering::Relaxed);
    eprintln!(
        "tern serve: shutting down; {in_flight} requests in flight get up to {:.0} s to finish",
        shutdown_timeout.as_secs_f64()
    );
    // New requests now get 503 while accepted ones finish; the listener closes.
    state.engine.shutdown();
    let _ = stop_tx.send(true);
    // A second signal aborts at once.
    let drained = tokio::select! {
        r = &mut server => Some(r),
        _ = tokio::time::sleep(shutdown_timeout) => None,
        _ = signals.recv() => None,
    };
    if drained.is_none() {
        eprintln!("tern serve: aborting the requests still running");
        state.engine.abort_all();
        // Aborted streams end at once; a client that does not read is not waited for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    eprintln!("tern serve: stopped");
    Ok(())
}

/// SIGINT and SIGTERM.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    #[cfg(unix)]
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    fn new() -> Result<Self> {
        Ok(Signals {})
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.engine.metrics().render_prometheus();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn model_card(s: &AppState) -> Value {
    json!({
        "id": s.model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "tern",
        "max_model_len": s.max_model_len,
    })
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_card(&s)] }))
}

async fn model(
    State(s): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::invalid(e.body_text(), Some("model")))?;
    s.check_model(Some(&name))?;
    Ok(Json(model_card(&s)))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("Invalid URL ({method} {})", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}
