"""Fair sharing of training time between the runs of a comparison (compare mode, docs/studio.md).

The runs of a comparison take turns: one training step at a time, and the next step goes to the run that has
used the least training time so far (measured by the wall clock around its steps). Each of ``n`` runs therefore
gets ``1/n`` of the training time whatever its step costs: a monotone step (a fixed-point solve per block) costs
more than a coupling step, so the cheaper run makes more steps in the same time, which is what a comparison
against wall-clock seconds must show. One step at a time also means every step has the machine's training cores
to itself, as it would alone.

The gate never blocks a run on one that does not train (paused, stopped, failed): only runs whose ``active()``
callable answers True take part. A run that was seen idle while another trained and then comes back may catch up
at most ``max_lead_s`` seconds, so a long pause does not hand it the whole machine until it has made up for it;
while the runs train together, the gate keeps the whole account (a step of any length is made up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

__all__ = ["FairShare"]


class FairShare:
    """A turn-taking gate for the training steps of several sessions (thread-safe).

    Args:
        max_lead_s: the most training time one active run may be ahead of another before the one behind stops
            catching up (a run returning from a pause is credited up to this lead).
        poll_s: how often a waiting run rechecks whether the others still train (their ``active()`` answers
            change without notice).
    """

    def __init__(self, max_lead_s: float = 1.0, poll_s: float = 0.02) -> None:
        self.max_lead_s = max_lead_s
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._used: dict[Hashable, float] = {}
        self._active: dict[Hashable, Callable[[], bool]] = {}
        self._idle: set[Hashable] = set()  # runs seen not training since their last turn
        self._holder: Hashable | None = None

    def join(self, key: Hashable, active: Callable[[], bool]) -> None:
        """Register a run; ``active()`` says (from any thread) whether it trains now."""
        with self._cond:
            self._used.setdefault(key, 0.0)
            self._active[key] = active

    def leave(self, key: Hashable) -> None:
        """Unregister a run (its turn, if it holds one, is released)."""
        with self._cond:
            self._active.pop(key, None)
            self._used.pop(key, None)
            self._idle.discard(key)
            if self._holder == key:
                self._holder = None
            self._cond.notify_all()

    @property
    def shares(self) -> int:
        """How many runs share the training time."""
        with self._cond:
            return len(self._active)

    def used(self, key: Hashable) -> float:
        """The training seconds the gate has counted for ``key`` (including catch-up credit)."""
        with self._cond:
            return self._used.get(key, 0.0)

    def acquire(self, key: Hashable, wanted: Callable[[], bool] = lambda: True) -> bool:
        """Wait for ``key``'s turn; False (no turn) as soon as ``wanted()`` is False (e.g. the session stops).

        The turn goes to a run when no step runs and no other active run has used less training time.
        """
        with self._cond:
            if key not in self._used:
                raise KeyError(f"run {key!r} has not joined the gate")
            while True:
                if not wanted():
                    return False
                others = []
                for k, active in self._active.items():
                    if k == key:
                        continue
                    if _safe(active):
                        others.append(self._used[k])
                    else:
                        self._idle.add(k)
                if others and key in self._idle:
                    # Back from a pause: catch up at most max_lead_s (not the machine for as long as it was away).
                    self._used[key] = max(self._used[key], min(others) - self.max_lead_s)
                if self._holder is None and (not others or self._used[key] <= min(others)):
                    self._idle.discard(key)
                    self._holder = key
                    return True
                self._cond.wait(self.poll_s)

    def release(self, key: Hashable, seconds: float) -> None:
        """End ``key``'s turn, which took ``seconds`` of training time."""
        with self._cond:
            if key in self._used:
                self._used[key] += max(0.0, float(seconds))
            if self._holder == key:
                self._holder = None
            self._cond.notify_all()


def _safe(active: Callable[[], bool]) -> bool:
    """``active()``, False if it raises (a run being torn down does not take part)."""
    try:
        return bool(active())
    except Exception:  # a torn-down session: it trains no more
        return False
