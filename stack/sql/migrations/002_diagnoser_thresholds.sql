-- The thresholds the diagnoser last judged with. When a restarted diagnoser has other
-- thresholds, every window must be judged again (qoe.diagnoser.adopt_thresholds).
CREATE TABLE IF NOT EXISTS diagnoser_thresholds (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    thresholds jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
