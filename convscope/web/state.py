"""The web app's state, and the only cache in convscope: loaded models, jobs, the temp area.

- ``ModelCache``: a small LRU of ``LoadedModel`` objects, each loaded once and shared by all
  requests, with a ``ModelLock``: forwards that attach nothing (classification) share the model,
  while a method that registers hooks, swaps a rectifier rule or replaces modules (everything
  else) has it to itself, because a hook on a shared module sees every thread's forward pass.
- ``JobStore``: slow methods run on a worker thread with progress, and can be cancelled; a few
  finished jobs are kept for their pictures, the oldest dropped first.
- ``TempArea``: a private ``0700`` folder for uploads, removed when the app stops.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convscope.types import LoadedModel


class ModelLock:
    """Readers-writer lock: many hook-free forwards at once, or one method that attaches hooks.

    Writers are preferred (a waiting writer blocks new readers), so a stream of classify
    requests cannot starve a Grad-CAM.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def hold(self, exclusive: bool) -> Any:
        return self.exclusive() if exclusive else self.shared()


@dataclass
class ModelEntry:
    """A cached model, its lock, and facts about it computed once (layer list)."""

    loaded: LoadedModel
    lock: ModelLock = field(default_factory=ModelLock)
    info: dict[str, Any] | None = None


Loader = Callable[..., LoadedModel]
"""``loader(name, weights)``, or ``loader(name, weights, output_index)`` when an index is given."""


class ModelCache:
    """LRU of loaded models keyed by ``(name, weights, output_index)``; each is loaded once, even
    when many requests ask for it at the same moment."""

    def __init__(self, loader: Loader, *, capacity: int = 2) -> None:
        self._loader = loader
        self._capacity = max(1, capacity)
        self._entries: OrderedDict[tuple[str | None, str | None, int | str | None], ModelEntry] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[tuple[str | None, str | None, int | str | None], threading.Lock] = {}

    def get(self, name: str | None, weights: str | None, output_index: int | str | None = None) -> ModelEntry:
        key = (name, weights, output_index)
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._guard:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry
            # outside the guard: loading takes seconds
            loaded = (self._loader(name, weights) if output_index is None
                      else self._loader(name, weights, output_index))
            entry = ModelEntry(loaded)
            with self._guard:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                while len(self._entries) > self._capacity:
                    self._entries.popitem(last=False)  # in-flight requests keep their reference
                self._loading.pop(key, None)
            return entry

    def loaded(self) -> list[LoadedModel]:
        with self._guard:
            return [entry.loaded for entry in self._entries.values()]


class JobCancelled(Exception):
    """Raised inside a job's progress callback to stop the method."""


@dataclass
class Job:
    """A slow method running on the worker thread.

    ``status``: ``queued``, ``running``, ``done``, ``error`` or ``cancelled``; ``done``/``total``:
    work units (occluded or masked copies, projections), ``total`` ``None`` when the method cannot
    tell in advance (Score-CAM: the layer's channels); ``result``: the rendered ``Views`` when done.
    """

    id: str
    method: str
    status: str = "queued"
    done: int = 0
    total: int | None = None
    error: str | None = None
    result: Any = None
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def progress(self, units: int) -> None:
        if self.cancel.is_set():
            raise JobCancelled(self.id)
        self.done += int(units)

    def as_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id, "method": self.method, "status": self.status,
            "progress": {"done": self.done, "total": self.total},
        }
        if self.error is not None:
            payload["error"] = self.error
        if self.result is not None:
            payload["views"] = [{"key": v.key, "title": v.title, "caption": v.caption} for v in self.result.views]
            payload["record"] = self.result.record
        return payload


class JobStore:
    """Runs jobs one at a time on a worker thread (they hold the model exclusively anyway)."""

    def __init__(self, *, keep: int = 16, workers: int = 1) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._guard = threading.Lock()
        self._keep = keep
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convscope-job")

    def submit(self, method: str, total: int | None, work: Callable[[Job], Any],
               describe: Callable[[BaseException], str]) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], method=method, total=total)
        with self._guard:
            self._jobs[job.id] = job
            self._trim()

        def run() -> None:
            try:
                if job.cancel.is_set():
                    job.status = "cancelled"
                    return
                job.status = "running"
                job.result = work(job)
                job.status = "done"
            except JobCancelled:
                job.status = "cancelled"
            except Exception as exc:  # noqa: BLE001 - one line for the page; the server carries on
                job.error = describe(exc)
                job.status = "error"
            finally:
                job.finished = time.monotonic()
                job.stopped.set()

        self._pool.submit(run)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._guard:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, *, wait: float = 0.0) -> Job | None:
        """Ask a job to stop; it does at its next progress step (every method reports one per
        forward batch). ``wait``: seconds to wait for it to stop, so the answer says ``cancelled``."""
        job = self.get(job_id)
        if job is not None:
            job.cancel.set()
            if job.status == "queued":
                job.status = "cancelled"
            elif wait > 0:
                job.stopped.wait(wait)
        return job

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._guard:
            out: dict[str, int] = {}
            for job in self._jobs.values():
                out[job.status] = out.get(job.status, 0) + 1
            return out

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in ("done", "error", "cancelled")]
        while len(self._jobs) > self._keep and finished:
            self._jobs.pop(finished.pop(0).id, None)

    def shutdown(self) -> None:
        with self._guard:
            for job in self._jobs.values():
                job.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class TempArea:
    """A private folder (mode 0700) for uploaded bytes; ``close()`` removes it and all inside."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="convscope-web-"))
        # Also at interpreter exit, for apps that were built but never started or stopped.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), ignore_errors=True)

    @contextmanager
    def file(self, data: bytes, suffix: str = "") -> Iterator[Path]:
        """Write ``data`` to a fresh private file for the block, then delete it."""
        path = self.root / (uuid.uuid4().hex + suffix)
        try:
            with open(path, "xb") as handle:
                handle.write(data)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._finalizer()
