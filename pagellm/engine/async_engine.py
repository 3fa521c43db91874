"""AsyncLLMEngine: the engine behind an asyncio server, with the engine core in its own process.

    API process (this class, beside the HTTP server)              engine-core process(es)
    -------------------------------------------------              -----------------------
    process_input: tokenize + validate (InputProcessor)
    generate(): pick the least loaded replica, register a stream,
        send AddRequest ---------------------------------------->  scheduler + executor
    reader thread per replica  <---------------------------------  CoreOutput after every step
        OutputProcessor (detokenize, stop strings; a match sends
        FinishSequence back), deliver RequestOutputs to the
        per-request asyncio queues
    a cancelled stream (client gone) sends AbortRequests: its KV blocks are freed at once

Request handling never waits on the engine's interpreter lock: a busy engine does not stall
/health, and tokenization runs beside the server, not in the engine. `data_parallel_size` replicas
(each a core with its own KV cache and its own tensor-parallel workers) sit behind one client;
a new request goes to the replica with the fewest running + waiting requests.

A replica whose core reports a dead worker, or whose process exits, is dead: its requests fail with
an error, new requests go to the others, and `dead` says why (the server's /health answers 503).
With `separate_process=False` the same core loop runs on a thread of this process (over a pipe).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from multiprocessing import Pipe
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerStats, check_request_fits
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.core import EngineBusyError, EngineCounters, EngineDeadError, EngineSleepingError
from pagellm.engine.core_proc import (
    AbortRequests,
    AddRequest,
    CoreCall,
    CoreFailed,
    CoreOutput,
    CoreReady,
    CoreReply,
    CoreSnapshot,
    FinishSequence,
    LoRAUpdate,
    Shutdown,
    SnapshotRequest,
    run_engine_core,
)
from pagellm.engine.input_processor import InputProcessor, ProcessedInput, PromptType
from pagellm.engine.llm_engine import load_tokenizer
from pagellm.engine.output_processor import OutputProcessor
from pagellm.outputs import PoolingRequestOutput, RequestOutput
from pagellm.pooling_params import PoolingParams
from pagellm.sampling_params import ParamError, SamplingParams
from pagellm.structured_output.manager import make_manager

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes

__all__ = ["AsyncLLMEngine", "EngineBusyError", "EngineDeadError", "EngineSleepingError", "QueueFullError",
           "RequestFailedError"]


# the errors of an engine-core call that keep their type across the connection (the server maps them: 400, 409, 503)
_CALL_ERRORS = {e.__name__: e for e in (ValueError, EngineBusyError, EngineDeadError)}


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests (the server answers 429)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (the message says why); other requests go on."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    replica: EngineReplica


def replica_gpus(index: int, world: int, visible: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for data-parallel replica `index` of engines of `world` ranks each (tensor x pipeline):
    its own `world` GPUs out of the `visible` ones, or None (every replica sees them all) when there are too few."""
    if len(visible) < (index + 1) * world:
        return None
    return ",".join(visible[index * world:(index + 1) * world])


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class EngineReplica:
    """One engine core and the API side's state for it: the connection, the detokenizer, the latest stats."""

    def __init__(self, index: int, config: EngineConfig, tokenizer, separate_process: bool) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.conn = self._start_process(config) if separate_process else self._start_thread(config)
        self.output_processor = OutputProcessor(tokenizer)
        self.lock = threading.Lock()  # the output processor: reader thread vs event loop (adds, aborts)
        self.send_lock = threading.Lock()
        self.stats: SchedulerStats | None = None
        self.counters = EngineCounters()
        self.dead: str | None = None
        self.snapshots: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}  # token -> waiter
        self.num_blocks = self._wait_ready()

    def _env(self, config: EngineConfig) -> dict | None:
        """The core process's environment: with data parallelism on CUDA, each replica its own GPUs (its ranks take
        them in order, distributed/parallel.py)."""
        p = config.parallel
        if p.data_parallel_size == 1 or config.device.device != "cuda":
            return None
        gpus = replica_gpus(self.index, p.world_size, _visible_gpus())
        if gpus is None:
            logger.warning("data parallelism: fewer GPUs than %d replicas x %d ranks; the replicas share them",
                           p.data_parallel_size, p.world_size)
            return None
        return {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}

    def _start_process(self, config: EngineConfig) -> Connection:
        authkey = secrets.token_bytes(32)
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            server.settimeout(1.0)
            host, port = server.getsockname()
            self.proc = subprocess.Popen([sys.executable, "-m", "pagellm.engine.core_main", host, str(port)],
                                         stdin=subprocess.PIPE, env=self._env(config))
            self.proc.stdin.write(pickle.dumps((authkey, config, logging.getLogger("pagellm").getEffectiveLevel())))
            self.proc.stdin.close()
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    sock, _ = server.accept()
                    break
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"the engine process exited with code {self.proc.returncode} while "
                                           "starting (its error is above)") from None
                    if time.monotonic() > deadline:
                        self.proc.kill()
                        raise RuntimeError("the engine process did not start in time") from None
        sock.settimeout(None)
        conn = Connection(sock.detach())
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
        return conn

    def _start_thread(self, config: EngineConfig) -> Connection:
        ours, theirs = Pipe()
        self.thread = threading.Thread(target=run_engine_core, args=(config, theirs), name=f"pagellm-core{self.index}",
                                       daemon=True)
        self.thread.start()
        return ours

    def _wait_ready(self) -> int:
        while not self.conn.poll(1.0):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the engine process exited with code {self.proc.returncode} while loading the "
                                   "model (its error is above)")
            if self.thread is not None and not self.thread.is_alive():
                raise RuntimeError("the engine thread stopped while loading the model (its error is above)")
        msg = self.conn.recv()
        if isinstance(msg, CoreFailed):
            raise (ValueError if msg.is_value_error else RuntimeError)(msg.error)
        if not isinstance(msg, CoreReady):
            raise RuntimeError(f"unexpected first message from the engine core: {type(msg).__name__}")
        return msg.num_blocks

    def send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    @property
    def load(self) -> int:
        s = self.stats
        return 0 if s is None else s.num_running_reqs + s.num_waiting_reqs

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.send(Shutdown())
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.thread is not None:
            self.thread.join(timeout)
        self.conn.close()


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, separate_process: bool = True) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer) if config.model.tokenizer else None
        m = config.model
        self.input_processor = InputProcessor(m, self.tokenizer,
                                              make_manager(None, self.tokenizer, m.vocab_size, m.eos_token_ids),
                                              config.scheduler.max_num_batched_tokens, config.cache.block_size)
        self.max_waiting_requests = config.scheduler.max_waiting_requests
        self._streams: dict[str, _Stream] = {}  # touched by the event loop and the reader threads under _lock
        self._lock = threading.Lock()
        self._accepting = True
        self.sleeping = False  # sleep mode: requests are refused (503) until wake_up leaves nothing asleep
        self._tokens = itertools.count()
        self.replicas: list[EngineReplica] = []
        try:
            for i in range(config.parallel.data_parallel_size):
                self.replicas.append(EngineReplica(i, config, self.tokenizer, separate_process))
        except BaseException:
            for r in self.replicas:
                r.close()
            raise
        self._readers = [threading.Thread(target=self._read, args=(r,), name=f"pagellm-reader{r.index}", daemon=True)
                         for r in self.replicas]
        for t in self._readers:
            t.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, separate_process: bool = True) -> AsyncLLMEngine:
        return cls(args.create_engine_config(), separate_process)

    # ---- state the server reads ----------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """KV cache blocks of each replica."""
        return self.replicas[0].num_blocks

    @property
    def dead(self) -> str | None:
        """Why a replica can serve nothing more, or None while all are healthy."""
        reasons = [f"replica {r.index}: {r.dead}" if len(self.replicas) > 1 else r.dead
                   for r in self.replicas if r.dead is not None]
        return "; ".join(reasons) or None

    @property
    def replica_stats(self) -> list[SchedulerStats | None]:
        return [r.stats for r in self.replicas]

    @property
    def stats(self) -> SchedulerStats:
        """Every replica's latest scheduler stats, summed (kv_cache_usage: the mean)."""
        known = [s for s in self.replica_stats if s is not None]
        if not known:
            return SchedulerStats(0, 0, 0.0, self.num_blocks * len(self.replicas), self.num_blocks * len(self.replicas),
                                  0, 0, 0)
        total = {f.name: sum(getattr(s, f.name) for s in known) for f in fields(SchedulerStats)}
        total["kv_cache_usage"] = sum(s.kv_cache_usage for s in known) / len(known)
        return SchedulerStats(**total)

    @property
    def counters(self) -> EngineCounters:
        return EngineCounters(*(sum(getattr(r.counters, f.name) for r in self.replicas)
                                for f in fields(EngineCounters)))

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    # ---- caller side ----------------------------------------------------------------

    def process_input(self, prompt: PromptType, params: SamplingParams, max_seqs: int | None = None,
                      logprobs_cap: bool = True) -> ProcessedInput:
        """Tokenize and validate now (ValueError), so a server can answer 400 before streaming anything.
        `max_seqs`: sequences it runs at once (default best_of); `logprobs_cap=False` for beam candidates."""
        inp = self.input_processor.process(prompt, params, logprobs_cap)
        check_request_fits(self.config.scheduler, self.config.cache.block_size, self.num_blocks,
                           self.config.model.sliding_window, len(inp.prompt_token_ids), inp.params.max_tokens or 0,
                           max_seqs if max_seqs is not None else inp.params.best_of)
        return inp

    def process_pooling_input(self, prompt: PromptType, params: PoolingParams) -> ProcessedInput:
        """A pooling model's request, tokenized and validated now (ValueError); run it with generate()."""
        inp = self.input_processor.process_pooling(prompt, params)
        check_request_fits(self.config.scheduler, self.config.cache.block_size, self.num_blocks,
                           self.config.model.sliding_window, len(inp.prompt_token_ids), 1, 1)
        return inp

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams,
                     request_id: str) -> AsyncIterator[PoolingRequestOutput]:
        """A pooling model's output for one prompt (one item, finished). Cancelling aborts it."""
        async for out in self.generate(self.process_pooling_input(prompt, pooling_params), None, request_id):
            yield out

    def check_capacity(self, num_requests: int) -> None:
        """Before any work: ParamError if num_requests could never be queued at once, QueueFullError (429)
        if the queue has no room for them now."""
        limit = self.max_waiting_requests
        if limit is None:
            return
        if num_requests > limit:
            raise ParamError(f"the request holds {num_requests} prompts, but the server queues at most {limit} "
                             "requests (--max-waiting-requests); send fewer prompts per request.", param="prompt")
        waiting = self._num_waiting()
        if waiting + num_requests > limit:
            raise QueueFullError(f"{waiting} requests are waiting (max_waiting_requests={limit}); try again later")

    def _num_waiting(self) -> int:
        # Live requests not known to be running are waiting (the running count is the cores' last report,
        # so in doubt this counts more as waiting, never fewer).
        with self._lock:
            return len(self._streams) - self.stats.num_running_reqs

    def _pick_replica(self) -> EngineReplica:
        live = [r for r in self.replicas if r.dead is None]
        if not live:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        with self._lock:
            mine = {r.index: 0 for r in live}
            for s in self._streams.values():
                if s.replica.index in mine:
                    mine[s.replica.index] += 1
        # the API side's own in-flight count is the freshest load figure; the core's stats break ties
        return min(live, key=lambda r: (mine[r.index], r.load, r.index))

    async def generate(self, prompt: PromptType | ProcessedInput, params: SamplingParams | None,
                       request_id: str, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request (deltas if params.output_kind is DELTA). Cancelling aborts it."""
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if self.sleeping:
            raise EngineSleepingError("the engine is asleep (sleep mode): POST /wake_up before sending requests.")
        inp = prompt if isinstance(prompt, ProcessedInput) else self.process_input(prompt, params or SamplingParams())
        if lora_request is not None:
            inp.lora = lora_request
        replica = self._pick_replica()
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), replica)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use.")
            waiting = len(self._streams) - self.stats.num_running_reqs
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"{waiting} requests are waiting (max_waiting_requests="
                                     f"{self.max_waiting_requests}); try again later")
            self._streams[request_id] = stream
        arrival = time.monotonic()
        with replica.lock:
            replica.output_processor.add_request(request_id, inp.prompt, inp.prompt_token_ids, inp.params, arrival,
                                                 embeds=inp.embeds_prompt)
        finished = False
        try:
            replica.send(AddRequest(request_id, inp, arrival))
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
                self._abort(replica, [request_id])
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            self._abort(stream.replica, [request_id])

    def _abort(self, replica: EngineReplica, ids: list[str]) -> None:
        with replica.lock:
            replica.output_processor.abort(ids)
        try:
            replica.send(AbortRequests(ids))
        except OSError:
            pass  # the core is gone: nothing holds the request's blocks

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to drain_timeout, then abort the rest and stop
        the engine cores."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            pending = list(self._streams.items())
        for rid, stream in pending:  # each stream ends with an abort output (finish_reason "abort")
            with stream.replica.lock:
                outs = stream.replica.output_processor.abort([rid])
            try:
                stream.replica.send(AbortRequests([rid]))
            except OSError:
                pass
            for out in outs:
                self._deliver(rid, out)
        deadline = time.monotonic() + 5
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, r.close) for r in self.replicas))

    # ---- reader threads -------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    async def _ask_cores(self, message, timeout: float) -> list:
        """Send message(token) to every replica's core and wait for each answer (None from a core that cannot be
        reached or does not answer in time, e.g. dead)."""
        loop = asyncio.get_running_loop()
        waits = []
        for r in self.replicas:
            token = next(self._tokens)
            fut = loop.create_future()
            r.snapshots[token] = (loop, fut)
            try:
                r.send(message(token))
            except OSError:
                fut.set_result(None)
            waits.append((r, token, fut))
        out = []
        for r, token, fut in waits:
            try:
                out.append(await asyncio.wait_for(fut, timeout))
            except asyncio.TimeoutError:
                out.append(None)
            r.snapshots.pop(token, None)
        return out

    async def snapshot(self, timeout: float = 2.0) -> list[CoreSnapshot | None]:
        """Each replica's block map and request table, taken by its core between steps (None if it did not
        answer in time)."""
        return await self._ask_cores(SnapshotRequest, timeout)

    async def update_lora(self, lora, load: bool, timeout: float = 120.0) -> list:
        """Load (load=True) or unload a LoRA adapter in every replica's core. Returns their answers (the adapter
        was new / was loaded); ValueError with the first refusal."""
        replies = await self._ask_cores(lambda token: LoRAUpdate(token, lora, load), timeout)
        for reply in replies:
            if reply is None:
                raise RuntimeError("an engine replica did not answer the LoRA update (dead or busy)")
            if reply.error is not None:
                raise ValueError(reply.error)
        return [reply.value for reply in replies]

    # ---- between rollouts (engine/core.py): every replica's core -----------------------

    async def call_cores(self, method: str, *args, timeout: float = 600.0, **kwargs) -> list:
        """An EngineCore call (core_proc.CORE_CALLS) on every replica; their answers. A ValueError (or the error's
        type and message) from the first core that refused."""
        replies = await self._ask_cores(lambda token: CoreCall(token, method, args, kwargs), timeout)
        for reply in replies:
            if reply is None:
                raise RuntimeError(f"an engine replica did not answer {method}() (dead, or still busy after "
                                   f"{timeout:.0f}s)")
            if reply.error is not None:
                kind = _CALL_ERRORS.get(reply.error_type)
                raise kind(reply.error) if kind else RuntimeError(f"{reply.error_type}: {reply.error}")
        return [reply.value for reply in replies]

    async def sleep(self, level: int = 1) -> None:
        """Sleep mode on every replica (needs enable_sleep_mode and no request in flight); new requests get 503."""
        self.sleeping = True
        try:
            await self.call_cores("sleep", level)
        finally:
            self.sleeping = any(await self.call_cores("is_sleeping"))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        try:
            await self.call_cores("wake_up", tags)
        finally:
            self.sleeping = any(await self.call_cores("is_sleeping"))

    async def is_sleeping(self) -> bool:
        return any(await self.call_cores("is_sleeping"))

    async def reset_prefix_cache(self) -> bool:
        """True when every replica forgot its cached prefixes (False: requests held blocks somewhere)."""
        return all(await self.call_cores("reset_prefix_cache"))

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list:
        """A worker method on every rank of every replica: the results, replica after replica, in rank order."""
        out = await self.call_cores("collective_rpc", method, tuple(args), kwargs or {},
                                    timeout=timeout if timeout is not None else 600.0)
        return [r for replica in out for r in replica]

    def _read(self, replica: EngineReplica) -> None:
        while True:
            try:
                msg = replica.conn.recv()
            except (EOFError, OSError):
                self._replica_gone(replica)
                return
            if isinstance(msg, CoreOutput):
                self._handle(replica, msg)
            elif isinstance(msg, (CoreSnapshot, CoreReply)):
                waiter = replica.snapshots.pop(msg.token, None)
                if waiter is not None:
                    loop, fut = waiter
                    loop.call_soon_threadsafe(lambda f=fut, m=msg: f.done() or f.set_result(m))

    def _handle(self, replica: EngineReplica, msg: CoreOutput) -> None:
        if msg.stats is not None:
            replica.stats, replica.counters = msg.stats, msg.counters
        for rid, why in msg.rejected:
            with replica.lock:
                replica.output_processor.abort([rid])
            self._deliver(rid, EngineDeadError(why) if "EngineDeadError" in why else
                          EngineSleepingError(why) if "EngineSleepingError" in why else ValueError(why))

        def on_stop(rid: str, index: int, stop: str) -> bool:
            replica.send(FinishSequence(rid, index, stop))
            return replica.output_processor.all_finished(rid)

        with replica.lock:
            failed = replica.output_processor.abort(msg.failed, error=msg.error) if msg.failed else []
            outs = replica.output_processor.process(msg.updates, on_stop)
        for out in failed:
            self._deliver(out.request_id, RequestFailedError(out.error or "the engine failed the request"))
        for out in outs:
            self._deliver(out.request_id, out)
        if msg.dead is not None and replica.dead is None:
            replica.dead = msg.dead
            logger.error("engine replica %d is dead: %s", replica.index, msg.dead)

    def _replica_gone(self, replica: EngineReplica) -> None:
        if replica.dead is None and self._accepting:
            code = replica.proc.poll() if replica.proc is not None else None
            replica.dead = f"the engine process exited (code {code})" if replica.proc is not None else \
                "the engine thread stopped"
            logger.error("engine replica %d: %s", replica.index, replica.dead)
        with self._lock:
            mine = [rid for rid, s in self._streams.items() if s.replica is replica]
        for rid in mine:
            self._deliver(rid, RequestFailedError(f"engine dead: {replica.dead or 'shut down'}"))

