"""The model interface: what a model declares, what it is given, what it returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydicom import Dataset

from service.config import Rule
from service.uids import UidFactory
from service.values import Study


@dataclass(frozen=True)
class Applicability:
    """Whether a model applies to a study, and why not when it does not."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class RunContext:
    """What a run may use besides the study: stable UIDs and the triggering series."""

    uids: UidFactory
    run_id: int
    trigger_series_uid: str | None = None
    #: when the run started: objects of one run share it (series and content dates), also
    #: when its parts run in different processes
    started: datetime | None = None


@dataclass
class ModelResult:
    """DICOM objects to write, plus a JSON-serialisable findings summary for the ledger."""

    datasets: list[Dataset]
    findings: dict[str, Any] = field(default_factory=dict)
    skipped_instances: dict[str, str] = field(default_factory=dict)  # SOP UID -> reason


class Model(Protocol):
    """A model loaded once at start and run per study."""

    name: str
    version: str

    def ready(self) -> Applicability:
        """Whether the model can run now (e.g. weights present); studies wait if not."""
        ...

    def applies(self, study: Study) -> Applicability:
        """Whether this model should run on ``study``; the reason is recorded if not."""
        ...

    def run(self, study: Study, ctx: RunContext) -> ModelResult:
        """Run on the study's applicable instances; raise ModelError on failure."""
        ...


@dataclass
class Prepared:
    """A study read and preprocessed for a :class:`BatchedModel`: ``inputs`` holds one row
    per image for the forward pass; ``state`` is what :meth:`BatchedModel.finish` needs
    back. Both cross process boundaries, so they must pickle."""

    inputs: np.ndarray
    state: Any = None


@runtime_checkable
class BatchedModel(Model, Protocol):
    """A model whose run splits into stages, so that the service can prepare and finish
    studies in worker processes while one model instance runs the forward pass on a
    batch gathered across studies. ``run`` is ``finish(prepare(), forward())``. A batched
    model must pickle without its network (workers call only ``prepare``/``finish``)."""

    def prepare(self, study: Study, ctx: RunContext) -> Prepared:
        """Read and preprocess the applicable instances; raise ModelError if none is."""
        ...

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """The network on a batch of rows from one or more :class:`Prepared` inputs."""
        ...

    def finish(self, prepared: Prepared, outputs: np.ndarray, ctx: RunContext) -> ModelResult:
        """The result objects of one study from its rows of the forward output."""
        ...


@runtime_checkable
class SplitModel(Model, Protocol):
    """A model whose result for a study is the union of its results for parts of the
    study (each instance's outputs depend on that instance alone), so that the service can
    run the parts in separate workers. ``run`` is ``run_part`` on the whole study, failing
    when it produced nothing."""

    def run_part(self, study: Study, ctx: RunContext) -> ModelResult:
        """``run`` on the instances of ``study`` (a part); may produce nothing."""
        ...

    def merge_findings(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The findings of the whole run from those of its parts, in instance order."""
        ...


def nothing_produced(name: str, skipped: Mapping[str, str]) -> str:
    """Why a model's run produced no object: the distinct reasons its instances were skipped."""
    return f"{name} produced nothing: " + "; ".join(sorted(set(skipped.values())))


def rule_matches(rule: Rule, study: Study) -> bool:
    """True when some instance of the study matches every tag list of ``rule``."""
    for inst in study.instances:
        if rule.modality and inst.modality.upper() not in rule.modality:
            continue
        if rule.body_part and inst.body_part.upper() not in rule.body_part:
            continue
        if rule.sop_class and inst.sop_class_uid not in rule.sop_class:
            continue
        return True
    return False


def select_model(
    rules: Sequence[Rule], models: Mapping[str, Model], study: Study
) -> tuple[Model | None, str]:
    """The first rule's model that matches and applies; else None with the reason."""
    reasons = []
    for rule in rules:
        if not rule_matches(rule, study):
            continue
        model = models.get(rule.model)
        if model is None:
            reasons.append(f"rule names unknown model {rule.model!r}")
            continue
        verdict = model.applies(study)
        if verdict.ok:
            return model, ""
        reasons.append(f"{model.name}: {verdict.reason}")
    if not reasons:
        modalities = sorted({i.modality or "?" for i in study.instances})
        return None, f"no routing rule matches (Modality {','.join(modalities)})"
    return None, "; ".join(reasons)
