"""New UIDs, all from the one configured root (PS3.5 §9 and Annex B).

A UID is never made by appending to an existing UID: that breaks the 64-character limit
(PS3.5 §9.1) and collides across sites. Output UIDs are derived from the run's identity, so a
run repeated after a crash rewrites the same objects with the same UIDs instead of
producing duplicates.
"""

from __future__ import annotations

from pydicom.uid import UID, generate_uid


class UidFactory:
    """Derives stable UIDs under ``root`` from a seed (e.g. gateway, study, run id)."""

    def __init__(self, root: str, *seed: str) -> None:
        self.root = root if root.endswith(".") else root + "."
        self.seed = [str(s) for s in seed]

    def uid(self, *purpose: str) -> UID:
        """The UID for ``purpose`` (e.g. ``("series", "sr")``); same inputs, same UID."""
        return generate_uid(prefix=self.root, entropy_srcs=[*self.seed, *map(str, purpose)])


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID of at most 64 characters (PS3.5 §9.1)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID(value).is_valid
