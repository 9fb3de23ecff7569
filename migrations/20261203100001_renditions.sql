-- Renditions: the sizes a site needs (OG card, thumbnail, WebP), made by the worker from the
-- original it already has. The app asks in `renditions`; the worker answers in `rendition_urls`
-- (and, per spec, in `rendition_errors` when one could not be made); every rendition object is a
-- row in `imagegen.renditions` beside its original's row in `imagegen.images`.

-- The spec grammar, checked at INSERT. src/image/renditions.rs parses the same grammar; the two
-- must agree (a test inserts every spec the Rust side accepts or refuses).
--   og | thumb | webp | {W}x{H}.{fmt} | {W}w.{fmt}, fmt in jpg, jpeg, png, webp, 16 <= W, H <= 4096,
--   no leading zeros, no duplicates, at most 8 specs.
CREATE FUNCTION imagegen.renditions_valid(specs text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    spec text;
    m text[];
BEGIN
    IF cardinality(specs) > 8 OR coalesce(array_ndims(specs), 1) <> 1 THEN
        RETURN false;
    END IF;
    -- count(DISTINCT) skips NULLs, so a NULL element fails here too.
    IF (SELECT count(DISTINCT s) FROM unnest(specs) AS s) <> cardinality(specs) THEN
        RETURN false;
    END IF;
    FOREACH spec IN ARRAY specs LOOP
        CONTINUE WHEN spec IN ('og', 'thumb', 'webp');
        m := regexp_match(spec, '^([1-9][0-9]{1,3})(?:x([1-9][0-9]{1,3})|w)\.(jpg|jpeg|png|webp)$');
        IF m IS NULL OR m[1]::int NOT BETWEEN 16 AND 4096
           OR (m[2] IS NOT NULL AND m[2]::int NOT BETWEEN 16 AND 4096) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

COMMENT ON FUNCTION imagegen.renditions_valid(text[]) IS
    'Rendition specs: og, thumb, webp, WxH.fmt or Ww.fmt (fmt jpg|jpeg|png|webp, 16..4096 px), '
    'at most 8, no duplicates.';

ALTER TABLE imagegen.jobs
    ADD COLUMN renditions text[] NOT NULL DEFAULT '{}'
        CONSTRAINT jobs_renditions_valid CHECK (imagegen.renditions_valid(renditions)),
    -- {"og": [url of image 0, url of image 1, ...], "thumb": [...]}: keyed by the spec as
    -- written, one URL per original in the order of image_urls. A spec is here only when every
    -- original got it.
    ADD COLUMN rendition_urls jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT jobs_rendition_urls_object CHECK (jsonb_typeof(rendition_urls) = 'object'),
    -- {"og": "why it failed"}: renditions that could not be made or stored. The job still
    -- succeeded (its originals are stored); `imagegen renditions add` can make them later.
    ADD COLUMN rendition_errors jsonb
        CONSTRAINT jobs_rendition_errors_object CHECK (jsonb_typeof(rendition_errors) = 'object');

-- A ThumbHash of the original (base64, a few dozen bytes): a blurred preview a page can paint
-- before the image loads.
ALTER TABLE imagegen.images ADD COLUMN placeholder text;

-- One row per rendition object: what an audit or a CDN purge needs, like imagegen.images.
CREATE TABLE imagegen.renditions (
    job_id        bigint      NOT NULL REFERENCES imagegen.jobs (id) ON DELETE CASCADE,
    idx           integer     NOT NULL,
    spec          text        NOT NULL,
    key           text        NOT NULL,
    url           text        NOT NULL,
    content_type  text        NOT NULL,
    bytes         bigint      NOT NULL,
    width         integer     NOT NULL,
    height        integer     NOT NULL,
    sha256        text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx, spec)
);

COMMENT ON TABLE imagegen.renditions IS
    'One stored rendition (spec) of original image idx of a job; see jobs.rendition_urls.';
