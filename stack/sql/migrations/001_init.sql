-- QoE reference platform schema. Idempotent: every object is created only if missing, so a
-- half-applied run (or a hand-applied copy) can simply be applied again.
-- schema_migrations itself is created by the migration runner (qoe.db.migrate) before this.

-- Every event id ever counted, kept >= DEDUP_RETENTION_HOURS past its event time so a
-- redelivered or resent event is never counted twice.
CREATE TABLE IF NOT EXISTS processed_events (
    event_id text PRIMARY KEY,
    event_ts timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS processed_events_event_ts_idx ON processed_events (event_ts);

-- One row per (probe, target, window): running sums so averages are sum / samples.
-- version counts changes; diagnosed_version is the version the diagnoser last judged.
CREATE TABLE IF NOT EXISTS window_aggregates (
    probe_id text NOT NULL,
    target text NOT NULL,
    window_start timestamptz NOT NULL,
    window_seconds integer NOT NULL CHECK (window_seconds > 0),
    samples bigint NOT NULL CHECK (samples > 0),
    rtt_sum double precision NOT NULL,
    rtt_min double precision NOT NULL,
    rtt_max double precision NOT NULL,
    jitter_sum double precision NOT NULL,
    jitter_max double precision NOT NULL,
    loss_sum double precision NOT NULL,
    loss_max double precision NOT NULL,
    throughput_sum double precision NOT NULL,
    throughput_min double precision NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    diagnosed_version bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (probe_id, target, window_start, window_seconds)
);
-- The diagnoser's work queue: only rows changed since they were last judged.
CREATE INDEX IF NOT EXISTS window_aggregates_undiagnosed_idx
    ON window_aggregates (probe_id, target, window_start, window_seconds)
    WHERE version > diagnosed_version;

CREATE TABLE IF NOT EXISTS diagnoses (
    probe_id text NOT NULL,
    target text NOT NULL,
    window_start timestamptz NOT NULL,
    window_seconds integer NOT NULL,
    kind text NOT NULL CHECK (kind IN ('high_latency', 'high_jitter', 'packet_loss', 'low_throughput')),
    observed double precision NOT NULL,
    threshold double precision NOT NULL,
    PRIMARY KEY (probe_id, target, window_start, window_seconds, kind)
);

-- The read contract (stack/CONTRACT.md): exactly these columns, nothing internal.
CREATE OR REPLACE VIEW qoe_window_aggregates AS
SELECT probe_id, target, window_start, window_seconds, samples,
       rtt_sum, rtt_min, rtt_max, jitter_sum, jitter_max,
       loss_sum, loss_max, throughput_sum, throughput_min
FROM window_aggregates;

CREATE OR REPLACE VIEW qoe_diagnoses AS
SELECT probe_id, target, window_start, kind, observed, threshold
FROM diagnoses;
