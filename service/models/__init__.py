"""Model registry: builds the models the routing rules name, once, at start."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from service.config import Config
from service.errors import ConfigError
from service.models.base import Model

logger = logging.getLogger(__name__)

MODEL_NAMES = ("annotate", "cxr-densenet121")
#: STATE's folder for the ONNX export the service makes when none lies beside the weights
EXPORT_FOLDER = "models"


def routed_model_names(config: Config) -> set[str]:
    """Every model named by a rule of the defaults or of any gateway."""
    names = {rule.model for rule in config.defaults.rules}
    for gateway in config.gateways.values():
        names.update(rule.model for rule in gateway.rules)
    return names


def build_models(
    config: Config, names: Iterable[str] | None = None, *, load: bool = True
) -> dict[str, Model]:
    """Load each named model once (default: those the rules route to); a network may
    go on loading in the background (``loading``). ``load`` False (a node without the
    ``run`` role): each model routes (name, version, applies) but loads no network."""
    wanted = sorted(routed_model_names(config) if names is None else set(names))
    models: dict[str, Model] = {}
    for name in wanted:
        if name == "annotate":
            from service.models.annotate import AnnotateModel

            models[name] = AnnotateModel()
        elif name == "cxr-densenet121":
            from service.models.cxr import CxrModel

            models[name] = CxrModel(
                config.cxr, load=load, export_dir=config.state_dir / EXPORT_FOLDER
            )
        else:
            raise ConfigError("rules.model", f"unknown model {name!r}; known: {MODEL_NAMES}")
        verdict = models[name].ready()
        if not verdict.ok:
            state = f"not ready: {verdict.reason}"
        elif not load:
            state = "routed only (this node has no run role: nothing loaded)"
        elif getattr(models[name], "loading", False):
            state = "loading in the background (studies are prepared meanwhile)"
        else:
            state = "loaded"
        logger.info("model %s version %s %s", name, models[name].version, state)
    return models
