"""highdicom's "does this IOD have pixel data?" remembered per SOP class (one private hook).

highdicom answers it (``highdicom._standard_utils.does_iod_have_pixel_data``) by scanning
every attribute of every module of the IOD in its tables of the standard, on every call:
building one CXR study's SR and summary image asks it three times, about 11 ms in all
(``bench/cxr.py``'s SR+SC column). The answer depends on the SOP Class UID alone and the
tables do not change in a process, so each answer is kept. The function is private and
imported by name into several highdicom modules, so the hook is installed only for the
exact highdicom version it was read in; any other version is left as it is.
"""

from __future__ import annotations

import functools
import importlib
import logging

import highdicom

logger = logging.getLogger(__name__)

#: The highdicom version whose modules below import the function by name.
HIGHDICOM_VERSION = "0.28.2"
FUNCTION = "does_iod_have_pixel_data"
MODULES = (
    "highdicom._standard_utils",
    "highdicom.base_content",
    "highdicom.content",
    "highdicom.image",
    "highdicom.sr.templates",
)


def install() -> bool:
    """Put the remembering function in place of highdicom's (idempotent); False when this
    highdicom is not :data:`HIGHDICOM_VERSION` and nothing was changed."""
    if highdicom.__version__ != HIGHDICOM_VERSION:
        logger.debug("highdicom %s: its pixel-data lookup is left as it is", highdicom.__version__)
        return False
    current = getattr(importlib.import_module(MODULES[0]), FUNCTION)
    if hasattr(current, "cache_info"):
        return True  # installed already
    cached = functools.cache(current)
    for name in MODULES:
        module = importlib.import_module(name)
        if getattr(module, FUNCTION) is current:
            setattr(module, FUNCTION, cached)
    return True
