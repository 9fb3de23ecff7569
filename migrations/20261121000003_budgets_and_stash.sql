-- Spending limits per batch, and the place where paid-for images wait when storage or the final
-- write failed, so a later attempt finishes from them instead of paying the model again.

-- A budget for a batch: the worker never starts a call that could take the batch's spend (billed
-- plus in-flight at the expected price) past `budget_usd`. Set it with plain SQL or
-- `imagegen budget set`.
CREATE TABLE imagegen.batch_budgets (
    batch       text        PRIMARY KEY,
    budget_usd  numeric     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT batch_budgets_budget_not_negative CHECK (budget_usd >= 0)
);

-- Decoded images of a paid generation whose upload (or final write) failed. A later attempt of
-- the same job uploads these rather than calling the model again; they are deleted once stored.
CREATE TABLE imagegen.paid_images (
    job_id         bigint      NOT NULL REFERENCES imagegen.jobs (id) ON DELETE CASCADE,
    idx            integer     NOT NULL,
    data           bytea       NOT NULL,
    generation_id  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx)
);

-- Today's spend for the daily budget reads attempts by time.
CREATE INDEX attempts_finished_idx ON imagegen.attempts (finished_at);

-- What a running attempt's call is expected to cost, set when a budget let the call start and
-- cleared when the attempt ends: the in-flight part of every budget check.
ALTER TABLE imagegen.jobs ADD COLUMN reserved_usd numeric;
