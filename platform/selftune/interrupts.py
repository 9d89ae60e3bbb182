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


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM does what SIGINT does here: Tune's handler while a search fits (it stops
    the trials and saves Tune's state), else ``KeyboardInterrupt``. Only the main thread may set
    handlers; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_sigint)


def _as_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Python's default_int_handler raises KeyboardInterrupt; Tune's sets its stop event
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a non-interactive shell) or left to the OS
        raise KeyboardInterrupt
