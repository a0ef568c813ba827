"""Operations: Prometheus metrics, /healthz and the status report."""
