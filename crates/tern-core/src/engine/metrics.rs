//! Engine counters, gauges and latency histograms, rendered in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Shared between the engine thread (writer) and front ends (readers).
#[derive(Debug)]
pub struct Metrics {
    pub requests_stop: AtomicU64,
    pub requests_length: AtomicU64,
    pub requests_abort: AtomicU64,
    pub requests_error: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Prompt tokens actually run through the model (prefix-cache hits and chunks skipped).
    pub prefill_tokens_computed: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Microseconds of engine steps, and of the runner's forward passes within them (the rest
    /// is the engine's own host work: scheduling, sampling, detokenizing, streaming).
    pub step_micros: AtomicU64,
    pub forward_micros: AtomicU64,
    /// Of the rest: choosing the step's work (scheduler, block tables), and turning its
    /// outputs into tokens, text and stream events.
    pub schedule_micros: AtomicU64,
    pub output_micros: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Speculative decoding: verification passes (sequence-steps with proposed tokens).
    pub spec_verifications: AtomicU64,
    pub spec_proposed_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    /// Time spent proposing (n-gram lookup or the drafter's passes).
    pub spec_propose_micros: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Metrics {
            requests_stop: z(),
            requests_length: z(),
            requests_abort: z(),
            requests_error: z(),
            prompt_tokens: z(),
            generation_tokens: z(),
            prefill_tokens_computed: z(),
            prefix_cache_queries: z(),
            prefix_cache_hits: z(),
            preemptions: z(),
            steps: z(),
            step_micros: z(),
            forward_micros: z(),
            schedule_micros: z(),
            output_micros: z(),
            running: z(),
            waiting: z(),
            kv_blocks_used: z(),
            kv_blocks_total: z(),
            spec_verifications: z(),
            spec_proposed_tokens: z(),
            spec_accepted_tokens: z(),
            spec_propose_micros: z(),
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(ITL_BUCKETS)),
        }
    }
}

impl Metrics {
    pub(crate) fn observe_ttft(&self, d: Duration) {
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).observe(d.as_secs_f64());
    }

    pub(crate) fn observe_itl(&self, d: Duration) {
        self.itl.lock().unwrap_or_else(|e| e.into_inner()).observe(d.as_secs_f64());
    }

    /// Hits / queries of prompt tokens in the prefix cache (0 before any query).
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        let q = self.prefix_cache_queries.load(Relaxed);
        if q == 0 {
            0.0
        } else {
            self.prefix_cache_hits.load(Relaxed) as f64 / q as f64
        }
    }

    /// Prometheus text exposition format, metric names prefixed `tern_`.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP tern_{name} {help}\n# TYPE tern_{name} {kind}\ntern_{name} {v}");
        };
        let g = |a: &AtomicU64| a.load(Relaxed) as f64;
        one("num_requests_running", "gauge", "Sequences scheduled in the engine.", g(&self.running));
        one("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", g(&self.waiting));
        one("kv_blocks_used", "gauge", "KV cache blocks held by sequences.", g(&self.kv_blocks_used));
        let free = g(&self.kv_blocks_total) - g(&self.kv_blocks_used);
        one("kv_blocks_free", "gauge", "KV cache blocks not held by any sequence.", free);
        one("kv_blocks_total", "gauge", "KV cache blocks in the pool.", g(&self.kv_blocks_total));
        one("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", g(&self.prompt_tokens));
        one("generation_tokens_total", "counter", "Generated tokens.", g(&self.generation_tokens));
        one(
            "prefill_tokens_computed_total",
            "counter",
            "Prompt tokens run through the model (excludes prefix-cache hits).",
            g(&self.prefill_tokens_computed),
        );
        one(
            "prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            g(&self.prefix_cache_queries),
        );
        one(
            "prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            g(&self.prefix_cache_hits),
        );
        one(
            "prefix_cache_hit_rate",
            "gauge",
            "prefix_cache_hits_total / prefix_cache_queries_total.",
            self.prefix_cache_hit_rate(),
        );
        one("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", g(&self.preemptions));
        one("engine_steps_total", "counter", "Engine steps (batched forward passes).", g(&self.steps));
        let secs = |a: &AtomicU64| g(a) / 1e6;
        one("engine_step_seconds_total", "counter", "Time spent in engine steps.", secs(&self.step_micros));
        one(
            "engine_forward_seconds_total",
            "counter",
            "Time spent in forward passes (within engine steps).",
            secs(&self.forward_micros),
        );
        one(
            "engine_schedule_seconds_total",
            "counter",
            "Time spent choosing each step's work (within engine steps).",
            secs(&self.schedule_micros),
        );
        one(
            "engine_output_seconds_total",
            "counter",
            "Time spent turning forward results into tokens, text and stream events (within engine steps).",
            secs(&self.output_micros),
        );
        one(
            "spec_decode_num_verifications_total",
            "counter",
            "Speculative decoding: sequence-steps that verified proposed tokens.",
            g(&self.spec_verifications),
        );
        one(
            "spec_decode_num_draft_tokens_total",
            "counter",
            "Speculative decoding: tokens proposed.",
            g(&self.spec_proposed_tokens),
        );
        one(
            "spec_decode_num_accepted_tokens_total",
            "counter",
            "Speculative decoding: proposed tokens accepted by the target model.",
            g(&self.spec_accepted_tokens),
        );
        let (p, a) = (g(&self.spec_proposed_tokens), g(&self.spec_accepted_tokens));
        one(
            "spec_decode_acceptance_rate",
            "gauge",
            "Speculative decoding: accepted / proposed tokens.",
            if p > 0.0 { a / p } else { 0.0 },
        );
        let v = g(&self.spec_verifications);
        one(
            "spec_decode_mean_accepted_per_verification",
            "gauge",
            "Speculative decoding: accepted tokens per verification pass (each also yields one more).",
            if v > 0.0 { a / v } else { 0.0 },
        );
        one(
            "spec_decode_propose_seconds_total",
            "counter",
            "Speculative decoding: time spent proposing (within engine steps).",
            secs(&self.spec_propose_micros),
        );
        let _ = writeln!(out, "# HELP tern_request_success_total Finished requests by finish reason.");
        let _ = writeln!(out, "# TYPE tern_request_success_total counter");
        for (reason, a) in [
            ("stop", &self.requests_stop),
            ("length", &self.requests_length),
            ("abort", &self.requests_abort),
            ("error", &self.requests_error),
        ] {
            let _ = writeln!(out, "tern_request_success_total{{finished_reason=\"{reason}\"}} {}", a.load(Relaxed));
        }
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).render(
            &mut out,
            "tern_time_to_first_token_seconds",
            "Time from submission to the first generated token.",
        );
        self.itl.lock().unwrap_or_else(|e| e.into_inner()).render(
            &mut out,
            "tern_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        out
    }
}
