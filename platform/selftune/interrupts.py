"""SIGTERM takes Ctrl-C's path: ``ray job stop``, Kubernetes and batch schedulers stop a process
with SIGTERM, and selftune must then end its runs KILLED and keep a search resumable, as it does
on Ctrl-C.

Ray replaces the SIGTERM handler when it starts (``ray.init`` installs one that exits, and a local
head node one that kills its processes and exits with 1: a search then ends FAILED, exit -6), so
``sigterm_as_interrupt`` is called again once Ray has started.
"""

from __future__ import annotations

import signal
import threading


def sigterm_as_interrupt(*, through_sigint_handler: bool = False) -> None:
    """From now on SIGTERM raises ``KeyboardInterrupt``; with ``through_sigint_handler`` it calls
    the SIGINT handler instead (the search driver: while Tune fits, Tune's handler stops the trials
    and saves Tune's state, and Ctrl-C must not raise mid-step). Not through it elsewhere: Ray
    Train's ``fit()`` leaves a SIGINT handler of its own that aborts the stage and exits 1.
    Only the main thread may set handlers; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_sigint if through_sigint_handler else _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _as_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Python's default_int_handler raises KeyboardInterrupt; Tune's sets its stop event
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a non-interactive shell) or left to the OS
        raise KeyboardInterrupt
