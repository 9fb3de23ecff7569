//! Integration tests: the OpenRouter client against the stand-in (`fake-openrouter`), over real
//! HTTP on port 0. One test per row of shared/openrouter.md's failure table and per quirk, each
//! asserting the verdict, the delay, the recorded usage and the error text.

mod failures;
mod memory;
mod quirks;
mod secrets;
mod standin;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::models::FLASH_IMAGE;
use imagegen::openrouter::{CallError, Client, Config, Generation, ImageRequest};

/// The key the stand-in accepts, shaped like a real one so a leak would be recognisable.
pub const KEY: &str = "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";

/// A stand-in that accepts only [`KEY`], with no latency.
pub async fn fake() -> FakeServer {
    fake_with(FakeConfig::default()).await
}

/// A stand-in with `config`, accepting only [`KEY`].
pub async fn fake_with(config: FakeConfig) -> FakeServer {
    FakeServer::start(FakeConfig {
        api_key: Some(KEY.to_owned()),
        ..config
    })
    .await
    .unwrap()
}

/// Client settings pointing at `server`, with the right key.
pub fn config(server: &FakeServer) -> Config {
    Config::new(server.base_url(), KEY)
}

pub fn client(server: &FakeServer) -> Client {
    Client::new(config(server)).unwrap()
}

/// A flash 16:9 request for `prompt`.
pub fn request(prompt: &str) -> ImageRequest {
    ImageRequest {
        model: FLASH_IMAGE.to_owned(),
        prompt: prompt.to_owned(),
        aspect_ratio: "16:9".to_owned(),
        image_size: None,
        references: Vec::new(),
    }
}

/// One call that must fail.
pub async fn fail(server: &FakeServer, prompt: &str) -> CallError {
    match client(server).generate(&request(prompt)).await {
        Ok(g) => panic!(
            "expected a failure for {prompt:?}, got {:?}",
            g.generation_id
        ),
        Err(e) => e,
    }
}

/// One call that must succeed.
pub async fn succeed(server: &FakeServer, prompt: &str) -> Generation {
    match client(server).generate(&request(prompt)).await {
        Ok(g) => g,
        Err(e) => panic!("expected success for {prompt:?}, got {e} ({:?})", e.kind),
    }
}

/// The SHA-256 (hex) of bytes, to compare with what the stand-in says it served.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Set in a child process to the name of the one test it runs.
const CHILD_ENV: &str = "IMAGEGEN_TEST_CHILD";

/// Runs `body` in a process of its own: this test binary re-run on just `test` (its path as
/// `module_path!()::name`). For tests that need process-wide state (a global log subscriber,
/// peak memory), so they hold under `cargo test`, which runs tests as threads of one process,
/// as well as under `cargo nextest`. Returns the child's stdout in the parent, `None` in the
/// child.
pub fn in_own_process(test: &str, body: impl FnOnce()) -> Option<String> {
    let test = test.split_once("::").map_or(test, |(_crate, path)| path);
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        body();
        return None;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, test)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{test} failed in its own process:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test:\n{stdout}"
    );
    Some(stdout)
}
