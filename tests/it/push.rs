//! Push to other applications, on real Postgres: the finished-job NOTIFY, the event log and its
//! stream, signed webhooks (verified with the Standard Webhooks reference library), the
//! outbound guard, a worker killed between commit and delivery, and two worker processes
//! through a real PgBouncer in transaction mode.

mod events;
mod notify;
mod pgbouncer;
mod retention;
mod stream;
mod webhooks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use imagegen::openrouter::fake::FakeServer;
use imagegen::queue::{AttemptRecord, ClaimFilter, Completion, Finish, Queue};
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

/// The secret the tests sign with (the Standard Webhooks specification's example key).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The stand-in provider's key in worker-process tests.
pub const KEY: &str = "sk-or-test-push-key";
pub const WAIT: Duration = Duration::from_secs(120);

/// Claims every due job and ends each as `finish(job_id)` says, through the queue's own
/// statements (no provider needed). Returns the ids claimed.
pub async fn claim_and_finish(queue: &Queue, finish: impl Fn(i64) -> Finish) -> Vec<i64> {
    let worker = Uuid::new_v4();
    let jobs = queue
        .claim(
            worker,
            500,
            Duration::from_secs(30),
            &ClaimFilter::default(),
        )
        .await
        .unwrap();
    let completions: Vec<Completion> = jobs
        .iter()
        .map(|j| Completion {
            job_id: j.id,
            lease: j.lease(),
            started_at: Utc::now(),
            duration: Duration::from_millis(5),
            finish: finish(j.id),
            record: AttemptRecord::default(),
        })
        .collect();
    let applied = queue.complete(&completions).await.unwrap();
    assert!(applied.iter().all(|a| *a), "every completion applied");
    jobs.iter().map(|j| j.id).collect()
}

pub fn succeeded() -> Finish {
    Finish::Succeeded {
        image_urls: vec!["https://cdn.example/img.png".into()],
        images: vec![],
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// What a receiver answers to its n-th request (0-based).
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Never answers (the caller times out or dies).
    Hang,
}

/// A webhook receiver on a loopback port: records every request, answers as `script` says.
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
}

type ReceiverState = (
    Arc<Mutex<Vec<Received>>>,
    Arc<dyn Fn(usize) -> Answer + Send + Sync>,
);

impl Receiver {
    pub async fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let state: ReceiverState = (got.clone(), Arc::new(script));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(
    State((got, script)): State<ReceiverState>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let n = {
        let mut got = got.lock().unwrap();
        got.push(Received {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body,
        });
        got.len() - 1
    };
    match script(n) {
        Answer::Status(s) => StatusCode::from_u16(s).unwrap(),
        Answer::Hang => std::future::pending().await,
    }
}

/// Verifies a received webhook with the Standard Webhooks reference library (Python), from the
/// venv `scripts/ensure-venv` made. Returns the library's verdict.
pub fn verify_with_reference_library(r: &Received) -> Result<(), String> {
    let venv = std::env::var("IMAGEGEN_TEST_VENV").unwrap_or_else(|_| {
        panic!("IMAGEGEN_TEST_VENV is not set: run the tests with scripts/test (it makes the venv)")
    });
    let input = serde_json::json!({"secret": SECRET, "headers": r.headers, "body": r.body});
    let mut child = Command::new(format!("{venv}/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/verify_webhook.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the python verifier");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn database_url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

/// An `imagegen worker` process on `db`, the stand-in and a local storage directory.
pub fn spawn_worker(
    db: &str,
    fake: &FakeServer,
    storage: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("worker")
        .args([
            "--concurrency",
            "8",
            "--poll-interval",
            "200ms",
            "--lease",
            "3s",
        ])
        .args([
            "--retry-base",
            "100ms",
            "--retry-cap",
            "400ms",
            "--grace",
            "20s",
        ])
        .args(extra)
        .env("DATABASE_URL", db)
        .env("OPENROUTER_BASE_URL", fake.base_url())
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_DEADLINE", "10s")
        .env("IMAGEGEN_STORAGE", storage)
        .env("IMAGEGEN_WEBHOOK_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start an imagegen worker process")
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {}", child.id());
}
