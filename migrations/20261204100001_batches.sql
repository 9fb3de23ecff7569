-- A batch is a thing: `imagegen.batches` holds what belongs to one (when and from what file it
-- was submitted, its templates, its defaults, its budget, its default callback URL). Jobs still
-- name their batch in `jobs.batch` and need no row here: a plain INSERT with a new batch name
-- keeps working, and `imagegen batch list` shows batches of either kind.

CREATE TABLE imagegen.batches (
    name               text        PRIMARY KEY,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- The file the last `imagegen batch submit` read (`-` for standard input).
    source             text,
    -- The prompt template and the key template of that submission (NULL: the `prompt` column,
    -- a hash key).
    template           text,
    key_template       text,
    -- The options every row got unless it overrode them: {"aspect_ratio": "16:9",
    -- "renditions": ["og", "thumb"], ...}.
    defaults           jsonb       NOT NULL DEFAULT '{}',
    -- The file's columns in file order (the report's `row.*` columns); later submissions add
    -- new ones at the end.
    columns            text[]      NOT NULL DEFAULT '{}',
    -- NULL: no budget. The worker never starts a call that could take the batch's spend (billed
    -- plus in flight) past it.
    budget_usd         numeric,
    budget_updated_at  timestamptz,
    -- Jobs inserted into this batch without a callback_url of their own get this one.
    callback_url       text,
    CONSTRAINT batches_name_valid CHECK (name ~ '[^[:space:]]' AND char_length(name) <= 200),
    -- The name of the constraint of the table this replaces: apps and messages keep seeing it.
    CONSTRAINT batch_budgets_budget_not_negative CHECK (budget_usd >= 0),
    CONSTRAINT batches_defaults_object CHECK (jsonb_typeof(defaults) = 'object'),
    CONSTRAINT batches_callback_url_valid CHECK (
        callback_url ~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$'
        AND char_length(callback_url) <= 2000)
);

COMMENT ON TABLE imagegen.batches IS
    'One batch: its source, templates, defaults, budget and default callback URL. Jobs name it in jobs.batch.';

INSERT INTO imagegen.batches (name, created_at, updated_at, budget_usd, budget_updated_at)
    SELECT batch, updated_at, updated_at, budget_usd, updated_at FROM imagegen.batch_budgets;

DROP TABLE imagegen.batch_budgets;

-- The old table, as a view: apps that read or set budgets with SQL keep working. It is a simple
-- view, so Postgres updates it by itself: INSERT (also `ON CONFLICT (batch) DO UPDATE`, which an
-- INSTEAD OF INSERT trigger would make impossible), and UPDATE. DELETE must not delete the
-- batch, only its budget: an INSTEAD OF trigger does that.
CREATE VIEW imagegen.batch_budgets AS
    SELECT name AS batch, budget_usd, budget_updated_at AS updated_at
    FROM imagegen.batches WHERE budget_usd IS NOT NULL;

COMMENT ON VIEW imagegen.batch_budgets IS
    'Batches that have a budget (imagegen.batches.budget_usd); INSERT, UPDATE and DELETE set it.';

ALTER VIEW imagegen.batch_budgets ALTER COLUMN updated_at SET DEFAULT now();

CREATE FUNCTION imagegen.batch_budgets_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE imagegen.batches SET budget_usd = NULL, budget_updated_at = now(), updated_at = now()
        WHERE name = OLD.batch;
    RETURN OLD;
END;
$$;

CREATE TRIGGER batch_budgets_delete
    INSTEAD OF DELETE ON imagegen.batch_budgets
    FOR EACH ROW EXECUTE FUNCTION imagegen.batch_budgets_delete();

-- An INSERT into the view for a batch that exists without a budget (submitted without one) must
-- set the budget, as inserting into the old table did, not fail on the batch's primary key.
-- Through the view, a row carries nothing but its name and budget; such a row for a batch
-- without a budget becomes an UPDATE of that batch (and the INSERT inserts nothing).
CREATE FUNCTION imagegen.batches_budget_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.budget_usd IS NOT NULL AND NEW.source IS NULL AND NEW.template IS NULL
       AND NEW.key_template IS NULL AND NEW.defaults = '{}' AND NEW.columns = '{}'
       AND NEW.callback_url IS NULL THEN
        UPDATE imagegen.batches SET budget_usd = NEW.budget_usd,
                budget_updated_at = COALESCE(NEW.budget_updated_at, now()), updated_at = now()
            WHERE name = NEW.name AND budget_usd IS NULL;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER batches_budget_insert
    BEFORE INSERT ON imagegen.batches
    FOR EACH ROW EXECUTE FUNCTION imagegen.batches_budget_insert();

-- A job's place in its batch's file (0-based row order of the file that added it or, after an
-- edited file was submitted again, of that file), so reports and the dashboard list a batch in
-- file order: ORDER BY batch_seq NULLS LAST, id. Jobs inserted otherwise have none and sort
-- after, by id. (The dashboard's migration adds the same column; both say IF NOT EXISTS.)
ALTER TABLE imagegen.jobs ADD COLUMN IF NOT EXISTS batch_seq bigint;

CREATE INDEX IF NOT EXISTS jobs_batch_seq_idx ON imagegen.jobs (batch, batch_seq, id)
    WHERE batch IS NOT NULL;

-- A job inserted into a batch with a default callback URL, without one of its own, gets the
-- batch's. The WHEN clause is checked without calling the function, so jobs outside batches,
-- or with their own URL (`imagegen batch submit` fills it in itself), pay nothing.
CREATE FUNCTION imagegen.jobs_batch_callback() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT b.callback_url INTO NEW.callback_url FROM imagegen.batches b WHERE b.name = NEW.batch;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_batch_callback
    BEFORE INSERT ON imagegen.jobs
    FOR EACH ROW
    WHEN (NEW.batch IS NOT NULL AND NEW.callback_url IS NULL)
    EXECUTE FUNCTION imagegen.jobs_batch_callback();
