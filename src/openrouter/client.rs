//! The OpenRouter image client: one chat-completions call per image, read under a total
//! deadline and a size cap, turned into a decoded image and its cost, or a classified error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{self, HeaderMap, HeaderValue};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Classify, ErrorClass};
use crate::image::{self, DecodedImage};

use super::error::{
    CallError, CallErrorKind, class_for_error, code_meaning, provider_text, retry_hint, short_text,
};
use super::models;
use super::stream;
use super::wire::{
    self, ChatRequest, ChatResponse, Choice, Content, ImageConfig, Part, PartUrl, RequestMessage,
    WireError, WireUsage,
};

/// OpenRouter's API root; `/chat/completions` is appended.
pub const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";
/// Time to establish a connection (TCP and TLS). Separate from the call deadline because a dead
/// host should fail in seconds, not minutes.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-call deadline for most models: the flash model answers in 8-30 s.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Whole-call deadline for the slow models: the pro model has multi-minute tails at 4K.
pub const DEFAULT_SLOW_DEADLINE: Duration = Duration::from_secs(300);
/// Models given [`DEFAULT_SLOW_DEADLINE`] unless configured otherwise.
pub const DEFAULT_SLOW_MODELS: &[&str] = &[models::PRO_IMAGE];
/// Largest answer body read: a 4K pro image is about 8 MB (11 MB as base64), so 64 MiB leaves
/// room for two images while refusing a runaway body.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// The most reference images one request carries (`jobs_reference_images_valid` agrees).
pub const MAX_REFERENCES: usize = 4;
/// How many answers may be read, decoded and stored at once across all calls of one client
/// (see [`Config::max_concurrent_bodies`]). Decoding is a few milliseconds of CPU per image, so
/// on a few cores more would only add memory: at 4K each holds an 8 MB image, and the thumbnail
/// of one decodes to 67 MB of pixels.
pub const DEFAULT_MAX_CONCURRENT_BODIES: usize = 4;

/// Client settings, parsed once from flags or the environment.
///
/// `Debug` never shows the API key (it is a [`SecretString`]).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// OpenRouter API root; `/chat/completions` is appended. Point it at `imagegen
    /// fake-openrouter` only for development.
    #[arg(long = "openrouter-base-url", env = "OPENROUTER_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub base_url: String,

    /// OpenRouter API key, sent as a bearer token. Prefer the environment variable: flags show up
    /// in process listings.
    #[arg(
        long = "openrouter-api-key",
        env = "OPENROUTER_API_KEY",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub api_key: Option<SecretString>,

    /// Sent as `HTTP-Referer`: the app's URL, for OpenRouter's attribution.
    #[arg(long = "openrouter-referer", env = "OPENROUTER_REFERER")]
    pub referer: Option<String>,

    /// Sent as `X-Title`: the app's name, for OpenRouter's attribution.
    #[arg(long = "openrouter-title", env = "OPENROUTER_TITLE")]
    pub title: Option<String>,

    /// Time allowed to connect to OpenRouter.
    #[arg(long = "openrouter-connect-timeout", env = "OPENROUTER_CONNECT_TIMEOUT",
          default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Deadline for a whole call, body included, for models not listed as slow. OpenRouter pads
    /// the body with whitespace while the model works, so only a total deadline ends a stuck call.
    /// Time an answer waits for a body permit (see --openrouter-max-concurrent-bodies) does not
    /// count: it is this process's queue, and the answer is already paid for.
    #[arg(long = "openrouter-deadline", env = "OPENROUTER_DEADLINE",
          default_value = "120s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,

    /// Deadline for a whole call to a slow model (see --openrouter-slow-models).
    #[arg(long = "openrouter-slow-deadline", env = "OPENROUTER_SLOW_DEADLINE",
          default_value = "300s", value_parser = humantime::parse_duration)]
    pub slow_deadline: Duration,

    /// Models given the slow deadline, comma-separated.
    #[arg(long = "openrouter-slow-models", env = "OPENROUTER_SLOW_MODELS",
          value_delimiter = ',', default_value = models::PRO_IMAGE)]
    pub slow_models: Vec<String>,

    /// Largest answer body read, in bytes; a larger answer fails the call (permanently: the same
    /// request would produce the same size).
    #[arg(long = "openrouter-max-body-bytes", env = "OPENROUTER_MAX_BODY_BYTES",
          default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: u64,

    /// How many answers may be read, decoded and stored at once. Calls still waiting for the
    /// model (receiving only padding) do not count; a call whose answer starts while the limit
    /// is reached waits, holding one read chunk (the wait is not counted against its deadline). The answer is decoded as it
    /// arrives (never held whole), so peak memory for answers is about this many decoded images
    /// (with the automatic thumbnail's work, bounded by the image pool).
    #[arg(long = "openrouter-max-concurrent-bodies", env = "OPENROUTER_MAX_CONCURRENT_BODIES",
          default_value_t = DEFAULT_MAX_CONCURRENT_BODIES)]
    pub max_concurrent_bodies: usize,
}

fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

impl Config {
    /// Defaults for everything but the base URL and key (for tests and embedding).
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Config {
        Config {
            base_url: base_url.into(),
            api_key: Some(SecretString::from(api_key.into())),
            referer: None,
            title: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            slow_deadline: DEFAULT_SLOW_DEADLINE,
            slow_models: DEFAULT_SLOW_MODELS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_concurrent_bodies: DEFAULT_MAX_CONCURRENT_BODIES,
        }
    }

    /// The whole-call deadline for `model`.
    pub fn deadline_for(&self, model: &str) -> Duration {
        if self.slow_models.iter().any(|m| m == model) {
            self.slow_deadline
        } else {
            self.deadline
        }
    }
}

/// Why a [`Client`] could not be built. All of them are configuration mistakes that every job
/// would meet, hence [`ErrorClass::Halt`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("OPENROUTER_API_KEY is not set")]
    MissingApiKey,
    #[error("the API key contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    #[error("OPENROUTER_BASE_URL {0:?} is not an http(s) URL")]
    InvalidBaseUrl(String),
    #[error("{name} {value:?} is not a valid HTTP header value")]
    InvalidHeader { name: &'static str, value: String },
    #[error("max_concurrent_bodies must be at least 1")]
    NoBodySlots,
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl Classify for ClientError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Halt
    }
}

/// One image to generate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageRequest {
    /// An OpenRouter model id, e.g. [`models::FLASH_IMAGE`].
    pub model: String,
    /// The user message.
    pub prompt: String,
    /// One of [`models::ASPECT_RATIOS`]; checked before any call.
    pub aspect_ratio: String,
    /// "1K", "2K" or "4K"; only the pro model uses it. `None` sends nothing (1K).
    pub image_size: Option<String>,
    /// Reference images sent after the prompt as `image_url` parts (style, logo, product).
    pub references: Vec<ReferenceImage>,
}

/// A reference image as the request carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceImage {
    /// An https URL the provider fetches itself (checked before it gets here).
    Url(String),
    /// Image bytes sent inline. Shared: every request with the same reference points at one
    /// buffer, which goes into the request body as is (see [`DataUrl`]).
    Data(Arc<DataUrl>),
}

/// A `data:image/...;base64,...` URL, encoded once. Its `Debug` shows the size, not the text.
#[derive(Clone, PartialEq, Eq)]
pub struct DataUrl {
    text: bytes::Bytes,
    format: image::ImageFormat,
    image_bytes: usize,
}

impl DataUrl {
    /// Encodes image bytes whose format was sniffed as `format`.
    pub fn new(image: &[u8], format: image::ImageFormat) -> DataUrl {
        use base64::Engine as _;
        let prefix = format!("data:{};base64,", format.content_type());
        let mut text = String::with_capacity(prefix.len() + image.len().div_ceil(3) * 4);
        text.push_str(&prefix);
        base64::prelude::BASE64_STANDARD.encode_string(image, &mut text);
        DataUrl {
            text: bytes::Bytes::from(text),
            format,
            image_bytes: image.len(),
        }
    }

    /// The URL's text (ASCII: needs no JSON escaping).
    pub fn as_bytes(&self) -> &bytes::Bytes {
        &self.text
    }

    pub fn format(&self) -> image::ImageFormat {
        self.format
    }

    /// Size of the image itself, before base64.
    pub fn image_bytes(&self) -> usize {
        self.image_bytes
    }
}

impl std::fmt::Debug for DataUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataUrl({}, {} bytes)",
            self.format.content_type(),
            self.image_bytes
        )
    }
}

/// What stands in the serialised request for the `i`-th inline reference until the body is
/// assembled. Found only as a whole JSON string (`"..."`), which a prompt can never produce:
/// inside a string every quote is escaped.
fn data_marker(i: usize) -> String {
    format!("imagegen-inline-reference-{i}")
}

/// The request body as chunks: the JSON around each inline reference, and the references' own
/// shared buffers in between, so a reference used by many calls in flight is in memory once.
fn request_chunks(json: Vec<u8>, data: &[&Arc<DataUrl>]) -> Result<Vec<bytes::Bytes>, String> {
    let mut chunks = Vec::with_capacity(data.len() * 2 + 1);
    let json = bytes::Bytes::from(json);
    let mut at = 0;
    for (i, d) in data.iter().enumerate() {
        let marker = format!("\"{}\"", data_marker(i));
        let found = json[at..]
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())
            .ok_or_else(|| format!("inline reference {i} missing from the request"))?;
        let start = at + found + 1; // keep the opening quote
        chunks.push(json.slice(at..start));
        chunks.push(d.as_bytes().clone());
        at = start + marker.len() - 2;
    }
    chunks.push(json.slice(at..));
    Ok(chunks)
}

/// Tokens and cost of one call, as the answer reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: i64,
    /// All output tokens: image, text and reasoning.
    pub completion_tokens: i64,
    /// The image part of `completion_tokens`.
    pub image_tokens: i64,
    /// `usage.cost` in USD, exactly as sent (read from the number's text, not through f64).
    pub cost_usd: Decimal,
}

impl Usage {
    fn from_wire(usage: &WireUsage<'_>) -> Usage {
        Usage {
            prompt_tokens: usage.prompt_tokens.unwrap_or(0),
            completion_tokens: usage.completion_tokens.unwrap_or(0),
            image_tokens: usage
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.image_tokens)
                .unwrap_or(0),
            cost_usd: usage.cost.and_then(wire::parse_cost).unwrap_or_default(),
        }
    }
}

/// A successful call.
///
/// Two images in one answer (the pro model sometimes sends a preview, then the final image):
/// only the **last** is kept, since it is the final rendering and the job asked for one image;
/// `discarded_images` says how many earlier ones were dropped (undecoded).
#[derive(Debug, Clone)]
pub struct Generation {
    /// Exactly one image: the last one the answer carried.
    pub images: Vec<DecodedImage>,
    /// Earlier images in the same answer that were not kept.
    pub discarded_images: usize,
    /// What the call cost. All zero if the answer carried no `usage` (OpenRouter always sends
    /// it today; a warning is logged if not).
    pub usage: Usage,
    /// The generation id from the body, else from the `X-Generation-Id` header.
    pub generation_id: Option<String>,
    pub http_status: u16,
    /// One of the client's body permits ([`Config::max_concurrent_bodies`]), held while the
    /// image is in memory: drop the generation (or this) once the image is stored, so that a
    /// burst of answers waits for memory instead of piling up decoded images.
    pub body_permit: Option<Arc<OwnedSemaphorePermit>>,
}

/// The OpenRouter client. Cheap to clone; all clones share one connection pool and one limit on
/// answers buffered at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    endpoint: String,
    /// Kept only to scrub it from error messages; the request carries it as a sensitive header.
    key: SecretString,
    config: Config,
    /// Permits to read, decode and store an answer (see [`Config::max_concurrent_bodies`]).
    bodies: Arc<Semaphore>,
    /// The size of the last image decoded for each model and image size: what the next answer's
    /// decoder reserves (see [`stream::AnswerReader::with_payload_hint`]).
    image_sizes: Mutex<HashMap<String, usize>>,
}

impl Inner {
    fn image_size_key(req: &ImageRequest) -> String {
        format!("{}\n{}", req.model, req.image_size.as_deref().unwrap_or(""))
    }

    /// Bytes to reserve for the image of an answer to `req`: the last one of its kind, plus an
    /// eighth (images of one model and size vary with their content), never more than an
    /// answer may hold.
    fn image_size_hint(&self, req: &ImageRequest) -> usize {
        let last = self.image_sizes.lock().map_or(0, |m| {
            m.get(&Self::image_size_key(req)).copied().unwrap_or(0)
        });
        let cap = usize::try_from(self.config.max_body_bytes / 4 * 3).unwrap_or(usize::MAX);
        last.saturating_add(last / 8).min(cap)
    }

    fn learn_image_size(&self, req: &ImageRequest, bytes: usize) {
        if let Ok(mut m) = self.image_sizes.lock() {
            m.insert(Self::image_size_key(req), bytes);
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.inner.endpoint)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// How much of a non-JSON error body (a proxy's page) is looked at for the message.
const NON_JSON_BODY_SHOWN: usize = 512;
/// The header that may carry the generation id.
const GENERATION_ID_HEADER: &str = "x-generation-id";
/// Identifies this client in OpenRouter's logs.
const USER_AGENT: &str = concat!("imagegen/", env!("CARGO_PKG_VERSION"));
/// Safety-related `native_finish_reason`s: OpenRouter's observed image ones, plus Gemini's
/// general safety reasons.
const SAFETY_REASONS: &[&str] = &[
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_OTHER",
    "NO_IMAGE",
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
];

impl Client {
    /// Builds the client; fails on a missing key or a malformed setting.
    pub fn new(config: Config) -> Result<Client, ClientError> {
        let key = config.api_key.clone().ok_or(ClientError::MissingApiKey)?;
        let base = config.base_url.trim_end_matches('/');
        let parsed =
            reqwest::Url::parse(base).map_err(|_| ClientError::InvalidBaseUrl(base.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ClientError::InvalidBaseUrl(base.to_owned()));
        }
        if config.max_concurrent_bodies == 0 {
            return Err(ClientError::NoBodySlots);
        }
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
            .map_err(|_| ClientError::InvalidApiKey)?;
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        for (name, value) in [
            ("HTTP-Referer", &config.referer),
            ("X-Title", &config.title),
        ] {
            if let Some(value) = value {
                let v = HeaderValue::from_str(value).map_err(|_| ClientError::InvalidHeader {
                    name,
                    value: value.clone(),
                })?;
                headers.insert(name, v);
            }
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            // One connection per call in flight. Over HTTP/2 all calls would share a connection
            // window, and answers waiting for a body permit would hold it and stall the answers
            // being read; over HTTP/1.1 a waiting answer only stalls its own socket.
            .http1_only()
            // A fresh connection per call: hyper's read buffer grows with each big answer a
            // connection has carried (to about 400 KB) and reqwest offers no cap, so a reused
            // connection whose answer waits for a body permit would hold that much read ahead.
            // A new connection starts at 8 KB. Its cost (a TCP, and for the real API a TLS,
            // handshake) is small against calls of 10 s to minutes.
            .pool_max_idle_per_host(0)
            // A redirect would turn the POST into a GET; an answer of 3xx is reported instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                endpoint: format!("{base}/chat/completions"),
                key,
                bodies: Arc::new(Semaphore::new(config.max_concurrent_bodies)),
                image_sizes: Mutex::new(HashMap::new()),
                config,
            }),
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Generates one image: one call, no retries (the caller owns the retry policy, using the
    /// error's class). The body permit is given back before returning; see
    /// [`Client::generate_held`] for keeping it until the image is stored.
    pub async fn generate(&self, req: &ImageRequest) -> Result<Generation, CallError> {
        let mut result = self.generate_held(req, || {}).await;
        if let Ok(g) = &mut result {
            g.body_permit = None;
        }
        result
    }

    /// [`Client::generate`], with the answer's body permit kept in
    /// [`Generation::body_permit`]: the caller drops the generation once the image is stored, so
    /// decoded images waiting for storage count against [`Config::max_concurrent_bodies`]. A
    /// caller that holds many generations at once must use [`Client::generate`] instead, or it
    /// waits for permits it holds itself.
    ///
    /// `answered` runs once, when a successful answer proper starts to arrive (after the
    /// keep-alive padding, before the body permit is waited for): from then on the provider has
    /// finished generating, and what is left is this process's own reading, decoding and
    /// storing. The worker gives the job's call slot back there (see [`crate::worker::CallSlot`]).
    /// It does not run for an error answer or a call that fails before its answer.
    pub async fn generate_held(
        &self,
        req: &ImageRequest,
        answered: impl FnOnce() + Send,
    ) -> Result<Generation, CallError> {
        let started = Instant::now();
        let result = self
            .call(req, answered)
            .await
            .map_err(|e| e.redact(self.inner.key.expose_secret()));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(g) => tracing::debug!(
                model = %req.model,
                generation_id = g.generation_id.as_deref().unwrap_or(""),
                cost_usd = %g.usage.cost_usd,
                bytes = g.images.first().map_or(0, |i| i.bytes.len()),
                elapsed_ms,
                "openrouter call succeeded"
            ),
            Err(e) => tracing::debug!(
                model = %req.model,
                kind = ?e.kind,
                class = e.class.word(),
                status = e.http_status,
                error = %e,
                elapsed_ms,
                "openrouter call failed"
            ),
        }
        result
    }

    async fn call(
        &self,
        req: &ImageRequest,
        answered: impl FnOnce() + Send,
    ) -> Result<Generation, CallError> {
        validate(req)?;
        let inner = &*self.inner;
        let deadline_len = inner.config.deadline_for(&req.model);
        let deadline = tokio::time::Instant::now() + deadline_len;
        let markers: Vec<String> = (0..req.references.len()).map(data_marker).collect();
        let mut inline = Vec::new();
        let content = if req.references.is_empty() {
            Content::Text(&req.prompt)
        } else {
            let mut parts = vec![Part::Text { text: &req.prompt }];
            for r in &req.references {
                let url = match r {
                    ReferenceImage::Url(u) => u.as_str(),
                    ReferenceImage::Data(d) => {
                        inline.push(d);
                        markers[inline.len() - 1].as_str()
                    }
                };
                parts.push(Part::ImageUrl {
                    image_url: PartUrl { url },
                });
            }
            Content::Parts(parts)
        };
        let body = ChatRequest {
            model: &req.model,
            messages: [RequestMessage {
                role: "user",
                content,
            }],
            modalities: ["image", "text"],
            image_config: ImageConfig {
                aspect_ratio: &req.aspect_ratio,
                image_size: req.image_size.as_deref(),
            },
        };
        let body = serde_json::to_vec(&body).map_err(|e| {
            CallError::invalid_request(format!("openrouter: encoding request: {e}"))
        })?;
        let request = inner
            .http
            .post(&inner.endpoint)
            .header(header::CONTENT_TYPE, "application/json");
        let request = if inline.is_empty() {
            request.body(body)
        } else {
            let chunks = request_chunks(body, &inline).map_err(|e| {
                CallError::invalid_request(format!("openrouter: assembling request: {e}"))
            })?;
            let length: usize = chunks.iter().map(|c| c.len()).sum();
            let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
            request
                .header(header::CONTENT_LENGTH, length)
                .body(reqwest::Body::wrap_stream(stream))
        };
        let send = request.send();
        let deadline_error = |status: Option<u16>, id: Option<String>| {
            CallError::new(
                CallErrorKind::Deadline,
                ErrorClass::RETRY,
                format!(
                    "openrouter: no complete answer within the {} deadline",
                    humantime::format_duration(deadline_len)
                ),
            )
            .with_status(status)
            .with_generation_id(id)
        };
        let mut response = match tokio::time::timeout_at(deadline, send).await {
            Err(_) => return Err(deadline_error(None, None)),
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "could not connect"
                } else {
                    "request failed"
                };
                return Err(CallError::new(
                    CallErrorKind::Transport,
                    ErrorClass::RETRY,
                    format!("openrouter: {what}: {}", root_cause(&e)),
                ));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let header_id = response
            .headers()
            .get(GENERATION_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let hint = retry_hint(response.headers(), SystemTime::now());
        let answered = response.status().is_success().then_some(answered);
        let read = read_body(
            &mut response,
            inner.config.max_body_bytes,
            &inner.bodies,
            inner.image_size_hint(req),
            deadline,
            answered,
        );
        // The permit is held through parsing and decoding, and handed to the caller with the
        // image: until it is stored, that is where the memory is.
        let (body, permit) = match read.await {
            Err(e) => {
                let err = match e {
                    BodyError::Deadline => return Err(deadline_error(Some(status), header_id)),
                    BodyError::TooLarge { cap } => CallError::new(
                        CallErrorKind::BodyTooLarge,
                        ErrorClass::Permanent,
                        format!(
                            "openrouter: answer larger than the {cap}-byte cap \
                             (OPENROUTER_MAX_BODY_BYTES)"
                        ),
                    ),
                    BodyError::Read(e) => CallError::new(
                        CallErrorKind::BodyRead,
                        ErrorClass::RETRY,
                        format!(
                            "openrouter: connection broke while reading the answer: {}",
                            root_cause(&e)
                        ),
                    ),
                };
                return Err(err.with_status(Some(status)).with_generation_id(header_id));
            }
            Ok(read) => read,
        };
        drop(response);
        let mut generation = interpret(status, hint, header_id, body, inner.key.expose_secret())?;
        if let Some(image) = generation.images.last() {
            inner.learn_image_size(req, image.bytes.len());
        }
        generation.body_permit = permit.map(Arc::new);
        Ok(generation)
    }
}

/// Checks what OpenRouter would reject with a 400, before spending a call on it.
#[expect(
    clippy::result_large_err,
    reason = "same error type as the public call; cold path"
)]
fn validate(req: &ImageRequest) -> Result<(), CallError> {
    if req.model.trim().is_empty() {
        return Err(CallError::invalid_request("openrouter: no model given"));
    }
    if req.prompt.trim().is_empty() {
        return Err(CallError::invalid_request("openrouter: empty prompt"));
    }
    if !models::is_valid_aspect_ratio(&req.aspect_ratio) {
        return Err(CallError::invalid_request(format!(
            "openrouter: aspect ratio {:?} is not one of {}",
            short_text(&req.aspect_ratio),
            models::ASPECT_RATIOS.join(", ")
        )));
    }
    if req.references.len() > MAX_REFERENCES {
        return Err(CallError::invalid_request(format!(
            "openrouter: {} reference images; at most {MAX_REFERENCES} are sent",
            req.references.len()
        )));
    }
    if let Some(size) = &req.image_size
        && !models::is_valid_image_size(size)
    {
        return Err(CallError::invalid_request(format!(
            "openrouter: image size {:?} is not one of {}",
            short_text(size),
            models::IMAGE_SIZES.join(", ")
        )));
    }
    Ok(())
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"), which is the
/// specific part; reqwest's own text repeats the URL.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    short_text(&cause.to_string())
}

enum BodyError {
    TooLarge {
        cap: u64,
    },
    Read(reqwest::Error),
    /// The call's deadline passed while the body was still arriving.
    Deadline,
}

/// Skips what OpenRouter writes before the JSON while the model works: whitespace, and SSE
/// comment lines (`: OPENROUTER PROCESSING`). Padding is never buffered, so a call that waits
/// for minutes holds no memory for it.
#[derive(Debug, Default)]
struct PaddingSkipper {
    in_comment: bool,
    done: bool,
}

impl PaddingSkipper {
    /// The part of `chunk` that belongs to the answer proper.
    fn skip<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        if self.done {
            return chunk;
        }
        for (i, &b) in chunk.iter().enumerate() {
            if self.in_comment {
                self.in_comment = b != b'\n';
                continue;
            }
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => {}
                b':' => self.in_comment = true,
                _ => {
                    self.done = true;
                    return &chunk[i..];
                }
            }
        }
        &[]
    }
}

/// Reads the body up to `cap` bytes (padding included), dropping the padding and feeding the
/// rest through the incremental decoder (see [`stream`]). A permit from `gate` is taken when the
/// answer proper starts and handed back with the answer: the caller keeps it until the image is
/// stored. While a call waits for its permit it holds one chunk: the connection is fresh (see
/// [`Client::new`]), so its read buffer never grew, and nothing more is read until the wait
/// ends. `answered` runs when the answer proper starts, before that wait.
async fn read_body(
    response: &mut reqwest::Response,
    cap: u64,
    gate: &Arc<Semaphore>,
    image_size_hint: usize,
    mut deadline: tokio::time::Instant,
    mut answered: Option<impl FnOnce()>,
) -> Result<(stream::Answer, Option<OwnedSemaphorePermit>), BodyError> {
    let length = response.content_length();
    if length.is_some_and(|len| len > cap) {
        return Err(BodyError::TooLarge { cap });
    }
    // A stated length bounds the image exactly (base64 is 4 characters for 3 bytes); a streamed
    // answer (the real API's, padded while it works) has none, and the last image's size is the
    // guess.
    let hint = length
        .and_then(|len| usize::try_from(len / 4 * 3).ok())
        .unwrap_or(image_size_hint);
    let mut skipper = PaddingSkipper::default();
    let mut reader = stream::AnswerReader::with_payload_hint(hint);
    let mut permit = None;
    let mut received: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) => return Err(BodyError::Deadline),
            Ok(chunk) => chunk.map_err(BodyError::Read)?,
        };
        let Some(chunk) = chunk else { break };
        received += chunk.len() as u64;
        if received > cap {
            return Err(BodyError::TooLarge { cap });
        }
        let part = skipper.skip(&chunk);
        if part.is_empty() {
            continue;
        }
        if let Some(answered) = answered.take() {
            answered();
        }
        if permit.is_none() {
            // The semaphore is never closed, so acquiring only fails if that changes; reading on
            // without a permit is then the safe fallback. The wait is this process's own queue,
            // not the provider's time: the deadline moves by as much. The answer has started,
            // so the call is paid for; a deadline that fired here would throw the image away
            // and pay for it again (seen under load, when answers outnumber permits).
            let waited = tokio::time::Instant::now();
            permit = gate.clone().acquire_owned().await.ok();
            deadline += waited.elapsed();
        }
        reader.feed(part);
    }
    Ok((reader.finish(), permit))
}

/// Turns a read answer (padding removed) into a generation or a classified error. Pure: the
/// whole verdict is made here. `secret` is scrubbed from any provider text kept.
#[expect(
    clippy::result_large_err,
    reason = "same error type as the public call; cold path"
)]
pub(crate) fn interpret(
    status: u16,
    hint: Option<Duration>,
    header_id: Option<String>,
    read: stream::Answer,
    secret: &str,
) -> Result<Generation, CallError> {
    let stream::Answer {
        skeleton,
        payloads,
        mut last,
        len,
    } = read;
    let body = &skeleton[..];
    if !(200..300).contains(&status) {
        return Err(http_error(status, hint, header_id, body, secret));
    }
    if body.is_empty() {
        return Err(CallError::new(
            CallErrorKind::EmptyBody,
            ErrorClass::RETRY,
            "openrouter: the answer ended after keep-alive padding, with no JSON (upstream died)",
        )
        .with_status(Some(status))
        .with_generation_id(header_id));
    }
    let answer: ChatResponse<'_> = serde_json::from_slice(body).map_err(|e| {
        CallError::new(
            CallErrorKind::MalformedBody,
            ErrorClass::RETRY,
            format!("openrouter: malformed answer ({len} bytes): {e}"),
        )
        .with_status(Some(status))
        .with_generation_id(header_id.clone())
    })?;
    let usage = answer.usage.as_ref().map(Usage::from_wire);
    let generation_id = answer.id.clone().or(header_id);
    let fail = |kind, class, code: Option<i64>, message: String| {
        CallError::new(kind, class, message)
            .with_status(Some(status))
            .with_code(code)
            .with_usage(usage)
            .with_generation_id(generation_id.clone())
    };

    if let Some(err) = &answer.error {
        let code = err.code();
        return Err(fail(
            CallErrorKind::ErrorInBody,
            code.map_or(ErrorClass::RETRY, |c| {
                class_for_error(c, err.reason(), hint)
            }),
            code,
            format!(
                "openrouter: error in a 200 answer ({}): {}",
                describe_code(code),
                describe(err, secret)
            ),
        ));
    }
    let Some(choice) = answer.choices.as_ref().and_then(|c| c.first()) else {
        return Err(fail(
            CallErrorKind::MalformedBody,
            ErrorClass::RETRY,
            None,
            "openrouter: answer has no choices".to_owned(),
        ));
    };
    if choice.finish_reason.as_deref() == Some("error") || choice.error.is_some() {
        let code = choice.error.as_ref().and_then(WireError::code);
        let reason = choice.error.as_ref().and_then(WireError::reason);
        let detail = choice
            .error
            .as_ref()
            .map_or_else(|| "no error details".to_owned(), |e| describe(e, secret));
        return Err(fail(
            CallErrorKind::ChoiceError,
            code.map_or(ErrorClass::RETRY, |c| class_for_error(c, reason, hint)),
            code,
            format!(
                "openrouter: generation failed ({}): {detail}",
                describe_code(code)
            ),
        ));
    }
    let message = choice.message.as_ref();
    let urls: Vec<&str> = message
        .and_then(|m| m.images.as_ref())
        .map(|images| {
            images
                .iter()
                .filter_map(|i| i.image_url.as_ref().map(|u| u.url.as_ref()))
                .collect()
        })
        .unwrap_or_default();
    let Some((last_url, earlier)) = urls.split_last() else {
        let text = message
            .and_then(|m| m.refusal.clone().filter(|r| !r.trim().is_empty()))
            .or_else(|| wire::content_text(message.and_then(|m| m.content.as_ref())))
            .map(|t| format!(": {}", provider_text(&t, secret)))
            .unwrap_or_default();
        let reasons = finish_reasons(choice);
        return Err(if is_safety_block(choice) {
            fail(
                CallErrorKind::SafetyBlock,
                ErrorClass::Permanent,
                None,
                format!("openrouter: safety block ({reasons}){text}"),
            )
        } else {
            fail(
                CallErrorKind::NoImage,
                ErrorClass::RETRY,
                None,
                format!("openrouter: no image in the answer ({reasons}){text}"),
            )
        });
    };
    let image = take_image(last_url, payloads, &mut last).map_err(|e| {
        CallError::from_image(earlier.len() + 1, &e)
            .with_status(Some(status))
            .with_usage(usage)
            .with_generation_id(generation_id.clone())
    })?;
    if usage.is_none() {
        tracing::warn!(
            generation_id = generation_id.as_deref().unwrap_or(""),
            "openrouter answer carried no usage; recording zero cost"
        );
    }
    Ok(Generation {
        images: vec![image],
        discarded_images: earlier.len(),
        usage: usage.unwrap_or_default(),
        generation_id,
        http_status: status,
        body_permit: None,
    })
}

/// The image a URL of the answer stands for: the decoded payload the reader kept, or, for a URL
/// it did not intercept (not a base64 data URL), the one-shot decoder's verdict on it.
fn take_image(
    url: &str,
    payloads: usize,
    last: &mut Option<Result<stream::Payload, String>>,
) -> Result<DecodedImage, image::ImageError> {
    match stream::Answer::payload_ref(url) {
        Some(n) if n + 1 == payloads => match last.take() {
            Some(Ok(p)) => {
                DecodedImage::from_decoded(p.bytes, p.sha256, &image::data_url_label(url))
            }
            Some(Err(why)) => Err(image::ImageError::InvalidBase64(why)),
            None => Err(image::ImageError::Empty),
        },
        // A reference to a payload that was not kept (not the answer's last) or a payload that
        // really starts with '#': neither is an image we can take.
        Some(_) => Err(image::ImageError::InvalidBase64(
            "the image payload is not the answer's last".to_owned(),
        )),
        None => image::decode_data_url(url),
    }
}

/// Reads a whole answer from memory as the client reads one from the network (in `chunk`-byte
/// pieces, the image's buffer reserved as for an answer of stated length): for benchmarks of the
/// parsing and decoding path, without a server.
#[doc(hidden)]
#[expect(
    clippy::result_large_err,
    reason = "same error type as the public call; cold path"
)]
pub fn interpret_bytes(status: u16, body: &[u8], chunk: usize) -> Result<Generation, CallError> {
    let mut skipper = PaddingSkipper::default();
    let mut reader = stream::AnswerReader::with_payload_hint(body.len() / 4 * 3);
    for piece in body.chunks(chunk.max(1)) {
        reader.feed(skipper.skip(piece));
    }
    interpret(status, None, None, reader.finish(), "")
}

/// The error for a non-2xx answer, from its JSON error object if it has one.
fn http_error(
    status: u16,
    hint: Option<Duration>,
    header_id: Option<String>,
    body: &[u8],
    secret: &str,
) -> CallError {
    let code = i64::from(status);
    let answer = serde_json::from_slice::<ChatResponse<'_>>(body).ok();
    let reason = answer
        .as_ref()
        .and_then(|a| a.error.as_ref())
        .and_then(WireError::reason);
    let class = class_for_error(code, reason, hint);
    let detail = match answer.as_ref().and_then(|a| a.error.as_ref()) {
        Some(err) => describe(err, secret),
        None if body.is_empty() => "empty body".to_owned(),
        // Not OpenRouter's JSON: a proxy or load balancer answered. Its text is the clue.
        None => provider_text(
            &String::from_utf8_lossy(&body[..body.len().min(NON_JSON_BODY_SHOWN)]),
            secret,
        ),
    };
    let wait = match class {
        ErrorClass::Transient { after: Some(d) } | ErrorClass::Saturated { after: Some(d) } => {
            format!(" (retry after {})", humantime::format_duration(d))
        }
        _ => String::new(),
    };
    CallError::new(
        CallErrorKind::HttpStatus,
        class,
        format!(
            "openrouter: HTTP {status} {}: {detail}{wait}",
            if matches!(class, ErrorClass::Saturated { .. }) {
                "too many paid calls in flight for the balance"
            } else {
                code_meaning(code)
            }
        ),
    )
    .with_status(Some(status))
    .with_code(Some(code))
    .with_usage(
        answer
            .as_ref()
            .and_then(|a| a.usage.as_ref())
            .map(Usage::from_wire),
    )
    .with_generation_id(answer.and_then(|a| a.id).or(header_id))
}

/// "code 429 rate limited", or "no code".
fn describe_code(code: Option<i64>) -> String {
    code.map_or_else(
        || "no code".to_owned(),
        |c| format!("code {c} {}", code_meaning(c)),
    )
}

/// An error object as one short line: message, the provider's raw text, moderation reasons.
fn describe(err: &WireError, secret: &str) -> String {
    let mut parts = Vec::new();
    if let Some(message) = err.message.as_deref().filter(|m| !m.trim().is_empty()) {
        parts.push(message.to_owned());
    }
    if let Some(raw) = err
        .raw()
        .filter(|r| Some(r.as_str()) != err.message.as_deref())
    {
        parts.push(raw);
    }
    if let Some(kind) = err.error_type() {
        parts.push(format!("error_type {kind}"));
    }
    if let Some(reasons) = err.reasons() {
        parts.push(format!("reasons: {reasons}"));
    }
    if parts.is_empty() {
        return "no message".to_owned();
    }
    provider_text(&parts.join("; "), secret)
}

fn finish_reasons(choice: &Choice<'_>) -> String {
    format!(
        "finish_reason {}, native_finish_reason {}",
        choice.finish_reason.as_deref().unwrap_or("none"),
        choice.native_finish_reason.as_deref().unwrap_or("none")
    )
}

fn is_safety_block(choice: &Choice<'_>) -> bool {
    choice.finish_reason.as_deref() == Some("content_filter")
        || choice
            .native_finish_reason
            .as_deref()
            .is_some_and(|r| SAFETY_REASONS.contains(&r))
        || choice
            .message
            .as_ref()
            .and_then(|m| m.refusal.as_deref())
            .is_some_and(|r| !r.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flag_defaults_match_the_named_constants() {
        let cli = Cli::try_parse_from(["x", "--openrouter-api-key", "sk-test"]).unwrap();
        let defaults = Config::new(DEFAULT_BASE_URL, "sk-test");
        let c = cli.config;
        assert_eq!(c.base_url, defaults.base_url);
        assert_eq!(c.connect_timeout, defaults.connect_timeout);
        assert_eq!(c.deadline, defaults.deadline);
        assert_eq!(c.slow_deadline, defaults.slow_deadline);
        assert_eq!(c.slow_models, defaults.slow_models);
        assert_eq!(c.max_body_bytes, defaults.max_body_bytes);
        assert_eq!(c.max_concurrent_bodies, defaults.max_concurrent_bodies);
        assert_eq!(c.deadline_for(models::PRO_IMAGE), DEFAULT_SLOW_DEADLINE);
        assert_eq!(c.deadline_for(models::FLASH_IMAGE), DEFAULT_DEADLINE);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let config = Config::new("http://127.0.0.1:1", "sk-or-v1-very-secret");
        let client = Client::new(config.clone()).unwrap();
        for text in [format!("{config:?}"), format!("{client:?}")] {
            assert!(!text.contains("very-secret"), "{text}");
        }
    }

    #[test]
    fn a_client_needs_a_key_and_an_http_url() {
        let mut config = Config::new("http://127.0.0.1:1", "k");
        config.api_key = None;
        assert!(matches!(
            Client::new(config),
            Err(ClientError::MissingApiKey)
        ));
        assert!(matches!(
            Client::new(Config::new("ftp://example.com", "k")),
            Err(ClientError::InvalidBaseUrl(_))
        ));
    }

    #[test]
    fn padding_and_comment_lines_are_skipped_across_chunks() {
        let mut s = PaddingSkipper::default();
        assert_eq!(s.skip(b"\n \n: OPENROUTER "), b"");
        assert_eq!(s.skip(b"PROCESSING\n\n\r\n"), b"");
        assert_eq!(s.skip(b"  {\"a\": \n 1}"), b"{\"a\": \n 1}");
        // Once the answer started, nothing is skipped any more.
        assert_eq!(s.skip(b" : x"), b" : x");
    }

    fn request(ratio: &str, size: Option<&str>) -> ImageRequest {
        ImageRequest {
            model: models::FLASH_IMAGE.to_owned(),
            prompt: "a lake".to_owned(),
            aspect_ratio: ratio.to_owned(),
            image_size: size.map(str::to_owned),
            references: Vec::new(),
        }
    }

    #[test]
    fn inline_references_are_spliced_in_as_shared_buffers() {
        let png = b"\x89PNG\r\n\x1a\nrest";
        let data = Arc::new(DataUrl::new(png, image::ImageFormat::Png));
        // A prompt quoting the marker cannot be mistaken for it.
        let json = serde_json::to_vec(&serde_json::json!({
            "prompt": "say \"imagegen-inline-reference-0\"",
            "a": "imagegen-inline-reference-0",
            "b": "imagegen-inline-reference-1"
        }))
        .unwrap();
        let chunks = request_chunks(json, &[&data, &data]).unwrap();
        assert_eq!(chunks.len(), 5);
        // The middle chunks are the shared buffer itself, not copies.
        assert_eq!(chunks[1].as_ptr(), data.as_bytes().as_ptr());
        assert_eq!(chunks[3].as_ptr(), data.as_bytes().as_ptr());
        let body: Vec<u8> = chunks.concat();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let url = v["a"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        assert_eq!(v["b"], v["a"]);
        assert_eq!(v["prompt"], "say \"imagegen-inline-reference-0\"");
        assert_eq!(format!("{data:?}"), "DataUrl(image/png, 12 bytes)");
    }

    #[test]
    fn validation_refuses_what_openrouter_would_400() {
        assert!(validate(&request("16:9", Some("4K"))).is_ok());
        let err = validate(&request("1.91:1", None)).unwrap_err();
        assert_eq!(err.kind, CallErrorKind::InvalidRequest);
        assert_eq!(err.class, ErrorClass::Permanent);
        assert_eq!(
            err.to_string(),
            "openrouter: aspect ratio \"1.91:1\" is not one of 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, \
             5:4, 9:16, 16:9, 21:9"
        );
        assert!(validate(&request("1:1", Some("8K"))).is_err());
        let mut empty = request("1:1", None);
        empty.prompt = "  ".to_owned();
        assert!(validate(&empty).is_err());
    }

    fn read(body: &[u8]) -> stream::Answer {
        let mut r = stream::AnswerReader::default();
        r.feed(body);
        r.finish()
    }

    #[test]
    fn non_json_error_bodies_are_quoted_briefly() {
        let err = interpret(
            502,
            None,
            None,
            read(b"<html><body>Bad gateway</body></html>"),
            "k",
        )
        .unwrap_err();
        assert_eq!(err.kind, CallErrorKind::HttpStatus);
        assert_eq!(err.class, ErrorClass::RETRY);
        assert_eq!(
            err.to_string(),
            "openrouter: HTTP 502 provider error: <html><body>Bad gateway</body></html>"
        );
    }

    #[test]
    fn a_top_level_error_without_code_is_transient() {
        let body =
            br#"{"error":{"message":"No instances available","availability":{}},"user_id":"u"}"#;
        let err = interpret(200, None, Some("gen-h".into()), read(body), "k").unwrap_err();
        assert_eq!(err.kind, CallErrorKind::ErrorInBody);
        assert_eq!(err.class, ErrorClass::RETRY);
        assert_eq!(err.code, None);
        assert_eq!(err.generation_id.as_deref(), Some("gen-h"));
        assert_eq!(
            err.to_string(),
            "openrouter: error in a 200 answer (no code): No instances available"
        );
    }
}
