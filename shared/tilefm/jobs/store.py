"""Job state in Redis. CONTRACT (to be implemented): every write that moves a job is atomic (a Lua
script or WATCH/MULTI), so two processes racing never lose an update.

Keys (prefix configurable, default "tilefm:"):
- job:{id}             JSON of the Job record (tilefm.jobs.models.Job), plus a "version" counter
- jobs:all             sorted set of ids by creation time (ms), for listing / pagination
- jobs:state:{state}   sorted set of ids by creation time, per state
- jobs:queue           sorted set of queued ids, score = priority-major, creation-minor (lowest first pops)
- idem:{key}           id of the job created with that Idempotency-Key, and the body hash (TTL 24 h)
- job:{id}:done        set of "z/x/y" tiles finished (idempotent: a tile is never counted twice)
- job:{id}:failed      hash "z/x/y" -> reason (tiles that failed for good)
- job:{id}:events      stream of JobEvent JSON (capped), read by SSE and gRPC Watch
- job:{id}:lease       scheduler lease: owner id, with a TTL; an expired lease means the owner died
- job:{id}:cancel      flag set by cancel while the job runs

API:
    class JobStore:
        def __init__(self, redis: redis.Redis, prefix: str = "tilefm:")
        def create(self, spec: JobSpec, *, idempotency_key: str | None, body_hash: str | None) -> tuple[Job, bool]
            # returns (job, created); same key + same hash -> the existing job, created False;
            # same key + another hash -> raises IdempotencyConflict; new jobs are queued
        def get(self, job_id: str) -> Job             # raises JobNotFound
        def list(self, *, state: JobState | None, limit: int, cursor: str | None) -> tuple[list[Job], str | None]
            # newest first; cursor is opaque; next cursor None at the end
        def transition(self, job_id, to: JobState, *, expect: set[JobState] | None = None, **updates) -> Job
            # atomic; raises InvalidTransition if the current state doesn't allow it (TRANSITIONS)
        def claim_next(self, owner: str, lease_s: float) -> Job | None
            # atomically pops the best queued job, sets lease, moves it to running
        def renew_lease(self, job_id, owner, lease_s) -> bool
        def expired_running(self) -> list[str]    # running jobs whose lease expired (to re-queue)
        def requeue(self, job_id) -> Job          # running -> queued, lease dropped, done tiles kept
        def tile_done(self, job_id, tile: str) -> bool   # True if newly added
        def tiles_done(self, job_id) -> set[str]
        def tile_failed(self, job_id, tile, reason) -> None
        def set_total(self, job_id, total: int) -> None
        def request_cancel(self, job_id) -> Job   # queued -> cancelled at once; running -> flag, the runner stops
        def cancel_requested(self, job_id) -> bool
        def publish(self, event: JobEvent) -> None
        def events(self, job_id, last_id: str = "0", block_ms: int = 1000) -> list[tuple[str, JobEvent]]
        def counts_by_state(self) -> dict[JobState, int]
        def queue_depth(self) -> int
"""
