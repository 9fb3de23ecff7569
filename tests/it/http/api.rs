//! The API's endpoints over a real socket: submission and idempotency, the error answers, one
//! job's shape, listing with every filter and paging over thousands of rows, batches, workers,
//! stats and budgets.

use std::collections::HashSet;
use std::process::Command;

use imagegen::queue::{NewJob, Queue};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{SEEDED_COST, Server, answer, succeed};
use crate::helpers::pool;

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn problem_type(body: &Value) -> &str {
    body["type"].as_str().unwrap_or("")
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn submission_is_idempotent_and_all_or_nothing(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 5).await;
    let s = Server::start(&db).await;

    let one =
        json!({"prompt": "A calm lake", "idempotency_key": "post-1", "metadata": {"slug": "lake"}});
    let (status, first) = s.post("/api/v1/jobs", &one).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["created"], true);
    let id = first["job"]["id"].as_i64().unwrap();
    assert_eq!(first["job"]["aspect_ratio"], "16:9");
    assert_eq!(first["job"]["model"], "google/gemini-2.5-flash-image");
    assert_eq!(first["job"]["state"], "pending");

    // The same job again: nothing created, the existing job answered.
    let (status, again) = s.post("/api/v1/jobs", &one).await;
    assert_eq!(status, 200);
    assert_eq!(again["created"], false);
    assert_eq!(again["job"]["id"], id);
    // Spelling out a default is the same job.
    let explicit = json!({"prompt": "A calm lake", "idempotency_key": "post-1",
        "metadata": {"slug": "lake"}, "aspect_ratio": "16:9", "max_attempts": 3});
    assert_eq!(s.post("/api/v1/jobs", &explicit).await.0, 200);

    // The key with another job: 409, nothing changed.
    let (status, conflict) = s
        .post(
            "/api/v1/jobs",
            &json!({"prompt": "Another lake", "idempotency_key": "post-1"}),
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(
        problem_type(&conflict),
        "urn:imagegen:problem:idempotency-key-reused"
    );
    assert_eq!(count(&db).await, 1);

    // An array: the existing job and two new ones (one repeated inside the array).
    let many = json!([
        one,
        {"prompt": "new one", "idempotency_key": "post-2", "batch": "site/a"},
        {"prompt": "new one", "idempotency_key": "post-2", "batch": "site/a"},
        {"prompt": "no key", "priority": 5},
    ]);
    let (status, answer_many) = s.post("/api/v1/jobs", &many).await;
    assert_eq!(status, 201, "{answer_many}");
    let items = answer_many["jobs"].as_array().unwrap();
    let created: Vec<bool> = items
        .iter()
        .map(|i| i["created"].as_bool().unwrap())
        .collect();
    assert_eq!(created, [false, true, false, true]);
    assert_eq!(items[0]["job"]["id"], id);
    assert_eq!(items[1]["job"]["id"], items[2]["job"]["id"]);
    assert_eq!(count(&db).await, 3);

    // Only existing jobs: 200.
    let (status, _) = s.post("/api/v1/jobs", &json!([one])).await;
    assert_eq!(status, 200);

    // A refused item rolls the whole array back, and the answer names the constraint.
    let bad = json!([
        {"prompt": "fine 1"},
        {"prompt": "fine 2"},
        {"prompt": "bad ratio", "aspect_ratio": "1.91:1"},
    ]);
    let (status, refused) = s.post("/api/v1/jobs", &bad).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        problem_type(&refused),
        "urn:imagegen:problem:constraint-violation"
    );
    assert_eq!(refused["constraint"], "jobs_aspect_ratio_valid");
    assert_eq!(refused["index"], 2);
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("jobs_aspect_ratio_valid")
    );
    assert_eq!(
        count(&db).await,
        3,
        "nothing of a refused submission is applied"
    );

    for (body, constraint) in [
        (json!({"prompt": "   "}), "jobs_prompt_not_blank"),
        (
            json!({"prompt": "x", "max_attempts": 0}),
            "jobs_max_attempts_range",
        ),
        (
            json!({"prompt": "x", "priority": 5000}),
            "jobs_priority_range",
        ),
        (
            json!({"prompt": "x", "model": "no slash"}),
            "jobs_model_format",
        ),
        (
            json!({"prompt": "x", "image_size": "8K"}),
            "jobs_image_size_valid",
        ),
    ] {
        let (status, p) = s.post("/api/v1/jobs", &body).await;
        assert_eq!(status, 422, "{body}: {p}");
        assert_eq!(p["constraint"], constraint, "{body}");
    }
    // A NUL byte is refused by the database as a value, not a server error.
    let (status, p) = s
        .post("/api/v1/jobs", &json!({"prompt": "nul \u{0} here"}))
        .await;
    assert_eq!(status, 422, "{p}");

    // Shape errors: unknown field, wrong type, missing prompt.
    for body in [
        json!({"prompt": "x", "colour": "red"}),
        json!({"prompt": 5}),
        json!({"aspect_ratio": "1:1"}),
        json!([]),
    ] {
        let (status, p) = s.post("/api/v1/jobs", &body).await;
        assert_eq!(status, 422, "{body}: {p}");
        assert_eq!(
            problem_type(&p),
            "urn:imagegen:problem:invalid-body",
            "{body}"
        );
    }
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"prompt": format!("p{i}")}))
        .collect();
    let (status, p) = s.post("/api/v1/jobs", &Value::Array(too_many)).await;
    assert_eq!(status, 422);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:too-many-jobs");
    assert_eq!(count(&db).await, 3);
    s.stop().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn malformed_oversized_and_unknown_requests_get_problems(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let s = Server::start(&db).await;
    let post_raw = |body: Vec<u8>, ctype: &'static str| {
        s.client
            .post(s.url("/api/v1/jobs"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let (status, p) = answer(
        post_raw(b"{\"prompt\": ".to_vec(), "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:malformed-json");

    let (status, p) = answer(post_raw(b"prompt=x".to_vec(), "text/plain").await.unwrap()).await;
    assert_eq!(status, 415);
    assert_eq!(
        problem_type(&p),
        "urn:imagegen:problem:unsupported-media-type"
    );

    // Just over 1 MiB of valid JSON.
    let big = serde_json::to_vec(&json!({"prompt": "x".repeat(1024 * 1024)})).unwrap();
    let (status, p) = answer(post_raw(big, "application/json").await.unwrap()).await;
    assert_eq!(status, 413);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:body-too-large");
    assert_eq!(count(&db).await, 0);

    let (status, p) = s.get("/api/v1/jobs/424242").await;
    assert_eq!(status, 404);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:not-found");
    let (status, _) = s.get("/api/v1/jobs/not-a-number").await;
    assert_eq!(status, 400);
    let (status, _) = s.post("/api/v1/jobs/424242/retry", &json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = s.get("/api/v1/nothing-here").await;
    assert_eq!(status, 404);
    let res = s.client.delete(s.url("/api/v1/jobs")).send().await.unwrap();
    let (status, p) = answer(res).await;
    assert_eq!(status, 405);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:method-not-allowed");
    let (status, _) = s.get(&format!("/api/v1/jobs?q={}", "a".repeat(9000))).await;
    assert_eq!(status, 414);
    for bad in [
        "limit=0",
        "limit=501",
        "limit=ten",
        "state=done",
        "metadata=%7Bnope",
        "order=sideways",
        "order=batch",
        "created_after=yesterday",
        "cursor=garbage",
    ] {
        let (status, p) = s.get(&format!("/api/v1/jobs?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {p}");
        assert_eq!(
            problem_type(&p),
            "urn:imagegen:problem:invalid-parameter",
            "{bad}"
        );
    }
    s.stop().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_job_has_one_shape_in_the_api_the_list_and_the_cli(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let queue = Queue::new(db.clone());
    let s = Server::start(&db).await;
    let (_, posted) = s
        .post(
            "/api/v1/jobs",
            &json!({"prompt": "shape", "batch": "b", "metadata": {"n": 1}}),
        )
        .await;
    let id = posted["job"]["id"].as_i64().unwrap();
    assert_eq!(succeed(&queue, 10).await, vec![id]);

    let (status, job) = s.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts_used"], 1);
    // Money is a decimal string, exactly as billed.
    assert_eq!(job["cost_usd"], SEEDED_COST);
    assert_eq!(job["attempts"][0]["cost_usd"], SEEDED_COST);
    assert_eq!(job["attempts"][0]["outcome"], "succeeded");
    assert_eq!(job["attempts"][0]["generation_id"], format!("gen-{id}"));
    assert_eq!(job["images"][0]["width"], 1344);
    assert_eq!(job["images"][0]["url"], job["image_urls"][0]);

    let (_, list) = s.get("/api/v1/jobs?batch=b").await;
    assert_eq!(list["jobs"][0], job, "list items are the same shape");

    let url = format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["show", &id.to_string(), "--json"])
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, job, "imagegen show --json prints the API's shape");

    // Retry and cancel answer the changed job; a wrong state is a 409.
    let (status, p) = s
        .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(problem_type(&p), "urn:imagegen:problem:wrong-state");
    let (_, fresh) = s
        .post("/api/v1/jobs", &json!({"prompt": "to cancel"}))
        .await;
    let fresh_id = fresh["job"]["id"].as_i64().unwrap();
    let (status, cancelled) = s
        .post(&format!("/api/v1/jobs/{fresh_id}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, cancelled["state"].as_str()),
        (200, Some("cancelled"))
    );
    let (status, retried) = s
        .post(&format!("/api/v1/jobs/{fresh_id}/retry"), &json!({}))
        .await;
    assert_eq!((status, retried["state"].as_str()), (200, Some("pending")));
    s.stop().await;
}

/// Every id of a listing, page by page, checking each page's order and size.
async fn walk(s: &Server, query: &str, limit: usize, newest_first: bool) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/jobs?limit={limit}&{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{path}: {page}");
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= limit);
        ids.extend(jobs.iter().map(|j| j["id"].as_i64().unwrap()));
        match page["next"].as_str() {
            Some(c) => {
                assert_eq!(jobs.len(), limit, "only the last page may be short");
                cursor = Some(c.to_owned());
            }
            None => break,
        }
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    if newest_first {
        sorted.reverse();
    }
    assert_eq!(ids, sorted, "{query}: pages in order");
    ids
}

async fn ids_where(db: &PgPool, condition: &str) -> HashSet<i64> {
    sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM imagegen.jobs WHERE {condition}"))
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn once(ids: &[i64]) -> HashSet<i64> {
    let set: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "a job was repeated");
    set
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn filters_and_pages_cover_thousands_of_jobs_exactly_once(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let queue = Queue::new(db.clone());
    let batches = ["site/a", "site/b", "other"];
    let jobs: Vec<NewJob> = (0..3000)
        .map(|i| NewJob {
            prompt: if i % 10 == 0 {
                format!("Header {i}: 50% OFF Postgres sale")
            } else {
                format!("header {i} about lakes")
            },
            batch: Some(batches[i % 3].to_owned()),
            model: Some(
                if i % 4 == 0 {
                    "google/gemini-3-pro-image-preview"
                } else {
                    "google/gemini-2.5-flash-image"
                }
                .to_owned(),
            ),
            metadata: Some(json!({"slug": format!("post-{}", i % 7), "n": i})),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    sqlx::query("UPDATE imagegen.jobs SET state = 'failed' WHERE id % 5 = 0")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE imagegen.jobs SET state = 'cancelled' WHERE id % 5 = 1")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE imagegen.jobs SET created_at = '2026-01-01T00:00:00Z'::timestamptz + id * interval '1 minute'",
    )
    .execute(&db)
    .await
    .unwrap();
    let s = Server::start(&db).await;

    let all = walk(&s, "", 500, true).await;
    assert_eq!(once(&all), ids_where(&db, "true").await);
    assert_eq!(all.len(), 3000);

    let cases: &[(&str, &str)] = &[
        ("state=failed", "state = 'failed'"),
        ("state=failed,cancelled", "state IN ('failed', 'cancelled')"),
        ("batch=site%2Fa", "batch = 'site/a'"),
        (
            "model=google%2Fgemini-3-pro-image-preview",
            "model = 'google/gemini-3-pro-image-preview'",
        ),
        ("q=50%25%20off", "prompt ILIKE '%50\\% off%'"),
        ("q=LAKES", "prompt ILIKE '%lakes%'"),
        (
            "metadata=%7B%22slug%22%3A%22post-3%22%7D",
            "metadata @> '{\"slug\":\"post-3\"}'",
        ),
        (
            "created_after=2026-01-01T10:00:00Z&created_before=2026-01-02T10:00:00Z",
            "created_at > '2026-01-01T10:00:00Z' AND created_at < '2026-01-02T10:00:00Z'",
        ),
        (
            "batch=site%2Fb&state=pending&q=header",
            "batch = 'site/b' AND state = 'pending' AND prompt ILIKE '%header%'",
        ),
    ];
    for (query, condition) in cases {
        let want = ids_where(&db, condition).await;
        assert!(!want.is_empty(), "{query} matches nothing: a useless case");
        let got = walk(&s, query, 137, true).await;
        assert_eq!(once(&got), want, "{query}");
    }

    // File order within a batch: ascending ids, every job once.
    let got = walk(&s, "batch=other&order=batch", 99, false).await;
    assert_eq!(once(&got), ids_where(&db, "batch = 'other'").await);

    // Jobs added while a client pages (newest first) come before its first page: none of the
    // later pages repeats or skips a job that existed when it started.
    let (_, first) = s.get("/api/v1/jobs?limit=250&batch=site%2Fa").await;
    let mut seen: Vec<i64> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    let before = ids_where(&db, "batch = 'site/a'").await;
    queue
        .enqueue_many(
            &(0..50)
                .map(|i| NewJob {
                    prompt: format!("late {i}"),
                    batch: Some("site/a".into()),
                    ..NewJob::default()
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let mut cursor = first["next"].as_str().map(str::to_owned);
    while let Some(c) = cursor {
        let (_, page) = s
            .get(&format!("/api/v1/jobs?limit=250&batch=site%2Fa&cursor={c}"))
            .await;
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_i64().unwrap()),
        );
        cursor = page["next"].as_str().map(str::to_owned);
    }
    assert_eq!(once(&seen), before);

    // A cursor only continues the listing it came from.
    let (_, page) = s.get("/api/v1/jobs?limit=10&state=failed").await;
    let c = page["next"].as_str().unwrap();
    let (status, p) = s
        .get(&format!("/api/v1/jobs?limit=10&state=cancelled&cursor={c}"))
        .await;
    assert_eq!(status, 400, "{p}");
    s.stop().await;
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn batches_workers_stats_and_budgets(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 5).await;
    let queue = Queue::new(db.clone());
    let s = Server::start(&db).await;
    let jobs: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("p{i}"), "batch": "blog/2026 headers"}))
        .collect();
    assert_eq!(s.post("/api/v1/jobs", &Value::Array(jobs)).await.0, 201);
    assert_eq!(
        s.post("/api/v1/jobs", &json!({"prompt": "loose"})).await.0,
        201
    );
    succeed(&queue, 2).await;
    sqlx::query("UPDATE imagegen.jobs SET state = 'failed' WHERE id IN (3, 4)")
        .execute(&db)
        .await
        .unwrap();

    let path = "/api/v1/batches/blog%2F2026%20headers";
    let (status, b) = s.get(path).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["batch"], "blog/2026 headers");
    assert_eq!(b["jobs"], 6);
    assert_eq!(
        b["counts"],
        json!({"pending": 2, "running": 0, "succeeded": 2, "failed": 2, "cancelled": 0})
    );
    assert_eq!(b["cost_usd"], "0.0774072");
    assert_eq!(b["finished_recently"], 2);
    assert!(b["eta_seconds"].as_i64().unwrap() > 0);
    assert!(b["budget_usd"].is_null());

    let (_, list) = s.get("/api/v1/batches").await;
    assert_eq!(list["batches"].as_array().unwrap().len(), 1);
    assert_eq!(list["batches"][0], b);
    assert_eq!(s.get("/api/v1/batches/nope").await.0, 404);

    let (status, b) = s
        .put(&format!("{path}/budget"), &json!({"budget_usd": "1.50"}))
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["budget_usd"], "1.50");
    assert_eq!(b["budget_remaining_usd"], "1.4225928");
    let (status, p) = s
        .put(&format!("{path}/budget"), &json!({"budget_usd": "-1"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(p["constraint"], "batch_budgets_budget_not_negative");
    let (status, p) = s
        .put(&format!("{path}/budget"), &json!({"budget_usd": "lots"}))
        .await;
    assert_eq!(status, 422, "{p}");

    let (status, r) = s.post(&format!("{path}/retry-failed"), &json!({})).await;
    assert_eq!((status, r["jobs"].as_u64()), (200, Some(2)));
    let (status, r) = s.post(&format!("{path}/cancel-pending"), &json!({})).await;
    assert_eq!((status, r["jobs"].as_u64()), (200, Some(4)));
    let (_, b) = s.get(path).await;
    assert_eq!(b["counts"]["cancelled"], 4);
    assert!(b["eta_seconds"].is_null(), "nothing left to do");

    let worker = uuid::Uuid::new_v4();
    queue.register_worker(worker, "host-a", 4242).await.unwrap();
    queue
        .worker_heartbeat(
            worker,
            Some(chrono::Utc::now()),
            Some("daily budget reached"),
        )
        .await
        .unwrap();
    let (_, w) = s.get("/api/v1/workers").await;
    assert_eq!(w["workers"][0]["id"], worker.to_string());
    assert_eq!(w["workers"][0]["paused"], true);
    assert_eq!(w["workers"][0]["pause_reason"], "daily budget reached");
    assert_eq!(w["workers"][0]["in_flight"], 0);

    let (status, st) = s.get("/api/v1/stats").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["jobs"], 7);
    assert_eq!(st["counts"]["pending"], 1);
    assert_eq!(st["spend_today_usd"], "0.0774072");
    assert_eq!(st["last_hour"]["succeeded"], 2);
    assert_eq!(
        st["spend_today_by_model"][0]["model"],
        "google/gemini-2.5-flash-image"
    );
    assert!(st["daily_budget_usd"].is_null());

    // The daily budget lives in the database: set it here, every worker reads it.
    let (status, set) = s
        .put("/api/v1/budget/daily", &json!({"budget_usd": "2"}))
        .await;
    assert_eq!((status, &set["daily_budget_usd"]), (200, &json!("2")));
    assert_eq!(
        queue.settings().await.unwrap().daily_budget_usd,
        Some("2".parse().unwrap())
    );
    let (_, st) = s.get("/api/v1/stats").await;
    assert_eq!(st["daily_budget_remaining_usd"], "1.9225928");
    let (status, p) = s
        .put("/api/v1/budget/daily", &json!({"budget_usd": "-3"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(p["constraint"], "settings_daily_budget_not_negative");
    assert_eq!(
        s.put("/api/v1/budget/daily", &json!({"budget_usd": null}))
            .await
            .0,
        200
    );
    assert_eq!(queue.settings().await.unwrap().daily_budget_usd, None);

    let (status, h) = s.get("/healthz").await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
    let (status, r) = s.get("/readyz").await;
    assert_eq!((status, r["status"].as_str()), (200, Some("ready")));
    // A database behind the binary's schema is not ready, and says what to do.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&db)
    .await
    .unwrap();
    let (status, r) = s.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(
        r["detail"].as_str().unwrap().contains("imagegen migrate"),
        "{r}"
    );
    s.stop().await;
}
