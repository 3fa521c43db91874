"""AsyncLLMEngine: the engine behind an asyncio server.

    caller (event loop)                       engine thread
    generate(prompt, params) --validate-->    (ValueError raised to the caller at once)
        submit(add) ------------------------> add_request
        async for out in stream  <--------    step() -> RequestOutput -> loop.call_soon_threadsafe(queue.put)
        cancelled / disconnected --abort-->   abort_request (every block freed)

One thread owns the LLMEngine and runs steps while any request is active, so
model steps never block the event loop. Commands (add, abort) reach it
through a queue and are applied between steps. An exception inside a step
fails the requests it touched (the engine's own handling) and the loop goes
on; if the loop itself hits a bug, every active request gets the error and
the loop keeps serving new ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagellm.core.scheduler import SchedulerStats
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.input_processor import ProcessedInput, PromptType
from pagellm.engine.llm_engine import EngineDeadError, LLMEngine
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import ParamError, SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests (the server answers 429)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (the message says why); other requests go on."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # touched by both threads under _lock
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._accepting = True
        self.stats: SchedulerStats = engine.get_stats()  # snapshot refreshed by the engine thread
        self.counters = engine.stats
        self._thread = threading.Thread(target=self._run, name="pagellm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        cfg = args.create_engine_config()
        return cls(LLMEngine(cfg), cfg.scheduler.max_waiting_requests)

    # ---- caller side ----------------------------------------------------------------

    def process_input(self, prompt: PromptType, params: SamplingParams) -> ProcessedInput:
        """Validate now (ValueError), so a server can answer 400 before streaming anything."""
        return self.engine.process_input(prompt, params)

    def check_capacity(self, num_requests: int) -> None:
        """Before any work: ParamError if num_requests could never be queued at once, QueueFullError (429)
        if the queue has no room for them now."""
        limit = self.max_waiting_requests
        if limit is None:
            return
        if num_requests > limit:
            raise ParamError(f"the request holds {num_requests} prompts, but the server queues at most {limit} "
                             "requests (--max-waiting-requests); send fewer prompts per request.", param="prompt")
        with self._lock:
            waiting = len(self._streams) - self.stats.num_running_reqs
        if waiting + num_requests > limit:
            raise QueueFullError(f"{waiting} requests are waiting (max_waiting_requests={limit}); try again later")

    @property
    def dead(self) -> str | None:
        """Why the engine can serve nothing more, or None while it is healthy."""
        return self.engine.dead

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, prompt: PromptType | ProcessedInput, params: SamplingParams | None,
                       request_id: str, policy: Any = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request (deltas if params.output_kind is DELTA). Cancelling aborts it."""
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if self.engine.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.engine.dead}")
        inp = prompt if isinstance(prompt, ProcessedInput) else self.process_input(prompt, params or SamplingParams())
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use.")
            # Live requests not known to be running are waiting (the running count is the engine's last
            # snapshot, so in doubt this counts more as waiting, never fewer).
            waiting = len(self._streams) - self.stats.num_running_reqs
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"{waiting} requests are waiting (max_waiting_requests="
                                     f"{self.max_waiting_requests}); try again later")
            self._streams[request_id] = stream
        self._submit(("add", request_id, inp, policy))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(("abort", request_id))
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        self._wakeup.set()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to drain_timeout, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._submit(("abort", rid))
        deadline = time.monotonic() + 5
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wakeup.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # ---- engine thread --------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, inp, policy = cmd
                try:
                    self.engine.add_request(rid, inp, policy=policy)
                except (ValueError, EngineDeadError) as e:
                    self._deliver(rid, e)
            else:
                for out in self.engine.abort_request(cmd[1]):
                    self._deliver(out.request_id, out)

    def _run(self) -> None:
        while not self._stopping:
            self._apply_commands()
            for out in self.engine.check_health():  # a dead worker fails what is in flight, even when idle
                self._deliver(out.request_id, RequestFailedError(out.error or "engine dead"))
            if not self.engine.has_unfinished_requests():
                self.stats = self.engine.get_stats()
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug outside the model step: fail what is active, keep serving
                logger.exception("engine step failed")
                ids = list(self.engine.scheduler.requests)
                self.engine.abort_request(ids)
                for rid in ids:
                    self._deliver(rid, RequestFailedError(f"{type(e).__name__}: {e}"))
                continue
            self.stats = self.engine.get_stats()
            for out in outputs:
                if out.error is not None:
                    self._deliver(out.request_id, RequestFailedError(out.error))
                else:
                    self._deliver(out.request_id, out)

