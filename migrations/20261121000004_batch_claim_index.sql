-- Claims of one batch (`imagegen worker --batch`, the demo) read this partial index in claim
-- order, instead of combining the pending and batch indexes and sorting.
CREATE INDEX jobs_pending_batch_idx ON imagegen.jobs (batch, priority DESC, run_at, id)
    WHERE state = 'pending' AND batch IS NOT NULL;
