"""A rank's KV pool from the caller's memory: torch tensors, NumPy arrays or
raw (pointer, bytes, memory_kind) tuples, checked against the instance's
layout before any agent sees them; and pools allocated in the layout's shape.

No copy is made: the agent reads and writes the tensor's own memory and
keeps the objects alive until it is closed.
"""

import sys
from typing import Any, List, NamedTuple, Tuple

from . import _kvbounce
from ._kvbounce import InvalidArgumentError, UnimplementedError, pool_shape

# The element types that hold each kvbounce dtype, by their torch / NumPy
# names; the first one is what allocate_pool uses (when the library has it).
# fp8 and bf16 also take the unsigned integer of their width: older torch
# has no float8, and NumPy has neither.
_TORCH_DTYPES = {
    "bf16": ("bfloat16",),
    "fp16": ("float16",),
    "fp8": ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint8"),
    "fp32": ("float32",),
}
_NUMPY_DTYPES = {
    "bf16": ("bfloat16", "uint16"),
    "fp16": ("float16",),
    "fp8": ("float8_e4m3fn", "float8_e5m2", "uint8"),
    "fp32": ("float32",),
}
_MEMORY_KINDS = ("host", "pinned-host", "pinned", "cuda")


class ResolvedPool(NamedTuple):
    bases: List[int]  # one address, or one per layer
    memory: str  # "host", "pinned-host" or "cuda"
    device: int
    num_blocks: int
    keepalive: Tuple[Any, ...]


class _Memory(NamedTuple):
    address: int
    nbytes: int
    memory: str
    device: int
    what: str  # for messages: "torch tensor of shape (...)"


def _torch_memory(t, dtype: str, where: str) -> _Memory:
    torch = sys.modules["torch"]
    if t.layout != torch.strided:
        raise InvalidArgumentError(f"{where}: a {t.layout} tensor is not a dense pool")
    name = str(t.dtype).replace("torch.", "")
    allowed = _TORCH_DTYPES[dtype]
    if name not in allowed:
        raise InvalidArgumentError(
            f"{where}: a torch tensor of dtype torch.{name} does not hold {dtype} elements "
            f"(expected {' or '.join('torch.' + a for a in allowed)})")
    if not t.is_contiguous():
        raise InvalidArgumentError(
            f"{where}: the torch tensor is not contiguous (shape {tuple(t.shape)}, strides "
            f"{tuple(t.stride())}): kvbounce addresses the pool through its layout's strides; "
            f"allocate it with kvbounce.allocate_pool")
    device = t.device
    if device.type == "cpu":
        try:
            pinned = t.is_pinned()
        except RuntimeError:  # a torch without CUDA may refuse the question
            pinned = False
        memory, ordinal = ("pinned-host" if pinned else "host"), 0
    elif device.type == "cuda":
        memory = "cuda"
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
    else:
        raise InvalidArgumentError(
            f"{where}: a tensor on device '{device}': kvbounce pools live in host memory or on "
            f"CUDA devices")
    return _Memory(t.data_ptr(), t.numel() * t.element_size(), memory, ordinal,
                   f"torch tensor of shape {tuple(t.shape)}")


def _numpy_memory(a, dtype: str, role: str, where: str) -> _Memory:
    allowed = _NUMPY_DTYPES[dtype]
    if a.dtype.name not in allowed:
        raise InvalidArgumentError(
            f"{where}: a NumPy array of dtype {a.dtype.name} does not hold {dtype} elements "
            f"(expected {' or '.join(allowed)})")
    if not a.flags.c_contiguous:
        raise InvalidArgumentError(
            f"{where}: the NumPy array is not C-contiguous (shape {a.shape}, strides "
            f"{a.strides}): kvbounce addresses the pool through its layout's strides; allocate "
            f"it with kvbounce.allocate_pool")
    if role == "gen" and not a.flags.writeable:
        raise InvalidArgumentError(f"{where}: the NumPy array is read-only, and a gen rank's "
                                   f"pool is written")
    return _Memory(a.ctypes.data, a.nbytes, "host", 0, f"NumPy array of shape {a.shape}")


def _raw_memory(raw: tuple, where: str) -> _Memory:
    if len(raw) not in (3, 4):
        raise InvalidArgumentError(
            f"{where}: a raw pool is (pointer, bytes, memory_kind) or (pointer, bytes, "
            f"memory_kind, device), not {len(raw)} items")
    address, nbytes, memory = raw[0], raw[1], raw[2]
    device = raw[3] if len(raw) == 4 else 0
    for name, value in (("pointer", address), ("bytes", nbytes), ("device", device)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(f"{where}: {name} = {value!r} is not an integer >= 0")
    if address == 0:
        raise InvalidArgumentError(f"{where}: the pointer is null")
    if memory not in _MEMORY_KINDS:
        raise InvalidArgumentError(f"{where}: memory kind {memory!r} is invalid: must be one of "
                                   f"{', '.join(_MEMORY_KINDS)}")
    return _Memory(address, nbytes, "pinned-host" if memory == "pinned" else memory, device,
                   f"raw region of {nbytes} bytes")


def _is_raw(obj) -> bool:
    return isinstance(obj, tuple) and len(obj) > 0 and isinstance(obj[0], int)


def _memory_of(obj, dtype: str, role: str, where: str) -> _Memory:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_memory(obj, dtype, where)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return _numpy_memory(obj, dtype, role, where)
    if _is_raw(obj):
        return _raw_memory(obj, where)
    raise TypeError(
        f"{where}: a pool is a torch tensor, a NumPy array, a (pointer, bytes, memory_kind) "
        f"tuple, or a list of them (one per local layer), not {type(obj).__name__}")


def resolve_pool(pool, instance, rank: int, role: str, num_blocks=None) -> ResolvedPool:
    """Checks `pool` against rank `rank` of `instance` and returns what the
    agent needs. Raises InvalidArgumentError (dtype, contiguity, device, a
    size that is not a whole number of blocks, layers that disagree),
    UnimplementedError (a CUDA pool in a build without CUDA) or TypeError."""
    per_layer = isinstance(pool, list) or (isinstance(pool, tuple) and not _is_raw(pool))
    items = list(pool) if per_layer else [pool]
    if per_layer:
        layers = instance.placement(rank)["num_layers"]
        if len(items) != layers:
            raise InvalidArgumentError(
                f"pool: {len(items)} per-layer tensors given, rank {rank} holds {layers} layers")
    block_bytes = instance.block_bytes(rank, per_layer)
    bases, blocks, first = [], None, None
    for i, item in enumerate(items):
        where = f"pool[{i}]" if per_layer else "pool"
        m = _memory_of(item, instance.dtype, role, where)
        if m.memory == "cuda" and not _kvbounce.cuda_available():
            raise UnimplementedError(
                f"{where}: a CUDA pool needs kvbounce built with CUDA, and this build has none")
        if first is not None and (m.memory, m.device) != (first.memory, first.device):
            raise InvalidArgumentError(
                f"{where}: {m.memory} memory (device {m.device}) where pool[0] is {first.memory} "
                f"memory (device {first.device}): every layer of a pool lives in one place")
        n, rest = divmod(m.nbytes, block_bytes)
        if n == 0 or rest != 0:
            shape = pool_shape(instance, 1, rank, per_layer)
            raise InvalidArgumentError(
                f"{where}: a {m.what} of {m.nbytes} bytes is not a whole number of blocks: a "
                f"block of rank {rank} ({instance.dtype}, {instance.layout}) takes {block_bytes} "
                f"bytes{' per layer' if per_layer else ''}; kvbounce.pool_shape(instance, "
                f"num_blocks, rank{', per_layer=True' if per_layer else ''}) gives the shape, "
                f"{shape} for one block")
        if blocks is not None and n != blocks:
            raise InvalidArgumentError(
                f"{where}: holds {n} blocks where pool[0] holds {blocks}")
        if num_blocks is not None and n != num_blocks:
            raise InvalidArgumentError(
                f"{where}: holds {n} blocks of {block_bytes} bytes, num_blocks = {num_blocks}")
        blocks, first = n, first or m
        bases.append(m.address)
    return ResolvedPool(bases, first.memory, first.device, blocks, tuple(items))


def allocate_pool(instance, num_blocks: int, rank: int = 0, *, per_layer: bool = False,
                  backend: str = "torch", device: str = "cpu", pin_memory: bool = False):
    """A zeroed pool for rank `rank` of `instance` with `num_blocks` blocks,
    in the shape kvbounce.pool_shape gives: a torch tensor (backend="torch",
    on `device`) or a NumPy array (backend="numpy"); with per_layer
    (layer-major layouts) a list of one tensor per local layer, as vLLM keeps
    its cache."""
    shape = pool_shape(instance, num_blocks, rank, per_layer)
    count = instance.placement(rank)["num_layers"] if per_layer else 1
    if backend == "torch":
        import torch
        names = [n for n in _TORCH_DTYPES[instance.dtype] if hasattr(torch, n)]
        dtype = getattr(torch, names[0])

        def make():
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    elif backend == "numpy":
        import numpy
        if device != "cpu" or pin_memory:
            raise InvalidArgumentError("allocate_pool: NumPy pools are host memory "
                                       "(device='cpu', pin_memory=False)")
        names = [n for n in _NUMPY_DTYPES[instance.dtype] if hasattr(numpy, n)]
        dtype = getattr(numpy, names[0])

        def make():
            return numpy.zeros(shape, dtype=dtype)
    else:
        raise InvalidArgumentError(f"allocate_pool: backend = {backend!r} is invalid: must be "
                                   f"'torch' or 'numpy'")
    return [make() for _ in range(count)] if per_layer else make()
