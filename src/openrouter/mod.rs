//! The OpenRouter chat-completions image client, and the local stand-in server that imitates it.
//!
//! - [`client`]: [`Client::generate`] makes one call and returns a [`Generation`] (the decoded
//!   image and its [`Usage`]) or a [`CallError`] whose class is the verdict (retry, with the
//!   provider's delay; permanent; halt the worker). The verdict is decided here and nowhere else.
//! - [`error`]: [`CallError`], its kinds, and the reading of status codes and retry hints.
//! - [`wire`]: the JSON on the wire.
//! - [`models`]: model ids, aspect ratios, image sizes and their pixel dimensions.
//! - [`fake`]: `imagegen fake-openrouter`, the development stand-in used by tests, the demo
//!   and the benchmarks.

pub mod client;
pub mod error;
pub mod fake;
pub mod models;
mod wire;

pub use client::{
    Client, ClientError, Config, DEFAULT_BASE_URL, DataUrl, Generation, ImageRequest,
    MAX_REFERENCES, ReferenceImage, Usage,
};
pub use error::{CallError, CallErrorKind};
