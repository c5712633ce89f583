"""A CPU-side proxy for "this code never waits for the GPU".

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` catches every synchronisation; on a
machine without a GPU :class:`HostSyncGuard` catches the Python-level calls that would be
one there: a tensor's value read into Python (``item``, ``tolist``, ``bool``/``int``/
``float`` of a tensor, ``numpy``, ``.cpu()``), and the ops whose output size depends on the
values (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``, ``bincount``,
one-argument ``where``, ``repeat_interleave`` with tensor repeats, ``multinomial``).

Two layers: the Python calls through torch's function dispatch (``TorchFunctionMode``:
``calls``), and the aten ops below them, also those that torch's C++ calls inside another op
(``TorchDispatchMode``: ``aten_calls``; a value read is ``_local_scalar_dense``). It is a
proxy all the same: a CPU kernel may read a value where its CUDA twin does not (or the
reverse), so the CUDA test of ``tests/test_cuda.py`` (sync debug mode) has the last word.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: calls that read a value back, or whose output shape depends on values (by name)
SYNCING = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
    "nonzero", "nonzero_static", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
    "multinomial", "is_nonzero", "equal", "allclose",
})


#: aten ops that read a value back or size their output by the values (``_assert_async`` is
#: not one: on CUDA it checks on the device without waiting)
ATEN_SYNCING = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "bincount", "multinomial", "is_nonzero", "equal",
    "repeat_interleave", "histc",
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


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, guard: HostSyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        kwargs = kwargs or {}
        # repeat_interleave reaches aten only with tensor repeats (int repeats are an expand),
        # and reads their sum back unless output_size is given
        if name in ATEN_SYNCING and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.guard._record(str(func), aten=True)
        return func(*args, **kwargs)


class HostSyncGuard(TorchFunctionMode):
    """Records (``strict=False``) or refuses (``strict=True``: RuntimeError) syncing calls.

    ``calls``: (name, the line of the caller) of each Python-level one; ``aten_calls``: the
    aten ops among :data:`ATEN_SYNCING` that ran.
    """

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.calls: list[tuple[str, str]] = []
        self.aten_calls: list[str] = []
        self._aten = _AtenRecorder(self)

    def _record(self, name: str, aten: bool = False) -> None:
        if aten:
            self.aten_calls.append(name)
            where = "aten"
        else:
            frame = traceback.extract_stack(limit=3)[0]  # the caller of __torch_function__
            where = f"{frame.filename}:{frame.lineno}"
            self.calls.append((name, where))
        if self.strict:
            raise RuntimeError(f"host synchronisation: {name} at {where}")

    def __enter__(self):
        super().__enter__()
        self._aten.__enter__()
        return self

    def __exit__(self, *exc):
        self._aten.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _is_syncing(name, args, kwargs):
            self._record(name)
        return func(*args, **kwargs)
