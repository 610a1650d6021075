"""Process-wide settings a kernel computation overrides, shared by overlapping calls.

Some of what a computation needs is process-global, not per thread: a warning filter,
PyTorch's attention-backend flags. Saving and restoring it per call is wrong when two
threads call fastntk at once (the second saves the first's override and restores it last,
so the override outlives both calls), and ``warnings.catch_warnings``, which swaps the
whole filter list, can also drop filters another thread added meanwhile. Here each setting
is a :class:`Shared`: the first thread in saves and overrides it, the last one out restores
it, under one lock for all of them; overlapping calls see the override throughout.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
import weakref
from typing import Any, Callable, Generic, Iterator, TypeVar

Saved = TypeVar("Saved")

_LOCK = threading.Lock()
"""Held while any :class:`Shared` setting is overridden or restored."""


class Shared(Generic[Saved]):
    """A process-wide setting overridden while any thread is inside :meth:`scope`.

    ``override()`` changes it and returns what ``restore(saved)`` needs to undo exactly that.
    """

    def __init__(self, override: Callable[[], Saved], restore: Callable[[Saved], None]) -> None:
        self.override, self.restore = override, restore
        self.users = 0
        self.saved: Saved | None = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Overridden in this block (and in any other thread's overlapping one)."""
        with _LOCK:
            if self.users == 0:
                self.saved = self.override()
            self.users += 1
        try:
            yield
        finally:
            with _LOCK:
                self.users -= 1
                if self.users == 0:
                    saved, self.saved = self.saved, None
                    self.restore(saved)  # type: ignore[arg-type]


def flag(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Shared[Any]:
    """A flag with a getter and a setter, set to ``value`` while shared, then set back."""

    def override() -> Any:
        previous = get()
        set_(value)
        return previous

    return Shared(override, set_)


FORWARD_AD = threading.RLock()
"""Held around forward-mode AD (``torch.func.jvp``): PyTorch keeps its forward-AD levels for
the whole process, so one thread leaving its level invalidates another thread's."""


# ------------------------------------------------------------------ vmap fallback warnings

FALLBACK_WARNING = "There is a performance drop"
"""How torch.func's warning for an op without a batching rule (run as a loop) begins."""

_SEEN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("fastntk_fallback_warnings", default=None)
"""In a thread inside :func:`quiet_fallbacks`, the fallback warnings seen there; None elsewhere."""


class _InQuietThread:
    """A filter's message pattern that matches fallback warnings only in a thread inside
    :func:`quiet_fallbacks` (and records them); Python calls its ``match`` like a regex's."""

    def match(self, text: str) -> bool:
        seen = _SEEN.get()
        if seen is None or not isinstance(text, str) or not text.startswith(FALLBACK_WARNING):
            return False
        seen.append(text)
        return True

    def __repr__(self) -> str:
        return f"fastntk: {FALLBACK_WARNING!r}... inside a fastntk call"


FILTER = ("ignore", _InQuietThread(), UserWarning, None, 0)
"""The one ``warnings.filters`` entry fastntk adds (first, while any call runs); it ignores
nothing outside fastntk's calls."""


def _filters_changed() -> None:
    """Tell the warnings module its filters changed (it then forgets warnings already shown
    once, as after ``warnings.filterwarnings``), so that every fallback meets the filter."""
    changed = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
    if changed is not None:
        changed()


def _add_filter() -> None:
    if not any(entry is FILTER for entry in warnings.filters):
        warnings.filters.insert(0, FILTER)  # in place: the list object and other entries stay
        _filters_changed()


def _remove_filter(_: None) -> None:
    """Remove fastntk's entry by identity from the current list, whatever else changed since."""
    for i in reversed(range(len(warnings.filters))):
        if warnings.filters[i] is FILTER:
            del warnings.filters[i]
    _filters_changed()


_FILTER = Shared(_add_filter, _remove_filter)


@contextlib.contextmanager
def quiet_fallbacks() -> Iterator[list[str]]:
    """Silence torch.func's "performance drop" warnings in this thread only; yield the list
    of those raised here (until the block ends), which tells whether vmap ran an op as a loop.

    Other threads' warnings, and every other warning here, meet the filters as before.
    """
    seen: list[str] = []
    with _FILTER.scope():
        with _LOCK:
            _add_filter()  # again, if another thread removed it meanwhile (warnings.resetwarnings)
        token = _SEEN.set(seen)
        try:
            yield seen
        finally:
            _SEEN.reset(token)


# ------------------------------------------------------------------ modules in use

_MODULE_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()


def _module_lock(module: Any) -> threading.RLock:
    with _LOCK:
        try:
            lock = _MODULE_LOCKS.get(module)
            if lock is None:
                lock = _MODULE_LOCKS[module] = threading.RLock()
        except TypeError:  # not hashable or not weakly referenceable: one lock for all such
            lock = _UNKEYED
    return lock


_UNKEYED = threading.RLock()


_IN_MODEL = threading.local()
"""``depth``: how many modules this thread holds (see :func:`using_module`)."""


@contextlib.contextmanager
def using_module(module: Any) -> Iterator[None]:
    """Hold ``module`` and its submodules for this thread: ``torch.func.functional_call``
    swaps a module's tensors in place while it runs, so two threads must not run it (or read
    the module's parameters) on a shared module at once. The locks of every submodule are
    taken in one order (their ids), so overlapping module trees cannot deadlock; and no
    thread takes them while it holds others (a model whose forward calls fastntk), since
    locks taken one inside another, in two threads, can.

    Raises:
        ModelError: fastntk was called from inside a model's forward pass.
    """
    if getattr(_IN_MODEL, "depth", 0):
        from ._errors import ModelError

        raise ModelError(
            "fastntk was called from inside the forward pass of a model it is computing a kernel of "
            "(a model or hook that calls fastntk): compute the inner kernel outside the model's forward"
        )
    with contextlib.ExitStack() as stack:
        for lock in sorted({_module_lock(m) for m in module.modules()}, key=id):
            stack.enter_context(lock)
        _IN_MODEL.depth = 1
        try:
            yield
        finally:
            _IN_MODEL.depth = 0
