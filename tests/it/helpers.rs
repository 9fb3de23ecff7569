//! Shared test helpers: worker settings for tests, closure handlers, a TCP proxy that can cut the
//! database off, and waiting on a condition without sleeping for ordering.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use imagegen::retry::RetryPolicy;
use imagegen::worker::WorkerConfig;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Worker settings for tests: quick timers so leases, rescues and retries happen within a test.
pub fn fast_config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        poll_interval: Duration::from_millis(200),
        lease: Duration::from_secs(30),
        renew_interval: Duration::from_secs(5),
        rescue_interval: Duration::from_millis(200),
        grace: Duration::from_secs(10),
        halt_probe_interval: Duration::from_millis(200),
        // Retries due at once, so tests do not wait on backoff. (`exit_when_idle` waits for
        // retries either way: they are marked `retry_pending`.)
        retry: RetryPolicy {
            base: Duration::ZERO,
            cap: Duration::ZERO,
        },
        exit_when_idle: true,
        only_batch: None,
        window: None,
    }
}

/// A pool on the test's database with room for several workers.
pub async fn pool(opts: &PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.clone())
        .await
        .expect("connect to the test database")
}

/// Polls `cond` until it holds, failing the test after `limit`. For waiting on an outcome, not
/// for ordering: the condition is the ordering.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of Postgres that can cut every connection and refuse new ones, as a
/// database restart or a network partition does, then come back.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    /// Connections refused or cut while down: proof that clients noticed the outage.
    pub refused: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let refused = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (up2, gen2, refused2, stop2) = (
            up.clone(),
            generation.clone(),
            refused.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let mut cut = gen2.subscribe();
                let refused3 = refused2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => { refused3.fetch_add(1, Ordering::SeqCst); }
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
            refused,
            stop,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connect options for the same database as `opts`, through `proxy`.
pub fn via_proxy(opts: &PgConnectOptions, proxy: &Proxy) -> PgConnectOptions {
    opts.clone()
        .host(&proxy.addr.ip().to_string())
        .port(proxy.addr.port())
}

/// The Postgres address the test options point at.
pub async fn pg_addr(opts: &PgConnectOptions) -> SocketAddr {
    let host = opts.get_host();
    let host = if host.starts_with('/') {
        "127.0.0.1"
    } else {
        host
    };
    tokio::net::lookup_host((host, opts.get_port()))
        .await
        .expect("resolve postgres host")
        .next()
        .expect("postgres address")
}
