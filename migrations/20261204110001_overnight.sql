-- Overnight runs, reference images and regeneration (issue 11).

-- "Waiting for a retry", made explicit: set when a transient failure schedules another attempt,
-- cleared when the job is claimed (or retried by hand). `attempts` cannot tell: a manual retry
-- resets it and hand-backs after a halt or a cool-down spend none. `worker --exit-when-idle`
-- keeps running while such a job exists, and not for jobs an app scheduled for later.
ALTER TABLE imagegen.jobs
    ADD COLUMN retry_pending boolean NOT NULL DEFAULT false;

-- Reference images sent with the prompt (style, logo, product photo): at most 4, each an
-- https:// URL (passed to the provider as is) or a storage key (read from storage and sent as a
-- data URL). src/pipeline checks format and size before the call; this checks the shape.
CREATE FUNCTION imagegen.reference_images_valid(refs text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT cardinality(refs) <= 4
       AND coalesce(array_ndims(refs), 1) = 1
       AND NOT EXISTS (
           SELECT 1 FROM unnest(refs) AS r
           WHERE r IS NULL
              OR NOT (
                  (r ~ '^https://[^[:space:]/?#]+[^[:space:]]*$' AND length(r) <= 2000)
                  OR (r ~ '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$'
                      AND length(r) <= 512
                      AND r !~ '(^|/)\.\.?(/|$)')))
$$;

COMMENT ON FUNCTION imagegen.reference_images_valid(text[]) IS
    'Reference images: at most 4, each an https:// URL (up to 2000 characters) or a storage key '
    '([A-Za-z0-9._-] segments separated by /, no . or .. segment, up to 512 characters).';

ALTER TABLE imagegen.jobs
    ADD COLUMN reference_images text[] NOT NULL DEFAULT '{}'
        CONSTRAINT jobs_reference_images_valid CHECK (imagegen.reference_images_valid(reference_images));

-- Regeneration: a finished job can be made again (`imagegen regenerate`). Each generation's
-- images get their own keys (generation 1 the plain ones, later ones `{id}-g{N}-{index}`); the
-- rows of earlier generations stay as history.
ALTER TABLE imagegen.jobs
    ADD COLUMN generation integer NOT NULL DEFAULT 1
        CONSTRAINT jobs_generation_positive CHECK (generation >= 1);

ALTER TABLE imagegen.images ADD COLUMN generation integer NOT NULL DEFAULT 1;
ALTER TABLE imagegen.images DROP CONSTRAINT images_pkey;
ALTER TABLE imagegen.images ADD PRIMARY KEY (job_id, generation, idx);

ALTER TABLE imagegen.renditions ADD COLUMN generation integer NOT NULL DEFAULT 1;
ALTER TABLE imagegen.renditions DROP CONSTRAINT renditions_pkey;
ALTER TABLE imagegen.renditions ADD PRIMARY KEY (job_id, generation, idx, spec);

ALTER TABLE imagegen.attempts ADD COLUMN generation integer NOT NULL DEFAULT 1;

-- Paid images of one generation are only ever recovered into that generation.
ALTER TABLE imagegen.paid_images ADD COLUMN generation integer NOT NULL DEFAULT 1;

-- Prune walks finished jobs by age.
CREATE INDEX jobs_finished_idx ON imagegen.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
