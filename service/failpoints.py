"""Named crash points for tests: ``GATEWAY_FAILPOINTS=name[,name…]`` kills the process there
(``name=sleep:S`` pauses it there for S seconds instead, to act on the world meanwhile).

Only the tests set the variable; without it :func:`hit` is one set lookup. A hit sends
SIGKILL to the service's own process: nothing is flushed or cleaned up, exactly as a power
cut or the out-of-memory killer would leave it.

Names: ``before-commit:<label>`` and ``after-commit:<label>`` around every ledger
transition (``<label>``: the study state it sets, else the run's, else the send's, else
``event``). A kill inside an open association is tested from outside (a slow peer, and
SIGKILL once it has stored an instance).
"""

from __future__ import annotations

import logging
import os
import signal
import time

logger = logging.getLogger(__name__)

ENV = "GATEWAY_FAILPOINTS"


def _parse(text: str) -> dict[str, float | None]:
    armed: dict[str, float | None] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, action = entry.partition("=")
        armed[name] = float(action.removeprefix("sleep:")) if action else None
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Kill this process at once when ``name`` is armed (``name=sleep:S``: pause S s)."""
    if name not in _ARMED:
        return
    pause = _ARMED[name]
    if pause is not None:
        logger.warning("failpoint %s: pausing %.1f s", name, pause)
        time.sleep(pause)
        return
    logger.critical("failpoint %s: killing the process", name)
    os.kill(os.getpid(), signal.SIGKILL)
