-- A job's place in its batch file (line order), so a batch lists in the order it was written;
-- rows inserted without one sort after, by id. The batches work sets it on submission.
ALTER TABLE imagegen.jobs ADD COLUMN IF NOT EXISTS batch_seq bigint;
