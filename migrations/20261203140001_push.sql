-- Push: tell other applications when a job is finished, in three ways, all written by one row
-- trigger in the transaction that finishes the job (so nothing is announced that a reader cannot
-- see, and nothing finished goes unannounced, whoever finished it: the worker, `imagegen cancel`
-- or an application's plain `UPDATE`):
--   1. `NOTIFY imagegen_job_finished` with a small JSON payload;
--   2. a row in `imagegen.events`, the log the event stream (SSE) reads, resumable by id;
--   3. a row in `imagegen.deliveries`, the webhook outbox, when the job names a `callback_url`.

-- Where to POST the finished job (Standard Webhooks signed). Only http(s), with a host, no spaces,
-- of a sane length; the worker checks the resolved address again before each call.
ALTER TABLE imagegen.jobs ADD COLUMN callback_url text;
ALTER TABLE imagegen.jobs ADD CONSTRAINT jobs_callback_url_valid CHECK (
    callback_url ~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$'
    AND char_length(callback_url) <= 2000);

-- One row per transition of a job into a final state. `id` is the event id the stream sends (and
-- a client's `Last-Event-ID`). Readers order by (`tx`, `id`) and read only rows below
-- `event_horizon()` (see `Queue::events_after`): identity values are handed out before commit,
-- so by id alone a reader could pass an id whose transaction commits later and never see it.
CREATE TABLE imagegen.events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction's 64-bit id (xid8, which never wraps), as bigint.
    tx          bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    job_id      bigint      NOT NULL,
    state       text        NOT NULL,
    batch       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE imagegen.events IS
    'One row per job reaching succeeded, failed or cancelled; the event stream reads it by (tx, id).';

CREATE INDEX events_order_idx ON imagegen.events (tx, id);
CREATE INDEX events_batch_idx ON imagegen.events (batch, tx, id) WHERE batch IS NOT NULL;

-- The first transaction id (64-bit) an event of a transaction still running in this database
-- could have: every event with a smaller `tx` is committed (or rolled back) for good, so
-- readers take only those and never pass one that commits later. Transactions of other
-- databases of the cluster do not count (they cannot write these events), so a long one there
-- does not hold the stream back. A transaction that can write an event has written to this
-- database, so it holds a relation lock here until it ends; `pg_locks` shows those locks and
-- each transaction's own id lock to every role. Call it in a statement *before* the read it
-- bounds: a transaction ending in between is then visible to that read.
CREATE FUNCTION imagegen.event_horizon() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH snap AS (
        SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax
    ), here AS (
        SELECT t.transactionid::text::bigint AS xid32
        FROM pg_locks t
        WHERE t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock' AND t.granted
          AND EXISTS (
              SELECT 1 FROM pg_locks r
              WHERE r.virtualtransaction = t.virtualtransaction AND r.locktype = 'relation'
                AND r.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
    )
    -- Widen each 32-bit id with the epoch of the snapshot's xmax (one epoch back if that
    -- would put it past xmax).
    SELECT least(snap.xmax, min(
        CASE WHEN ((snap.xmax >> 32) << 32) + here.xid32 >= snap.xmax
             THEN ((snap.xmax >> 32) << 32) + here.xid32 - 4294967296
             ELSE ((snap.xmax >> 32) << 32) + here.xid32 END))
    FROM snap LEFT JOIN here ON true
    GROUP BY snap.xmax
$$;

-- The webhook outbox. A delivery is claimed like a job: `next_attempt_at` is pushed past the
-- lease when claimed, so a deliverer that dies mid-call leaves it due again once the lease is
-- over; every later write is fenced by (`lease_owner`, `attempts`).
CREATE TABLE imagegen.deliveries (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The `webhook-id` header: the same on every retry and redelivery of this delivery.
    webhook_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    event_id         bigint      NOT NULL,
    job_id           bigint      NOT NULL,
    url              text        NOT NULL,
    state            text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      uuid,
    -- The exact bytes sent, fixed by the first attempt so retries send the same body.
    body             text,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT deliveries_state_valid CHECK (state IN ('pending', 'delivered', 'failed')),
    CONSTRAINT deliveries_webhook_id_unique UNIQUE (webhook_id)
);

COMMENT ON TABLE imagegen.deliveries IS
    'Webhook outbox: one row per finished job with a callback_url; delivered by the worker.';

CREATE INDEX deliveries_due_idx ON imagegen.deliveries (next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX deliveries_job_idx ON imagegen.deliveries (job_id);
CREATE INDEX deliveries_failed_idx ON imagegen.deliveries (id) WHERE state = 'failed';

-- The longest batch or idempotency key (as JSON text) the NOTIFY payload carries; longer ones
-- are left out and `"truncated": true` says so (a cut key would be a wrong key). Whatever the row
-- holds, the payload stays under ~1.2 kB, far below the 8,000-byte limit whose breach would
-- abort the transaction that finishes the job.
CREATE FUNCTION imagegen.job_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    batch_json text := to_json(NEW.batch)::text;
    key_json text := to_json(NEW.idempotency_key)::text;
    truncated boolean := false;
BEGIN
    INSERT INTO imagegen.events (job_id, state, batch)
        VALUES (NEW.id, NEW.state, NEW.batch)
        RETURNING id INTO event_id;
    IF NEW.callback_url IS NOT NULL THEN
        INSERT INTO imagegen.deliveries (event_id, job_id, url)
            VALUES (event_id, NEW.id, NEW.callback_url);
        -- Wakes idle deliverers; identical payloads collapse into one per transaction.
        PERFORM pg_notify('imagegen_deliveries', '');
    END IF;
    IF octet_length(batch_json) > 512 THEN
        batch_json := 'null';
        truncated := true;
    END IF;
    IF octet_length(key_json) > 512 THEN
        key_json := 'null';
        truncated := true;
    END IF;
    PERFORM pg_notify('imagegen_job_finished',
        '{"id":' || NEW.id || ',"state":"' || NEW.state || '","batch":' || batch_json
        || ',"idempotency_key":' || key_json || ',"event_id":' || event_id
        || CASE WHEN truncated THEN ',"truncated":true' ELSE '' END || '}');
    RETURN NULL;
END;
$$;

-- Row triggers that fire only on a transition into a final state: the WHEN clause is checked
-- without calling the function, so claims, renewals and retries pay nothing.
CREATE TRIGGER jobs_finished_update
    AFTER UPDATE OF state ON imagegen.jobs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION imagegen.job_finished();

CREATE TRIGGER jobs_finished_insert
    AFTER INSERT ON imagegen.jobs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION imagegen.job_finished();
