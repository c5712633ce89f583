"""A CPU-side proxy for "this code never waits for the GPU".

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` catches every synchronisation; on a
machine without a GPU :class:`HostSyncGuard` catches the Python-level calls that would be
one there: a tensor's value read into Python (``item``, ``tolist``, ``bool``/``int``/
``float`` of a tensor, ``numpy``, ``.cpu()``), and the ops whose output size depends on the
values (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``, ``bincount``,
one-argument ``where``, ``repeat_interleave`` with tensor repeats, ``multinomial``).

It sees what Python calls through torch's function dispatch (``TorchFunctionMode``), not what
torch's C++ does inside an op, so it is a proxy: a passing test on the CPU says the code
asks for no value, and the CUDA test of ``tests/test_cuda.py`` checks the rest.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

#: calls that read a value back, or whose output shape depends on values (by name)
SYNCING = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
    "nonzero", "nonzero_static", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
    "multinomial", "is_nonzero", "equal", "allclose",
})


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_syncing(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNCING:
        return True
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
        return _has_bool_index(args[1])
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name == "to":
        targets = list(args[1:]) + [kwargs.get("device")]
        return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
                   for t in targets)
    return False


class HostSyncGuard(TorchFunctionMode):
    """Records (``strict=False``) or refuses (``strict=True``: RuntimeError) syncing calls.

    ``calls``: (name, the line of the caller) of each one recorded.
    """

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _is_syncing(name, args, kwargs):
            frame = traceback.extract_stack(limit=3)[0]
            where = f"{frame.filename}:{frame.lineno}"
            self.calls.append((name, where))
            if self.strict:
                raise RuntimeError(f"host synchronisation: {name} at {where}")
        return func(*args, **kwargs)
