"""The engine core's loop and the messages it exchanges with the API side, over one connection.

    API side (AsyncLLMEngine)                         engine core (this loop: a process, or a thread)
    AddRequest(id, ProcessedInput, arrival)  ------>  EngineCore.add_request
    AbortRequests(ids)                       ------>  EngineCore.abort_requests
    FinishSequence(id, index, stop)          ------>  EngineCore.finish_sequence   (a stop string matched)
    SnapshotRequest(token)                   ------>  (dashboard) block map and request table
    CoreCall(token, method, args, kwargs)    ------>  EngineCore.sleep / wake_up / is_sleeping /
                                                      reset_prefix_cache / collective_rpc
    Shutdown()                               ------>  stop the executor, exit
                                             <------  CoreReady(num_blocks)         (once, after loading)
                                             <------  CoreOutput(updates, failed, stats, counters, dead)
                                                      (after every step; once more when it goes idle)
                                             <------  CoreSnapshot(token, block_map, requests)
                                             <------  CoreReply(token, error, value)   (LoRAUpdate, CoreCall)

The connection is a multiprocessing Connection: pickled dataclasses over a local socket (the engine
process of `pagellm serve`) or a pipe (the same loop on a thread). Per step, what crosses is each
running request's new token ids and logprobs (tens of bytes per sequence) one way, and new requests
(their token ids) the other. The core never tokenizes or detokenizes.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from pagellm.config import EngineConfig
from pagellm.core.sched_output import RequestUpdate
from pagellm.core.scheduler import SchedulerStats
from pagellm.engine.core import EngineCore, EngineCounters
from pagellm.engine.input_processor import ProcessedInput

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle core checks its workers' health


# ---- API side -> core -------------------------------------------------------------------

@dataclass
class AddRequest:
    request_id: str
    inp: ProcessedInput  # validated and tokenized on the API side
    arrival_time: float  # time.monotonic() on the API side (same machine: the clocks agree)


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class FinishSequence:
    request_id: str
    index: int  # which of the request's sequences
    stop: str  # the stop string that ended it


@dataclass
class Shutdown:
    pass


@dataclass
class SnapshotRequest:
    token: int  # echoed in the reply


@dataclass
class LoRAUpdate:
    """Load (or unload) a LoRA adapter at run time; answered by CoreReply."""

    token: int  # echoed in the reply
    lora: object  # the LoRARequest
    load: bool  # False: unload


@dataclass
class CoreCall:
    """One of the core's calls between rollouts (CORE_CALLS), answered by CoreReply."""

    token: int
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


CORE_CALLS = frozenset({"sleep", "wake_up", "is_sleeping", "reset_prefix_cache", "collective_rpc"})


@dataclass
class CoreReply:
    token: int
    error: str | None = None  # why the call was refused (a ValueError's message), None when done
    value: object = None
    error_type: str | None = None  # the exception's type name (CoreCall)


@dataclass
class CoreSnapshot:
    """What the dashboard shows of one engine core, taken between steps."""

    token: int
    block_map: bytes  # one byte per KV block (KVCacheManager.block_map)
    requests: list[dict]  # running, then waiting requests (Scheduler.request_table)


# ---- core -> API side -------------------------------------------------------------------

@dataclass
class CoreReady:
    num_blocks: int  # KV cache blocks (the API side checks that requests fit)


@dataclass
class CoreFailed:
    """The core could not start (instead of CoreReady): a configuration it refuses, e.g. a LoRA adapter."""

    error: str
    is_value_error: bool  # a ValueError: the user's input, reported as one line


@dataclass
class CoreOutput:
    updates: list[RequestUpdate] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # requests ended by an error
    error: str | None = None  # why they failed
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request id, why) not queued at all
    stats: SchedulerStats | None = None  # after this step
    counters: EngineCounters | None = None
    dead: str | None = None  # set once the core can run no more steps


def run_engine_core(config: EngineConfig, conn: Connection) -> None:
    """Build the core, then serve messages and steps until Shutdown or until the connection closes."""
    try:
        core = EngineCore(config)
    except ValueError as e:
        conn.send(CoreFailed(str(e), True))
        return
    except Exception as e:
        conn.send(CoreFailed(f"{type(e).__name__}: {e}", False))
        raise
    conn.send(CoreReady(core.num_blocks))
    reported_idle = False
    try:
        while True:
            busy = core.has_unfinished_requests()
            out = CoreOutput()
            if conn.poll(0 if busy else IDLE_POLL_S):
                if not _apply_messages(core, conn, out):
                    return
            health = core.check_health()
            out.failed += health.failed
            out.error = out.error or health.error
            if core.has_unfinished_requests():
                step = core.step()
                out.updates, out.failed, out.error = step.updates, out.failed + step.failed, out.error or step.error
                reported_idle = False
            elif reported_idle and not (out.failed or out.rejected):
                continue
            else:
                reported_idle = True
            out.stats, out.counters, out.dead = core.get_stats(), core.counters, core.dead
            conn.send(out)
    except (EOFError, OSError):
        logger.warning("the API side went away; the engine core stops")
    finally:
        core.shutdown()


def _apply_messages(core: EngineCore, conn: Connection, out: CoreOutput) -> bool:
    """Apply every message waiting; False on Shutdown."""
    while conn.poll(0):
        msg = conn.recv()
        if isinstance(msg, AddRequest):
            try:
                core.add_request(msg.request_id, msg.inp, msg.arrival_time)
            except Exception as e:  # noqa: BLE001 - the request is refused, the core goes on
                out.rejected.append((msg.request_id, f"{type(e).__name__}: {e}"))
        elif isinstance(msg, AbortRequests):
            core.abort_requests(msg.request_ids)
        elif isinstance(msg, FinishSequence):
            core.finish_sequence(msg.request_id, msg.index, msg.stop)
        elif isinstance(msg, Shutdown):
            return False
        elif isinstance(msg, LoRAUpdate):
            try:
                value = core.add_lora(msg.lora) if msg.load else core.remove_lora(msg.lora.lora_int_id)
                conn.send(CoreReply(msg.token, None, value))
            except Exception as e:  # noqa: BLE001 - refused: the caller reports it, the core goes on
                conn.send(CoreReply(msg.token, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))
        elif isinstance(msg, CoreCall):
            try:
                if msg.method not in CORE_CALLS:
                    raise ValueError(f"unknown engine-core call {msg.method!r}")
                conn.send(CoreReply(msg.token, None, getattr(core, msg.method)(*msg.args, **msg.kwargs)))
            except Exception as e:  # noqa: BLE001 - the caller reports it, the core goes on
                conn.send(CoreReply(msg.token, str(e), None, type(e).__name__))
        elif isinstance(msg, SnapshotRequest):
            conn.send(CoreSnapshot(msg.token, core.scheduler.kv.block_map(), core.scheduler.request_table()))
        else:
            raise TypeError(f"unknown engine-core message {type(msg).__name__}")
    return True


# ---- the engine-core process ------------------------------------------------------------

def connect(address: tuple[str, int], authkey: bytes) -> Connection:
    """The core's side of the handshake (the API side listens and authenticates it)."""
    sock = socket.create_connection(address)
    conn = Connection(sock.detach())
    answer_challenge(conn, authkey)
    deliver_challenge(conn, authkey)
    return conn

