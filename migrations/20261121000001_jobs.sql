-- The jobs table other applications write to with plain SQL, the per-attempt log, and the
-- notification that wakes idle workers. Every rule a row must obey is a named constraint, so a bad
-- INSERT fails at once with a name that says why.

CREATE SCHEMA IF NOT EXISTS imagegen;

CREATE TABLE imagegen.jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,

    -- What the application asks for.
    prompt            text        NOT NULL,
    aspect_ratio      text        NOT NULL DEFAULT '16:9',
    model             text        NOT NULL DEFAULT 'google/gemini-2.5-flash-image',
    image_size        text,
    batch             text,
    priority          integer     NOT NULL DEFAULT 0,
    run_at            timestamptz NOT NULL DEFAULT now(),
    idempotency_key   text,
    max_attempts      integer     NOT NULL DEFAULT 3,
    metadata          jsonb,

    -- What the worker reports.
    state             text        NOT NULL DEFAULT 'pending',
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text,
    image_urls        text[]      NOT NULL DEFAULT '{}',
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_usd          numeric     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),

    -- The lease: which worker process holds the job and until when. Together with `attempts` it
    -- is the fencing token every finishing write checks.
    lease_owner       uuid,
    lease_expires_at  timestamptz,

    CONSTRAINT jobs_prompt_not_blank CHECK (prompt ~ '[^[:space:]]'),
    CONSTRAINT jobs_prompt_max_length CHECK (char_length(prompt) <= 8000),
    CONSTRAINT jobs_aspect_ratio_valid CHECK (aspect_ratio IN
        ('1:1', '2:3', '3:2', '3:4', '4:3', '4:5', '5:4', '9:16', '16:9', '21:9')),
    CONSTRAINT jobs_model_format CHECK (model ~ '^[A-Za-z0-9._-]+/[A-Za-z0-9._:-]+$'
        AND char_length(model) <= 200),
    CONSTRAINT jobs_image_size_valid CHECK (image_size IN ('1K', '2K', '4K')),
    CONSTRAINT jobs_batch_valid CHECK (batch ~ '[^[:space:]]' AND char_length(batch) <= 200),
    CONSTRAINT jobs_idempotency_key_not_blank CHECK (idempotency_key ~ '[^[:space:]]'),
    CONSTRAINT jobs_idempotency_key_unique UNIQUE (idempotency_key),
    CONSTRAINT jobs_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 25),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT jobs_state_valid CHECK (state IN
        ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT jobs_attempts_range CHECK (attempts >= 0),
    -- A running job always has a lease and nothing else does.
    CONSTRAINT jobs_lease_matches_state CHECK ((state = 'running') = (lease_owner IS NOT NULL
        AND lease_expires_at IS NOT NULL))
);

COMMENT ON TABLE imagegen.jobs IS
    'One image job. Insert a prompt; read state, image_urls, tokens and cost_usd.';

-- The claim path: only runnable rows are indexed, so claims stay flat however much history grows.
CREATE INDEX jobs_pending_idx ON imagegen.jobs (priority DESC, run_at, id)
    WHERE state = 'pending';
-- Finding expired leases looks only at running rows.
CREATE INDEX jobs_running_lease_idx ON imagegen.jobs (lease_expires_at)
    WHERE state = 'running';
CREATE INDEX jobs_batch_idx ON imagegen.jobs (batch) WHERE batch IS NOT NULL;

-- One row per attempt: when it ran, how it ended, and what it cost (failed attempts are billed too).
CREATE TABLE imagegen.attempts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id            bigint      NOT NULL REFERENCES imagegen.jobs (id) ON DELETE CASCADE,
    attempt           integer     NOT NULL,
    worker_id         uuid        NOT NULL,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL DEFAULT now(),
    outcome           text        NOT NULL,
    error             text,
    http_status       integer,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    image_tokens      bigint      NOT NULL DEFAULT 0,
    cost_usd          numeric     NOT NULL DEFAULT 0,
    generation_id     text,
    duration_ms       bigint,
    CONSTRAINT attempts_outcome_valid CHECK (outcome IN
        ('succeeded', 'retry', 'failed', 'halted', 'released', 'lease_expired'))
);

CREATE INDEX attempts_job_idx ON imagegen.attempts (job_id, attempt);

-- Worker processes announce themselves so `imagegen status` can say who is running and who has
-- paused claiming, and why.
CREATE TABLE imagegen.workers (
    id            uuid        PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    paused_until  timestamptz,
    pause_reason  text,
    stopped_at    timestamptz
);

-- Wake idle workers on any INSERT. Statement-level: one notification per INSERT statement however
-- many rows it carries, so bulk inserts do not serialise on NOTIFY. The payload is empty: a woken
-- worker simply claims again.
CREATE FUNCTION imagegen.notify_new_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('imagegen_jobs', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_insert
    AFTER INSERT ON imagegen.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION imagegen.notify_new_jobs();
