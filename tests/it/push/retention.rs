//! Retention of the push tables: events and finished deliveries past the retention period are
//! pruned in chunks; young rows and pending deliveries stay; a stream cannot resume from a
//! pruned event and says so.

use std::time::Duration;

use imagegen::notify::events::EventHub;
use imagegen::notify::retention::{DEFAULT_RETENTION, prune_once};
use imagegen::queue::events::Pruned;
use imagegen::queue::{NewJob, Queue, QueueError};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{claim_and_finish, succeeded};

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn old_events_and_finished_deliveries_are_pruned_and_nothing_else(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let jobs: Vec<NewJob> = (0..12)
        .map(|i| NewJob {
            prompt: format!("p{i}"),
            callback_url: Some(format!("https://hooks.example/{i}")),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    let mut ids = claim_and_finish(&queue, |_| succeeded()).await;
    ids.sort();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM imagegen.events").await,
        12
    );

    // The first 7 events are 8 days old; deliveries: the first 3 delivered 8 days ago, the next
    // 2 failed 8 days ago, the next 2 still pending since then, the rest delivered today.
    sqlx::query(
        "UPDATE imagegen.events SET created_at = now() - interval '8 days' \
         WHERE id IN (SELECT id FROM imagegen.events ORDER BY id LIMIT 7)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let old_event: i64 = count(&pool, "SELECT min(id) FROM imagegen.events").await;
    for (range, state, old) in [
        (0..3, "delivered", true),
        (3..5, "failed", true),
        (5..7, "pending", true),
        (7..12, "delivered", false),
    ] {
        let age = if old { "8 days" } else { "1 minute" };
        sqlx::query(&format!(
            "UPDATE imagegen.deliveries SET state = $1, updated_at = now() - interval '{age}', \
                 created_at = now() - interval '{age}' WHERE job_id = ANY($2)"
        ))
        .bind(state)
        .bind(&ids[range])
        .execute(&pool)
        .await
        .unwrap();
    }

    // Chunks of 2: the loops must go on past the first chunk, and stop at young rows.
    let pruned = queue
        .prune_push(Duration::from_secs(7 * 24 * 3600), 2)
        .await
        .unwrap();
    assert_eq!(
        pruned,
        Pruned {
            events: 7,
            deliveries: 5
        }
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM imagegen.events WHERE created_at < now() - interval '1 day'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM imagegen.events").await,
        5
    );
    let left: Vec<(i64, String)> =
        sqlx::query_as("SELECT job_id, state FROM imagegen.deliveries ORDER BY job_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let want: Vec<(i64, String)> = ids[5..7]
        .iter()
        .map(|j| (*j, "pending".to_owned()))
        .chain(ids[7..].iter().map(|j| (*j, "delivered".to_owned())))
        .collect();
    assert_eq!(left, want, "pending and young deliveries stay");

    // A second round finds nothing; the default retention keeps today's rows.
    assert_eq!(
        prune_once(&queue, DEFAULT_RETENTION).await.unwrap(),
        Pruned::default()
    );

    // Resuming after a pruned event is refused, not silently restarted from now.
    let stop = CancellationToken::new();
    let hub = EventHub::start(queue.clone(), Duration::from_secs(1), stop.clone());
    assert!(matches!(
        hub.subscribe(Some(old_event), None).await,
        Err(QueueError::NotFound(_))
    ));
    stop.cancel();
}
