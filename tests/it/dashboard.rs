//! Integration tests: the dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/test`), driven over WebDriver by fantoccini, against
//! the real router on port 0, the test's own Postgres database and images made by the real
//! pipeline from the stand-in provider. Each page is screenshot under `target/screenshots/`.
//!
//! Every visit also reads the browser's console: a script error or a Content-Security-Policy
//! violation fails the test, so the strict policy stays strict.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use imagegen::http::auth::AuthArgs;
use imagegen::http::{self, HttpState};
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client as OrClient, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{fast_config, wait_until};

const KEY: &str = "sk-or-test-dashboard-key";
const TOKEN: &str = "dashboard-token-0123456789";
const READ_TOKEN: &str = "dashboard-read-token-0123456789";

/// Where screenshots go: `target/screenshots/NAME.png`.
fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    dir
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A chromedriver process and one Chromium session on it; both end when dropped.
struct Browser {
    driver: Child,
    port: u16,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        use std::os::unix::process::CommandExt as _;
        let driver = Command::new(
            std::env::var("IMAGEGEN_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        // Its own process group, so the Chromium it starts can be ended with it.
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver (Debian package chromium-driver; scripts/test installs it)");
        let status = format!("http://127.0.0.1:{port}/status");
        let http = reqwest::Client::new();
        wait_until(
            Duration::from_secs(30),
            "chromedriver to answer",
            || async { http.get(&status).send().await.is_ok() },
        )
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": std::env::var("IMAGEGEN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": [
                    // Chromium refuses to run as root with its sandbox.
                    "--no-sandbox", "--headless", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Browser {
            driver,
            port,
            client: Some(client),
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// The browser console since the last call; fails on any error (script error, CSP
    /// violation, failed load).
    async fn assert_console_clean(&self, page: &str) {
        let severe: Vec<Value> = self
            .console()
            .await
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(
            severe.is_empty(),
            "{page}: browser console errors: {severe:#?}"
        );
    }

    /// Reads (and so empties) the console after a step that is meant to log a refusal.
    async fn drain_console(&self) {
        self.console().await;
    }

    async fn console(&self) -> Vec<Value> {
        let sid = self.c().session_id().await.unwrap().unwrap();
        let logs: Value = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/session/{sid}/se/log",
                self.port
            ))
            .json(&json!({"type": "browser"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        logs["value"].as_array().cloned().unwrap_or_default()
    }

    /// Ends the session (Chromium exits) and the driver.
    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
        }
    }

    async fn goto(&self, url: &str) {
        self.c().goto(url).await.unwrap();
        self.assert_console_clean(url).await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.c().screenshot().await.unwrap();
        std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
    }

    /// A full-page screenshot: the window grown to the page's height first.
    async fn screenshot_full(&self, name: &str) {
        let h = self
            .c()
            .execute("return document.documentElement.scrollHeight", vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap_or(1000)
            .clamp(600, 4000);
        self.c().set_window_size(1280, h as u32).await.unwrap();
        self.screenshot(name).await;
        self.c().set_window_size(1280, 1000).await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.c().execute(script, vec![]).await.unwrap()
    }

    /// Waits for the page to show `needle`: a click that submits a form returns before the
    /// next page has loaded, and its body may be missing meanwhile.
    async fn wait_for_text(&self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = match self.c().find(Locator::Css("body")).await {
                Ok(body) => body.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the page never showed {needle:?}; it shows: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the browser to be on `path` (after a submitted form's redirects).
    async fn wait_for_path(&self, path: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.c().current_url().await.map(|u| u.path().to_owned());
            if now.as_deref().is_ok_and(|p| p == path) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the browser never reached {path}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn body_text(&self) -> String {
        self.c()
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and any Chromium left by a failed test.
        let _ = Command::new("kill")
            // `--`: procps' kill reads a bare `-PID` as an option and signals nothing.
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

/// The dashboard server under test, with local storage; stopped when dropped.
struct Site {
    base: String,
    stop: CancellationToken,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn site(pool: &PgPool, storage: Option<Storage>, args: AuthArgs) -> Site {
    let (listener, auth) = http::bind("127.0.0.1:0".parse().unwrap(), &args)
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = HttpState::new(Queue::new(pool.clone()), storage, auth);
    let stop = CancellationToken::new();
    tokio::spawn(http::serve(listener, http::router(state), stop.clone()));
    Site { base, stop }
}

/// Runs `prompts` as batch `batch` through the real pipeline and the stand-in (thumbnails
/// included) until every job is finished. Returns the storage it wrote to.
async fn make_batch(
    pool: &PgPool,
    dir: &std::path::Path,
    batch: &str,
    prompts: &[String],
) -> Storage {
    let fake = FakeServer::start(FakeConfig {
        latency: Duration::ZERO,
        api_key: Some(KEY.to_owned()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let storage = Storage::open(&StorageConfig::new(dir.display().to_string()))
        .await
        .unwrap();
    let queue = Queue::new(pool.clone());
    let jobs: Vec<NewJob> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| NewJob {
            prompt: p.clone(),
            batch: Some(batch.to_owned()),
            idempotency_key: Some(format!("{batch}/header-{i:02}")),
            max_attempts: Some(1),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    let client = OrClient::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    let pipeline = Pipeline::new(
        client,
        storage.clone(),
        queue.clone(),
        PipelineConfig::default(),
    );
    let worker = Worker::new(queue.clone(), pipeline, fast_config(8));
    worker.run(CancellationToken::new()).await.unwrap();
    fake.stop().await.ok();
    storage
}

async fn state_of(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM imagegen.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

const SUCCEEDED_IN_GALLERY: usize = 49;

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_batch_gallery_shows_every_image_and_a_failed_job_can_be_retried(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut prompts: Vec<String> = (0..SUCCEEDED_IN_GALLERY)
        .map(|i| format!("Blog header {i}: a lighthouse at dusk, variation {i}"))
        .collect();
    prompts.insert(7, "A header the stand-in refuses [fault:safety]".to_owned());
    let storage = make_batch(&pool, dir.path(), "spring/posts", &prompts).await;
    let s = site(&pool, Some(storage), AuthArgs::default()).await;
    let b = Browser::start().await;

    // The gallery, in file order, every succeeded job with its own loaded thumbnail.
    b.goto(&format!("{}/batches/spring%2Fposts", s.base)).await;
    b.screenshot("batch").await;
    // Scroll through so the lazy tiles load too.
    for _ in 0..12 {
        b.js("window.scrollBy(0, 700)").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_until(
        Duration::from_secs(30),
        "every thumbnail to load",
        || async {
            b.js("return [...document.querySelectorAll('img.thumb')].every(i => i.complete)")
                .await
                == Value::Bool(true)
        },
    )
    .await;
    let thumbs = b
        .js("return [...document.querySelectorAll('.tile img.thumb')].map(i => [i.naturalWidth, i.currentSrc, i.closest('.tile').dataset.id])")
        .await;
    let thumbs = thumbs.as_array().unwrap();
    assert_eq!(
        thumbs.len(),
        SUCCEEDED_IN_GALLERY,
        "one thumbnail per succeeded job"
    );
    let mut srcs = std::collections::HashSet::new();
    let mut tiles = std::collections::HashSet::new();
    for t in thumbs {
        assert!(t[0].as_u64().unwrap() > 0, "thumbnail {t} did not load");
        assert!(
            t[1].as_str().unwrap().contains("/media/"),
            "served through the server: {t}"
        );
        srcs.insert(t[1].as_str().unwrap().to_owned());
        tiles.insert(t[2].as_str().unwrap().to_owned());
    }
    // The `?v=` of each link is the digest of its bytes: distinct links are distinct images.
    assert_eq!(srcs.len(), SUCCEEDED_IN_GALLERY, "distinct images");
    assert_eq!(tiles.len(), SUCCEEDED_IN_GALLERY);
    // The file order: keys ascend.
    let keys = b
        .js("return [...document.querySelectorAll('.tile .key')].map(k => k.textContent)")
        .await;
    let keys: Vec<String> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), prompts.len());
    // Thumbnails, not originals: the 50-job page moves well under 3 MB of images.
    let image_bytes = b
        .js("return performance.getEntriesByType('resource').filter(e => e.name.includes('/media/')).reduce((n, e) => n + e.encodedBodySize, 0)")
        .await
        .as_u64()
        .unwrap();
    println!(
        "batch page of {} jobs: {image_bytes} bytes of images",
        prompts.len()
    );
    assert!(image_bytes > 0);
    assert!(image_bytes < 3_000_000, "{image_bytes} bytes of images");
    // The failed job shows its error.
    let failed = b
        .c()
        .find(Locator::Css(".tile.state-failed .tile-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(failed.contains("safety"), "the error is shown: {failed:?}");
    b.assert_console_clean("gallery after scrolling").await;

    // Retry on the failed job's page puts it back to pending.
    let failed_id: i64 = sqlx::query_scalar("SELECT id FROM imagegen.jobs WHERE state = 'failed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    b.goto(&format!("{}/jobs/{failed_id}", s.base)).await;
    assert!(b.body_text().await.contains("safety"));
    b.screenshot("job-failed").await;
    b.c()
        .find(Locator::XPath("//button[normalize-space()='Retry']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the retry to land", || async {
        state_of(&pool, failed_id).await == "pending"
    })
    .await;
    b.wait_for_text("pending again").await;
    b.assert_console_clean("after retry").await;

    // A succeeded job's page: the image, renditions with URLs, the attempts.
    let ok_id: i64 = sqlx::query_scalar(
        "SELECT id FROM imagegen.jobs WHERE state = 'succeeded' ORDER BY id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    b.goto(&format!("{}/jobs/{ok_id}", s.base)).await;
    wait_until(Duration::from_secs(20), "the full image to load", || async {
        b.js("const i = document.querySelector('.image img.thumb'); return !!i && i.complete && i.naturalWidth > 1000")
            .await
            == Value::Bool(true)
    })
    .await;
    let text = b.body_text().await;
    assert!(
        text.contains("thumb") && text.contains("succeeded"),
        "{text}"
    );
    b.screenshot_full("job").await;

    // The overview and the search show the same batch.
    b.goto(&format!("{}/", s.base)).await;
    let text = b.body_text().await;
    assert!(text.contains("spring/posts"), "{text}");
    b.screenshot_full("overview").await;
    b.goto(&format!(
        "{}/jobs?state=succeeded&batch=spring%2Fposts",
        s.base
    ))
    .await;
    b.screenshot("jobs").await;
    let rows = b
        .js("return document.querySelectorAll('table.jobs tbody tr').length")
        .await;
    assert_eq!(rows.as_u64().unwrap(), 49);

    // A phone-sized window.
    b.c().set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{}/batches/spring%2Fposts", s.base)).await;
    b.screenshot("batch-phone").await;
    let overflow = b
        .js("return document.documentElement.scrollWidth > window.innerWidth + 1")
        .await;
    assert_eq!(
        overflow,
        Value::Bool(false),
        "no sideways scrolling on a phone"
    );
    b.close().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn markup_in_a_prompt_is_shown_as_text_and_runs_nothing(pool: PgPool) {
    let nasty = [
        "<script>window.__xss = 1</script> a header",
        "\"><img src=x onerror=\"window.__xss = 2\"> another",
    ];
    for (i, p) in nasty.iter().enumerate() {
        sqlx::query(
            "INSERT INTO imagegen.jobs (prompt, batch, state, attempts, last_error, metadata, \
                 finished_at, idempotency_key) \
             VALUES ($1, 'x<b>ss', 'failed', 1, $2, $3, now(), $4)",
        )
        .bind(p)
        .bind(format!("provider said: {p}"))
        .bind(json!({"note": p}))
        .bind(format!("k-{i}-<i>"))
        .execute(&pool)
        .await
        .unwrap();
    }
    let s = site(&pool, None, AuthArgs::default()).await;
    let b = Browser::start().await;
    for (name, path) in [
        ("xss-batch", "/batches/x%3Cb%3Ess".to_owned()),
        ("xss-job", "/jobs/2".to_owned()),
        ("xss-jobs", "/jobs?q=%3Cscript%3E".to_owned()),
    ] {
        b.goto(&format!("{}{path}", s.base)).await;
        let text = b.body_text().await;
        if name != "xss-jobs" {
            assert!(
                text.contains("\"><img src=x onerror=\"window.__xss = 2\">"),
                "{name}: {text}"
            );
        }
        if name != "xss-job" {
            assert!(
                text.contains("<script>window.__xss = 1</script>"),
                "{name}: {text}"
            );
        }
        let ran = b.js("return window.__xss === undefined").await;
        assert_eq!(ran, Value::Bool(true), "{name}: injected script ran");
        let injected = b
            .js("return document.querySelectorAll('img[src=\"x\"], script:not([src]), b, i').length")
            .await;
        assert_eq!(
            injected.as_u64(),
            Some(0),
            "{name}: markup from a row became elements"
        );
        b.screenshot(name).await;
    }
    b.close().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn read_only_mode_shows_no_actions_and_refuses_them(pool: PgPool) {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, batch, state, attempts, last_error, finished_at) \
         SELECT 'job ' || g, 'ro', CASE WHEN g % 2 = 0 THEN 'failed' ELSE 'pending' END, 1, \
             CASE WHEN g % 2 = 0 THEN 'boom' END, now() FROM generate_series(1, 6) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let s = site(
        &pool,
        None,
        AuthArgs {
            read_only: true,
            ..AuthArgs::default()
        },
    )
    .await;
    let b = Browser::start().await;
    for path in ["/batches/ro", "/jobs/2", "/jobs/1", "/jobs", "/"] {
        b.goto(&format!("{}{path}", s.base)).await;
        let forms = b
            .js("return document.querySelectorAll('form[method=post] button, form[method=\"post\"] button').length")
            .await;
        assert_eq!(
            forms.as_u64(),
            Some(0),
            "{path}: action buttons in read-only mode"
        );
        assert!(
            b.body_text().await.contains("read-only"),
            "{path} says read-only"
        );
    }
    b.goto(&format!("{}/batches/ro", s.base)).await;
    b.screenshot("read-only").await;
    // A forged form post from the page is refused, and nothing changes.
    let status = b
        .c()
        .execute_async(
            "const done = arguments[0]; fetch('/jobs/2/retry', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'csrf=x'}).then(r => done(r.status))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status.as_u64(), Some(403));
    let http = reqwest::Client::new();
    for path in [
        "/batches/ro/retry-failed",
        "/batches/ro/cancel-pending",
        "/jobs/bulk",
    ] {
        let res = http
            .post(format!("{}{path}", s.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("csrf=x&action=retry&id=2")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 403, "{path}");
    }
    assert_eq!(state_of(&pool, 2).await, "failed");
    assert_eq!(state_of(&pool, 1).await, "pending");
    b.close().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn with_a_token_pages_need_the_session_cookie_and_forms_the_csrf_token(pool: PgPool) {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, batch, state, attempts, last_error, finished_at) \
         VALUES ('locked job', 'locked', 'failed', 1, 'boom', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let s = site(
        &pool,
        None,
        AuthArgs {
            token: Some(SecretString::from(TOKEN)),
            read_token: Some(SecretString::from(READ_TOKEN)),
            ..AuthArgs::default()
        },
    )
    .await;
    // Without the cookie: pages send to sign-in, everything else is refused.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/", "/batches/locked", "/jobs/1", "/jobs"] {
        let res = http.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 303, "{path}");
        let to = res.headers()["location"].to_str().unwrap();
        assert!(to.starts_with("/signin?next="), "{path} -> {to}");
    }
    for path in ["/live/overview", "/media/1/0/thumb"] {
        let res = http.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 401, "{path}");
    }
    let res = http
        .post(format!("{}/jobs/1/retry", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    // A forged cookie is no cookie.
    let res = http
        .get(format!("{}/jobs/1", s.base))
        .header("cookie", "imagegen_session=f.00.00")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 303);

    let b = Browser::start().await;
    b.goto(&format!("{}/jobs/1", s.base)).await;
    assert!(b.c().current_url().await.unwrap().path() == "/signin");
    b.screenshot("signin").await;
    let token = b.c().find(Locator::Css("#token")).await.unwrap();
    token.send_keys("not-the-token-at-all").await.unwrap();
    b.c()
        .find(Locator::XPath("//button[normalize-space()='Sign in']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for_text("not valid").await;
    b.drain_console().await;
    let token = b.c().find(Locator::Css("#token")).await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    b.c()
        .find(Locator::XPath("//button[normalize-space()='Sign in']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // Back where it was asked for, signed in.
    b.wait_for_path("/jobs/1").await;
    b.wait_for_text("locked job").await;
    let cookie_visible = b
        .js("return document.cookie.includes('imagegen_session')")
        .await;
    assert_eq!(
        cookie_visible,
        Value::Bool(false),
        "the session cookie is HttpOnly"
    );
    // A post with the cookie but without the page's CSRF token is refused.
    let status = b
        .c()
        .execute_async(
            "const done = arguments[0]; fetch('/jobs/1/retry', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'csrf=forged'}).then(r => done(r.status))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status.as_u64(), Some(403));
    b.drain_console().await;
    assert_eq!(state_of(&pool, 1).await, "failed");
    // The page's own form works.
    b.c()
        .find(Locator::XPath("//button[normalize-space()='Retry']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the retry to land", || async {
        state_of(&pool, 1).await == "pending"
    })
    .await;
    b.assert_console_clean("signed in").await;
    b.close().await;
}
