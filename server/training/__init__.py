"""Training jobs run beside the server: a SQLite job store, a one-at-a-time manager and its worker process."""
