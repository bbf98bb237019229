"""Named crash points for tests: ``GATEWAY_FAILPOINTS=name[,name…]`` kills the process there.

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

logger = logging.getLogger(__name__)

ENV = "GATEWAY_FAILPOINTS"
_ARMED = frozenset(filter(None, (n.strip() for n in os.environ.get(ENV, "").split(","))))


def hit(name: str) -> None:
    """Kill this process at once when ``name`` is armed."""
    if name in _ARMED:
        logger.critical("failpoint %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)
