-- Installation-wide settings every worker reads from the database, so all of them obey the same
-- values and the HTTP API can show them. One row, one typed column per setting (a named
-- constraint per rule), rather than key/value text.

CREATE TABLE imagegen.settings (
    singleton         boolean     PRIMARY KEY DEFAULT true,
    -- No call starts that could take today's (UTC) spend of the whole installation past this.
    -- NULL: no daily budget. Set with `imagegen budget daily set USD`, `imagegen worker
    -- --daily-budget-usd`, `PUT /api/v1/budget/daily` or plain SQL.
    daily_budget_usd  numeric,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT settings_singleton CHECK (singleton),
    CONSTRAINT settings_daily_budget_not_negative CHECK (daily_budget_usd >= 0)
);

INSERT INTO imagegen.settings DEFAULT VALUES;
