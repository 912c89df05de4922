"""Model configs for planning: a local config.json, the hub when reachable, or the built-in catalogue."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

CATALOGUE_FILE = Path(__file__).parent / "catalogue.json"


@functools.lru_cache(maxsize=1)
def _entries() -> dict[str, dict[str, Any]]:
    models = json.loads(CATALOGUE_FILE.read_text())["models"]
    out = {}
    for key, entry in models.items():
        for name in (key, *entry["aliases"]):
            out[name.lower()] = {"id": key, **entry}
    return out


def catalogue_names() -> list[str]:
    """Hub ids of the built-in catalogue."""
    return list(json.loads(CATALOGUE_FILE.read_text())["models"])


def lookup(name: str) -> dict[str, Any] | None:
    """The catalogue's config.json values for a hub id or alias (case-insensitive), or None."""
    entry = _entries().get(name.strip().lower())
    return dict(entry["config"]) if entry else None


def from_catalogue(name: str) -> Any:
    """A transformers PretrainedConfig from the catalogue (a diffusion pipeline's: nbtune.diffusion's
    PipelineConfig of its parts' configs), or None when the name is not in it."""
    values = lookup(name)
    if values is None:
        return None
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    if model_type == "stable-diffusion":
        from nbtune.diffusion import PipelineConfig

        text = dict(values.pop("text_encoder"))
        return PipelineConfig(text_encoder=AutoConfig.for_model(text.pop("model_type"), **text), **values)
    return AutoConfig.for_model(model_type, **values)


def model_config_for(config: Any) -> Any:
    """The PretrainedConfig of a TuneConfig's model: local folder, then catalogue, then the hub (fast fail)."""
    from nbtune.models import load_model_config, resolve_path

    name = config.model.name_or_path
    path = Path(resolve_path(name))
    if path.is_dir():
        return load_model_config(config)
    found = from_catalogue(name)
    if found is not None:
        return found
    if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        try:
            from huggingface_hub import constants

            old = constants.HF_HUB_ETAG_TIMEOUT
            constants.HF_HUB_ETAG_TIMEOUT = 3  # planning must not hang on an unreachable hub
            try:
                return load_model_config(config)
            finally:
                constants.HF_HUB_ETAG_TIMEOUT = old
        except Exception as error:  # noqa: BLE001 - any hub failure means "not available offline"
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise ValueError(f"model.name_or_path {name!r} is not a local folder, not in the built-in catalogue and the hub "
                     f"config could not be read ({reason}); pass model_config= or use one of: "
                     f"{', '.join(catalogue_names()[:6])}, ...")
