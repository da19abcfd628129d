-- When the leading producer last ran settlement: the settlement interval
-- holds across restarts and leader changes (one row).
CREATE TABLE settlement_clock (
    id          BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    last_run_at TIMESTAMPTZ
);
INSERT INTO settlement_clock (id, last_run_at) VALUES (true, NULL);
