"""Job state in Redis. Every write that moves a job is one Lua script, so two processes racing never
lose an update and never see half a move.

Keys (prefix configurable, default "tilefm:"):
- job:{id}             hash: the Job record, one field per part, JSON where the part is structured
                       (spec, outputs, error), plus a "version" counter bumped by every write to it;
                       a hash rather than one JSON string so that the scripts change a state without
                       decoding JSON (Redis' cjson turns [] into {}); `get()` assembles the Job
- jobs:all             sorted set of ids by creation time (ms), for listing / pagination
- jobs:state:{state}   sorted set of ids by creation time, per state
- jobs:queue           sorted set of queued ids, score = (9 - priority) * 1e13 + created_ms; the
                       lowest pops first: priority 9 before 0, then oldest first, then smallest id
- idem:{key}           hash {id, hash}: the job created with that Idempotency-Key and the request
                       body's hash (TTL 24 h)
- job:{id}:done        set of "z/x/y" tiles finished (idempotent: a tile is never counted twice)
- job:{id}:failed      hash "z/x/y" -> reason (tiles that failed for good)
- job:{id}:events      stream of JobEvent JSON (field "data", capped ~1000), read by SSE and gRPC
                       Watch; every state change (create, claim, transition, requeue, cancel)
                       appends one from inside its script, so the stream is in commit order
- job:{id}:lease       scheduler lease: owner id, with a TTL; an expired lease means the owner died
- job:{id}:cancel      flag set by cancel while the job runs

Job ids are 32 hex characters like `uuid4().hex`, but time-sortable (ULID-like): 12 hex digits of
the creation time in ms, then 20 random hex digits (80 bits), monotonic within a process.

Progress: tiles_done = SCARD job:{id}:done and tiles_failed = HLEN job:{id}:failed, read in the same
MULTI (or script) as the record, so they are always exact; tiles_total is the record's "total".

Scripts use keys derived from their arguments (the queue pop cannot know its job's keys up front),
so the store needs a single Redis (or a replica set), not Redis Cluster.

API:
    class JobStore:
        def __init__(self, redis: redis.Redis, prefix: str = "tilefm:")
        @classmethod from_url(url, prefix="tilefm:", **redis_kwargs) -> JobStore   # decode_responses=True
        def create(self, spec: JobSpec, *, idempotency_key: str | None = None, body_hash: str | None = None,
                   total: int = 0) -> tuple[Job, bool]
            # one script: record (tiles_total = total), indexes, queue entry, first event; returns
            # (job, created); same key + same hash -> the existing job, created False;
            # same key + another hash -> raises IdempotencyConflict; new jobs are queued.
            # body_hash None -> the hash of the spec's canonical JSON
        async def create_async(self, client: redis.asyncio.Redis, spec, ...) -> tuple[Job, bool]
            # the same, on an event loop
        def get(self, job_id: str) -> Job             # raises JobNotFound
        def list(self, *, state: JobState | None = None, limit: int = 20, cursor: str | None = None
                 ) -> tuple[list[Job], str | None]
            # newest first; cursor is opaque; next cursor None at the end; InvalidPage for a bad
            # limit (1..100) or cursor
        def transition(self, job_id, to: JobState, *, expect: set[JobState] | None = None, **updates) -> Job
            # atomic; raises InvalidTransition if the current state doesn't allow it (TRANSITIONS)
            # or is not in `expect`. updates: outputs=list[str], error=JobError|dict|str|None,
            # message=str (the event's text), and for to=RUNNING owner=str, lease_s=float (required).
            # to=QUEUED on a job whose cancel was requested cancels it instead.
        def claim_next(self, owner: str, lease_s: float) -> Job | None
            # atomically pops the best queued job, sets lease, moves it to running
        def renew_lease(self, job_id, owner, lease_s) -> bool
        def lease_owner(self, job_id) -> str | None
        def expired_running(self) -> list[str]    # running jobs whose lease expired (to re-queue)
        def requeue(self, job_id) -> Job          # running -> queued, lease dropped, done tiles kept
        def tile_done(self, job_id, tile: str) -> bool   # True if newly added
        def tiles_done(self, job_id) -> set[str]
        def tile_failed(self, job_id, tile, reason) -> None   # ignored if the tile is already done
        def tiles_failed(self, job_id) -> dict[str, str]
        def set_total(self, job_id, total: int) -> None
        def request_cancel(self, job_id) -> Job
            # queued -> cancelled at once; running -> flag, the runner stops
        def cancel_requested(self, job_id) -> bool
        def publish(self, event: JobEvent) -> str   # the stream id
        def last_event_id(self, job_id) -> str
        def events(self, job_id, last_id: str = "0", block_ms: int = 1000, count: int = 100
                   ) -> list[tuple[str, JobEvent]]
            # block_ms <= 0: don't block; ValueError unless block_ms < the client's socket_timeout
            # (redis-py 8 defaults to 5 s)
        def counts_by_state(self) -> dict[JobState, int]
        def queue_depth(self) -> int
        def persistence(self) -> Persistence   # whether this Redis keeps its data across a restart

`REDIS_UNAVAILABLE`: the errors that mean Redis cannot be reached for now (down, restarting,
loading its data, failing over) rather than that a request was wrong; callers retry them (the
scheduler) or answer 503 (the APIs).

Why one module (~770 lines): the key layout above, the Lua scripts that move a job (about 200
lines of it) and the methods that call them are one contract; kept together so that a change to
a key is made in one place.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import redis as redis_lib

from tilefm.jobs.errors import IdempotencyConflict, InvalidPage, InvalidTransition, JobNotFound
from tilefm.jobs.models import (
    TRANSITIONS,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    Progress,
    Timings,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

__all__ = ["REDIS_UNAVAILABLE", "JobStore", "Persistence", "new_job_id", "queue_score", "spec_hash"]

#: Redis is unreachable for now, not wrong: refused or dropped connections, timeouts, a server
#: still loading its AOF (BusyLoadingError is a ConnectionError) or a replica not yet promoted
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_lib.exceptions.ConnectionError,
    redis_lib.exceptions.TimeoutError,
    redis_lib.exceptions.ReadOnlyError,
)


class Persistence(NamedTuple):
    """Whether a Redis keeps its data across a restart: `durable` is True with the append-only
    file on, False without it (RDB snapshots alone lose the writes since the last one), None
    where the server does not say (INFO switched off, as some managed services do)."""

    durable: bool | None
    detail: str


#: how long an Idempotency-Key is remembered
IDEMPOTENCY_TTL_S = 24 * 3600
#: approximate cap of each job's event stream
EVENTS_MAXLEN = 1000
#: list() page size bounds
MAX_LIMIT = 100
#: queue score: priority-major (higher priority pops first), creation-minor (older pops first)
PRIORITY_WEIGHT = 10**13  # > any ms timestamp before year 2286, and 10 * 1e13 < 2**53: exact


_id_lock = threading.Lock()
_last_id: tuple[int, int] = (-1, 0)


def new_job_id(now_ms: int | None = None) -> str:
    """32 hex chars: 12 of creation ms (sortable), 20 random. Within one process, ids made in the
    same millisecond increase (the random part is incremented, as in monotonic ULIDs), so creation
    order and id order agree; across processes, same-millisecond ids are ordered at random."""
    global _last_id
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _id_lock:
        last_ms, last_rand = _last_id
        rand = last_rand + 1 if ms == last_ms and last_rand + 1 < 2**80 else secrets.randbits(79)
        _last_id = (ms, rand)
    return f"{ms:012x}{rand:020x}"


def queue_score(priority: int, created_ms: int) -> int:
    """Lowest pops first: priority 9 (most urgent) before 0, then the oldest."""
    return (9 - priority) * PRIORITY_WEIGHT + created_ms


def spec_hash(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _lua_transitions() -> str:
    rows = []
    for src, dsts in TRANSITIONS.items():
        inner = ", ".join(f"{d.value} = true" for d in sorted(dsts, key=lambda s: s.value))
        rows.append(f"  {src.value} = {{{inner}}}")
    return "{\n" + ",\n".join(rows) + "\n}"


# Shared by every script. ARGV[1] is always the key prefix.
_PRELUDE = (
    """
local P = ARGV[1]
local ALLOWED = """
    + _lua_transitions()
    + """
local FINAL = {"""
    + ", ".join(f"{s.value} = true" for s in JobState if s.final)
    + """}
local MAXLEN = """
    + str(EVENTS_MAXLEN)
    + """

local function jkey(id) return P .. 'job:' .. id end

local function snapshot(id)
  local k = jkey(id)
  return {redis.call('HGETALL', k), redis.call('SCARD', k .. ':done'), redis.call('HLEN', k .. ':failed')}
end

local function emit(id, state, now, msg)
  local k = jkey(id)
  local total = tonumber(redis.call('HGET', k, 'total') or '0') or 0
  local ev = cjson.encode({
    job_id = id, state = state, tiles_per_second = 0, time = now, message = msg,
    progress = {tiles_total = total, tiles_done = redis.call('SCARD', k .. ':done'),
                tiles_failed = redis.call('HLEN', k .. ':failed')}})
  redis.call('XADD', k .. ':events', 'MAXLEN', '~', MAXLEN, '*', 'data', ev)
end

-- move a job from state `from` to `to`: indexes, queue, lease, timings, version, event
local function move(id, from, to, now, msg)
  local k = jkey(id)
  redis.call('ZREM', P .. 'jobs:state:' .. from, id)
  redis.call('ZADD', P .. 'jobs:state:' .. to, redis.call('HGET', k, 'created_ms'), id)
  if from == 'queued' then redis.call('ZREM', P .. 'jobs:queue', id) end
  if to == 'queued' then redis.call('ZADD', P .. 'jobs:queue', redis.call('HGET', k, 'qscore'), id) end
  if from == 'running' then
    redis.call('DEL', k .. ':lease')
    redis.call('HDEL', k, 'owner')
  end
  if to == 'running' and not redis.call('HGET', k, 'started') then redis.call('HSET', k, 'started', now) end
  if FINAL[to] then
    redis.call('HSET', k, 'finished', now)
    redis.call('DEL', k .. ':cancel')
  end
  redis.call('HSET', k, 'state', to)
  redis.call('HINCRBY', k, 'version', 1)
  emit(id, to, now, msg)
end
"""
)

# ARGV: prefix, id, idem_key|'', body_hash, idem_ttl_s, now_iso, created_ms, qscore, priority,
#       spec_json, total
_CREATE = """
local id, idem, hash = ARGV[2], ARGV[3], ARGV[4]
if idem ~= '' then
  local ik = P .. 'idem:' .. idem
  local prev = redis.call('HMGET', ik, 'id', 'hash')
  if prev[1] and redis.call('EXISTS', jkey(prev[1])) == 1 then
    if prev[2] == hash then return {'exists', snapshot(prev[1])} end
    return {'conflict', prev[1]}
  end
  redis.call('HSET', ik, 'id', id, 'hash', hash)
  redis.call('EXPIRE', ik, ARGV[5])
end
local k = jkey(id)
redis.call('HSET', k, 'id', id, 'state', 'queued', 'spec', ARGV[10], 'created', ARGV[6],
           'created_ms', ARGV[7], 'qscore', ARGV[8], 'priority', ARGV[9], 'total', ARGV[11],
           'outputs', '[]', 'version', 1)
redis.call('ZADD', P .. 'jobs:all', ARGV[7], id)
redis.call('ZADD', P .. 'jobs:state:queued', ARGV[7], id)
redis.call('ZADD', P .. 'jobs:queue', ARGV[8], id)
emit(id, 'queued', ARGV[6], 'queued')
return {'created', snapshot(id)}
"""

# ARGV: prefix, id, to, expect_csv|'', now_iso, message, owner|'', lease_ms, [field, value]...
_TRANSITION = """
local id, to, expect, now, msg = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local k = jkey(id)
local cur = redis.call('HGET', k, 'state')
if not cur then return {'notfound'} end
if expect ~= '' then
  local ok = false
  for s in string.gmatch(expect, '[^,]+') do
    if s == cur then ok = true end
  end
  if not ok then return {'unexpected', cur} end
end
if not ALLOWED[cur] or not ALLOWED[cur][to] then return {'invalid', cur} end
if to == 'queued' and redis.call('EXISTS', k .. ':cancel') == 1 and ALLOWED[cur]['cancelled'] then
  to = 'cancelled'
  msg = 'cancelled (cancel was requested before the job was re-queued)'
end
for i = 9, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
move(id, cur, to, now, msg)
if to == 'running' then
  redis.call('SET', k .. ':lease', ARGV[7], 'PX', ARGV[8])
  redis.call('HSET', k, 'owner', ARGV[7])
end
return {'ok', snapshot(id)}
"""

# ARGV: prefix, owner, lease_ms, now_iso, message
_CLAIM = """
while true do
  local popped = redis.call('ZPOPMIN', P .. 'jobs:queue')
  if #popped == 0 then return {'empty'} end
  local id = popped[1]
  local k = jkey(id)
  if redis.call('HGET', k, 'state') == 'queued' then
    move(id, 'queued', 'running', ARGV[4], ARGV[5])
    redis.call('SET', k .. ':lease', ARGV[2], 'PX', ARGV[3])
    redis.call('HSET', k, 'owner', ARGV[2])
    return {'ok', snapshot(id)}
  end
  -- a stale queue entry (job gone or moved): dropped, try the next
end
"""

# ARGV: prefix, id, now_iso
_CANCEL = """
local id, now = ARGV[2], ARGV[3]
local k = jkey(id)
local cur = redis.call('HGET', k, 'state')
if not cur then return {'notfound'} end
if cur == 'queued' then
  move(id, 'queued', 'cancelled', now, 'cancelled')
elseif cur == 'running' then
  if redis.call('SET', k .. ':cancel', '1', 'NX') then
    redis.call('HINCRBY', k, 'version', 1)
    emit(id, 'running', now, 'cancel requested')
  end
elseif cur ~= 'cancelled' then
  return {'invalid', cur}
end
return {'ok', snapshot(id)}
"""

# ARGV: prefix, id, owner, lease_ms
_RENEW = """
local lk = jkey(ARGV[2]) .. ':lease'
if redis.call('GET', lk) == ARGV[3] then
  redis.call('PEXPIRE', lk, ARGV[4])
  return 1
end
return 0
"""

# ARGV: prefix
_EXPIRED = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'jobs:state:running', 0, -1)) do
  if redis.call('EXISTS', jkey(id) .. ':lease') == 0 then out[#out + 1] = id end
end
return out
"""

# ARGV: prefix, id, tile -> -1 no job, 1 new, 0 already done
_TILE_DONE = """
local k = jkey(ARGV[2])
if redis.call('EXISTS', k) == 0 then return -1 end
local n = redis.call('SADD', k .. ':done', ARGV[3])
redis.call('HDEL', k .. ':failed', ARGV[3])
return n
"""

# ARGV: prefix, id, tile, reason -> -1 no job, 1 recorded, 0 ignored (tile already done)
_TILE_FAILED = """
local k = jkey(ARGV[2])
if redis.call('EXISTS', k) == 0 then return -1 end
if redis.call('SISMEMBER', k .. ':done', ARGV[3]) == 1 then return 0 end
redis.call('HSET', k .. ':failed', ARGV[3], ARGV[4])
return 1
"""

# ARGV: prefix, id, total -> 0 no job, 1 ok
_SET_TOTAL = """
local k = jkey(ARGV[2])
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'total', ARGV[3])
redis.call('HINCRBY', k, 'version', 1)
return 1
"""


def _now() -> tuple[datetime, int]:
    ms = time.time_ns() // 1_000_000
    return datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=(ms % 1000) * 1000), ms


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _state(s: JobState | str) -> JobState:
    return s if isinstance(s, JobState) else JobState(s)


def _encode_cursor(score: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, job_id = raw.split(":", 1)
        return int(score), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidPage("not a cursor this service returned", field="cursor") from exc


class JobStore:
    """Jobs in one Redis, under `prefix`. Thread-safe as far as the redis client is (redis-py's
    pooled client is); expects `decode_responses=True` but copes without."""

    def __init__(self, redis: redis_lib.Redis, prefix: str = "tilefm:"):
        self.redis = redis
        self.prefix = prefix
        reg = redis.register_script
        self._create = reg(_PRELUDE + _CREATE)
        self._transition = reg(_PRELUDE + _TRANSITION)
        self._claim = reg(_PRELUDE + _CLAIM)
        self._cancel = reg(_PRELUDE + _CANCEL)
        self._renew = reg(_PRELUDE + _RENEW)
        self._expired = reg(_PRELUDE + _EXPIRED)
        self._tile_done = reg(_PRELUDE + _TILE_DONE)
        self._tile_failed = reg(_PRELUDE + _TILE_FAILED)
        self._set_total = reg(_PRELUDE + _SET_TOTAL)

    @classmethod
    def from_url(cls, url: str, prefix: str = "tilefm:", **kwargs: Any) -> JobStore:
        return cls(redis_lib.Redis.from_url(url, decode_responses=True, **kwargs), prefix)

    # -- keys ------------------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _job(self, job_id: str, suffix: str | None = None) -> str:
        return f"{self.prefix}job:{job_id}" + (f":{suffix}" if suffix else "")

    # -- records ---------------------------------------------------------------------------------

    @staticmethod
    def _from_snapshot(snap: list[Any]) -> Job:
        flat, done, failed = snap
        if isinstance(flat, dict):  # RESP3 clients return maps
            h = {_str(a): _str(b) for a, b in flat.items()}
        else:
            h = {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat), 2)}
        return JobStore._from_hash(h, int(done), int(failed))

    @staticmethod
    def _from_hash(h: dict[str, str], done: int, failed: int) -> Job:
        error = h.get("error") or None
        return Job(
            id=h["id"],
            state=JobState(h["state"]),
            spec=JobSpec.model_validate_json(h["spec"]),
            progress=Progress(tiles_total=int(h.get("total") or 0), tiles_done=done, tiles_failed=failed),
            timings=Timings(created=h["created"], started=h.get("started"), finished=h.get("finished")),
            outputs=json.loads(h.get("outputs") or "[]"),
            error=JobError.model_validate_json(error) if error else None,
        )

    def _result(self, job_id: str, res: list[Any], to: str = "") -> Job:
        status = _str(res[0])
        if status == "notfound":
            raise JobNotFound(job_id)
        if status == "unexpected":
            raise InvalidTransition(
                job_id, _str(res[1]), to, f"job {job_id} is {_str(res[1])}, not in the expected state(s)"
            )
        if status == "invalid":
            raise InvalidTransition(job_id, _str(res[1]), to)
        return self._from_snapshot(res[1])

    # -- create / read ---------------------------------------------------------------------------

    def create(
        self,
        spec: JobSpec,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        total: int = 0,
    ) -> tuple[Job, bool]:
        """One round trip: the job, its tile count (known at validation) and the queue entry together."""
        args = self._create_args(spec, idempotency_key, body_hash, total)
        return self._created(self._create(args=args), idempotency_key)

    async def create_async(
        self,
        client: AsyncRedis,
        spec: JobSpec,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        total: int = 0,
    ) -> tuple[Job, bool]:
        """`create` over an asyncio client of the same Redis (the API's event loop records jobs
        without a thread hop); the same script, so the two are interchangeable."""
        args = self._create_args(spec, idempotency_key, body_hash, total)
        try:
            res = await client.evalsha(self._create.sha, 0, *args)
        except redis_lib.exceptions.NoScriptError:  # a restarted or flushed Redis
            res = await client.eval(cast(str, self._create.script), 0, *args)
        return self._created(res, idempotency_key)

    def _create_args(
        self, spec: JobSpec, idempotency_key: str | None, body_hash: str | None, total: int
    ) -> list[Any]:
        if total < 0:
            raise ValueError("total must be >= 0")
        now, ms = _now()
        if idempotency_key is not None and body_hash is None:
            body_hash = spec_hash(spec)
        return [
            self.prefix,
            new_job_id(ms),
            idempotency_key or "",
            body_hash or "",
            IDEMPOTENCY_TTL_S,
            now.isoformat(),
            ms,
            queue_score(spec.priority, ms),
            spec.priority,
            spec.model_dump_json(),
            int(total),
        ]

    def _created(self, res: list[Any], idempotency_key: str | None) -> tuple[Job, bool]:
        status = _str(res[0])
        if status == "conflict":
            raise IdempotencyConflict(idempotency_key or "", _str(res[1]))
        return self._from_snapshot(res[1]), status == "created"

    def get(self, job_id: str) -> Job:
        jobs = self._get_many([job_id])
        if jobs[0] is None:
            raise JobNotFound(job_id)
        return jobs[0]

    def _get_many(self, ids: list[str]) -> list[Job | None]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=True)
        for job_id in ids:
            pipe.hgetall(self._job(job_id))
            pipe.scard(self._job(job_id, "done"))
            pipe.hlen(self._job(job_id, "failed"))
        res = pipe.execute()
        out: list[Job | None] = []
        for i in range(len(ids)):
            h, done, failed = res[3 * i : 3 * i + 3]
            out.append(self._from_hash({_str(a): _str(b) for a, b in h.items()}, done, failed) if h else None)
        return out

    def list(
        self, *, state: JobState | str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidPage(f"must be between 1 and {MAX_LIMIT}", field="limit")
        st = _state(state) if state is not None else None
        index = self._k("jobs", "state", st.value) if st else self._k("jobs", "all")
        # order: score (created ms) desc, then id desc (Redis' order for equal scores, reversed)
        candidates: list[tuple[str, int]] = []
        if cursor:
            score, last_id = _decode_cursor(cursor)
            ties = [_str(m) for m in self.redis.zrangebyscore(index, score, score)]
            candidates += [(m, score) for m in sorted((m for m in ties if m < last_id), reverse=True)]
            upper: str | int = f"({score}"
        else:
            upper = "+inf"
        # withscores=True: (member, score) pairs, which redis-py's return type does not single out
        rest = cast(
            "builtins.list[tuple[Any, float]]",
            self.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=limit + 1, withscores=True),
        )
        candidates += [(_str(m), int(s)) for m, s in rest]
        page, more = candidates[:limit], len(candidates) > limit
        jobs = [
            j for j in self._get_many([m for m, _ in page]) if j is not None and (st is None or j.state == st)
        ]
        next_cursor = _encode_cursor(page[-1][1], page[-1][0]) if more and page else None
        return jobs, next_cursor

    # -- state machine ---------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        to: JobState | str,
        *,
        expect: Iterable[JobState | str] | None = None,
        **updates: Any,
    ) -> Job:
        to = _state(to)
        unknown = set(updates) - {"outputs", "error", "message", "owner", "lease_s"}
        if unknown:
            raise TypeError(f"transition() got unknown updates: {sorted(unknown)}")
        fields: list[str] = []
        if "outputs" in updates:
            fields += ["outputs", json.dumps([str(o) for o in updates["outputs"]])]
        if "error" in updates:
            err = updates["error"]
            if err is None:
                fields += ["error", ""]
            else:
                if isinstance(err, str):
                    err = JobError(message=err)
                elif isinstance(err, dict):
                    err = JobError.model_validate(err)
                fields += ["error", err.model_dump_json()]
        owner, lease_ms = "", 0
        if to is JobState.RUNNING:
            if not updates.get("owner") or not updates.get("lease_s"):
                raise TypeError("transition(to=RUNNING) needs owner= and lease_s= (the job's lease)")
            owner, lease_ms = str(updates["owner"]), max(1, int(updates["lease_s"] * 1000))
        expect_csv = ",".join(_state(s).value for s in expect) if expect is not None else ""
        if expect is not None and not expect_csv:
            raise InvalidTransition(job_id, "?", to.value, "expect is empty: no state would do")
        now, _ = _now()
        message = updates.get("message") or to.value
        res = self._transition(
            args=[
                self.prefix,
                job_id,
                to.value,
                expect_csv,
                now.isoformat(),
                message,
                owner,
                lease_ms,
                *fields,
            ]
        )
        return self._result(job_id, res, to.value)

    def claim_next(self, owner: str, lease_s: float) -> Job | None:
        now, _ = _now()
        res = self._claim(
            args=[
                self.prefix,
                owner,
                max(1, int(lease_s * 1000)),
                now.isoformat(),
                f"running (claimed by {owner})",
            ]
        )
        if _str(res[0]) == "empty":
            return None
        return self._from_snapshot(res[1])

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(self._renew(args=[self.prefix, job_id, owner, max(1, int(lease_s * 1000))]))

    def lease_owner(self, job_id: str) -> str | None:
        v = self.redis.get(self._job(job_id, "lease"))
        return _str(v) if v is not None else None

    def expired_running(self) -> builtins.list[str]:
        return [_str(i) for i in self._expired(args=[self.prefix])]

    def requeue(self, job_id: str) -> Job:
        """running -> queued (back in line at its original place: same priority and creation time),
        lease dropped, done tiles kept. If a cancel was requested, the job is cancelled instead."""
        return self.transition(job_id, JobState.QUEUED, expect={JobState.RUNNING}, message="requeued")

    def request_cancel(self, job_id: str) -> Job:
        """queued -> cancelled at once; running -> the cancel flag (the runner stops, then moves it
        to cancelled); already cancelled -> unchanged; succeeded / failed -> InvalidTransition."""
        now, _ = _now()
        res = self._cancel(args=[self.prefix, job_id, now.isoformat()])
        return self._result(job_id, res, JobState.CANCELLED.value)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._job(job_id, "cancel")))

    # -- tiles -----------------------------------------------------------------------------------

    def tile_done(self, job_id: str, tile: str) -> bool:
        n = int(self._tile_done(args=[self.prefix, job_id, tile]))
        if n < 0:
            raise JobNotFound(job_id)
        return n == 1

    def tiles_done(self, job_id: str) -> set[str]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(self._job(job_id))
        pipe.smembers(self._job(job_id, "done"))
        exists, members = pipe.execute()
        if not exists:
            raise JobNotFound(job_id)
        return {_str(m) for m in members}

    def tile_failed(self, job_id: str, tile: str, reason: str) -> None:
        if int(self._tile_failed(args=[self.prefix, job_id, tile, reason])) < 0:
            raise JobNotFound(job_id)

    def tiles_failed(self, job_id: str) -> dict[str, str]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(self._job(job_id))
        pipe.hgetall(self._job(job_id, "failed"))
        exists, failed = pipe.execute()
        if not exists:
            raise JobNotFound(job_id)
        return {_str(a): _str(b) for a, b in failed.items()}

    def set_total(self, job_id: str, total: int) -> None:
        if total < 0:
            raise ValueError("total must be >= 0")
        if not int(self._set_total(args=[self.prefix, job_id, int(total)])):
            raise JobNotFound(job_id)

    # -- events ----------------------------------------------------------------------------------

    def publish(self, event: JobEvent) -> str:
        return _str(
            self.redis.xadd(
                self._job(event.job_id, "events"),
                {"data": event.model_dump_json()},
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )
        )

    def last_event_id(self, job_id: str) -> str:
        """The id of the newest event ("0" when there is none), to stream only what comes after."""
        newest = self.redis.xrevrange(self._job(job_id, "events"), count=1)
        return _str(newest[0][0]) if newest else "0"

    def events(
        self, job_id: str, last_id: str = "0", block_ms: int = 1000, count: int = 100
    ) -> builtins.list[tuple[str, JobEvent]]:
        """Events after `last_id` ("0": from the start, "$": only new ones), waiting up to
        `block_ms` for the first; [] on timeout. Raises JobNotFound for an unknown job."""
        key = self._job(job_id, "events")
        timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        if block_ms > 0 and timeout is not None and block_ms >= timeout * 1000:
            raise ValueError(f"block_ms={block_ms} must be below the client's socket_timeout ({timeout} s)")
        if not self.redis.exists(self._job(job_id)):
            raise JobNotFound(job_id)
        res: Any = self.redis.xread({key: last_id}, count=count, block=block_ms if block_ms > 0 else None)
        if isinstance(res, dict):  # RESP3: {key: [entries]}
            entries = next(iter(res.values()))[0] if res else []
        else:  # RESP2: [[key, entries]]
            entries = res[0][1] if res else []
        out = []
        for stream_id, fields in entries:
            data = fields.get("data", fields.get(b"data"))
            out.append((_str(stream_id), JobEvent.model_validate_json(data)))
        return out

    # -- gauges ----------------------------------------------------------------------------------

    def counts_by_state(self) -> dict[JobState, int]:
        pipe = self.redis.pipeline(transaction=True)
        for s in JobState:
            pipe.zcard(self._k("jobs", "state", s.value))
        return dict(zip(JobState, (int(n) for n in pipe.execute()), strict=True))

    def queue_depth(self) -> int:
        return int(self.redis.zcard(self._k("jobs", "queue")))

    # -- durability ------------------------------------------------------------------------------

    def persistence(self) -> Persistence:
        """From INFO persistence (aof_enabled) and, where CONFIG is allowed, the fsync policy or
        the snapshot schedule. Raises what an unreachable Redis raises."""
        try:
            info = self.redis.info("persistence")
        except redis_lib.exceptions.ResponseError as e:
            return Persistence(None, f"unknown (INFO refused: {e})")
        if "aof_enabled" not in info:
            return Persistence(None, "unknown (INFO persistence has no aof_enabled)")
        if int(info["aof_enabled"]):
            fsync = self._config("appendfsync")
            return Persistence(True, f"aof (appendfsync {fsync})" if fsync else "aof")
        save = self._config("save")
        return Persistence(False, f"rdb snapshots only (save {save!r})" if save else "none")

    def _config(self, name: str) -> str | None:
        """A CONFIG value, or None where CONFIG is renamed or switched off."""
        try:
            values: dict[Any, Any] = self.redis.config_get(name)
        except redis_lib.exceptions.ResponseError:
            return None
        value = values.get(name, values.get(name.encode()))
        return _str(value) if value is not None else None
