"""highdicom's pixel-data lookup, remembered per SOP class: the same answers, every
importing module served, and only for the highdicom version it was read in."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import highdicom
from highdicom._standard_utils import get_sop_class_iod_map

from service.models import hdcache


def answer(function: Callable[[str], bool], uid: str) -> bool | str:
    """The function's answer, or the error it raises (highdicom's tables miss a few IODs)."""
    try:
        return function(uid)
    except KeyError as exc:
        return f"KeyError {exc}"


def test_every_module_asks_the_remembering_function_with_the_same_answers() -> None:
    assert hdcache.install() and hdcache.install()  # idempotent
    modules = [importlib.import_module(name) for name in hdcache.MODULES]
    functions = {id(getattr(module, hdcache.FUNCTION)) for module in modules}
    assert len(functions) == 1
    cached = getattr(modules[0], hdcache.FUNCTION)
    original = cached.__wrapped__
    uids = list(get_sop_class_iod_map())
    assert len(uids) > 100
    assert [answer(cached, uid) for uid in uids] == [answer(original, uid) for uid in uids]
    assert cached("1.2.840.10008.5.1.4.1.1.7") and not cached("1.2.840.10008.5.1.4.1.1.88.34")


def test_another_highdicom_version_is_left_as_it_is() -> None:
    probe = (
        "import highdicom, highdicom._standard_utils as su\n"
        "highdicom.__version__ = '0.0.1'\n"
        "from service.models import hdcache\n"
        "print(hdcache.install(), hasattr(su.does_iod_have_pixel_data, 'cache_info'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["False", "False"]
    assert highdicom.__version__ == hdcache.HIGHDICOM_VERSION  # the pin in requirements.txt
