"""Detect device-to-host synchronisations: ops that read a tensor's value back to the host.

On a GPU each such read stalls the host until the stream drains, so the hot path of a strategy must make
none. The ops are recorded at the dispatcher, so the check works on CPU tensors too (where a read costs
nothing, but would cost a sync on a GPU)::

    with no_host_sync():                 # raises HostSyncError naming the ops on exit
        out = strategy.attention(q, k, v, cu_seqlens=docs)
        out.backward(grad)
"""

from __future__ import annotations

import traceback

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_SYNC_OPS", "HostSyncError", "HostSyncRecorder", "OpLog", "no_host_sync"]

#: ops whose result depends on a value read back to the host (or whose output shape does)
HOST_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",  # .item(), int(t), float(t), bool(t) of a 1-element tensor
        "aten.is_nonzero",  # bool(t), `if t:`
        "aten.equal",  # torch.equal
        "aten.item",
        "aten.nonzero",  # data-dependent output shape
        "aten.nonzero_static",
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.repeat_interleave",  # with tensor repeats and no output_size: the size is read back
        "aten.allclose",
        "aten._assert_async",
    }
)


class HostSyncError(AssertionError):
    """An op that reads a device value back to the host ran where none may."""


class HostSyncRecorder(TorchDispatchMode):
    """Records every op of :data:`HOST_SYNC_OPS` that runs while active, with the Python stack."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_SYNC_OPS and not _size_known(name, func, kwargs or {}):
            self.calls.append((str(func), "".join(traceback.format_stack(limit=12)[:-1])))
        return func(*args, **(kwargs or {}))


def _size_known(name: str, func, kwargs: dict) -> bool:
    # repeat_interleave with integer repeats, or with the output size given, needs no value from the device.
    return name == "aten.repeat_interleave" and (
        func._overloadname == "self_int" or kwargs.get("output_size") is not None
    )


class no_host_sync(HostSyncRecorder):  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Fail on exit if any op that reads a device value back to the host ran inside the block."""

    def __exit__(self, exc_type, exc, tb):
        result = super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.calls:
            op, stack = self.calls[0]
            raise HostSyncError(
                f"{len(self.calls)} host synchronisation(s): {sorted({c[0] for c in self.calls})}; first at:\n{stack}"
            )
        return result


class OpLog(TorchDispatchMode):
    """Appends the name of every op that runs (``aten.bmm``, ...) to ``log``, a list other code may append its own
    markers to (a communicator's "posted" / "waited"), so a test can assert what ran between them."""

    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.log.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
