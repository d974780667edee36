//! `tern bench serve`: a load generator for an OpenAI-compatible completions server (`tern
//! serve`, or any server that speaks POST /v1/completions with SSE streaming).
//!
//! Every prompt is a list of random token ids, so its length is exact whatever the tokenizer:
//! ids are drawn from 1000..20000, a range inside every supported vocabulary. With
//! `--prefix-len P` every prompt starts with the same P random tokens (a shared system prompt,
//! to measure prefix caching); the rest is random per prompt. Requests ask for exactly the
//! output length (`max_tokens`, `ignore_eos: true`) with `temperature: 0`: greedy decoding is
//! reproducible and the cheapest sampler, so the numbers measure the engine, not the sampler.
//!
//! Traffic: `--concurrency C` keeps C requests in flight; `--request-rate R` starts requests at
//! Poisson arrivals (exponential gaps of mean 1/R s, drawn from `--seed`) whatever is in flight;
//! neither starts all requests at once. Each request opens its own HTTP/1.1 connection and
//! reads the SSE stream as it arrives, recording time to first token (TTFT), the gaps between
//! content chunks (ITL), end-to-end latency and the output token count (`usage`, else the
//! number of content chunks). GET /metrics is scraped before and after, and the deltas of
//! tern's prefix-cache counters are reported when the server exposes them.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::rng::Rng;
use tokio::net::TcpStream;

/// Prompt token ids are drawn from this range: valid for every vocabulary tern supports and
/// clear of the special tokens at the start of most vocabularies.
const TOKEN_IDS: std::ops::Range<u32> = 1000..20000;

/// Counters scraped from GET /metrics before and after the run (deltas reported if present).
const SERVER_COUNTERS: &[&str] = &[
    "tern_prefix_cache_hits_total",
    "tern_prefix_cache_queries_total",
    "tern_prefill_tokens_computed_total",
    "tern_engine_steps_total",
    "tern_engine_step_seconds_total",
    "tern_engine_forward_seconds_total",
    "tern_engine_schedule_seconds_total",
    "tern_engine_output_seconds_total",
];

/// Distinct error messages kept for the report.
const MAX_ERRORS_KEPT: usize = 5;

#[derive(Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// The server's root URL (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model name sent with each request (default: the first model listed by GET /v1/models,
    /// if the server answers it; otherwise no name is sent).
    #[arg(long)]
    pub model: Option<String>,
    /// Number of requests.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Requests kept in flight at once (default, with no --request-rate: all at once).
    #[arg(long, conflicts_with = "request_rate")]
    pub concurrency: Option<usize>,
    /// Requests started per second, at Poisson arrivals (seeded by --seed).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Prompt tokens per request, after the shared prefix.
    #[arg(long, default_value_t = 256)]
    pub input_len: usize,
    /// Tokens generated per request (max_tokens, with ignore_eos).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Draw each input and output length uniformly from [len*(1-r), len*(1+r)]; 0 <= r < 1.
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Every prompt starts with the same this many random tokens (a shared system prompt).
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    /// Seed of the prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// How requests are started.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Traffic {
    /// At most this many in flight.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second.
    Rate(f64),
}

/// The validated benchmark.
#[derive(Clone, Debug)]
struct Config {
    target: Target,
    model: Option<String>,
    num_prompts: usize,
    traffic: Traffic,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
    prefix_len: usize,
    seed: u64,
}

impl Config {
    fn from_args(a: &ServeBenchArgs) -> Result<Config> {
        if a.num_prompts == 0 {
            bail!("--num-prompts must be at least 1");
        }
        let traffic = match (a.concurrency, a.request_rate) {
            (Some(_), Some(_)) => bail!("give either --concurrency or --request-rate, not both"),
            (Some(0), None) => bail!("--concurrency must be at least 1"),
            (Some(c), None) => Traffic::Concurrency(c),
            (None, Some(r)) if !(r.is_finite() && r > 0.0) => {
                bail!("--request-rate must be a positive number of requests per second, not {r}")
            }
            (None, Some(r)) => Traffic::Rate(r),
            (None, None) => Traffic::Concurrency(a.num_prompts),
        };
        if !(0.0..1.0).contains(&a.range_ratio) {
            bail!("--range-ratio must be in [0, 1), not {}", a.range_ratio);
        }
        if a.output_len == 0 {
            bail!("--output-len must be at least 1");
        }
        if a.input_len == 0 && a.prefix_len == 0 {
            bail!("--input-len and --prefix-len are both 0: prompts would be empty");
        }
        if a.model.as_deref() == Some("") {
            bail!("--model must not be empty");
        }
        Ok(Config {
            target: Target::parse(&a.url)?,
            model: a.model.clone(),
            num_prompts: a.num_prompts,
            traffic,
            input_len: a.input_len,
            output_len: a.output_len,
            range_ratio: a.range_ratio,
            prefix_len: a.prefix_len,
            seed: a.seed,
        })
    }
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    let cfg = Config::from_args(&a)?;
    // One thread is plenty to drive the requests, and leaves the cores to a local server.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    let report = rt.block_on(benchmark(&cfg))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.errors.is_empty() {
        eprintln!("{} of {} requests failed; first errors:", report.failed, report.num_prompts);
        for e in &report.errors {
            eprintln!("  {e}");
        }
    }
    if report.completed == 0 {
        bail!("all {} requests failed", report.num_prompts);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Where the server is: host and port to connect to, and the path prefix of its endpoints.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    host: String,
    port: u16,
    authority: String,
    base_path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target> {
        let bad = || format!("cannot read --url {url:?}: expected http://HOST[:PORT][/PATH]");
        let uri: Uri = url.parse().with_context(bad)?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!("--url {url:?}: https is not supported; use http://"),
            _ => bail!("{}", bad()),
        }
        let authority = uri.authority().with_context(bad)?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            bail!("{}", bad());
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Target {
            url: url.to_string(),
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            base_path,
        })
    }

    async fn connect(&self) -> Result<TcpStream> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| anyhow!("cannot connect to {}: {e}", self.url))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// One request on its own connection; the response body is read by the caller.
    async fn send(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Response<Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {}", self.url))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_path))
            .header(HOST, self.authority.as_str());
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        sender.send_request(req).await.with_context(|| format!("{path}: no response"))
    }

    /// GET a small document; None on any failure (used for optional endpoints).
    async fn get_text(&self, path: &str) -> Option<String> {
        let fetch = async {
            let resp = self.send(Method::GET, path, None).await.ok()?;
            if resp.status() != StatusCode::OK {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            String::from_utf8(body.to_vec()).ok()
        };
        tokio::time::timeout(Duration::from_secs(10), fetch).await.ok().flatten()
    }
}

// ---------------------------------------------------------------------------------------------
// Server-sent events

/// Splits a byte stream into SSE events and returns the `data` of each complete event (lines
/// `data: ...` joined with newlines; other fields and comments ignored; LF or CRLF).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8], events: &mut Vec<String>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[start..start + nl];
            start += nl + 1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(v) = line.strip_prefix(b"data:") {
                let v = String::from_utf8_lossy(v.strip_prefix(b" ").unwrap_or(v));
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&v);
                    }
                    None => self.data = Some(v.into_owned()),
                }
            }
        }
        self.buf.drain(..start);
    }
}

// ---------------------------------------------------------------------------------------------
// One request

#[derive(Debug, Default, Clone)]
struct RequestResult {
    error: Option<String>,
    input_tokens: usize,
    /// From the usage chunk, else the number of content chunks.
    output_tokens: usize,
    content_chunks: usize,
    /// Seconds from sending to the first content chunk.
    ttft: Option<f64>,
    /// Seconds between successive content chunks.
    itl: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    e2e: f64,
}

/// Sends one streaming completion and times its chunks.
async fn one_request(target: &Target, body: Bytes, input_tokens: usize) -> RequestResult {
    let mut r = RequestResult { input_tokens, ..Default::default() };
    let start = Instant::now();
    if let Err(e) = stream_completion(target, body, start, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r.e2e = start.elapsed().as_secs_f64();
    r
}

async fn stream_completion(target: &Target, body: Bytes, start: Instant, r: &mut RequestResult) -> Result<()> {
    let resp = target.send(Method::POST, "/v1/completions", Some(body)).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("HTTP {}: {}", status.as_u16(), error_message(&text));
    }
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut usage_tokens = None;
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        parser.push(&data, &mut events);
        for payload in events.drain(..) {
            if payload.trim() == "[DONE]" {
                r.output_tokens = usage_tokens.unwrap_or(r.content_chunks);
                return Ok(());
            }
            let chunk: Value = serde_json::from_str(&payload)
                .with_context(|| format!("stream chunk is not JSON: {:?}", truncate(&payload, 200)))?;
            if chunk.get("error").is_some_and(|e| !e.is_null()) {
                bail!("error in stream: {}", error_message(payload.as_bytes()));
            }
            if let Some(n) = chunk.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                usage_tokens = Some(n as usize);
            }
            if is_content(&chunk) {
                match last {
                    None => r.ttft = Some((now - start).as_secs_f64()),
                    Some(t) => r.itl.push((now - t).as_secs_f64()),
                }
                last = Some(now);
                r.content_chunks += 1;
            }
        }
    }
    bail!("the stream ended without data: [DONE]")
}

/// A chunk carrying generated text (or token ids, for servers that return them).
fn is_content(chunk: &Value) -> bool {
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else { return false };
    choices.iter().any(|c| {
        c.get("text").and_then(Value::as_str).is_some_and(|t| !t.is_empty())
            || c.get("token_ids").and_then(Value::as_array).is_some_and(|t| !t.is_empty())
    })
}

/// `error.message` of an OpenAI error body, else the body itself (shortened).
fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    let msg = parsed.as_ref().and_then(|v| {
        let e = v.get("error")?;
        e.get("message").and_then(Value::as_str).map(str::to_string).or_else(|| e.as_str().map(str::to_string))
    });
    truncate(msg.as_deref().unwrap_or(text.trim()), 300)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Workload

struct Prompt {
    tokens: Vec<u32>,
    max_tokens: usize,
}

/// Uniform integer in [len*(1-r), len*(1+r)] (bounds rounded down).
fn draw_len(rng: &mut Rng, len: usize, r: f64) -> usize {
    let lo = (len as f64 * (1.0 - r)).floor() as usize;
    let hi = ((len as f64 * (1.0 + r)).floor() as usize).max(lo);
    lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize
}

fn random_tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    let span = (TOKEN_IDS.end - TOKEN_IDS.start) as u64;
    (0..n).map(|_| TOKEN_IDS.start + (rng.next_u64() % span) as u32).collect()
}

fn make_prompts(cfg: &Config) -> Vec<Prompt> {
    let mut rng = Rng::new(cfg.seed);
    let prefix = random_tokens(&mut rng, cfg.prefix_len);
    (0..cfg.num_prompts)
        .map(|_| {
            let input = draw_len(&mut rng, cfg.input_len, cfg.range_ratio);
            let output = draw_len(&mut rng, cfg.output_len, cfg.range_ratio).max(1);
            let mut tokens = prefix.clone();
            tokens.extend(random_tokens(&mut rng, input));
            if tokens.is_empty() {
                // Only when input_len*(1-r) rounds to 0 with no prefix: keep every prompt non-empty.
                tokens.extend(random_tokens(&mut rng, 1));
            }
            Prompt { tokens, max_tokens: output }
        })
        .collect()
}

/// Start offsets of Poisson arrivals: the first at 0, then exponential gaps of mean 1/rate.
fn poisson_offsets(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    // A stream separate from the prompts', so that changing the rate keeps the same prompts.
    let mut rng = Rng::new(seed ^ 0x5EED_A881_7A15_0000);
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                t += -(1.0 - u).ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

fn request_body(model: Option<&str>, p: &Prompt) -> Bytes {
    let mut body = json!({
        "prompt": p.tokens,
        "max_tokens": p.max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    Bytes::from(body.to_string())
}

// ---------------------------------------------------------------------------------------------
// The run

/// Values of the named counters in a Prometheus text exposition (unlabelled samples only).
fn parse_metrics(text: &str, names: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
        if names.contains(&name) {
            if let Ok(v) = value.parse::<f64>() {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}

async fn scrape_metrics(target: &Target) -> BTreeMap<String, f64> {
    match target.get_text("/metrics").await {
        Some(text) => parse_metrics(&text, SERVER_COUNTERS),
        None => BTreeMap::new(),
    }
}

/// The id of the first model of GET /v1/models, if the server answers it.
async fn first_model(target: &Target) -> Option<String> {
    let text = target.get_text("/v1/models").await?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.pointer("/data/0/id")?.as_str().map(str::to_string)
}

async fn benchmark(cfg: &Config) -> Result<Report> {
    let target = Arc::new(cfg.target.clone());
    // Fail fast, with a clear message, when nothing listens at the URL.
    match tokio::time::timeout(Duration::from_secs(10), target.connect()).await {
        Ok(r) => drop(r?),
        Err(_) => bail!("cannot connect to {}: timed out after 10 s", target.url),
    }
    let model = match &cfg.model {
        Some(m) => Some(m.clone()),
        None => first_model(&target).await,
    };
    let prompts = make_prompts(cfg);
    let jobs: Arc<Vec<(Bytes, usize)>> =
        Arc::new(prompts.iter().map(|p| (request_body(model.as_deref(), p), p.tokens.len())).collect());
    let before = scrape_metrics(&target).await;

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match cfg.traffic {
        Traffic::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(jobs.len()) {
                let (target, jobs, next) = (target.clone(), jobs.clone(), next.clone());
                tasks.spawn(async move {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((body, n_in)) = jobs.get(i) else { break };
                        done.push((i, one_request(&target, body.clone(), *n_in).await));
                    }
                    done
                });
            }
        }
        Traffic::Rate(rate) => {
            for (i, offset) in poisson_offsets(jobs.len(), rate, cfg.seed).into_iter().enumerate() {
                let (target, jobs) = (target.clone(), jobs.clone());
                let at = tokio::time::Instant::from_std(start + offset);
                tasks.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let (body, n_in) = &jobs[i];
                    vec![(i, one_request(&target, body.clone(), *n_in).await)]
                });
            }
        }
    }
    let mut results = vec![RequestResult::default(); jobs.len()];
    while let Some(done) = tasks.join_next().await {
        for (i, r) in done.context("a request task failed")? {
            results[i] = r;
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let after = scrape_metrics(&target).await;
    let server_metrics: BTreeMap<String, f64> =
        after.iter().filter_map(|(k, v)| Some((k.clone(), v - before.get(k)?))).collect();
    Ok(make_report(cfg, model, duration, &results, server_metrics))
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// The p-th percentile (0..=100) of sorted values by linear interpolation between the two
/// nearest ranks (numpy's default): rank p/100 * (n-1) counted from 0. None if empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (p / 100.0).clamp(0.0, 1.0) * last as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// Mean and percentiles, in milliseconds (null when there are no values).
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Stats {
    pub count: usize,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

fn stats_ms(seconds: impl IntoIterator<Item = f64>) -> Stats {
    let mut v: Vec<f64> = seconds.into_iter().map(|s| s * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Stats { count: v.len(), mean, p50: percentile(&v, 50.0), p90: percentile(&v, 90.0), p99: percentile(&v, 99.0) }
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub url: String,
    pub model: Option<String>,
    pub num_prompts: usize,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    pub prefix_len: usize,
    pub seed: u64,
    pub temperature: f64,
    /// Seconds from the first request sent to the last response finished.
    pub duration_s: f64,
    pub completed: usize,
    pub failed: usize,
    /// Prompt tokens sent and tokens generated, over completed requests.
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Stats,
    pub itl_ms: Stats,
    /// Per request: (e2e - ttft) / (output tokens - 1), for requests with 2+ tokens.
    pub tpot_ms: Stats,
    pub e2e_ms: Stats,
    /// Deltas over the run of the server's counters that it exposes (tern's prefix cache).
    pub server_metrics: BTreeMap<String, f64>,
    /// hits / queries of the deltas above, when both are present and queries > 0.
    pub prefix_cache_hit_rate: Option<f64>,
    /// The first few distinct error messages.
    pub errors: Vec<String>,
}

fn make_report(
    cfg: &Config,
    model: Option<String>,
    duration: f64,
    results: &[RequestResult],
    server_metrics: BTreeMap<String, f64>,
) -> Report {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let mut errors: Vec<String> = Vec::new();
    for e in results.iter().filter_map(|r| r.error.as_ref()) {
        if errors.len() < MAX_ERRORS_KEPT && !errors.contains(e) {
            errors.push(e.clone());
        }
    }
    let total_input_tokens: usize = ok.iter().map(|r| r.input_tokens).sum();
    let total_output_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let tpot = ok.iter().filter_map(|r| {
        let ttft = r.ttft?;
        (r.output_tokens > 1).then(|| (r.e2e - ttft) / (r.output_tokens - 1) as f64)
    });
    let prefix_cache_hit_rate = match (
        server_metrics.get("tern_prefix_cache_hits_total"),
        server_metrics.get("tern_prefix_cache_queries_total"),
    ) {
        (Some(&h), Some(&q)) if q > 0.0 => Some(h / q),
        _ => None,
    };
    let (concurrency, request_rate) = match cfg.traffic {
        Traffic::Concurrency(c) => (Some(c), None),
        Traffic::Rate(r) => (None, Some(r)),
    };
    Report {
        url: cfg.target.url.clone(),
        model,
        num_prompts: cfg.num_prompts,
        concurrency,
        request_rate,
        input_len: cfg.input_len,
        output_len: cfg.output_len,
        range_ratio: cfg.range_ratio,
        prefix_len: cfg.prefix_len,
        seed: cfg.seed,
        temperature: 0.0,
        duration_s: duration,
        completed: ok.len(),
        failed: results.len() - ok.len(),
        total_input_tokens,
        total_output_tokens,
        request_throughput: per_s(ok.len() as f64),
        output_token_throughput: per_s(total_output_tokens as f64),
        total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
        ttft_ms: stats_ms(ok.iter().filter_map(|r| r.ttft)),
        itl_ms: stats_ms(ok.iter().flat_map(|r| r.itl.iter().copied())),
        tpot_ms: stats_ms(tpot),
        e2e_ms: stats_ms(ok.iter().map(|r| r.e2e)),
        server_metrics,
        prefix_cache_hit_rate,
        errors,
    }
}

fn print_report(r: &Report) {
    let traffic = match (r.concurrency, r.request_rate) {
        (Some(c), _) if c >= r.num_prompts => format!("all {} requests at once", r.num_prompts),
        (Some(c), _) => format!("concurrency {c}"),
        (_, Some(rate)) => format!("{rate} req/s, Poisson arrivals (seed {})", r.seed),
        _ => String::new(),
    };
    let spread = if r.range_ratio > 0.0 { format!(" (±{:.0}%)", r.range_ratio * 100.0) } else { String::new() };
    let prefix = if r.prefix_len > 0 { format!("{} shared + ", r.prefix_len) } else { String::new() };
    println!(
        "{} ({}): {} prompts of {prefix}{}{spread} tokens, {}{spread} output tokens, {traffic}, temperature 0",
        r.url,
        r.model.as_deref().unwrap_or("model not named"),
        r.num_prompts,
        r.input_len,
        r.output_len
    );
    println!("| metric | value |");
    println!("|---|---|");
    println!("| duration (s) | {:.2} |", r.duration_s);
    println!("| completed / failed requests | {} / {} |", r.completed, r.failed);
    println!("| input / output tokens | {} / {} |", r.total_input_tokens, r.total_output_tokens);
    println!("| request throughput (req/s) | {:.2} |", r.request_throughput);
    println!("| output token throughput (tok/s) | {:.1} |", r.output_token_throughput);
    println!("| total token throughput (tok/s) | {:.1} |", r.total_token_throughput);
    for (name, v) in &r.server_metrics {
        println!("| {name} (delta) | {v} |");
    }
    if let Some(rate) = r.prefix_cache_hit_rate {
        println!("| prefix cache hit rate | {:.1}% |", rate * 100.0);
    }
    println!();
    println!("| latency (ms) | mean | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (name, s) in [("TTFT", &r.ttft_ms), ("ITL", &r.itl_ms), ("TPOT", &r.tpot_ms), ("E2E", &r.e2e_ms)] {
        println!("| {name} | {} | {} | {} | {} |", ms(s.mean), ms(s.p50), ms(s.p90), ms(s.p99));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::Mutex;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        a: ServeBenchArgs,
    }

    fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<ServeBenchArgs, clap::Error> {
        TestCli::try_parse_from(std::iter::once("x").chain(args)).map(|c| c.a)
    }

    #[test]
    fn percentile_interpolates_linearly() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 0.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5)); // rank 1.5
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12); // rank 2.7
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&hundred, 99.0).unwrap() - 99.01).abs() < 1e-9); // rank 98.01
        assert_eq!(percentile(&hundred, 50.0), Some(50.5));
        let s = stats_ms([0.001, 0.003]);
        assert_eq!((s.count, s.mean, s.p50), (2, Some(2.0), Some(2.0)));
        assert_eq!(stats_ms([]).mean, None);
    }

    #[test]
    fn sse_parser_handles_split_and_crlf_events() {
        let mut p = SseParser::default();
        let mut ev = Vec::new();
        p.push(b"data: {\"a\"", &mut ev);
        assert!(ev.is_empty());
        p.push(b":1}\n\n: comment\n\ndata: x\r\n", &mut ev);
        assert_eq!(ev, vec!["{\"a\":1}".to_string()]);
        p.push(b"data:y\r\n\r\nevent: e\ndata: [DONE]\n", &mut ev);
        assert_eq!(ev[1], "x\ny");
        assert_eq!(ev.len(), 2);
        p.push(b"\n", &mut ev);
        assert_eq!(ev[2], "[DONE]");
    }

    #[test]
    fn prompts_have_the_asked_lengths_and_prefix() {
        let a = parse([
            "--num-prompts",
            "50",
            "--input-len",
            "100",
            "--output-len",
            "10",
            "--range-ratio",
            "0.5",
            "--prefix-len",
            "16",
        ])
        .unwrap();
        let cfg = Config::from_args(&a).unwrap();
        let prompts = make_prompts(&cfg);
        assert_eq!(prompts.len(), 50);
        for p in &prompts {
            assert_eq!(p.tokens[..16], prompts[0].tokens[..16]);
            assert!((16 + 50..=16 + 150).contains(&p.tokens.len()), "{}", p.tokens.len());
            assert!((5..=15).contains(&p.max_tokens));
            assert!(p.tokens.iter().all(|t| TOKEN_IDS.contains(t)));
        }
        assert_ne!(prompts[0].tokens[16..], prompts[1].tokens[16..]);
        let lens: std::collections::HashSet<usize> = prompts.iter().map(|p| p.tokens.len()).collect();
        assert!(lens.len() > 10);
        let offsets = poisson_offsets(2000, 100.0, 3);
        assert_eq!(offsets[0], Duration::ZERO);
        let mean_gap = offsets[1999].as_secs_f64() / 1999.0;
        assert!((mean_gap - 0.01).abs() < 0.001, "{mean_gap}");
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let err = |args: &[&str]| {
            let a = parse(args.iter().copied()).map_err(|e| e.to_string())?;
            Config::from_args(&a).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(err(&["--num-prompts", "0"]).unwrap_err().contains("--num-prompts"));
        assert!(err(&["--concurrency", "2", "--request-rate", "1"]).unwrap_err().contains("cannot be used with"));
        assert!(err(&["--concurrency", "0"]).unwrap_err().contains("--concurrency"));
        assert!(err(&["--request-rate", "0"]).unwrap_err().contains("--request-rate"));
        assert!(err(&["--range-ratio", "1"]).unwrap_err().contains("--range-ratio"));
        assert!(err(&["--output-len", "0"]).unwrap_err().contains("--output-len"));
        assert!(err(&["--input-len", "0"]).unwrap_err().contains("empty"));
        assert!(err(&["--url", "https://x"]).unwrap_err().contains("https"));
        assert!(err(&["--url", "localhost:8080"]).unwrap_err().contains("http://HOST"));
        assert!(err(&["--url", "http://[::1]:9/base/"]).is_ok());
        let t = Target::parse("http://[::1]:9/base/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.base_path.as_str()), ("::1", 9, "/base"));
    }

    #[test]
    fn bench_keeps_its_model_flags_and_takes_serve() {
        use crate::bench::BenchCommand;
        let Ok(crate::Cli { command: crate::Command::Bench(b) }) =
            crate::Cli::try_parse_from(["tern", "bench", "-m", "smollm2-135m", "-p", "64", "-n", "16"])
        else {
            panic!("tern bench -m -p -n must parse")
        };
        assert_eq!((b.model.model.as_str(), b.prompt_tokens, b.gen_tokens), ("smollm2-135m", 64, 16));
        assert!(b.command.is_none());
        let Ok(crate::Cli { command: crate::Command::Bench(b) }) =
            crate::Cli::try_parse_from(["tern", "bench", "serve", "--url", "http://h:1", "--concurrency", "3"])
        else {
            panic!("tern bench serve must parse")
        };
        let Some(BenchCommand::Serve(s)) = b.command else { panic!("no serve subcommand") };
        assert_eq!((s.url.as_str(), s.concurrency), ("http://h:1", Some(3)));
        assert!(crate::Cli::try_parse_from(["tern", "bench", "-p", "4", "serve"]).is_err());
    }

    // --- A fake SSE server on OS threads ----------------------------------------------------

    const FIRST_TOKEN_DELAY: Duration = Duration::from_millis(40);
    const TOKEN_GAP: Duration = Duration::from_millis(10);

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Ok,
        /// No usage chunk: the client must count content chunks.
        NoUsage,
        /// Every second completion answers 503; the others put an error object in the stream.
        Errors,
    }

    #[derive(Default)]
    struct Fake {
        prompts: Mutex<Vec<Vec<u32>>>,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        served: AtomicUsize,
        query_tokens: AtomicUsize,
    }

    fn read_request(s: &mut StdStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).ok()?;
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok()))
            .flatten()
            .unwrap_or(0);
        let mut body = vec![0; len];
        s.read_exact(&mut body).ok()?;
        Some((head.lines().next()?.to_string(), body))
    }

    fn write_chunk(s: &mut StdStream, data: &str) {
        let _ = write!(s, "{:x}\r\n{data}\r\n", data.len());
        let _ = s.flush();
    }

    fn serve_one(mut s: StdStream, mode: Mode, fake: &Fake) {
        let _ = s.set_nodelay(true);
        let Some((request_line, body)) = read_request(&mut s) else { return };
        let reply = |s: &mut StdStream, status: &str, body: &str| {
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        };
        if request_line.starts_with("GET /metrics ") {
            let q = fake.query_tokens.load(Ordering::SeqCst);
            let text = format!(
                "# HELP tern_prefix_cache_hits_total x\n# TYPE tern_prefix_cache_hits_total counter\n\
                 tern_prefix_cache_hits_total {}\ntern_prefix_cache_queries_total {q}\nother_total 5\n",
                q / 2
            );
            return reply(&mut s, "200 OK", &text);
        }
        if request_line.starts_with("GET /v1/models ") {
            return reply(&mut s, "200 OK", r#"{"object":"list","data":[{"id":"fake-model"}]}"#);
        }
        assert!(request_line.starts_with("POST /v1/completions "), "{request_line}");
        let req: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(req["stream"], true);
        assert_eq!(req["ignore_eos"], true);
        assert_eq!(req["stream_options"]["include_usage"], true);
        assert_eq!(req["model"], "fake-model");
        let prompt: Vec<u32> = serde_json::from_value(req["prompt"].clone()).unwrap();
        let n = req["max_tokens"].as_u64().unwrap() as usize;
        let k = fake.served.fetch_add(1, Ordering::SeqCst);
        fake.prompts.lock().unwrap().push(prompt.clone());
        if mode == Mode::Errors && k.is_multiple_of(2) {
            return reply(&mut s, "503 Service Unavailable", r#"{"error":{"message":"overloaded"}}"#);
        }
        let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        std::thread::sleep(FIRST_TOKEN_DELAY);
        for i in 0..n {
            if i > 0 {
                std::thread::sleep(TOKEN_GAP);
            }
            if mode == Mode::Errors {
                write_chunk(&mut s, "data: {\"error\":{\"message\":\"engine failed\"}}\n\n");
                break;
            }
            let event =
                format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"t{i} \",\"finish_reason\":null}}]}}\n\n");
            if i == 1 {
                // An event split across writes, and a chunk that carries no text yet.
                let (a, b) = event.split_at(10);
                write_chunk(&mut s, a);
                std::thread::sleep(Duration::from_millis(2));
                write_chunk(&mut s, b);
                write_chunk(&mut s, "data: {\"choices\":[{\"index\":0,\"text\":\"\"}]}\r\n\r\n");
            } else {
                write_chunk(&mut s, &event);
            }
        }
        if mode != Mode::Errors {
            write_chunk(&mut s, "data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}]}\n\n");
            if mode == Mode::Ok {
                let usage = format!(
                    "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n",
                    prompt.len(),
                    prompt.len() + n
                );
                write_chunk(&mut s, &usage);
            }
        }
        // Counted out before the last event: a client may send its next request as soon as it
        // reads [DONE], before this thread runs again.
        fake.query_tokens.fetch_add(prompt.len(), Ordering::SeqCst);
        fake.in_flight.fetch_sub(1, Ordering::SeqCst);
        if mode != Mode::Errors {
            write_chunk(&mut s, "data: [DONE]\n\n");
        }
        let _ = write!(s, "0\r\n\r\n");
    }

    fn start_fake(mode: Mode) -> (String, Arc<Fake>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Arc::new(Fake::default());
        let f = fake.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let f = f.clone();
                std::thread::spawn(move || serve_one(s, mode, &f));
            }
        });
        (url, fake)
    }

    fn bench(url: &str, extra: &[&str]) -> Result<Report> {
        let args = ["--url", url].into_iter().chain(extra.iter().copied());
        let cfg = Config::from_args(&parse(args)?)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(benchmark(&cfg))
    }

    #[test]
    fn measures_a_fake_sse_server() {
        let (url, fake) = start_fake(Mode::Ok);
        let args =
            ["--num-prompts", "6", "--concurrency", "2", "--input-len", "20", "--output-len", "5", "--prefix-len", "8"];
        let r = bench(&url, &args).unwrap();
        assert_eq!((r.completed, r.failed), (6, 0), "{:?}", r.errors);
        assert_eq!(r.model.as_deref(), Some("fake-model"));
        assert_eq!((r.total_input_tokens, r.total_output_tokens), (6 * 28, 6 * 5));
        assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 2);
        let prompts = fake.prompts.lock().unwrap();
        assert_eq!(prompts.len(), 6);
        assert!(prompts.iter().all(|p| p.len() == 28 && p[..8] == prompts[0][..8]));
        // 5 content chunks per request (the empty-text chunks do not count): 1 TTFT, 4 gaps.
        assert_eq!((r.ttft_ms.count, r.itl_ms.count, r.e2e_ms.count), (6, 24, 6));
        let first = FIRST_TOKEN_DELAY.as_secs_f64() * 1e3;
        let gap = TOKEN_GAP.as_secs_f64() * 1e3;
        let ttft = r.ttft_ms.mean.unwrap();
        assert!(ttft >= first && ttft < first + 500.0, "ttft {ttft}");
        let itl = r.itl_ms.p50.unwrap();
        assert!(itl >= gap * 0.9 && itl < gap + 200.0, "itl {itl}");
        let tpot = r.tpot_ms.mean.unwrap();
        assert!(tpot >= gap * 0.9 && tpot < gap + 200.0, "tpot {tpot}");
        assert!(r.e2e_ms.p99.unwrap() >= first + 4.0 * gap);
        // 3 rounds of 2 requests, each at least 40 + 4 * 10 ms.
        assert!(r.duration_s >= 3.0 * (first + 4.0 * gap) / 1e3, "{}", r.duration_s);
        assert!((r.request_throughput - 6.0 / r.duration_s).abs() < 1e-9);
        assert!((r.total_token_throughput - (6.0 * 33.0) / r.duration_s).abs() < 1e-9);
        assert_eq!(r.server_metrics.get("tern_prefix_cache_queries_total"), Some(&(6.0 * 28.0)));
        assert_eq!(r.server_metrics.get("tern_prefix_cache_hits_total"), Some(&(3.0 * 28.0)));
        assert!(!r.server_metrics.contains_key("tern_prefill_tokens_computed_total"));
        assert!(!r.server_metrics.contains_key("other_total"));
        assert_eq!(r.prefix_cache_hit_rate, Some(0.5));
        print_report(&r);
        serde_json::to_string(&r).unwrap();
    }

    #[test]
    fn poisson_arrivals_and_chunk_counting_without_usage() {
        let (url, fake) = start_fake(Mode::NoUsage);
        let args =
            ["--num-prompts", "5", "--request-rate", "100", "--input-len", "10", "--output-len", "3", "--seed", "7"];
        let r = bench(&url, &args).unwrap();
        assert_eq!((r.completed, r.failed), (5, 0), "{:?}", r.errors);
        assert_eq!(r.total_output_tokens, 15);
        assert_eq!(r.itl_ms.count, 10);
        assert_eq!(r.request_rate, Some(100.0));
        assert_eq!(fake.served.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn errors_are_counted_not_fatal() {
        let (url, _fake) = start_fake(Mode::Errors);
        let r = bench(&url, &["--num-prompts", "4", "--input-len", "4", "--output-len", "3"]).unwrap();
        assert_eq!((r.completed, r.failed), (0, 4));
        assert_eq!(r.concurrency, Some(4));
        assert!(r.errors.iter().any(|e| e == "HTTP 503: overloaded"), "{:?}", r.errors);
        assert!(r.errors.iter().any(|e| e.contains("engine failed")), "{:?}", r.errors);
        assert_eq!(r.ttft_ms.mean, None);
        assert_eq!(r.request_throughput, 0.0);
        print_report(&r);
    }

    #[test]
    fn no_server_is_a_clear_error() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let e = bench(&url, &["--num-prompts", "1"]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot connect to {url}")), "{e}");
    }
}
