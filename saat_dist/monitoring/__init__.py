"""Run telemetry: the Prometheus exporter each training worker serves."""
