//! `GET /api/v1/events` over a real socket: a client that reconnects with `Last-Event-ID` gets
//! every event once, in order; the batch filter; keep-alive comments on an idle stream; clear
//! refusals of an unknown or malformed id; and a shutdown that ends open streams.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use imagegen::http::auth::AuthArgs;
use imagegen::http::{self, HttpState};
use imagegen::queue::{NewJob, Queue};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{claim_and_finish, succeeded};

struct EventServer {
    base: String,
    stop: CancellationToken,
    task: JoinHandle<Result<(), http::HttpError>>,
}

async fn start(pool: &PgPool) -> EventServer {
    let (listener, auth) = http::bind("127.0.0.1:0".parse().unwrap(), &AuthArgs::default())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let mut state = HttpState::new(Queue::new(pool.clone()), None, auth).with_shutdown(&stop);
    state.event_keep_alive = Duration::from_millis(300);
    let task = tokio::spawn(http::serve(listener, http::router(state), stop.clone()));
    EventServer {
        base: format!("http://{addr}"),
        stop,
        task,
    }
}

/// One SSE frame: its fields, or a comment (keep-alive).
#[derive(Debug)]
enum Frame {
    Event {
        id: i64,
        name: String,
        data: serde_json::Value,
    },
    Comment,
}

struct Client {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
}

impl Client {
    async fn connect(base: &str, query: &str, last: Option<&str>) -> Client {
        let mut req = reqwest::Client::new().get(format!("{base}/api/v1/events{query}"));
        if let Some(l) = last {
            req = req.header("Last-Event-ID", l);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Client {
            body: Box::pin(res.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next frame, or `None` when the server ended the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let text: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data, mut comment) = (None, None, None, false);
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<i64>().unwrap());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str(v.trim()).unwrap());
                    } else if line.starts_with(':') {
                        comment = true;
                    }
                }
                return Some(match (id, name, data) {
                    (Some(id), Some(name), Some(data)) => Frame::Event { id, name, data },
                    _ => {
                        assert!(
                            comment,
                            "a frame that is neither an event nor a comment: {text:?}"
                        );
                        Frame::Comment
                    }
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("the stream sends something within 20 s");
            match chunk {
                Some(c) => self.buf.push_str(std::str::from_utf8(&c.unwrap()).unwrap()),
                None => return None,
            }
        }
    }

    /// The next event (skipping keep-alives): (event id, job id).
    async fn event(&mut self) -> (i64, i64) {
        loop {
            match self.frame().await.expect("the stream is open") {
                Frame::Event { id, name, data } => {
                    assert_eq!(name, "job_finished");
                    assert_eq!(data["id"], id, "the SSE id is the event id");
                    assert_eq!(data["state"], "succeeded");
                    return (id, data["job_id"].as_i64().unwrap());
                }
                Frame::Comment => {}
            }
        }
    }
}

async fn finish_new_jobs(queue: &Queue, batches: &[&str]) -> Vec<i64> {
    let jobs: Vec<NewJob> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| NewJob {
            prompt: format!("p{i}"),
            batch: Some((*b).into()),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    claim_and_finish(queue, |_| succeeded()).await
}

/// (event id, job id, batch) of the whole log, in the order the stream reads it.
async fn log(pool: &PgPool) -> Vec<(i64, i64, String)> {
    sqlx::query_as("SELECT id, job_id, batch FROM imagegen.events ORDER BY tx, id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_reconnect_with_last_event_id_loses_and_repeats_nothing(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let server = start(&pool).await;
    let before = finish_new_jobs(&queue, &["a", "b"]).await;

    let mut first = Client::connect(&server.base, "", None).await;
    finish_new_jobs(&queue, &["a", "b", "a", "b", "a"]).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(first.event().await);
    }
    // The connection drops mid-way; more jobs finish while the client is away.
    drop(first);
    finish_new_jobs(&queue, &["b", "a", "b", "a"]).await;
    let last = seen.last().unwrap().0.to_string();
    let mut second = Client::connect(&server.base, "", Some(&last)).await;
    for _ in 0..6 {
        seen.push(second.event().await);
    }
    finish_new_jobs(&queue, &["c"]).await;
    seen.push(second.event().await);
    // Idle now: keep-alive comments, no event.
    for _ in 0..2 {
        assert!(matches!(second.frame().await, Some(Frame::Comment)));
    }

    let log = log(&pool).await;
    assert_eq!(log.len(), before.len() + 10);
    let want: Vec<(i64, i64)> = log[before.len()..]
        .iter()
        .map(|(e, j, _)| (*e, *j))
        .collect();
    assert_eq!(
        seen, want,
        "every event after the first connect, once, in order"
    );

    // Only batch "a", resumed (by the query parameter) from the fifth event seen.
    let from = seen[4].0;
    let mut only_a = Client::connect(
        &server.base,
        &format!("?batch=a&last_event_id={from}"),
        None,
    )
    .await;
    let want_a: Vec<(i64, i64)> = log[before.len() + 5..]
        .iter()
        .filter(|(_, _, b)| b == "a")
        .map(|(e, j, _)| (*e, *j))
        .collect();
    assert_eq!(want_a.len(), 2);
    for w in want_a {
        assert_eq!(only_a.event().await, w);
    }

    // An id the log does not hold, and one that is not an id, are refused with a problem.
    let client = reqwest::Client::new();
    for (header, status) in [("99999999", 410), ("seven", 400)] {
        let res = client
            .get(format!("{}/api/v1/events", server.base))
            .header("Last-Event-ID", header)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "Last-Event-ID: {header}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }

    // A shutdown ends the open streams instead of waiting for them for ever.
    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), server.task)
        .await
        .expect("the server stops with streams open")
        .unwrap()
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), second.frame()).await {
            Ok(None) => break,
            Ok(Some(Frame::Comment)) => {}
            other => panic!("the stream should end, got {other:?}"),
        }
    }
}
