"""QoE Harness: validation harness for the QoE telemetry pipeline."""
