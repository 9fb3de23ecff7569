//! The local stand-in for OpenRouter (`imagegen fake-openrouter`): a real HTTP server that
//! answers `POST /api/v1/chat/completions` the way OpenRouter does for the Gemini image models,
//! so the client, the demo and the benchmarks run against real HTTP without spending money.
//!
//! It is a development tool: nothing points at it unless told to (`OPENROUTER_BASE_URL`).
//!
//! What it imitates:
//! - the 200 and headers are sent at once, then the body is padded with newlines while the
//!   "model works" ([`FakeConfig::latency`]), then the JSON comes;
//! - the real answer shape, with a real PNG of the model's pixel size for the aspect ratio (and
//!   `image_size` for the pro model), about [`FakeConfig::image_bytes`] at 1K, distinct per answer;
//! - `usage` priced per model as OpenRouter does (flash: $0.30/M in, $30/M image out, 1290
//!   image tokens; pro: $2/M in, $12/M text and reasoning out, $120/M image out, 1120 image
//!   tokens at 1K/2K and 2000 at 4K);
//! - request checks: a missing or wrong key is a 401, an unknown model or a bad aspect ratio a
//!   400, a request without "image" in `modalities` gets text only;
//! - every failure of shared/openrouter.md on demand, from a marker in the prompt or injected
//!   for the next calls whatever the prompt ([`FakeServer::inject`], [`FakeConfig::faults`],
//!   `--fault`).
//!
//! Markers (details in [`faults`] and on each [`Fault`]): `[fault:400]` ... `[fault:529]` (any
//! 4xx or 5xx, with `retry-after=SECS` and `reset=SECS` options), `unavailable`, `echo-key`,
//! `200-error`, `choice-error`, `safety`, `text-only`, `two-images`, `jpeg-as-png`,
//! `not-an-image`, `cut`, `whitespace-eof`, `reset`, `slow=30s`, `oversize`, and the harmless
//! quirks `content-null`, `content-text`, `content-array`, `sse-comments`. A marker applies to
//! every call with that prompt; `xN` (`[fault:503x2]`) limits it to the first N, then the next
//! marker or success.
//!
//! It counts what it got and what it billed ([`FakeServer::stats`]) so tests can check how many
//! times a prompt was called and that recorded costs add up to what was billed. A call is
//! billed when the answer carrying its `usage` has been handed to the connection complete; an
//! answer the client abandoned (deadline) or that was cut is not billed here (the real service
//! may bill those, and the client cannot know).

pub mod faults;
mod images;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use bytes::Bytes;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::image::ImageFormat;

use self::images::{ImageCache, ImageKey, target_bytes};
use super::models::{self, Price};
pub use faults::{Fault, Step};

/// Size of the 1K 16:9 PNG, like a real flash answer (1-1.5 MB).
pub const DEFAULT_IMAGE_BYTES: usize = 1_200_000;
/// How often a newline is written while the model "works". OpenRouter's own cadence is not
/// documented; a second keeps 1,000 waiting calls at 1,000 tiny writes a second.
pub const DEFAULT_PAD_INTERVAL: Duration = Duration::from_secs(1);
/// Body size of the `oversize` fault: above the client's default 64 MiB cap.
pub const DEFAULT_OVERSIZE_BYTES: u64 = 80 * 1024 * 1024;
/// Where `imagegen fake-openrouter` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4010";
/// Pending-connection queue: benchmarks open 1,000 connections at once.
const LISTEN_BACKLOG: u32 = 4096;
/// The API root, as in `https://openrouter.ai/api/v1`.
const API_ROOT: &str = "/api/v1";
/// Reasoning tokens the pro model "spends" per image (it always thinks first).
const PRO_REASONING_TOKENS: i64 = 240;
/// Text tokens of a text-only answer.
const TEXT_ONLY_TOKENS: i64 = 42;
const TEXT_ONLY_CONTENT: &str = "I can describe the image instead: a calm, wide scene in soft \
                                 morning light, with muted colours and a clear horizon.";
const WHITESPACE_PAD: &[u8] = b"\n";
const COMMENT_PAD: &[u8] = b": OPENROUTER PROCESSING\n\n";
/// The `not-an-image` fault's "image".
const NOT_AN_IMAGE: &[u8] = b"<html><body>upstream error page</body></html>";
/// The `oversize` fault's image payload is this block repeated (shared, never copied).
static OVERSIZE_BLOCK: [u8; 64 * 1024] = [b'A'; 64 * 1024];

/// How the stand-in behaves. [`FakeConfig::default`] listens on 127.0.0.1 port 0 with no
/// latency, for tests. `Debug` does not show the key.
#[derive(Clone)]
pub struct FakeConfig {
    /// Address to bind; port 0 picks a free one (see [`FakeServer::addr`]).
    pub listen: SocketAddr,
    /// How long each call "works" (padding the body meanwhile) before answering.
    pub latency: Duration,
    /// Interval between padding writes.
    pub pad_interval: Duration,
    /// Target size of a 1K 16:9 image in bytes; other sizes scale with their pixels.
    pub image_bytes: usize,
    /// The only key accepted; `None` accepts any non-empty bearer token.
    pub api_key: Option<String>,
    /// Body size of the `oversize` fault.
    pub oversize_bytes: u64,
    /// Faults for the first calls, whatever their prompt (as [`FakeServer::inject`]).
    pub faults: Vec<Step>,
}

impl std::fmt::Debug for FakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeConfig")
            .field("listen", &self.listen)
            .field("latency", &self.latency)
            .field("pad_interval", &self.pad_interval)
            .field("image_bytes", &self.image_bytes)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("oversize_bytes", &self.oversize_bytes)
            .field("faults", &self.faults)
            .finish()
    }
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::ZERO,
            pad_interval: DEFAULT_PAD_INTERVAL,
            image_bytes: DEFAULT_IMAGE_BYTES,
            api_key: None,
            oversize_bytes: DEFAULT_OVERSIZE_BYTES,
            faults: Vec::new(),
        }
    }
}

/// `imagegen fake-openrouter` flags. `Debug` does not show the key.
#[derive(Clone, clap::Args)]
pub struct FakeArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// How long each call works before answering (the flash model takes 8-30 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Interval between keep-alive newlines while working.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub pad_interval: Duration,
    /// Size of a 1K 16:9 image in bytes; other sizes scale with their pixels.
    #[arg(long, default_value_t = DEFAULT_IMAGE_BYTES)]
    pub image_bytes: usize,
    /// The only API key accepted (others get 401); without it any key is accepted.
    #[arg(long, env = "FAKE_OPENROUTER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Body size of the `oversize` fault, in bytes.
    #[arg(long, default_value_t = DEFAULT_OVERSIZE_BYTES)]
    pub oversize_bytes: u64,
    /// A fault for the first calls whatever their prompt, in marker syntax (`402x5`,
    /// `429x3 retry-after=2`); repeatable, applied in order.
    #[arg(long = "fault", value_parser = Step::parse)]
    pub faults: Vec<Step>,
}

impl std::fmt::Debug for FakeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&FakeConfig::from(self.clone()), f)
    }
}

impl From<FakeArgs> for FakeConfig {
    fn from(args: FakeArgs) -> Self {
        FakeConfig {
            listen: args.listen,
            latency: args.latency,
            pad_interval: args.pad_interval,
            image_bytes: args.image_bytes,
            api_key: args.api_key,
            oversize_bytes: args.oversize_bytes,
            faults: args.faults,
        }
    }
}

/// Runs `imagegen fake-openrouter` until Ctrl-C: prints `OPENROUTER_BASE_URL=...` on stdout for
/// scripts, serves, then logs what it billed.
pub async fn run(args: FakeArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let server = FakeServer::start(args.into())
        .await
        .with_context(|| format!("fake-openrouter: listening on {listen}"))?;
    println!("OPENROUTER_BASE_URL={}", server.base_url());
    tracing::warn!(
        base_url = %server.base_url(),
        "fake-openrouter is a development stand-in: it generates placeholder images and bills nothing real"
    );
    tokio::signal::ctrl_c()
        .await
        .context("fake-openrouter: waiting for Ctrl-C")?;
    let stats = server.stats();
    server.stop().await.context("fake-openrouter: stopping")?;
    tracing::info!(
        calls = stats.calls,
        generations = stats.served.len(),
        billed_usd = %stats.billed_usd,
        "fake-openrouter stopped"
    );
    Ok(())
}

/// One image the stand-in served in a successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedImage {
    pub generation_id: String,
    pub prompt: String,
    pub model: String,
    /// SHA-256 (hex) of the image file, as the client should store it.
    pub sha256: String,
    pub bytes: usize,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub cost_usd: Decimal,
}

/// What the stand-in received and billed.
#[derive(Debug, Clone, Default)]
pub struct FakeStats {
    /// Every request to the chat-completions route, rejected ones included.
    pub calls: u64,
    /// Requests per prompt (exactly as sent, markers included), for requests that got that far.
    pub per_prompt: HashMap<String, u64>,
    /// Sum of `usage.cost` of every answer delivered complete.
    pub billed_usd: Decimal,
    /// Every successful generation, in completion order (the last image of a two-image answer).
    pub served: Vec<ServedImage>,
    /// Every reference image received in a well-formed request, in arrival order.
    pub references: Vec<ReceivedReference>,
}

/// A reference image as a request carried it (after the shape check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedReference {
    /// The prompt (text part) it came with.
    pub prompt: String,
    /// Its position among the message's parts (1 is the first after the text).
    pub part: usize,
    /// An https URL as sent (not fetched), or `None` for inline data.
    pub url: Option<String>,
    /// Inline data: the declared format, and the SHA-256 (hex) and size of the decoded bytes.
    pub format: Option<ImageFormat>,
    pub sha256: Option<String>,
    pub bytes: usize,
}

/// A running stand-in. Stops when [`FakeServer::stop`] is called or when dropped.
#[derive(Debug)]
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Taken by [`FakeServer::stop`]; a dropped server only cancels.
    task: Option<JoinHandle<io::Result<()>>>,
}

impl FakeServer {
    /// Binds `config.listen` and serves in the background on the current Tokio runtime.
    pub async fn start(config: FakeConfig) -> io::Result<FakeServer> {
        let socket = if config.listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(config.listen)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            injected: Mutex::new(config.faults.iter().cloned().collect()),
            config,
            images: ImageCache::default(),
            stats: Mutex::new(FakeStats::default()),
            stopping: CancellationToken::new(),
        });
        let app = router(shared.clone());
        let stopping = shared.stopping.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await
        });
        Ok(FakeServer {
            addr,
            shared,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `OPENROUTER_BASE_URL`, e.g. `http://127.0.0.1:40123/api/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}{API_ROOT}", self.addr)
    }

    /// A snapshot of everything counted so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.stats(|s| s.clone())
    }

    /// Requests received on the route.
    pub fn calls(&self) -> u64 {
        self.shared.stats(|s| s.calls)
    }

    /// Requests received with exactly this prompt.
    pub fn calls_for(&self, prompt: &str) -> u64 {
        self.shared
            .stats(|s| s.per_prompt.get(prompt).copied().unwrap_or(0))
    }

    /// Total `usage.cost` of the answers delivered.
    pub fn billed_usd(&self) -> Decimal {
        self.shared.stats(|s| s.billed_usd)
    }

    /// Successful generations so far.
    pub fn successes(&self) -> usize {
        self.shared.stats(|s| s.served.len())
    }

    /// The images served in successful answers.
    pub fn served(&self) -> Vec<ServedImage> {
        self.shared.stats(|s| s.served.clone())
    }

    /// Makes the next `calls` requests fail with `fault`, whatever their prompt, after any
    /// faults injected before (e.g. 402 for a while, then recovery).
    pub fn inject(&self, fault: Fault, calls: u64) {
        self.shared.injected().push_back(Step {
            fault,
            calls: Some(calls),
        });
    }

    /// Drops the injected faults not yet used.
    pub fn clear_injected(&self) {
        self.shared.injected().clear();
    }

    /// Stops accepting, ends the answers in flight, and waits for the server to finish.
    pub async fn stop(mut self) -> io::Result<()> {
        self.shared.stopping.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shared.stopping.cancel();
    }
}

/// State shared by every request.
#[derive(Debug)]
struct Shared {
    config: FakeConfig,
    images: ImageCache,
    stats: Mutex<FakeStats>,
    injected: Mutex<VecDeque<Step>>,
    /// Cancelled on stop: the server stops accepting and padded answers end at once.
    stopping: CancellationToken,
}

impl Shared {
    fn stats<T>(&self, f: impl FnOnce(&mut FakeStats) -> T) -> T {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn injected(&self) -> std::sync::MutexGuard<'_, VecDeque<Step>> {
        self.injected.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next injected fault, used up one call at a time.
    fn take_injected(&self) -> Option<Fault> {
        let mut plan = self.injected();
        loop {
            let step = plan.front_mut()?;
            match &mut step.calls {
                None => return Some(step.fault.clone()),
                Some(0) => {
                    plan.pop_front();
                }
                Some(n) => {
                    *n -= 1;
                    let fault = step.fault.clone();
                    if *n == 0 {
                        plan.pop_front();
                    }
                    return Some(fault);
                }
            }
        }
    }

    fn complete(&self, billing: Billing) {
        self.stats(|s| {
            s.billed_usd += billing.cost;
            if let Some(image) = billing.served {
                s.served.push(image);
            }
        });
    }
}

/// The stand-in's routes: chat completions, and OpenRouter-shaped 404s for the rest.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            &format!("{API_ROOT}/chat/completions"),
            post(chat_completions),
        )
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                json!({"code": 404, "message": "Not Found"}),
            )
        })
        // Reference images come inline: four of 7 MB as base64 is about 38 MB.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(shared)
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.stats(|s| s.calls += 1);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let key = auth.strip_prefix("Bearer ").map_or("", str::trim);
    if key.is_empty() {
        return openrouter_error(401, "No auth credentials found", None);
    }
    if shared.config.api_key.as_deref().is_some_and(|k| k != key) {
        return openrouter_error(401, "User not found.", None);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return openrouter_error(400, &format!("Invalid JSON in request body: {e}"), None);
        }
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return openrouter_error(400, "No model specified", None);
    };
    if models::price(model).is_none() {
        return openrouter_error(400, &format!("{model} is not a valid model ID"), None);
    }
    let Some(prompt) = prompt_of(&request) else {
        return openrouter_error(
            400,
            "Input required: specify \"prompt\" or \"messages\"",
            None,
        );
    };
    match references_of(&request, &prompt) {
        Ok(received) => shared.stats(|s| s.references.extend(received)),
        Err(e) => return openrouter_error(400, &format!("fake-openrouter: {e}"), None),
    }
    let index = shared.stats(|s| {
        let n = s.per_prompt.entry(prompt.clone()).or_insert(0);
        *n += 1;
        *n - 1
    });
    let fault = match shared.take_injected() {
        Some(fault) => Some(fault),
        None => match faults::parse_markers(&prompt) {
            Ok(steps) => faults::fault_for_call(&steps, index),
            Err(e) => return openrouter_error(400, &format!("fake-openrouter: {e}"), None),
        },
    };
    match &fault {
        Some(Fault::Status {
            code,
            retry_after,
            reset_in,
        }) => return status_fault(*code, *retry_after, *reset_in, model, &prompt),
        Some(Fault::Unavailable) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "message": "No allowed providers are available for the selected model.",
                    "availability": {"status": "unavailable", "model": model}
                }),
            );
        }
        Some(Fault::EchoKey) => {
            return openrouter_error(
                400,
                &format!(
                    "Malformed request: the upstream proxy rejected the headers it received \
                     (Content-Type: application/json, Accept: */*, Authorization: {auth})"
                ),
                None,
            );
        }
        _ => {}
    }
    let image_config = request.get("image_config");
    let option = |name: &str| {
        image_config
            .and_then(|c| c.get(name))
            .and_then(Value::as_str)
    };
    let aspect_ratio = option("aspect_ratio").unwrap_or("1:1");
    let image_size = option("image_size");
    let Some((width, height)) = models::dimensions(model, aspect_ratio, image_size) else {
        return openrouter_error(
            400,
            "Provider returned error",
            Some(json!({
                "raw": json!({"error": {
                    "code": 400,
                    "message": format!(
                        "* GenerateContentRequest.generation_config.image_config: unsupported \
                         aspect_ratio {aspect_ratio} or image_size {}",
                        image_size.unwrap_or("1K")
                    ),
                    "status": "INVALID_ARGUMENT"
                }})
                .to_string(),
                "provider_name": "Google AI Studio"
            })),
        );
    };
    let wants_image = request
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "image"));
    let fault = match fault {
        // Without "image" in modalities the model writes text, as the real route does.
        None | Some(Fault::TwoImages | Fault::JpegAsPng) if !wants_image => Some(Fault::TextOnly),
        other => other,
    };
    let tier = if models::has_image_sizes(model) {
        image_size.unwrap_or("1K")
    } else {
        "1K"
    };
    let call = Call {
        id: generation_id(),
        model: model.to_owned(),
        prompt,
        width,
        height,
        tier: tier.to_owned(),
    };
    stream_answer(shared, call, fault)
}

/// The user message's text: a string, or the text parts of an array.
fn prompt_of(request: &Value) -> Option<String> {
    let messages = request.get("messages")?.as_array()?;
    let message = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    match message.get("content")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
    .filter(|p| !p.trim().is_empty())
}

/// Checks the parts of a user message whose `content` is an array, as the real route takes
/// them: text first, then `{"type": "image_url", "image_url": {"url": ...}}` parts whose URL is
/// https or a base64 data URL of a PNG, JPEG, WebP or GIF that is what it says.
fn references_of(request: &Value, prompt: &str) -> Result<Vec<ReceivedReference>, String> {
    let parts = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array);
    let Some(parts) = parts else {
        return Ok(Vec::new());
    };
    let mut received = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str);
        match (i, kind) {
            (0, Some("text")) => {
                if !part.get("text").is_some_and(Value::is_string) {
                    return Err("content[0]: a text part needs a string \"text\"".into());
                }
            }
            (0, _) => return Err("content[0]: the first part must be the text".into()),
            (_, Some("image_url")) => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.get("url"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        format!("content[{i}]: an image_url part needs image_url.url (a string)")
                    })?;
                received.push(reference_part(i, url, prompt)?);
            }
            (_, Some("text")) => {}
            (_, other) => {
                return Err(format!(
                    "content[{i}]: unknown part type {:?}",
                    other.unwrap_or("(none)")
                ));
            }
        }
    }
    Ok(received)
}

fn reference_part(i: usize, url: &str, prompt: &str) -> Result<ReceivedReference, String> {
    if url.starts_with("https://") {
        return Ok(ReceivedReference {
            prompt: prompt.to_owned(),
            part: i,
            url: Some(url.to_owned()),
            format: None,
            sha256: None,
            bytes: 0,
        });
    }
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| format!("content[{i}]: image_url.url must be https:// or a data: URL"))?;
    let (mime, data) = rest
        .split_once(";base64,")
        .ok_or_else(|| format!("content[{i}]: a data URL must be base64 (`;base64,`)"))?;
    let declared = match mime {
        "image/png" => ImageFormat::Png,
        "image/jpeg" => ImageFormat::Jpeg,
        "image/webp" => ImageFormat::Webp,
        "image/gif" => ImageFormat::Gif,
        other => return Err(format!("content[{i}]: unsupported image type {other:?}")),
    };
    let bytes = BASE64_STANDARD
        .decode(data)
        .map_err(|e| format!("content[{i}]: the data URL is not valid base64: {e}"))?;
    match crate::image::sniff(&bytes) {
        Some((actual, _, _)) if actual == declared => {}
        _ => {
            return Err(format!(
                "content[{i}]: the data URL's bytes are not a {mime} image"
            ));
        }
    }
    use sha2::Digest as _;
    Ok(ReceivedReference {
        prompt: prompt.to_owned(),
        part: i,
        url: None,
        format: Some(declared),
        sha256: Some(hex::encode(sha2::Sha256::digest(&bytes))),
        bytes: bytes.len(),
    })
}

/// One accepted call.
#[derive(Debug)]
struct Call {
    id: String,
    model: String,
    prompt: String,
    width: u32,
    height: u32,
    tier: String,
}

/// What to bill and record when an answer has been delivered complete.
#[derive(Debug)]
struct Billing {
    cost: Decimal,
    served: Option<ServedImage>,
}

/// How the body ends once its parts are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Clean,
    /// The connection is dropped mid-body.
    Reset,
}

/// The body of a 200 answer after the padding, and what it bills.
#[derive(Debug)]
struct Answer {
    parts: Vec<Bytes>,
    ending: Ending,
    billing: Option<Billing>,
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default)]
struct Tokens {
    prompt: i64,
    text: i64,
    reasoning: i64,
    image: i64,
}

impl Tokens {
    fn cost(self, p: Price) -> Decimal {
        let per_million = Decimal::from(self.prompt) * p.input
            + Decimal::from(self.text + self.reasoning) * p.text_out
            + Decimal::from(self.image) * p.image_out;
        (per_million / Decimal::from(1_000_000)).normalize()
    }

    /// The `usage` object; `cost` is the placeholder [`splice`] replaces with the exact number.
    fn usage_json(self) -> Value {
        let completion = self.text + self.reasoning + self.image;
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": completion,
            "total_tokens": self.prompt + completion,
            "cost": COST_MARKER,
            "is_byok": false,
            "prompt_tokens_details": {"cached_tokens": 0},
            "cost_details": {"upstream_inference_cost": null},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning, "image_tokens": self.image}
        })
    }
}

/// About four characters per token, like Gemini's tokenizer on English.
fn prompt_tokens(prompt: &str) -> i64 {
    (prompt.chars().count() as i64 + 3) / 4
}

const COST_MARKER: &str = "@@COST@@";

fn image_marker(i: usize) -> String {
    format!("@@IMAGE{i}@@")
}

/// Builds the 200 answer for a call and its fault.
async fn answer(shared: &Shared, call: &Call, fault: Option<Fault>) -> io::Result<Answer> {
    let config = &shared.config;
    let Some(price) = models::price(&call.model) else {
        return Err(io::Error::other("unpriced model"));
    };
    let pro = models::has_image_sizes(&call.model);
    let prompt_only = Tokens {
        prompt: prompt_tokens(&call.prompt),
        ..Tokens::default()
    };
    let mut answer = Answer {
        parts: Vec::new(),
        ending: Ending::Clean,
        billing: None,
    };
    let envelope = |choice: Value, usage: Value| {
        json!({
            "id": call.id,
            "provider": "Google AI Studio",
            "model": call.model,
            "object": "chat.completion",
            "created": unix_seconds(),
            "choices": [choice],
            "usage": usage
        })
    };
    let no_image_choice = |finish: &str, native: &str, content: Value| {
        json!({
            "finish_reason": finish, "native_finish_reason": native, "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "reasoning": null}
        })
    };
    match &fault {
        Some(Fault::ErrorIn200 { code }) => {
            let body = json!({
                "error": {"code": code, "message": error_message(*code, &call.model)},
                "user_id": "user_fake"
            });
            answer.parts = vec![Bytes::from(body.to_string())];
            return Ok(answer);
        }
        Some(Fault::WhitespaceEof) => {
            answer.parts = vec![Bytes::from_static(WHITESPACE_PAD)];
            return Ok(answer);
        }
        Some(Fault::ChoiceError { code }) => {
            let mut choice = no_image_choice("error", "ERROR", json!(""));
            choice["error"] = json!({
                "code": code,
                "message": format!("Upstream error from Google AI Studio: {}", error_message(*code, &call.model)),
                "metadata": {"error_type": "provider_error", "provider_name": "Google AI Studio"}
            });
            return Ok(billed(
                answer,
                envelope(choice, prompt_only.usage_json()),
                prompt_only,
                price,
            ));
        }
        Some(Fault::Safety { reason }) => {
            let finish = if reason == "NO_IMAGE" {
                "stop"
            } else {
                "content_filter"
            };
            let choice = no_image_choice(finish, reason, Value::Null);
            return Ok(billed(
                answer,
                envelope(choice, prompt_only.usage_json()),
                prompt_only,
                price,
            ));
        }
        Some(Fault::TextOnly) => {
            let tokens = Tokens {
                text: TEXT_ONLY_TOKENS,
                ..prompt_only
            };
            let choice = no_image_choice("stop", "STOP", json!(TEXT_ONLY_CONTENT));
            return Ok(billed(
                answer,
                envelope(choice, tokens.usage_json()),
                tokens,
                price,
            ));
        }
        _ => {}
    }

    let format = if fault == Some(Fault::JpegAsPng) {
        ImageFormat::Jpeg
    } else {
        ImageFormat::Png
    };
    let base = shared
        .images
        .get(ImageKey {
            format,
            width: call.width,
            height: call.height,
            target: target_bytes(config.image_bytes, call.width, call.height, &call.tier),
        })
        .await?;
    let image = base.render(&call.id, &call.prompt);
    let mut payloads = Vec::new();
    if fault == Some(Fault::TwoImages) {
        payloads.push(
            base.render(&format!("{}-preview", call.id), &call.prompt)
                .b64,
        );
    }
    match fault {
        Some(Fault::Oversize) => {
            let blocks = config.oversize_bytes / OVERSIZE_BLOCK.len() as u64 + 1;
            payloads.push(
                (0..blocks)
                    .map(|_| Bytes::from_static(&OVERSIZE_BLOCK))
                    .collect(),
            );
        }
        Some(Fault::NotAnImage) => {
            payloads.push(vec![Bytes::from(BASE64_STANDARD.encode(NOT_AN_IMAGE))]);
        }
        _ => payloads.push(image.b64.clone()),
    }
    let images: Vec<Value> = (0..payloads.len())
        .map(|i| {
            json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", image_marker(i))}, "index": i})
        })
        .collect();
    let content = match fault {
        Some(Fault::ContentNull) => Value::Null,
        Some(Fault::ContentText) => json!("Here is your image: a calm lake at dawn."),
        Some(Fault::ContentArray) => json!([{"type": "text", "text": "Here is your image."}]),
        _ => json!(""),
    };
    let tokens = Tokens {
        reasoning: if pro { PRO_REASONING_TOKENS } else { 0 },
        image: models::image_tokens(&call.model, Some(&call.tier)),
        ..prompt_only
    };
    let choice = json!({
        "finish_reason": "stop", "native_finish_reason": "STOP", "index": 0,
        "message": {
            "role": "assistant", "content": content, "refusal": null,
            "reasoning": if pro { json!("Planning the composition.") } else { Value::Null },
            "images": images
        }
    });
    let cost = tokens.cost(price);
    answer.parts = splice(
        &envelope(choice, tokens.usage_json()).to_string(),
        payloads,
        cost,
    );
    match fault {
        Some(Fault::Cut) | Some(Fault::Reset) => {
            halve(&mut answer.parts);
            if fault == Some(Fault::Reset) {
                answer.ending = Ending::Reset;
            }
        }
        // The client stops at its cap and never sees the usage, so nothing is billed.
        Some(Fault::Oversize) => {}
        Some(Fault::NotAnImage) => answer.billing = Some(Billing { cost, served: None }),
        _ => {
            answer.billing = Some(Billing {
                cost,
                served: Some(ServedImage {
                    generation_id: call.id.clone(),
                    prompt: call.prompt.clone(),
                    model: call.model.clone(),
                    sha256: image.sha256,
                    bytes: image.len,
                    format,
                    width: call.width,
                    height: call.height,
                    cost_usd: cost,
                }),
            });
        }
    }
    Ok(answer)
}

/// An answer without image that bills its tokens.
fn billed(mut answer: Answer, body: Value, tokens: Tokens, price: Price) -> Answer {
    let cost = tokens.cost(price);
    answer.parts = splice(&body.to_string(), Vec::new(), cost);
    answer.billing = Some(Billing { cost, served: None });
    answer
}

/// Replaces the cost placeholder with the exact decimal and cuts the JSON text at each image
/// placeholder, inserting the (shared) base64 pieces there.
fn splice(json: &str, images: Vec<Vec<Bytes>>, cost: Decimal) -> Vec<Bytes> {
    let json = json.replace(&format!("\"{COST_MARKER}\""), &cost.to_string());
    let mut parts = Vec::new();
    let mut rest = json.as_str();
    for (i, pieces) in images.into_iter().enumerate() {
        if let Some((before, after)) = rest.split_once(&image_marker(i)) {
            parts.push(Bytes::copy_from_slice(before.as_bytes()));
            parts.extend(pieces);
            rest = after;
        }
    }
    parts.push(Bytes::copy_from_slice(rest.as_bytes()));
    parts
}

/// Keeps the first half of the bytes of `parts`.
fn halve(parts: &mut Vec<Bytes>) {
    let mut keep = parts.iter().map(Bytes::len).sum::<usize>() / 2;
    let mut kept = Vec::new();
    for part in parts.drain(..) {
        if keep == 0 {
            break;
        }
        let n = part.len().min(keep);
        kept.push(part.slice(..n));
        keep -= n;
    }
    *parts = kept;
}

/// Sends the 200 and headers now, then pads while the answer is prepared (the image fetched
/// from the cache, generated on first use) and the latency runs out, then sends the answer.
fn stream_answer(shared: Arc<Shared>, call: Call, fault: Option<Fault>) -> Response {
    let latency = match &fault {
        Some(Fault::Slow(latency)) => *latency,
        _ => shared.config.latency,
    };
    let pad = match &fault {
        Some(Fault::SseComments) => COMMENT_PAD,
        _ => WHITESPACE_PAD,
    };
    let ready_at = Instant::now() + latency;
    let id = call.id.clone();
    let preparing = {
        let shared = shared.clone();
        async move {
            let answer = answer(&shared, &call, fault).await;
            tokio::time::sleep_until(ready_at).await;
            answer
        }
    };
    let writer = Writer {
        pad_every: shared.config.pad_interval.max(Duration::from_millis(1)),
        pad: Bytes::from_static(pad),
        first_pad: true,
        preparing: Some(Box::pin(preparing)),
        parts: VecDeque::new(),
        ending: None,
        billing: None,
        shared,
    };
    let stream = futures::stream::unfold(writer, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(&id) {
        headers.insert("x-generation-id", id);
    }
    response
}

/// The answer being prepared; dropped (and with it any wait) if the client goes away.
type Preparing = Pin<Box<dyn Future<Output = io::Result<Answer>> + Send>>;

/// Writes one answer body, chunk by chunk, as the connection asks for it.
struct Writer {
    shared: Arc<Shared>,
    pad_every: Duration,
    pad: Bytes,
    first_pad: bool,
    preparing: Option<Preparing>,
    parts: VecDeque<Bytes>,
    ending: Option<Ending>,
    billing: Option<Billing>,
}

impl Writer {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        // The first pad goes out at once, so the client holds a 200 from the start.
        if std::mem::take(&mut self.first_pad) {
            return Some(Ok(self.pad.clone()));
        }
        if let Some(preparing) = self.preparing.as_mut() {
            tokio::select! {
                answer = preparing => {
                    self.preparing = None;
                    let answer = match answer {
                        Ok(answer) => answer,
                        Err(e) => return Some(Err(e)),
                    };
                    self.parts = answer.parts.into();
                    self.ending = Some(answer.ending);
                    self.billing = answer.billing;
                }
                () = tokio::time::sleep(self.pad_every) => return Some(Ok(self.pad.clone())),
                () = self.shared.stopping.cancelled() => {
                    return Some(Err(io::Error::other("fake-openrouter is stopping")));
                }
            }
        }
        if let Some(part) = self.parts.pop_front() {
            if self.parts.is_empty()
                && let Some(billing) = self.billing.take()
            {
                self.shared.complete(billing);
            }
            return Some(Ok(part));
        }
        match self.ending.take()? {
            Ending::Clean => None,
            Ending::Reset => Some(Err(io::Error::other("upstream connection lost"))),
        }
    }
}

/// An error answer with OpenRouter's body shape: `{"error": {...}}`.
fn error_response(status: StatusCode, error: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": error }).to_string(),
    )
        .into_response()
}

fn openrouter_error(code: u16, message: &str, metadata: Option<Value>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut error = json!({"code": code, "message": message});
    if let Some(metadata) = metadata {
        error["metadata"] = metadata;
    }
    error_response(status, error)
}

/// OpenRouter's message for an error code (as close as its docs and reports allow).
fn error_message(code: u16, model: &str) -> String {
    match code {
        400 => "Provider returned error".to_owned(),
        401 => "User not found.".to_owned(),
        402 => {
            "Insufficient credits. Add more using https://openrouter.ai/settings/credits".to_owned()
        }
        403 => format!("{model} requires moderation. Your input was flagged for \"violence\""),
        408 => "Request timed out".to_owned(),
        429 => format!("Rate limit exceeded: limit_rpm/{model}"),
        500 => "Internal Server Error".to_owned(),
        502 => "Provider returned error".to_owned(),
        503 => "Service Unavailable".to_owned(),
        524 => "Provider timed out".to_owned(),
        529 => "Provider returned error: overloaded".to_owned(),
        _ => format!("fake-openrouter error {code}"),
    }
}

fn status_fault(
    code: u16,
    retry_after: Option<u64>,
    reset_in: Option<u64>,
    model: &str,
    prompt: &str,
) -> Response {
    let metadata = match code {
        403 => Some(json!({
            "reasons": ["violence"],
            "flagged_input": prompt.chars().take(100).collect::<String>(),
            "provider_name": "Google AI Studio",
            "model_slug": model
        })),
        400 | 502 | 529 => Some(json!({
            "raw": format!("upstream answered {code}"),
            "provider_name": "Google AI Studio"
        })),
        _ => None,
    };
    let mut response = openrouter_error(code, &error_message(code, model), metadata);
    let headers = response.headers_mut();
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(secs) = reset_in {
        let at = SystemTime::now() + Duration::from_secs(secs);
        let millis = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        headers.insert("x-ratelimit-reset", HeaderValue::from(millis));
    }
    response
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An id shaped like OpenRouter's: `gen-<unix seconds>-<20 alphanumerics>`.
fn generation_id() -> String {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(20)
        .collect();
    format!("gen-{}-{suffix}", unix_seconds())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FakeArgs,
    }

    #[test]
    fn cli_flags_parse_into_a_config_whose_debug_hides_the_key() {
        let cli = Cli::try_parse_from([
            "fake-openrouter",
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "2s",
            "--api-key",
            "sk-dev-secret",
            "--fault",
            "402x5",
            "--fault",
            "429x1 retry-after=2",
        ])
        .unwrap();
        let config = FakeConfig::from(cli.args.clone());
        assert_eq!(config.latency, Duration::from_secs(2));
        assert_eq!(config.image_bytes, DEFAULT_IMAGE_BYTES);
        assert_eq!(config.faults.len(), 2);
        assert_eq!(config.faults[0].calls, Some(5));
        assert_eq!(
            config.faults[1].fault,
            Fault::Status {
                code: 429,
                retry_after: Some(2),
                reset_in: None
            }
        );
        for text in [format!("{config:?}"), format!("{:?}", cli.args)] {
            assert!(!text.contains("sk-dev-secret"), "{text}");
        }
        assert!(Cli::try_parse_from(["x", "--fault", "nonsense"]).is_err());
    }

    #[test]
    fn prices_match_openrouter_examples() {
        // The documented flash example: 12 prompt tokens, 1290 image tokens, $0.0387036.
        let flash = Tokens {
            prompt: 12,
            image: 1290,
            ..Tokens::default()
        };
        assert_eq!(
            flash.cost(models::price(models::FLASH_IMAGE).unwrap()),
            Decimal::new(387036, 7)
        );
        let pro_4k = Tokens {
            image: 2000,
            ..Tokens::default()
        };
        assert_eq!(
            pro_4k.cost(models::price(models::PRO_IMAGE).unwrap()),
            Decimal::new(24, 2)
        );
    }

    #[test]
    fn splice_inserts_images_and_the_exact_cost() {
        let json = json!({"u": format!("x,{}", image_marker(0)), "cost": COST_MARKER}).to_string();
        let parts = splice(
            &json,
            vec![vec![Bytes::from_static(b"AB"), Bytes::from_static(b"CD")]],
            Decimal::new(387036, 7),
        );
        let text: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            r#"{"cost":0.0387036,"u":"x,ABCD"}"#
        );
    }

    #[test]
    fn halving_keeps_the_first_half() {
        let mut parts = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defgh")];
        halve(&mut parts);
        assert_eq!(
            parts,
            vec![Bytes::from_static(b"abc"), Bytes::from_static(b"d")]
        );
    }
}
