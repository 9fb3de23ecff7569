-- The finished-job NOTIFY carried an empty payload for every job without a batch or without an
-- idempotency key (most rows apps insert by hand): `to_json(NULL)` is NULL, and a NULL anywhere
-- in the concatenation made the whole payload NULL. Same function, with JSON nulls for them.

CREATE OR REPLACE FUNCTION imagegen.job_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    -- to_json(NULL) is SQL NULL, not JSON null: without the COALESCE a job with no batch or
    -- no key made the whole payload NULL, which NOTIFY sends as an empty string.
    batch_json text := COALESCE(to_json(NEW.batch)::text, 'null');
    key_json text := COALESCE(to_json(NEW.idempotency_key)::text, 'null');
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
