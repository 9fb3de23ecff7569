//! Memory stays bounded when many large answers arrive at once.
//!
//! The bound: the client buffers at most `max_concurrent_bodies` answers at once (calls still
//! receiving padding hold no buffer; the others wait for a permit while their bytes stay in the
//! socket), and each buffered answer costs up to twice its body (the buffer is copied when it
//! grows) plus its decoded image. So twenty ~4 MB answers arriving together, with the limit at
//! 4, may raise the peak resident set by at most `4 x (2 x body + image)` plus a fixed slack for
//! the runtime, connection buffers, the stand-in in the same process and allocator
//! fragmentation ([`SLACK_BYTES`]): 77 MB. Measured: 41-52 MB. With the limit lifted to 20 the
//! same burst measured 99-132 MB, so the test fails if the limit stops working.
//!
//! Peak RSS is process-wide, so the measurement runs in a process of its own
//! ([`super::in_own_process`]): the result holds under `cargo test` and `cargo nextest`.

use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config};

use super::{KEY, in_own_process, request};

/// Answers arriving at once.
const CALLS: usize = 20;
/// A 3 MB PNG is a 4 MB answer once in base64.
const IMAGE_BYTES: usize = 3_000_000;
/// The client's `max_concurrent_bodies` under test.
const BODIES: usize = 4;
/// Runtime, 20 connections' buffers, the stand-in's cached image and allocator slack.
const SLACK_BYTES: u64 = 32 * 1024 * 1024;

#[test]
fn twenty_concurrent_4mb_answers_stay_within_a_stated_bound() {
    let test = concat!(
        module_path!(),
        "::twenty_concurrent_4mb_answers_stay_within_a_stated_bound"
    );
    if let Some(stdout) = in_own_process(test, measure) {
        // With one test thread libtest writes "test <name> ... " first, on the same line.
        for line in stdout.lines() {
            if let Some(at) = line.find("memory: ") {
                println!("{}", &line[at..]);
            }
        }
    }
}

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn measure() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = FakeServer::start(FakeConfig {
            api_key: Some(KEY.to_owned()),
            image_bytes: IMAGE_BYTES,
            // All calls wait together, then all answers come at once.
            latency: Duration::from_millis(500),
            pad_interval: Duration::from_millis(50),
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        let client = Client::new(Config {
            max_concurrent_bodies: BODIES,
            ..Config::new(server.base_url(), KEY)
        })
        .unwrap();
        // Generates and caches the stand-in's image and warms the allocator.
        let warm = client.generate(&request("warm-up")).await.unwrap();
        // The stand-in draws a picture per prompt, so sizes differ by a little between prompts:
        // the bound below is taken for the largest an answer may be.
        let warm_size = warm.images[0].bytes.len() as u64;
        let image = warm_size + warm_size / 10;
        drop(warm);
        let body = image.div_ceil(3) * 4 + 2048;

        let baseline = status_bytes("VmRSS:");
        // Resets VmHWM to the current RSS (Linux 4.0+); if refused, the peak below can only
        // be overstated, never understated.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let calls: Vec<_> = (0..CALLS)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let g = client
                        .generate(&request(&format!("lake {i}")))
                        .await
                        .unwrap();
                    g.images[0].bytes.len() as u64
                })
            })
            .collect();
        for call in calls {
            let got = call.await.unwrap();
            assert!(
                got.abs_diff(warm_size) <= warm_size / 10,
                "an answer of {got} bytes, the warm-up's was {warm_size}"
            );
        }
        let growth = status_bytes("VmHWM:").saturating_sub(baseline);
        let bound = BODIES as u64 * (2 * body + image) + SLACK_BYTES;
        let unbounded = CALLS as u64 * (body + image);
        println!(
            "memory: {CALLS} answers of {} MB arrived together; peak grew by {} MB, bound {} MB \
             ({BODIES} x (2 x body + image) + {} MB slack); ungated they would need about {} MB",
            body / 1_000_000,
            growth / 1_000_000,
            bound / 1_000_000,
            SLACK_BYTES / 1_000_000,
            unbounded / 1_000_000
        );
        assert!(
            growth <= bound,
            "peak RSS grew by {growth} bytes, bound {bound}"
        );
        assert_eq!(server.successes(), CALLS + 1);
    });
}
