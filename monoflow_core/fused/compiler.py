"""When the compiled kernels are compiled (or loaded from Numba's cache), in which thread, and what is said."""

from __future__ import annotations

import atexit
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from ..kernel_cache import kernel_cache_dir
from . import blas, kernels, kernels_fold
from .settings import SETTINGS

__all__ = ["COMPILER", "KERNEL_COMPILE_SECONDS", "KERNEL_SETS", "KernelCompiler", "WarmUp", "kernels_ready"]

#: The compiled kernels of a dtype come in two sets, each compiled when first needed: "solve" (the fold's forward
#: and the solves: all that densities, samples and tests need) and "train" (the "solve" set, the fold's backward
#: and the runs' backward). Every kernel takes the formulation (block kind), the dimension and the architecture as
#: arguments, so one compiled version per dtype serves them all; there is nothing finer to leave out. The cost of
#: each piece is measured by ``benchmarks/first_run.py`` (``benchmarks/results/first_run.md``).
KERNEL_SETS = {
    "solve": ("fold_forward", "solve_run"),
    "train": ("fold_forward", "solve_run", "fold_backward", "backward_run"),
}
#: Rough cold compile time of each set, in seconds (low, high), quoted by the kernels' notices. On the 2-core
#: development machine (float32): the solvers' set 56 s and the training set 90 s at a load average of about 4, and
#: 175 s and 163-235 s at a load average of 8-11 (``benchmarks/results/first_run.md``); the low ends are a guess for
#: an idle machine of that kind.
KERNEL_COMPILE_SECONDS = {"solve": (30, 180), "train": (50, 300)}

#: The warm-up that compiles a set: called with the dtype, whether the training set, and the check to call between
#: two pieces (:meth:`KernelCompiler.check_not_cancelled`).
WarmUp = Callable[[torch.dtype, bool, Callable[[], None]], None]


class _CompileCancelledError(Exception):
    """Raised between the pieces of a background compile once the interpreter has begun to shut down."""


def _kernel(name: str) -> Any:
    """The compiled kernel ``name`` of :data:`KERNEL_SETS`."""
    return getattr(kernels_fold if name.startswith("fold_") else kernels, name)


def _signature_dtype(sig: Iterable[Any]) -> torch.dtype | None:
    """The torch dtype of a compiled kernel's signature (that of its first floating-point array, in a named group of
    arguments too)."""
    for arg in sig:
        members = getattr(arg, "types", None)  # (a tuple of arguments)
        found = _signature_dtype(members) if members is not None else None
        name = str(getattr(arg, "dtype", ""))
        if found is None and name in ("float32", "float64"):
            found = torch.float32 if name == "float32" else torch.float64
        if found is not None:
            return found
    return None


class KernelCompiler:
    """The compile state of the compiled kernels, per dtype and kernel set, and the threads that compile them.

    Attributes:
        state: ``(dtype, set) -> "compiling" | "ready" | "failed"``.
        notice: called with one line of text when this process starts to compile kernels that the on-disk cache
            does not hold (with a rough duration), and again when they are ready; ``None`` (the library's default)
            says nothing. The command line prints the lines on stderr and the studio shows them in its status bar.
            It may be called from a background compile thread.
        warm_up: the warm-up that compiles a set (:func:`monoflow_core.fused.warm.run_kernels_once`, wired in by the
            package: it runs the whole fused path, which needs this object).
    """

    def __init__(self) -> None:
        self.state: dict[tuple[torch.dtype, str], str] = {}
        self.notice: Callable[[str], None] | None = None
        self.warm_up: WarmUp | None = None
        self._lock = threading.Lock()
        #: Held while a set compiles (re-entrant: a compile's warm-up asks whether the kernels are ready).
        self.compile_lock = threading.RLock()
        #: Set once the interpreter has begun to shut down: background compiles stop at their next piece.
        self._shutdown = threading.Event()
        #: Background compile threads started by :meth:`ready` (joined at exit).
        self.threads: list[threading.Thread] = []
        #: ``active`` is True in a background compile thread (whose work shutting down cancels).
        self._background = threading.local()

    def ready(self, dtype: torch.dtype, wait: bool = False, backward: bool = True) -> bool:
        """Whether the compiled kernels are ready for ``dtype``; the first call starts compiling them (see
        :func:`kernels_ready`)."""
        if not (SETTINGS.use_kernels and kernels.AVAILABLE):
            return False
        key = (dtype, "train" if backward else "solve")
        with self._lock:
            state = self.state.get(key)
            if state is None and not backward and self.state.get((dtype, "train")) == "ready":
                self.state[key] = state = "ready"  # (the "train" set holds the "solve" set)
            if state is None:
                if not wait:
                    if self._shutdown.is_set():
                        return False  # (it would be cancelled before its first piece anyway)
                    self.state[key] = "compiling"
                    thread = threading.Thread(
                        target=self._compile_in_background,
                        args=key,
                        name=f"monoflow-kernels-{dtype}-{key[1]}",
                        daemon=True,
                    )
                    self.threads.append(thread)
                    thread.start()
                    return False
                self.state[key] = state = "compiling"
            elif state == "compiling" and not wait:
                return False
        if state == "compiling" and wait:
            with self.compile_lock:  # the thread compiling (if any) holds it until done
                if self.state.get(key) == "compiling":
                    self.compile(*key)
        return self.state.get(key) == "ready"

    def _compile_in_background(self, dtype: torch.dtype, kit: str) -> None:
        """The body of a background compile thread: :meth:`compile`, cancellable at shutdown."""
        self._background.active = True
        self.compile(dtype, kit)

    def check_not_cancelled(self) -> None:
        """Between two pieces of a compile: stop a background one if the interpreter has begun to shut down."""
        if getattr(self._background, "active", False) and self._shutdown.is_set():
            raise _CompileCancelledError

    def stop_background_compiles(self) -> None:
        """Cancel the background compiles and wait for their threads to end, before the interpreter finalises.

        At finalisation Python ends every daemon thread still running the next time it needs the interpreter, by
        unwinding its stack without running it (``pthread_exit``). A thread inside PyTorch's autograd engine (the
        warm-up differentiates the fold) or any other C++ code that calls back into Python then ends the whole
        process with ``terminate called without an active exception`` (exit status 134), after the program's work is
        done. A compile cannot be interrupted inside one piece (one kernel's compilation by Numba), so this waits for
        the piece under way (only while a compile is in progress: from a few seconds to half a minute on a slow
        machine) and the thread stops before the next one. ``atexit`` runs this after the program's non-daemon
        threads have ended and before finalisation; the threads are daemon threads so that this hook, not the
        interpreter, decides when they are joined (after cancelling: a non-daemon thread would be joined first,
        after its whole compile).
        """
        with self._lock:  # (ready() starts threads under it: none starts after this)
            self._shutdown.set()
            threads = list(self.threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    @staticmethod
    def cache_stamp(dtype: torch.dtype, kit: str) -> tuple[Path, str]:
        """A marker file in the kernels' cache folder, and the text it holds once ``kit`` of ``dtype`` was compiled
        there: the sources' sizes and modification times (what Numba's cache checks) and Numba's version."""
        import numba

        sources = [Path(kernels.__file__), Path(kernels_fold.__file__), Path(blas.__file__)]
        text = " ".join([numba.__version__, *(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)])
        name = f"monoflow-kernels-{str(dtype).replace('torch.', '')}-{kit}.stamp"
        return kernel_cache_dir() / name, text

    def expect_compile(self, dtype: torch.dtype, kit: str) -> bool:
        """Whether the kernels of ``kit`` in ``dtype`` will be compiled rather than loaded from the on-disk cache (as
        far as this process can tell: compiled here already, or the cache folder's marker of an earlier compile)."""
        if all(
            any(_signature_dtype(sig) == dtype for sig in getattr(_kernel(name), "overloads", ()))
            for name in KERNEL_SETS[kit]
        ):
            return False
        for held_by in ("solve", "train") if kit == "solve" else ("train",):  # (the "train" set holds "solve")
            try:
                path, text = self.cache_stamp(dtype, held_by)
                if path.read_text() == text:
                    return False
            except OSError:
                pass
        return True

    def _notify(self, text: str) -> None:
        if self.notice is not None:
            self.notice(text)

    def compile(self, dtype: torch.dtype, kit: str = "train") -> None:
        """Compile (or load from Numba's cache) the kernels of set ``kit`` for ``dtype``, through the engine's calls.

        The warm-up runs a tiny problem with deterministic weights (no random numbers: this may run in a background
        thread, and the global generator belongs to the user). Every kernel takes its sizes as arguments, so these
        compiled versions serve every architecture of the dtype. A background compile cancelled at shutdown leaves
        the state "compiling" (a later caller that waits compiles in its own thread).
        """
        key = (dtype, kit)
        with self.compile_lock:
            if self.state.get(key) != "compiling":
                return
            what = f"{'training' if kit == 'train' else 'solver'} kernels for {str(dtype).replace('torch.', '')}"
            announced = self.expect_compile(dtype, kit)
            if announced:
                low, high = KERNEL_COMPILE_SECONDS[kit]
                if kit == "train" and self.state.get((dtype, "solve")) == "ready":  # (the rest of the set only)
                    low, high = low - KERNEL_COMPILE_SECONDS["solve"][0], high - KERNEL_COMPILE_SECONDS["solve"][1]
                self._notify(
                    f"monoflow: compiling the {what} (first use with this cache; about {low}-{high} s, once: later "
                    f"runs load them from {kernel_cache_dir()})"
                )
            t0 = time.perf_counter()
            try:
                if self.warm_up is None:
                    raise RuntimeError("no warm-up is wired in (monoflow_core.fused does it at import)")
                blas.limit_blas_threads()
                # A caller that waits may be inside no_grad or inference_mode (an evaluation's first use); the
                # warm-up differentiates the fold, as training does, so that its backward is compiled too.
                with torch.inference_mode(False), torch.enable_grad():
                    self.warm_up(dtype, kit == "train", self.check_not_cancelled)
            except _CompileCancelledError:
                return
            except Exception as error:  # any failure leaves the PyTorch kernels in charge
                self.state[key] = "failed"
                warnings.warn(
                    f"monoflow: the compiled kernels for {dtype} are unavailable ({error!r}); the PyTorch "
                    "kernels serve instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            self.state[key] = "ready"
            if kit == "train":
                self.state[(dtype, "solve")] = "ready"
            seconds = time.perf_counter() - t0
            with suppress(OSError):  # (a cache folder that cannot be written only costs the notices' accuracy)
                path, text = self.cache_stamp(dtype, kit)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            if announced:
                self._notify(f"monoflow: the {what} are ready (compiled in {seconds:.0f} s)")
            elif seconds >= 5.0:  # (a busy machine, or a cache whose marker was gone)
                self._notify(f"monoflow: the {what} are ready (prepared in {seconds:.0f} s)")


#: The process's compiler of the kernels.
COMPILER = KernelCompiler()
atexit.register(COMPILER.stop_background_compiles)


def kernels_ready(dtype: torch.dtype, wait: bool = False, backward: bool = True) -> bool:
    """Whether the compiled kernels are ready for ``dtype``; the first call starts compiling them.

    ``backward``: the kernels of training too (the "train" set of :data:`KERNEL_SETS`), else only those of solves
    without gradients ("solve": densities, samples, tests), which compile in about 60% of the time. Compiling takes
    half a minute or more the first time on a machine (Numba then caches the machine code on disk, in the folder of
    :mod:`monoflow_core.kernel_cache`, and later processes load it in about a second); ``COMPILER.notice`` hears
    of it. Without ``wait`` it runs in a background thread and this returns at once (False until done): a caller
    can start it ahead of the first use. ``wait=True`` compiles (or loads) in the calling thread, or waits for the
    background compile under way, and returns when done; the fused path itself waits
    (:attr:`~monoflow_core.fused.settings.FusedSettings.wait`). A failure to compile is reported once as a warning
    and leaves the PyTorch kernels in charge for that dtype and set. Once the interpreter has begun to shut down no
    background compile starts (:meth:`KernelCompiler.stop_background_compiles`).
    """
    return COMPILER.ready(dtype, wait, backward)
