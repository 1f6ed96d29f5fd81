"""What is known about a backbone without loading it (no torch import): the built-in tiny
configurations and the patch size (ViT) or total reduction (ConvNeXt) from a transformers
configuration. :mod:`dinopipe.backbone` loads the models; :mod:`dinopipe.checks` uses this
to check ``features.stride`` when the workflow starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Built-in tiny configurations: (architecture, transformers config kwargs).
TINY_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-vit": (
        "vit",
        {
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_register_tokens": 4,
        },
    ),
    "tiny-convnext": ("convnext", {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}),
}

#: transformers' defaults for the keys read here (DINOv3ViTConfig, DINOv3ConvNextConfig).
_DEFAULT_VIT_PATCH = 16
_DEFAULT_CONVNEXT_STAGES = 4


def patch_size_of(model_type: str, config: Mapping[str, Any]) -> int:
    """Pixels per token along each image axis: the ViT patch size, or a ConvNeXt's total
    reduction (4 in the stem, then 2 per further stage: 32 for 4 stages).

    Args:
        model_type: ``"dinov3_vit"`` or ``"dinov3_convnext"`` (transformers' ``model_type``).
        config: The model configuration (``config.json`` as a dict, or config kwargs).
    """
    if model_type == "dinov3_vit":
        return int(config.get("patch_size", _DEFAULT_VIT_PATCH))
    if model_type == "dinov3_convnext":
        stages = len(config.get("hidden_sizes") or [0] * _DEFAULT_CONVNEXT_STAGES)
        return 4 * 2 ** (stages - 1)
    raise ValueError(f"model type {model_type!r} is not DINOv3 ViT/ConvNeXt")


def known_patch_size(name: str, revision: str | None = None) -> int | None:
    """The patch size of a backbone when it is known without loading it: built-in tiny
    models, local snapshot directories, and hub ids whose ``config.json`` is in the local
    Hugging Face cache; None otherwise (nothing is fetched)."""
    if name in TINY_BACKBONES:
        arch, kwargs = TINY_BACKBONES[name]
        return patch_size_of(f"dinov3_{arch}", kwargs)
    local = Path(name).expanduser()
    path: Path | None = local / "config.json" if local.is_dir() else None
    if path is None and "/" in name and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision)
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 (no cache, malformed id: unknown, checked when loading)
            path = None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        return patch_size_of(str(config.get("model_type", "")), config)
    except (OSError, ValueError) as exc:
        logger.debug("cannot read the patch size of backbone %s from %s: %s", name, path, exc)
        return None
