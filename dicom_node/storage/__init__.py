"""Durable state: the content-addressed spool, the job queue and the outbox (SQLite)."""
