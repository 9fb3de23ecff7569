//! The event log and its stream: a reconnect with `Last-Event-ID` resumes with nothing lost or
//! repeated, and an event whose transaction commits late is not skipped.

use std::time::Duration;

use imagegen::notify::events::{EventHub, EventStream};
use imagegen::queue::events::Event;
use imagegen::queue::{NewJob, Queue, QueueError};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{claim_and_finish, succeeded};

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
    let mut ids = claim_and_finish(queue, |_| succeeded()).await;
    ids.sort();
    ids
}

async fn next(stream: &mut EventStream) -> Event {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event arrives")
        .unwrap()
}

async fn all_events(pool: &PgPool) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT id, job_id FROM imagegen.events ORDER BY tx, id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_reconnect_resumes_after_the_last_event_seen(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let stop = CancellationToken::new();
    // A long poll: the stream must be woken by the notifications to pass in time.
    let hub = EventHub::start(queue.clone(), Duration::from_secs(600), stop.clone());
    let before = finish_new_jobs(&queue, &["a", "b"]).await;

    let mut stream = hub.subscribe(None, None).await.unwrap();
    let first = finish_new_jobs(&queue, &["a", "b", "a", "b", "a"]).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut stream).await);
    }
    // The client goes away mid-way; more jobs finish meanwhile.
    drop(stream);
    let second = finish_new_jobs(&queue, &["b", "a", "b", "a"]).await;

    let last = seen.last().unwrap().id;
    let mut resumed = hub.subscribe(Some(last), None).await.unwrap();
    for _ in 0..6 {
        seen.push(next(&mut resumed).await);
    }
    // Then the next one is the next job to finish, not a repeat.
    let third = finish_new_jobs(&queue, &["c"]).await;
    seen.push(next(&mut resumed).await);

    let log = all_events(&pool).await;
    let got: Vec<(i64, i64)> = seen.iter().map(|e| (e.id, e.job_id)).collect();
    assert_eq!(
        got,
        log[before.len()..].to_vec(),
        "every event once, in order"
    );
    let mut jobs: Vec<i64> = seen.iter().map(|e| e.job_id).collect();
    jobs.sort();
    let want: Vec<i64> = first.iter().chain(&second).chain(&third).copied().collect();
    assert_eq!(jobs, want);
    assert!(seen.iter().all(|e| e.state == "succeeded"));

    // One batch only, resumed from the start of the second round.
    let mut only_a = hub
        .subscribe(Some(seen[4].id), Some("a".into()))
        .await
        .unwrap();
    let want_a: Vec<i64> = seen[5..]
        .iter()
        .filter(|e| e.batch.as_deref() == Some("a"))
        .map(|e| e.id)
        .collect();
    assert_eq!(want_a.len(), 2);
    for id in want_a {
        assert_eq!(next(&mut only_a).await.id, id);
    }

    // An id that names no event is refused, not silently restarted from now.
    assert!(matches!(
        hub.subscribe(Some(i64::MAX), None).await,
        Err(QueueError::NotFound(_))
    ));
    stop.cancel();
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn an_event_committed_late_is_not_skipped(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let cursor = queue.event_cursor(None).await.unwrap();
    let a = queue
        .enqueue(&NewJob {
            prompt: "a".into(),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    let b = queue
        .enqueue(&NewJob {
            prompt: "b".into(),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    let cancel = "UPDATE imagegen.jobs SET state = 'cancelled' WHERE id = $1";
    // A's transaction takes the lower event id but commits second.
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(cancel)
        .bind(a)
        .execute(&mut *slow)
        .await
        .unwrap();
    let mut quick = pool.begin().await.unwrap();
    sqlx::query(cancel)
        .bind(b)
        .execute(&mut *quick)
        .await
        .unwrap();
    quick.commit().await.unwrap();

    let visible = all_events(&pool).await;
    assert_eq!(visible.len(), 1, "B's event is committed and visible");
    assert!(
        queue
            .events_after(cursor, None, 100)
            .await
            .unwrap()
            .is_empty(),
        "held back while an older transaction runs"
    );
    slow.commit().await.unwrap();

    let events = queue.events_after(cursor, None, 100).await.unwrap();
    let jobs: Vec<i64> = events.iter().map(|e| e.job_id).collect();
    assert_eq!(jobs, vec![a, b]);
    // By id alone a reader that had passed B would have skipped A for good.
    assert!(
        events.iter().find(|e| e.job_id == a).unwrap().id
            < events.iter().find(|e| e.job_id == b).unwrap().id
    );
    let after_both = imagegen::queue::events::EventCursor::after(&events[1]);
    assert!(
        queue
            .events_after(after_both, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
}
