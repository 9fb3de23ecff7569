//! Integration tests: the HTTP server. The real router over a real socket on port 0, on the
//! test's own Postgres database: every endpoint, listing and paging, idempotent submission, the
//! error answers, access rules, `/metrics` of a live worker process checked by `promtool`, and a
//! schemathesis run against the server's own OpenAPI document.

mod api;
mod auth;
mod media;
mod metrics;
mod schema;

use std::net::SocketAddr;
use std::time::Duration;

use imagegen::http::auth::AuthArgs;
use imagegen::http::{self, HttpState};
use imagegen::queue::{AttemptRecord, ClaimFilter, Completion, Finish, ImageRow, Queue};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A server under test; stopped (gracefully) when dropped.
pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), http::HttpError>>>,
}

impl Server {
    /// A server bound to `bind` (port 0) with these access settings, on `pool`.
    pub async fn start_with(pool: &PgPool, bind: &str, args: AuthArgs) -> Server {
        let (listener, auth) = http::bind(bind.parse().unwrap(), &args)
            .await
            .expect("bind the server");
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let state = HttpState::new(Queue::new(pool.clone()), None, auth).with_shutdown(&stop);
        let task = tokio::spawn(http::serve(listener, http::router(state), stop.clone()));
        // Reached through loopback whatever the bind address.
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Server {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            stop,
            task: Some(task),
        }
    }

    /// An open server on loopback.
    pub async fn start(pool: &PgPool) -> Server {
        Server::start_with(pool, "127.0.0.1:0", AuthArgs::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        answer(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        answer(
            self.client
                .post(self.url(path))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        answer(
            self.client
                .put(self.url(path))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Stops the server and waits until it has.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Status and JSON body (Null when the body is not JSON). Problem answers must say so.
pub async fn answer(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = res.bytes().await.unwrap();
    if status >= 400 {
        assert_eq!(
            ctype,
            "application/problem+json",
            "error {status} without problem+json: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The cost every seeded attempt is billed.
pub const SEEDED_COST: &str = "0.0387036";

/// Claims up to `n` due jobs and finishes them as succeeded with one image each, billed
/// [`SEEDED_COST`]. Returns the ids.
pub async fn succeed(queue: &Queue, n: i64) -> Vec<i64> {
    let worker = uuid::Uuid::new_v4();
    let jobs = queue
        .claim(worker, n, Duration::from_secs(60), &ClaimFilter::default())
        .await
        .unwrap();
    let completions: Vec<Completion> = jobs
        .iter()
        .map(|j| {
            let url = format!("https://cdn.example.com/{}.png", j.id);
            Completion {
                job_id: j.id,
                lease: j.lease(),
                started_at: chrono::Utc::now(),
                duration: Duration::from_millis(1200),
                finish: Finish::Succeeded {
                    image_urls: vec![url.clone()],
                    images: vec![ImageRow {
                        index: 0,
                        key: format!("{}.png", j.id),
                        url,
                        content_type: "image/png".into(),
                        bytes: 1234,
                        width: 1344,
                        height: 768,
                        sha256: "ab".repeat(32),
                    }],
                },
                record: AttemptRecord {
                    http_status: Some(200),
                    prompt_tokens: 10,
                    completion_tokens: 1300,
                    image_tokens: 1290,
                    cost_usd: SEEDED_COST.parse::<Decimal>().unwrap(),
                    generation_id: Some(format!("gen-{}", j.id)),
                },
            }
        })
        .collect();
    let applied = queue.complete(&completions).await.unwrap();
    assert!(applied.iter().all(|a| *a));
    jobs.iter().map(|j| j.id).collect()
}
