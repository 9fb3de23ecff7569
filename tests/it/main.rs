//! The one integration-test binary: shared helpers and a module per area. Run it with
//! `scripts/test`, which starts the S3-compatible server these tests need.

mod batch;
mod bench;
mod cooldown;
mod dashboard;
mod helpers;
mod http;
mod openrouter;
mod overnight;
mod pipeline;
mod push;
mod queue;
mod renditions;
mod storage;
