//! `tern serve` end to end: the server runs as a child process on a free port and is spoken
//! to over hand-written HTTP/1.1 and by the official `openai` Python client; greedy outputs
//! must equal `tern generate`'s.

mod common;
use common::*;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m";
const PROMPT: &str = "The capital of France is";
const CHAT_PROMPT: &str = "What is the capital of France?";

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str], envs: &[(&str, &str)]) -> Server {
        model_path(MODEL);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", "-m", MODEL, "--port", "0", "-t", "2", "--kv-cache-memory", "512MiB"])
            .args(extra)
            .env_remove("TERN_API_KEY")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start tern serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tern serve: listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => Server { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                panic!("tern serve did not start:\n{}", log.lock().unwrap());
            }
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "tern serve did not exit:\n{}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit must be graceful (status 0).
    fn stop(mut self) {
        self.sigterm();
        let status = self.wait_exit();
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "tern serve exited with {status}:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    fn get(&self, path: &str) -> Resp {
        http(&self.addr, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        http(&self.addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The `data:` payloads of a Server-Sent Events body.
    fn sse(&self) -> Vec<String> {
        self.text().split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += &format!("Content-Length: {}\r\n\r\n", body.len());
    let mut raw = req.into_bytes();
    raw.extend_from_slice(body);
    http_raw(addr, &raw)
}

fn http_raw(addr: &str, request: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    // The server may answer (413) and close before reading everything we send.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) if !raw.is_empty() => break,
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    parse_response(&raw)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(raw: &[u8]) -> Resp {
    let end = find(raw, b"\r\n\r\n").unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let mut body = raw[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Resp { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("chunk size");
        b = &b[eol + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
    out
}

/// `tern generate --json` with the server's settings; returns its text.
fn cli_text(chat: bool, prompt: &str, max_tokens: usize) -> String {
    let max = max_tokens.to_string();
    let mut args = vec!["generate", "-m", MODEL, "-t", "2", "--temperature", "0", "--max-tokens", &max, "--json"];
    if chat {
        args.push("--chat");
    }
    args.extend(["--", prompt]);
    let v: Value = serde_json::from_str(&tern_ok(&args)).unwrap();
    v["text"].as_str().unwrap().to_string()
}

/// Path, body, status, param, code.
type ErrorCase = (&'static str, Value, u16, Option<&'static str>, Option<&'static str>);

fn assert_error(r: &Resp, status: u16, param: Option<&str>, code: Option<&str>, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    let kind = if status < 500 { "invalid_request_error" } else { "server_error" };
    assert_eq!(e["type"], kind, "{what}: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{what}: {v}");
    }
    if let Some(c) = code {
        assert_eq!(e["code"], c, "{what}: {v}");
    }
}

#[test]
fn serve_endpoints_match_the_cli_and_fail_cleanly() {
    let server = Server::start(&[], &[]);
    let expected = cli_text(false, PROMPT, 24);

    // Completions, plain and streamed, equal the CLI's greedy text.
    let req = json!({ "model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0 });
    let r = server.post("/v1/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["text"], expected.as_str());
    let usage = &v["usage"];
    let n_out = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], if n_out == 24 { "length" } else { "stop" });
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + n_out));
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());

    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({ "include_usage": true });
    let r = server.post("/v1/completions", &stream_req);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = r.sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, expected);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"].as_u64(), Some(n_out));
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));

    // n = 2 greedy: two identical choices; a batch of prompts is prompt-major.
    let r = server.post("/v1/completions", &json!({ "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "n": 2 }));
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));
    let ids: Vec<u32> = server.post("/tokenize", &json!({ "prompt": "Once upon a time" })).json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let batch = json!({ "prompt": [PROMPT, ids], "max_tokens": 8, "temperature": 0, "n": 2 });
    let v = server.post("/v1/completions", &batch).json();
    let texts: Vec<&str> = v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    let single = |p: Value| server.post("/v1/completions", &json!({ "prompt": p, "max_tokens": 8, "temperature": 0 }));
    let (a, b) = (single(json!(PROMPT)).json(), single(json!("Once upon a time")).json());
    let (at, bt) = (a["choices"][0]["text"].as_str().unwrap(), b["choices"][0]["text"].as_str().unwrap());
    assert_eq!(texts, [at, at, bt, bt]);
    assert_eq!(v["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"].as_u64().unwrap() + ids.len() as u64);

    // Logprobs in both shapes.
    let v = server
        .post("/v1/completions", &json!({ "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3 }))
        .json();
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().map(Vec::len), Some(n), "{key}: {lp}");
    }
    assert_eq!(
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(),
        v["choices"][0]["text"].as_str().unwrap()
    );
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    let chat_req = json!({
        "messages": [{ "role": "user", "content": CHAT_PROMPT }],
        "max_tokens": 24, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let v = server.post("/v1/chat/completions", &chat_req).json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], cli_text(true, CHAT_PROMPT, 24).as_str());
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array() && content[0]["logprob"].as_f64().unwrap() <= 0.0);

    // Chat streaming: the role first, the same text, [DONE].
    let mut stream_chat = chat_req.clone();
    stream_chat["stream"] = json!(true);
    let events = server.post("/v1/chat/completions", &stream_chat).sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, v["choices"][0]["message"]["content"].as_str().unwrap());

    // Every kind of bad request gets its status and OpenAI's error shape.
    let long_prompt: Vec<u32> = vec![1; 9000];
    let cases: Vec<ErrorCase> = vec![
        ("/v1/completions", json!({ "prompt": PROMPT, "model": "gpt-4" }), 404, Some("model"), Some("model_not_found")),
        ("/v1/completions", json!({ "prompt": 5 }), 400, Some("prompt"), None),
        ("/v1/completions", json!({ "max_tokens": 3 }), 400, None, None),
        ("/v1/completions", json!({ "prompt": PROMPT, "max_tokens": "ten" }), 400, None, None),
        ("/v1/completions", json!({ "prompt": PROMPT, "temperature": -1 }), 400, Some("temperature"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "top_p": 2 }), 400, Some("top_p"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "n": 0 }), 400, Some("n"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "max_tokens": 0 }), 400, Some("max_tokens"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "max_tokens": 100000 }), 400, Some("max_tokens"), None),
        ("/v1/completions", json!({ "prompt": long_prompt }), 400, Some("prompt"), None),
        ("/v1/completions", json!({ "prompt": [999999] }), 400, Some("prompt"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "logprobs": 21 }), 400, Some("logprobs"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "echo": true }), 400, Some("echo"), None),
        ("/v1/completions", json!({ "prompt": PROMPT, "stop": [1] }), 400, Some("stop"), None),
        ("/v1/chat/completions", json!({ "messages": [] }), 400, Some("messages"), None),
        ("/v1/chat/completions", json!({ "messages": "hi" }), 400, None, None),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": 1 }] }),
            400,
            Some("messages"),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "x" }], "top_logprobs": 2 }),
            400,
            Some("top_logprobs"),
            None,
        ),
        ("/detokenize", json!({ "tokens": [999999] }), 400, Some("tokens"), None),
        ("/tokenize", json!({}), 400, None, None),
    ];
    for (path, body, status, param, code) in &cases {
        let r = server.post(path, body);
        assert_error(&r, *status, *param, *code, &format!("{path} {body}"));
    }
    let json_ct = [("Content-Type", "application/json")];
    for body in [&b"{\"prompt\": "[..], b"not json", b"", b"[1, 2]"] {
        let r = http(&server.addr, "POST", "/v1/completions", &json_ct, body);
        assert_error(&r, 400, None, None, &String::from_utf8_lossy(body));
    }
    assert_error(&server.get("/v1/nothing-here"), 404, None, None, "unknown route");
    assert_error(&server.get("/v1/completions"), 405, None, None, "wrong method");
    assert_error(&server.get("/v1/models/gpt-4"), 404, None, Some("model_not_found"), "unknown model card");
    // Over the size limit, declared or not.
    let head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2000000\r\n\r\n";
    assert_error(&http_raw(&server.addr, head.as_bytes()), 413, None, None, "declared too large");
    let mut chunked =
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 65536, " ".repeat(65536)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_error(&http_raw(&server.addr, &chunked), 413, None, None, "chunked too large");
    // The server still works.
    assert_eq!(server.post("/v1/completions", &req).json()["choices"][0]["text"], expected.as_str());

    // Models, health, metrics, tokenize round trip.
    let v = server.get("/v1/models").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(server.get(&format!("/v1/models/{MODEL}")).json()["id"], MODEL);
    let health = server.get("/health");
    assert_eq!((health.status, health.body.len()), (200, 0));
    let m = server.get("/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some("text/plain; version=0.0.4"));
    for name in [
        "tern_num_requests_running",
        "tern_num_requests_waiting",
        "tern_kv_blocks_used",
        "tern_prompt_tokens_total",
        "tern_generation_tokens_total",
        "tern_request_success_total{finished_reason=\"length\"}",
        "tern_time_to_first_token_seconds_bucket",
    ] {
        assert!(m.text().contains(name), "{name} missing from:\n{}", m.text());
    }
    let v = server.post("/tokenize", &json!({ "prompt": "Hello world", "add_special_tokens": true })).json();
    assert_eq!(v["tokens"], json!([19556, 905]));
    assert_eq!(v["count"], 2);
    assert_eq!(v["max_model_len"], 8192);
    assert_eq!(server.post("/detokenize", &json!({ "tokens": v["tokens"] })).json()["prompt"], "Hello world");
    let chat_ids =
        server.post("/tokenize", &json!({ "messages": [{ "role": "user", "content": CHAT_PROMPT }] })).json();
    assert!(chat_ids["count"].as_u64().unwrap() > 5);

    // A client that leaves mid-stream cancels its request.
    let aborted = server.metric("tern_request_success_total{finished_reason=\"abort\"}");
    let body = json!({ "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": true, "stream": true }).to_string();
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let req_text = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req_text.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.metric("tern_num_requests_running"), 1.0);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let running = server.metric("tern_num_requests_running");
        let now_aborted = server.metric("tern_request_success_total{finished_reason=\"abort\"}");
        if running == 0.0 && now_aborted == aborted + 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: running {running}, aborted {now_aborted} (was {aborted})");
        std::thread::sleep(Duration::from_millis(50));
    }

    // So does one that leaves while waiting for a plain (non-streamed) response.
    let body = json!({ "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": true }).to_string();
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let req_text = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req_text.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("tern_num_requests_running") != 1.0 {
        assert!(Instant::now() < deadline, "the request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let running = server.metric("tern_num_requests_running");
        let now_aborted = server.metric("tern_request_success_total{finished_reason=\"abort\"}");
        if running == 0.0 && now_aborted == aborted + 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: running {running}, aborted {now_aborted} (was {aborted})");
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM while a stream runs: the stream completes, then the server exits 0.
    let body = json!({ "prompt": PROMPT, "max_tokens": 48, "ignore_eos": true, "stream": true }).to_string();
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req_text = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req_text.as_bytes()).unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early");
        got.extend_from_slice(&buf[..n]);
    }
    server.sigterm();
    s.read_to_end(&mut got).unwrap();
    let r = parse_response(&got);
    let events = r.sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "the in-flight request finished normally");
    let mut server = server;
    let status = server.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", server.log.lock().unwrap());
}

#[test]
fn serve_api_key() {
    let server = Server::start(&["--max-request-bytes", "4KiB"], &[("TERN_API_KEY", "s3cret")]);
    let with = |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http(&server.addr, "GET", "/v1/models", &headers, b"")
    };
    assert_error(&with(None), 401, None, Some("invalid_api_key"), "no key");
    assert_error(&with(Some("Bearer wrong")), 401, None, Some("invalid_api_key"), "wrong key");
    assert_error(&with(Some("Bearer s3cret2")), 401, None, Some("invalid_api_key"), "longer key");
    assert_error(&with(Some("Basic s3cret")), 401, None, Some("invalid_api_key"), "wrong scheme");
    let ok = with(Some("Bearer s3cret"));
    assert_eq!(ok.status, 200, "{}", ok.text());
    let r = http(&server.addr, "POST", "/tokenize", &[], br#"{"prompt": "hi"}"#);
    assert_error(&r, 401, None, None, "tokenize without key");
    // Health and metrics need no key; unknown routes are 404 either way.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/metrics").status, 200);
    assert_error(&server.get("/nope"), 404, None, None, "unknown route");
    let auth = [("Authorization", "Bearer s3cret")];
    let big = json!({ "prompt": "x".repeat(5000) }).to_string();
    assert_error(&http(&server.addr, "POST", "/v1/completions", &auth, big.as_bytes()), 413, None, None, "4KiB limit");
    let small = json!({ "prompt": PROMPT, "max_tokens": 2 }).to_string();
    assert_eq!(http(&server.addr, "POST", "/v1/completions", &auth, small.as_bytes()).status, 200);
    server.stop();
}

/// A Python virtual environment with the `openai` package, under the target directory.
fn openai_venv() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_BIN_EXE_tern")).parent().and_then(|p| p.parent()).unwrap().to_path_buf();
    let venv = target.join("openai-venv");
    let python = venv.join("bin/python");
    let has_openai = || Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if has_openai() {
        return python;
    }
    if !python.exists() {
        let st = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().expect("cannot run python3");
        assert!(st.success(), "python3 -m venv {} failed", venv.display());
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "openai"])
        .output()
        .expect("cannot run pip");
    assert!(
        out.status.success(),
        "pip could not install the `openai` package into {} (is PyPI reachable?):\n{}",
        venv.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_openai(), "openai installed but cannot be imported");
    python
}

#[test]
fn serve_speaks_to_the_openai_client() {
    let python = openai_venv();
    let server = Server::start(&["--api-key", "py-key", "--served-model-name", "tern-test"], &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let base = format!("http://{}/v1", server.addr);
    let out = Command::new(python)
        .arg(script)
        .args([&base, "py-key", "tern-test", PROMPT, CHAT_PROMPT, "24"])
        .output()
        .expect("cannot run python");
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log.lock().unwrap()
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    let completion = cli_text(false, PROMPT, 24);
    let chat = cli_text(true, CHAT_PROMPT, 24);
    assert_eq!(v["models"], json!(["tern-test"]));
    assert_eq!(v["completion"], completion.as_str());
    assert_eq!(v["completion_stream"], completion.as_str());
    assert_eq!(v["chat"], chat.as_str());
    assert_eq!(v["chat_stream"], chat.as_str());
    assert_eq!(v["chat_role"], "assistant");
    assert!(v["chat_stream_usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=24).contains(&n)), "{v}");
    assert_eq!(v["unknown_model_error"], json!({ "status": 404, "code": "model_not_found" }));
    server.stop();
}
