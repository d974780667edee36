//! What runs before a handler: the API key check and the JSON body extractor. Both answer
//! with OpenAI-shaped errors (axum's own rejections are plain text).

use super::error::ApiError;
use super::AppState;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The key is kept and compared as its SHA-256: equal-length digests, compared in constant
/// time, reveal neither the key's bytes nor its length through timing.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware: requests must carry `Authorization: Bearer <key>` when a key is set.
pub async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_key {
        let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let Some(header) = header else {
            return ApiError::unauthorized("missing API key: send it as `Authorization: Bearer <key>`").into_response();
        };
        let given = match header.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => "",
        };
        if !constant_time_eq(&key_digest(given), expected) {
            return ApiError::unauthorized("incorrect API key provided").into_response();
        }
    }
    next.run(req).await
}

/// A JSON request body of type `T`, read up to `--max-request-bytes`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.max_request_bytes;
        let declared =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(ApiError::too_large(limit)),
            Err(e) => return Err(ApiError::invalid(format!("cannot read the request body: {e}"), None)),
        };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            let what = if e.is_data() { "invalid request" } else { "malformed JSON in the request body" };
            ApiError::invalid(format!("{what}: {e}"), None)
        })
    }
}
