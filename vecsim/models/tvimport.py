"""Import torchvision without importing torch's compiler.

``import torchvision`` imports ``torchvision.ops.roi_align``, whose one line
``from torch._dynamo.utils import is_compile_supported`` imports all of ``torch._dynamo``
(sympy, ``torch.fx``'s symbolic shapes, ``torch.distributed``'s tensor ops): about 1.1 s on a
2-core machine, about a third of the time a `vecsim index` process spent before its first
committed image, paid again by every rerun of a stopped job. vecsim's hooks never compile anything, and
``is_compile_supported`` is called only when ``roi_align`` runs.

:func:`import_torchvision` imports torchvision with a stand-in for ``torch._dynamo.utils``
in ``sys.modules`` for the length of that import only. The stand-in's ``is_compile_supported``
imports the real module and calls the real function the first time ``roi_align`` runs; any
other name asked of it is taken from the real module, imported then. A finder also watches the
same window: if anything imports the ``torch._dynamo`` package itself while the stand-in is in
place, the stand-in is withdrawn first, so the package binds its real ``utils``. After the
import nothing of the stand-in is left in ``sys.modules``; ``import torch._dynamo`` and
``torch.compile`` work as usual and pay for the import then.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import sys
import threading
import types

DYNAMO = "torch._dynamo"
DYNAMO_UTILS = "torch._dynamo.utils"
_lock = threading.Lock()


def _real_utils() -> types.ModuleType:
    if isinstance(sys.modules.get(DYNAMO_UTILS), _StandIn):
        del sys.modules[DYNAMO_UTILS]
    return importlib.import_module(DYNAMO_UTILS)


def is_compile_supported(device_type):  # torch._dynamo.utils.is_compile_supported, imported when first called
    return _real_utils().is_compile_supported(device_type)


class _StandIn(types.ModuleType):
    """``torch._dynamo.utils`` while torchvision is imported: lazy for the one name torchvision
    takes, the real module for any other."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_utils(), name)


class _Withdraw(importlib.abc.MetaPathFinder):
    """Withdraws the stand-in the moment the ``torch._dynamo`` package is imported (a finder
    that finds nothing: the import then goes on as usual)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == DYNAMO and isinstance(sys.modules.get(DYNAMO_UTILS), _StandIn):
            del sys.modules[DYNAMO_UTILS]
        return None


@contextlib.contextmanager
def dynamo_deferred():
    """While inside, ``from torch._dynamo.utils import is_compile_supported`` imports nothing
    (see the module's docstring); nothing is changed where ``torch._dynamo`` is imported already."""
    with _lock:
        if DYNAMO in sys.modules or DYNAMO_UTILS in sys.modules:
            yield
            return
        stand_in = _StandIn(DYNAMO_UTILS, "stand-in for torch._dynamo.utils while torchvision is imported")
        stand_in.is_compile_supported = is_compile_supported
        finder = _Withdraw()
        sys.modules[DYNAMO_UTILS] = stand_in
        sys.meta_path.insert(0, finder)
        try:
            yield
        finally:
            sys.meta_path.remove(finder)
            if sys.modules.get(DYNAMO_UTILS) is stand_in:
                del sys.modules[DYNAMO_UTILS]


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, without importing ``torch._dynamo`` on the way."""
    if "torchvision" not in sys.modules:
        with dynamo_deferred():
            import torchvision  # noqa: F401
    return sys.modules["torchvision"]
