-- processed_events.event_ts is read only by the pruner (everything older than the retention).
-- Rows arrive roughly in event-time order, so a BRIN index serves that range at almost no cost
-- per insert; the btree it replaces was a second index insert per event. Measured on the
-- aggregator's jsonb batch statement (throwaway PostgreSQL, 50 batches of 1,000 events, median
-- of 3): 19.6 -> 15.9 us of PostgreSQL CPU per event.
CREATE INDEX IF NOT EXISTS processed_events_event_ts_brin
    ON processed_events USING brin (event_ts);
DROP INDEX IF EXISTS processed_events_event_ts_idx;
