"""The reference QoE telemetry platform: ingest, aggregator, diagnoser and probe services."""
