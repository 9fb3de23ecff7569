//! The `imagegen_job_finished` NOTIFY: exactly one per transition into a final state, whoever
//! made it, with a payload that stays small whatever the row holds.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use imagegen::queue::{ClaimFilter, Finish, NewJob, Queue};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use super::{claim_and_finish, succeeded};

const CHANNEL: &str = "imagegen_job_finished";
const END: &str = "end of test";

/// Receives every finished-job notification until the marker, sent last (one session's
/// notifications arrive in commit order, so nothing committed before it can come after it).
async fn collect(pool: &PgPool, listener: &mut PgListener) -> Vec<serde_json::Value> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(END)
        .execute(pool)
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), listener.recv())
            .await
            .expect("notifications arrive")
            .unwrap();
        if n.payload() == END {
            return got;
        }
        assert!(n.payload().len() < 8000);
        got.push(serde_json::from_str(n.payload()).expect("payload is JSON"));
    }
}

fn job(prompt: &str, key: &str) -> NewJob {
    NewJob {
        prompt: prompt.into(),
        batch: Some("site/headers".into()),
        idempotency_key: Some(key.into()),
        ..NewJob::default()
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn one_notification_per_finished_job_whoever_finished_it(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();

    // A job whose worker dies on its last attempt: failed by the rescue.
    let doomed = queue
        .enqueue(&NewJob {
            max_attempts: Some(1),
            ..job("doomed", "k-doomed")
        })
        .await
        .unwrap()
        .id;
    queue
        .claim(
            Uuid::new_v4(),
            10,
            Duration::from_millis(1),
            &ClaimFilter::default(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let the 1 ms lease run out
    assert_eq!(queue.rescue_expired(10).await.unwrap(), 1);

    let ok = queue.enqueue(&job("ok", "k-ok")).await.unwrap().id;
    let bad = queue.enqueue(&job("bad", "k-bad")).await.unwrap().id;
    let flaky = queue.enqueue(&job("flaky", "k-flaky")).await.unwrap().id;
    // Not due yet, so no claim takes it: an application cancels it with plain SQL.
    let later = queue
        .enqueue(&NewJob {
            run_at: Some(Utc::now() + chrono::Duration::hours(1)),
            ..job("later", "k-later")
        })
        .await
        .unwrap()
        .id;
    let claimed = claim_and_finish(&queue, |id| {
        if id == bad {
            Finish::Failed { error: "no".into() }
        } else if id == flaky {
            Finish::Retry {
                error: "503".into(),
                delay: Duration::ZERO,
                refund: false,
            }
        } else {
            succeeded()
        }
    })
    .await;
    assert_eq!(claimed.len(), 3);
    sqlx::query("UPDATE imagegen.jobs SET state = 'cancelled', finished_at = now() WHERE id = $1")
        .bind(later)
        .execute(&pool)
        .await
        .unwrap();
    // The retried job finishes on its second attempt; the failed one is retried by hand and
    // finishes again: each a new event.
    assert_eq!(claim_and_finish(&queue, |_| succeeded()).await, vec![flaky]);
    queue.retry(bad).await.unwrap();
    assert_eq!(claim_and_finish(&queue, |_| succeeded()).await, vec![bad]);
    // Changes that are not transitions into a final state announce nothing.
    sqlx::query("UPDATE imagegen.jobs SET metadata = '{\"seen\": true}' WHERE id = $1")
        .bind(ok)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE imagegen.jobs SET state = state WHERE id = $1")
        .bind(ok)
        .execute(&pool)
        .await
        .unwrap();

    let got = collect(&pool, &mut listener).await;
    let announced: Vec<(i64, String)> = got
        .iter()
        .map(|p| {
            (
                p["id"].as_i64().unwrap(),
                p["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(i64, String)> = [
        (doomed, "failed"),
        (ok, "succeeded"),
        (bad, "failed"),
        (later, "cancelled"),
        (flaky, "succeeded"),
        (bad, "succeeded"),
    ]
    .into_iter()
    .map(|(id, s)| (id, s.to_owned()))
    .collect();
    // One completion statement finishes several jobs: order within it is not promised.
    let sorted = |v: &[(i64, String)]| v.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(announced.len(), want.len(), "{got:?}");
    assert_eq!(sorted(&announced), sorted(&want), "{got:?}");

    // Each payload names its job's batch and key, and an event of the log, one each.
    let keys: std::collections::HashMap<i64, &str> = [
        (doomed, "k-doomed"),
        (ok, "k-ok"),
        (bad, "k-bad"),
        (flaky, "k-flaky"),
        (later, "k-later"),
    ]
    .into_iter()
    .collect();
    for p in &got {
        let id = p["id"].as_i64().unwrap();
        assert_eq!(p["batch"], "site/headers");
        assert_eq!(p["idempotency_key"], keys[&id]);
        assert!(p.get("truncated").is_none());
    }
    let events: BTreeSet<(i64, i64, String)> =
        sqlx::query_as("SELECT id, job_id, state FROM imagegen.events")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let from_payloads: BTreeSet<(i64, i64, String)> = got
        .iter()
        .map(|p| {
            (
                p["event_id"].as_i64().unwrap(),
                p["id"].as_i64().unwrap(),
                p["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(from_payloads, events);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_payload_stays_small_whatever_the_row_holds(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    // 100 kB of key, and a batch of 200 control characters (1,200 bytes once JSON-escaped).
    let huge = queue
        .enqueue(&NewJob {
            prompt: "huge".into(),
            batch: Some("\u{1}".repeat(200)),
            idempotency_key: Some("k".repeat(100_000)),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    let long = queue
        .enqueue(&NewJob {
            prompt: "long".into(),
            batch: Some("b".repeat(200)),
            idempotency_key: Some("x".repeat(500)),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    // An application cancels both in one statement; the NOTIFY must not abort it.
    let cancelled =
        sqlx::query("UPDATE imagegen.jobs SET state = 'cancelled' WHERE state = 'pending'")
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
    assert_eq!(cancelled, 2);

    let got = collect(&pool, &mut listener).await;
    assert_eq!(got.len(), 2);
    for p in got {
        let text = p.to_string();
        assert!(text.len() < 1500, "{} bytes", text.len());
        if p["id"] == huge {
            assert_eq!(p["idempotency_key"], serde_json::Value::Null);
            assert_eq!(p["batch"], serde_json::Value::Null);
            assert_eq!(p["truncated"], true);
        } else {
            assert_eq!(p["id"], long);
            // Long but within bounds: kept whole, never cut into a wrong key.
            assert_eq!(p["idempotency_key"], "x".repeat(500));
            assert_eq!(p["batch"], "b".repeat(200));
            assert!(p.get("truncated").is_none());
        }
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_job_without_batch_or_key_is_announced_with_json_nulls(pool: PgPool) {
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    // As apps insert them by hand: no batch, no key; then one with a batch and no key.
    let bare: i64 =
        sqlx::query_scalar("INSERT INTO imagegen.jobs (prompt) VALUES ('a bare job') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    let batched: i64 = sqlx::query_scalar(
        "INSERT INTO imagegen.jobs (prompt, batch) VALUES ('a batched job', 'b') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE imagegen.jobs SET state = 'cancelled', finished_at = now()")
        .execute(&pool)
        .await
        .unwrap();

    let mut got = collect(&pool, &mut listener).await;
    got.sort_by_key(|p| p["id"].as_i64());
    assert_eq!(got.len(), 2, "{got:?}");
    let event_of = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM imagegen.events WHERE job_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        got[0],
        serde_json::json!({"id": bare, "state": "cancelled", "batch": null,
            "idempotency_key": null, "event_id": event_of(bare).await})
    );
    assert_eq!(
        got[1],
        serde_json::json!({"id": batched, "state": "cancelled", "batch": "b",
            "idempotency_key": null, "event_id": event_of(batched).await})
    );
}
