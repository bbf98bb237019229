"""Model registry: builds the models the routing rules name, once, at start."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from service.config import Config
from service.errors import ConfigError
from service.models.base import Model

logger = logging.getLogger(__name__)

MODEL_NAMES = ("annotate", "cxr-densenet121")


def routed_model_names(config: Config) -> set[str]:
    """Every model named by a rule of the defaults or of any gateway."""
    names = {rule.model for rule in config.defaults.rules}
    for gateway in config.gateways.values():
        names.update(rule.model for rule in gateway.rules)
    return names


def build_models(config: Config, names: Iterable[str] | None = None) -> dict[str, Model]:
    """Load each named model once (default: those the rules route to)."""
    wanted = sorted(routed_model_names(config) if names is None else set(names))
    models: dict[str, Model] = {}
    for name in wanted:
        if name == "annotate":
            from service.models.annotate import AnnotateModel

            models[name] = AnnotateModel()
        elif name == "cxr-densenet121":
            from service.models.cxr import CxrModel

            models[name] = CxrModel(config.cxr)
        else:
            raise ConfigError("rules.model", f"unknown model {name!r}; known: {MODEL_NAMES}")
        verdict = models[name].ready()
        logger.info(
            "model %s version %s loaded%s",
            name,
            models[name].version,
            "" if verdict.ok else f" but not ready: {verdict.reason}",
        )
    return models
