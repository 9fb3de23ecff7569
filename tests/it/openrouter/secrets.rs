//! The API key never appears in an error message, a Debug print, or a log line.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imagegen::openrouter::fake::FakeConfig;
use imagegen::openrouter::{CallErrorKind, Client, Config};
use tracing_subscriber::fmt::MakeWriter;

use super::{KEY, config, fake_with, in_own_process, request};

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Every piece of `secret` long enough to identify it.
fn leaks(text: &str, secret: &str) -> bool {
    const WINDOW: usize = 8;
    let secret = secret.strip_prefix("sk-or-v1-").unwrap_or(secret);
    (0..=secret.len().saturating_sub(WINDOW)).any(|i| text.contains(&secret[i..i + WINDOW]))
}

#[test]
fn the_key_never_appears_in_errors_debug_output_or_logs() {
    let test = concat!(
        module_path!(),
        "::the_key_never_appears_in_errors_debug_output_or_logs"
    );
    // A global subscriber sees every thread, but only one can be set per process: hence a
    // process of its own. (A thread-local one misses events whose callsite another test's
    // thread registered first.)
    in_own_process(test, || {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(exercise_every_error_path(logs));
    });
}

/// Every kind of failure, a success, and the Debug prints; then looks for the key in all of it.
async fn exercise_every_error_path(logs: Captured) {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(20),
        pad_interval: Duration::from_millis(5),
        oversize_bytes: 2 * 1024 * 1024,
        image_bytes: 100_000,
        ..FakeConfig::default()
    })
    .await;
    let client = Client::new(Config {
        deadline: Duration::from_secs(3),
        max_body_bytes: 1024 * 1024,
        ..config(&server)
    })
    .unwrap();
    let wrong_key = "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";
    let wrong = Client::new(Config::new(server.base_url(), wrong_key)).unwrap();

    let mut texts = vec![format!("{client:?}"), format!("{:?}", client.config())];
    let faults = [
        "400",
        "402",
        "403",
        "408",
        "429 retry-after=2",
        "500",
        "502",
        "503",
        "524",
        "529",
        "unavailable",
        "echo-key",
        "200-error",
        "choice-error",
        "safety",
        "text-only",
        "whitespace-eof",
        "cut",
        "reset",
        "oversize",
        "slow=1h",
    ];
    for fault in faults {
        let err = client
            .generate(&request(&format!("a lake [fault:{fault}]")))
            .await
            .unwrap_err();
        texts.push(err.to_string());
        texts.push(format!("{err:?}"));
    }
    let err = wrong.generate(&request("a lake")).await.unwrap_err();
    assert_eq!(err.http_status, Some(401));
    texts.push(err.to_string());
    texts.push(format!("{err:?}"));
    let mut bad = request("a lake");
    bad.aspect_ratio = KEY.to_owned();
    let err = client.generate(&bad).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::InvalidRequest);
    texts.push(err.to_string());
    client.generate(&request("a lake")).await.unwrap();

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("openrouter call failed"),
        "logs were captured"
    );
    assert!(
        logs.contains("openrouter call succeeded"),
        "logs were captured"
    );
    texts.push(logs);
    for text in &texts {
        assert!(!leaks(text, KEY), "the key leaked into: {text}");
        assert!(!leaks(text, wrong_key), "the wrong key leaked into: {text}");
    }
}

#[tokio::test]
async fn a_provider_message_quoting_the_key_is_scrubbed() {
    let server = fake_with(FakeConfig::default()).await;
    let client = Client::new(config(&server)).unwrap();
    let err = client
        .generate(&request("a lake [fault:echo-key]"))
        .await
        .unwrap_err();
    assert_eq!(err.http_status, Some(400));
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 400 bad request: Malformed request: the upstream proxy rejected the \
         headers it received (Content-Type: application/json, Accept: */*, Authorization: Bearer \
         [redacted])"
    );
}
