"""Jobs: the spec a user submits, the job record and its state machine, the Redis store, events."""
