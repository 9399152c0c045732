"""kvbounce: moves paged KV cache from prefill (ctx) to decode (gen) workers.

    import kvbounce
    inst = kvbounce.Instance("llama-3.1-8b", tp=2)
    pool = kvbounce.allocate_pool(inst, num_blocks=64, rank=0)      # a torch tensor
    with kvbounce.Agent("ctx", inst, rank=0, pool=pool) as agent:
        ...
        agent.publish(request_id, block_table, num_tokens)

Agents, transfers, models and the plan are the C++ library's (extension
module kvbounce._kvbounce); this package adds pools from tensors and arrays,
`await transfer`, and closes every agent at interpreter exit. docs/python.md
describes it all.
"""

import asyncio
import atexit
import threading
import weakref

from . import _kvbounce
from ._kvbounce import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    Error,
    FailedPreconditionError,
    Instance,
    InternalError,
    InvalidArgumentError,
    LoopbackFabric,
    Model,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    Transfer,
    UnavailableError,
    UnimplementedError,
    cuda_available,
    cuda_device_count,
    plan,
    pool_shape,
    presets,
    ucx_available,
)
from ._pool import allocate_pool, resolve_pool

__all__ = [
    "AbortedError", "AlreadyExistsError", "Agent", "CancelledError", "DataLossError",
    "DeadlineExceededError", "Error", "FailedPreconditionError", "Instance", "InternalError",
    "InvalidArgumentError", "LoopbackFabric", "Model", "NotFoundError", "OutOfRangeError",
    "ResourceExhaustedError", "Transfer", "UnavailableError", "UnimplementedError",
    "allocate_pool", "cuda_available", "cuda_device_count", "default_fabric", "plan",
    "pool_shape", "presets", "ucx_available",
]

_fabric_lock = threading.Lock()
_fabric = None


def default_fabric() -> LoopbackFabric:
    """The loopback fabric agents of this process share unless given another."""
    global _fabric
    with _fabric_lock:
        if _fabric is None:
            _fabric = LoopbackFabric()
        return _fabric


# Every agent not yet garbage, closed at exit before the interpreter stops
# running Python on other threads.
_live = weakref.WeakSet()


class Agent(_kvbounce._Agent):
    """One rank's agent (a ctx rank publishes, a gen rank pulls).

    role         "ctx" or "gen"
    instance     the kvbounce.Instance this rank belongs to
    rank         pp_rank * tp + tp_rank
    pool         a torch tensor or NumPy array in the layout's shape (or any
                 contiguous one of the same bytes), a raw (pointer, bytes,
                 memory_kind[, device]) tuple, or a list of them, one per local
                 layer (layer-major layouts). Zero-copy: kept alive until close.
    instance_id  the instance's name gen ranks pull by ("ctx0" / "gen0")
    num_blocks   the pool's blocks; checked against the pool when given
    config       {key: value} of kvbounce's Config, e.g. {"bounce_size_mb": 64}
    transport    "loopback" (agents of this process, on `fabric`, by default
                 default_fabric()), "ucx" (listening at `listen`) or "cuda-ipc"
                 (at `ipc_address`)
    connect_timeout, grace   seconds
    faults       loopback only, for tests: {"write_fail_rate": p, "delay_us": n,
                 "drop_after_ops": n, "seed": n}

    Errors are kvbounce.Error subclasses naming the field. Use it as a context
    manager, or call close(); agents still open at exit are closed then.
    """

    def __init__(self, role, instance, rank=0, *, pool, instance_id=None, num_blocks=None,
                 config=None, transport="loopback", fabric=None, loopback_name="",
                 listen="127.0.0.1:0", put_chunk_bytes=0, same_host_shared_memory=True,
                 ipc_address="", connect_timeout=10.0, grace=1.0, faults=None):
        if role not in ("ctx", "gen"):
            raise InvalidArgumentError(f"role = {role!r} is invalid: must be 'ctx' or 'gen'")
        if not isinstance(instance, Instance):
            raise TypeError(f"instance must be a kvbounce.Instance, not {type(instance).__name__}")
        if not isinstance(rank, int) or not 0 <= rank < instance.num_ranks:
            raise InvalidArgumentError(f"rank = {rank!r} is invalid: the instance has ranks 0 to "
                                       f"{instance.num_ranks - 1}")
        resolved = resolve_pool(pool, instance, rank, role, num_blocks)
        if transport == "loopback" and fabric is None:
            fabric = default_fabric()
        if instance_id is None:
            instance_id = role + "0"
        super().__init__(role, instance, rank, instance_id, resolved.bases, resolved.memory,
                         resolved.device, resolved.num_blocks, resolved.keepalive, config,
                         transport, fabric, loopback_name, listen, put_chunk_bytes,
                         same_host_shared_memory, ipc_address, float(connect_timeout),
                         float(grace), faults)
        self.role = role
        self.instance = instance
        self.rank = rank
        self.instance_id = instance_id
        self.num_blocks = resolved.num_blocks
        self.memory = resolved.memory
        _live.add(self)


def _await_transfer(transfer):
    """`await transfer`: None once it settled OK, its error otherwise. The
    library's thread wakes the awaiting loop with call_soon_threadsafe;
    cancelling the awaiting task cancels the transfer."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(t):
        if future.done():
            return
        error = t.exception()
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def on_done(t):  # on a kvbounce thread, or here when already settled
        try:
            loop.call_soon_threadsafe(settle, t)
        except RuntimeError:  # the loop was closed meanwhile: nobody awaits
            pass

    def on_future_done(f):
        if f.cancelled():
            transfer.cancel()

    future.add_done_callback(on_future_done)
    transfer.add_done_callback(on_done)
    return future.__await__()


Transfer.__await__ = _await_transfer


@atexit.register
def _close_all():
    for agent in list(_live):
        try:
            agent.close()
        except Error:
            pass
    _kvbounce._drain_deferred()
