-- One row per stored image of a succeeded job: where it is and what it is. `image_urls` on the
-- job is the short answer; this is the detail (and what a CDN purge or an audit needs).

CREATE TABLE imagegen.images (
    job_id        bigint      NOT NULL REFERENCES imagegen.jobs (id) ON DELETE CASCADE,
    idx           integer     NOT NULL,
    key           text        NOT NULL,
    url           text        NOT NULL,
    content_type  text        NOT NULL,
    bytes         bigint      NOT NULL,
    width         integer     NOT NULL,
    height        integer     NOT NULL,
    sha256        text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx)
);
