"""Metrics and params on their way to the tracker, without the training step waiting for it.

    Outbox           an ordered queue with a sender thread: retries with back-off, keeps
                     what the tracker has not taken (memory up to a bound, then spill
                     segments in the run folder), sends it when the tracker is back
    MlflowTransport  how an Outbox talks to MLflow (log_batch; the steps already stored)
    deliver_spilled  the driver's (or `bertflow registry register`'s) replay of the spill
                     a run left behind, with a bounded wait

Rank 0 of a training run logs through an Outbox (workflows.training.loop.RunLogger): a
`put` appends to memory and returns. The sender thread takes records in the order they
were put, and sends them with their original steps and timestamps. When a send fails
(after MLflow's own retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT) or has waited
longer than `stall_s`, one warning says the tracker is unreachable; the thread retries with
exponential back-off (1 s doubling to `MAX_BACKOFF_S`); one warning says it is back.

Bounded memory: past `memory_limit` records the oldest are written to the run folder
(`<run folder>/tracker_outbox/segment_<n>.jsonl`, one JSON record per line, each file
written whole: temporary name + rename locally, one PUT on object stores) and read back
from there; so are the unsent records at each checkpoint while the tracker is down
(`checkpoint`), so that a lost rank 0 loses nothing its checkpoint covers. A segment is
deleted once delivered. A new Outbox over the same folder (a restarted worker group, the
driver after training, `bertflow registry register`) sends the segments it finds first.

No duplicates: before its first send an Outbox reads, for every metric key, the latest
step the tracker holds (one get_run), and it never sends a metric at a step at or below
the latest one sent for its key. Within one worker group every key's steps increase, so
this drops exactly what was sent before: the steps a restarted worker group repeats
after its checkpoint, a segment delivered but not yet deleted when its writer died. A
metric's history holds each (key, step) once, the first value that reached the tracker.
Params are sent as they are (MLflow accepts the same value again).

Nothing here imports torch; MLflow is imported by MlflowTransport only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from data_prep.storage import Location, redact

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "segment_"
MEMORY_LIMIT = 20_000  # records (one metric value or param each) kept in memory
BATCH = 1000           # records per request: MLflow's log_batch takes at most 1000
MAX_BACKOFF_S = 15.0   # the longest pause between two tries
STALL_S = 60.0         # a send pending this long counts as the tracker being unreachable

Record = dict[str, Any]  # {"k", "v", "s", "t"}: a metric; {"p", "v"}: a param


class Transport(Protocol):
    """Where an Outbox delivers: `send` raises when the tracker did not take the records."""

    def latest_steps(self) -> dict[str, int]:
        """The latest step the tracker holds for each metric key of the run."""

    def send(self, records: list[Record]) -> None:
        """Store `records` (at most BATCH) in the run, or raise."""

    describe: str  # the tracker as the warnings name it (credentials redacted)


def metric_records(metrics: dict[str, float], step: int,
                   timestamp_ms: int | None = None) -> list[Record]:
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [{"k": k, "v": float(v), "s": int(step), "t": ts} for k, v in metrics.items()]


@dataclass
class _Segment:
    """A contiguous run of records in the spill folder (`records` None: not read yet)."""

    loc: Location
    count: int | None = None  # records in it (None: found on disk, not read yet)
    records: list[Record] | None = None
    done: int = 0  # records of it already delivered

    def left(self) -> int:
        if self.count is None:
            try:
                self.count = sum(1 for line in self.loc.read_text().splitlines() if line.strip())
            except OSError:
                return 0
        return self.count - self.done


class Outbox:
    """An ordered queue of records for one tracker run, sent by a thread of its own (see
    the module doc). `spill` is the folder its segments go to (None: memory only)."""

    def __init__(self, transport: Transport, spill: Location | None, *,
                 memory_limit: int = MEMORY_LIMIT, stall_s: float = STALL_S,
                 max_backoff_s: float = MAX_BACKOFF_S, start: bool = True) -> None:
        self.transport, self.spill = transport, spill
        self.memory_limit, self.stall_s, self.max_backoff_s = memory_limit, stall_s, max_backoff_s
        self._cond = threading.Condition()
        self._memory: list[Record] = []
        self._inflight: list[Record] = []       # taken from memory, being sent
        self._sending_since: float | None = None
        self._segments = self._existing_segments()
        self._next = 1 + max((_segment_number(s.loc) for s in self._segments), default=0)
        self._spill_at = memory_limit  # memory size that triggers the next spill
        self._latest: dict[str, int] | None = None  # key -> latest step the tracker holds
        self.down = False                       # warned unreachable, not yet back
        self.delivered = 0                      # records the tracker took
        self.dropped = 0                        # metrics it already held (not resent)
        self._stop = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bertflow-tracker-outbox",
                                        daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------ the caller's side

    def put_metrics(self, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Queue `metrics` at `step` (stamped now); returns at once."""
        if metrics:
            self._put(metric_records(metrics, step, timestamp_ms))

    def put_params(self, params: dict[str, Any]) -> None:
        self._put([{"p": k, "v": str(v)} for k, v in params.items()])

    def _put(self, records: list[Record]) -> None:
        with self._cond:
            self._memory.extend(records)
            self._check_stall()
            if len(self._memory) >= self._spill_at:
                self._spill_memory(include_inflight=False)
            self._cond.notify_all()

    def checkpoint(self) -> None:
        """Make what the tracker has not taken durable (a spill segment) if it is down:
        called at each checkpoint, so a restart from it loses no metric logged before."""
        with self._cond:
            self._check_stall()
            if self.down:
                self._spill_memory(include_inflight=True)

    def pending(self) -> int:
        """Records not yet delivered (in memory, being sent, or in segments)."""
        with self._cond:
            return (len(self._memory) + len(self._inflight)
                    + sum(s.left() for s in self._segments))

    def close(self, wait_s: float) -> bool:
        """Wait up to `wait_s` for every record to be delivered; then stop the thread and
        spill what is left to the run folder. True when everything was delivered."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while not self._drained() and time.monotonic() < deadline \
                    and self._thread.is_alive():
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            done = self._drained()
            self._stop.set()
            if not done:
                self._spill_memory(include_inflight=True)
            self._cond.notify_all()
        if done:
            self._thread.join(timeout=10)
        else:
            left = self.pending()
            log.warning("%d metric values and params not delivered to %s; they are kept "
                        "in %s and sent by the next run of this command or by `bertflow "
                        "registry register`", left, self.transport.describe,
                        self.spill.uri if self.spill else "memory (lost)")
        return done

    def _drained(self) -> bool:
        return not (self._memory or self._inflight or self._segments)

    def _check_stall(self) -> None:
        since = self._sending_since
        if not self.down and since is not None and time.monotonic() - since > self.stall_s:
            self._mark_down(f"no answer for {self.stall_s:.0f} s")

    def _mark_down(self, reason: str) -> None:
        self.down = True
        log.warning("tracker %s unreachable (%s): training goes on; metrics are kept (in "
                    "memory, beyond %d values in %s) and sent once it answers again",
                    self.transport.describe, redact(reason)[:300], self.memory_limit,
                    self.spill.uri if self.spill else "memory")

    def _spill_memory(self, include_inflight: bool) -> None:
        """Write memory (and a copy of the batch being sent) as the next segment; called
        with the lock held. A storage failure keeps the records in memory."""
        records = (self._inflight if include_inflight else []) + self._memory
        if not records or self.spill is None:
            return
        loc = self.spill.join(f"{SEGMENT_PREFIX}{self._next:08d}.jsonl")
        try:
            write_whole(loc, "".join(json.dumps(r) + "\n" for r in records))
        except OSError as exc:
            log.warning("could not spill %d metric values to %s (%s); kept in memory",
                        len(records), loc.uri, exc)
            self._spill_at = len(self._memory) + self.memory_limit  # not at every put
            return
        self._next += 1
        # Delivered before the copy of the batch in flight: a copy left over is dropped
        # as already sent (the steps rule of the module doc).
        self._segments.append(_Segment(loc, len(records)))
        self._memory, self._spill_at = [], self.memory_limit

    def _existing_segments(self) -> list[_Segment]:
        if self.spill is None:
            return []
        try:
            files = self.spill.list_files()
        except OSError:
            return []
        return [_Segment(f) for f in files if f.name.startswith(SEGMENT_PREFIX)
                and f.name.endswith(".jsonl")]

    # ------------------------------------------------------------ the sender thread

    def _run(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            with self._cond:
                while not self._segments and not self._memory and not self._inflight \
                        and not self._closing and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set() or self._drained():
                    if self._closing or self._stop.is_set():
                        self._cond.notify_all()
                        return
                    continue
                # The batch in flight first (segments written since are newer), then
                # the segments in order, then memory.
                segment = self._segments[0] if self._segments and not self._inflight else None
                if segment is None and not self._inflight:
                    self._inflight, self._memory = self._memory[:BATCH], self._memory[BATCH:]
                self._sending_since = time.monotonic()
            try:
                if segment is not None:
                    self._send_segment(segment)
                else:
                    self._deliver(self._inflight)
            except Exception as exc:  # the tracker (or the spill's storage) failed
                with self._cond:
                    self._sending_since = None
                    if not self.down:
                        self._mark_down(f"{type(exc).__name__}: {exc}")
                if self._stop.wait(pause):
                    return
                pause = min(pause * 2, self.max_backoff_s)
                continue
            pause = 1.0
            with self._cond:
                self._sending_since = None
                if self.down:
                    self.down = False
                    log.warning("tracker %s is back: sending the metrics kept meanwhile",
                                self.transport.describe)
                if segment is not None:
                    self._segments = [s for s in self._segments if s is not segment]
                else:
                    self._inflight = []
                self._cond.notify_all()

    def _send_segment(self, segment: _Segment) -> None:
        if segment.records is None:
            segment.records = [json.loads(line) for line in
                               segment.loc.read_text().splitlines() if line.strip()]
            segment.count = len(segment.records)
        while segment.done < len(segment.records):
            chunk = segment.records[segment.done:segment.done + BATCH]
            self._deliver(chunk)
            segment.done += len(chunk)
        segment.loc.delete()

    def _deliver(self, records: list[Record]) -> None:
        """Send `records` less the metrics the tracker already holds at their step."""
        if self._latest is None:
            self._latest = dict(self.transport.latest_steps())
        fresh = [r for r in records if "p" in r or r["s"] > self._latest.get(r["k"], -1)]
        if fresh:
            self.transport.send(fresh)
        for r in fresh:
            if "k" in r:
                self._latest[r["k"]] = max(r["s"], self._latest.get(r["k"], -1))
        self.delivered += len(fresh)
        self.dropped += len(records) - len(fresh)


def _segment_number(loc: Location) -> int:
    digits = loc.name[len(SEGMENT_PREFIX):].split(".", 1)[0]
    return int(digits) if digits.isdigit() else 0


def write_whole(loc: Location, text: str) -> None:
    """Write a file that readers see whole or not at all (temporary name + rename
    locally; one PUT on an object store)."""
    if not loc.local:
        loc.write_text(text)
        return
    tmp = loc.with_path(f"{loc.path}.tmp")
    tmp.write_text(text)
    loc.fs.move(tmp.path, loc.path)


class MlflowTransport:
    """An MLflow run as an Outbox's destination. `run_id` may be a function returning it
    (a sweep trial's rank 0 opens its run itself). Everything that needs the tracker is
    done by the sender thread, at first contact (`latest_steps`): opening the run, marking
    it RUNNING again (a resumed run was FAILED), `on_run(run_id)` (the system-metrics
    monitor), so a tracker that is down holds up nothing in training."""

    def __init__(self, tracking_uri: str, run_id: str | Callable[[], str],
                 on_run: Callable[[str], None] | None = None, reopen: bool = False) -> None:
        self.tracking_uri, self._run_id, self.on_run, self.reopen = (tracking_uri, run_id,
                                                                     on_run, reopen)
        self.describe = redact(tracking_uri)
        self._client = None

    @property
    def run_id(self) -> str:
        if callable(self._run_id):
            self._run_id = self._run_id()
        return self._run_id

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def latest_steps(self) -> dict[str, int]:
        run = self.client.get_run(self.run_id)
        if self.reopen and run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        if self.on_run is not None:
            on_run, self.on_run = self.on_run, None
            on_run(self.run_id)
        return {m.key: int(m.step) for m in run.data.to_proto().metrics}

    def send(self, records: list[Record]) -> None:
        from mlflow.entities import Metric, Param

        metrics = [Metric(r["k"], r["v"], r["t"], r["s"]) for r in records if "k" in r]
        params = [Param(r["p"], r["v"]) for r in records if "p" in r]
        self.client.log_batch(self.run_id, metrics=metrics, params=params, synchronous=True)


def deliver_spilled(spill: Location, tracking_uri: str, run_id: str, wait_s: float) -> bool:
    """Send the segments a run left in `spill` (its tracker_outbox folder) to run
    `run_id`, waiting up to `wait_s` for the tracker; True when nothing is left."""
    outbox = Outbox(MlflowTransport(tracking_uri, run_id), spill)
    return outbox.close(wait_s)
