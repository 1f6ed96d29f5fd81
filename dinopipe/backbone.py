"""DINOv3 backbones through transformers: hub ids, local snapshots, built-in tiny models.

A :class:`Backbone` wraps a transformers ``DINOv3ViTModel`` or ``DINOv3ConvNextModel``
and turns a batch of images (B, 3, H, W) into a spatial token grid (B, C, h, w). The
patch size (ViT) or total reduction (ConvNeXt: 32) and the channel count are read from
the model's configuration, never assumed.

Names understood by :func:`load_backbone`:

* ``"tiny-vit"`` / ``"tiny-convnext"``: built-in tiny configurations with seeded random
  weights, for tests and the offline demo. Nothing is downloaded.
* a local directory holding a transformers snapshot (``config.json`` + weights).
* a hub id such as ``facebook/dinov3-vits16-pretrain-lvd1689m`` (with optional
  revision). Weights come from the local Hugging Face cache; with
  ``HF_HUB_OFFLINE=1`` nothing is fetched and a missing snapshot is a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinopipe.backbone_spec import TINY_BACKBONES, patch_size_of  # noqa: F401 (TINY_BACKBONES re-exported)
from dinopipe.runtime import resolve_device

logger = logging.getLogger(__name__)

#: ImageNet statistics the DINOv3 models were trained with (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_OFFLINE_HELP = (
    "Pre-download the weights once on a machine with internet access, e.g. "
    "`HF_HOME=/shared/hf hf download {name}` (or `huggingface-cli download {name}`), then run "
    "with `HF_HOME=/shared/hf HF_HUB_OFFLINE=1`, or pass the snapshot directory as the "
    "backbone. Gated DINOv3 models also need `hf auth login` once."
)


@dataclass
class Backbone:
    """A DINOv3 model ready to turn images into token grids.

    Attributes:
        model: The transformers model (eval mode, on ``device``).
        name: What the user asked for (hub id, directory or tiny name).
        revision: Hub revision, or None.
        architecture: "vit" or "convnext".
        patch_size: Pixels per token along each image axis (ViT patch size, or the
            ConvNeXt total reduction).
        channels: Feature channels per token.
        num_prefix_tokens: CLS + register tokens before the patch tokens (ViT only).
        weights_hash: SHA-256 over the parameters (names, shapes, dtypes, bytes).
        device: Where the model runs.
    """

    model: nn.Module
    name: str
    revision: str | None
    architecture: str
    patch_size: int
    channels: int
    num_prefix_tokens: int
    weights_hash: str
    device: torch.device

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the model on normalised images.

        Args:
            pixel_values: (B, 3, H, W) with H and W multiples of ``patch_size``.

        Returns:
            (B, C, H / patch_size, W / patch_size) token features, float32.
        """
        b, _, h, w = pixel_values.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {self.patch_size}")
        gh, gw = h // self.patch_size, w // self.patch_size
        if self.architecture == "vit":
            out = self.model(pixel_values=pixel_values).last_hidden_state
            grid = out[:, self.num_prefix_tokens :, :]
            grid = grid.transpose(1, 2).reshape(b, self.channels, gh, gw)
        else:
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            grid = out.hidden_states[-1]
            if grid.shape[-2:] != (gh, gw):
                raise RuntimeError(f"unexpected ConvNeXt output grid {tuple(grid.shape)} for input {(h, w)}")
        return grid.float()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (sorted names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tiny_model(name: str, seed: int) -> nn.Module:
    arch, kwargs = TINY_BACKBONES[name]
    # import only the architecture asked for (each is a separate transformers module)
    if arch == "vit":
        from transformers import DINOv3ViTConfig as Config
        from transformers import DINOv3ViTModel as Model
    else:
        from transformers import DINOv3ConvNextConfig as Config
        from transformers import DINOv3ConvNextModel as Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Model(Config(**kwargs))


def _pretrained_model(name: str, revision: str | None) -> nn.Module:
    from transformers import AutoModel

    local = Path(name).expanduser()
    is_dir = local.is_dir()
    if not is_dir and name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"backbone directory not found: {name}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return AutoModel.from_pretrained(
            str(local) if is_dir else name, revision=None if is_dir else revision, local_files_only=offline or is_dir
        )
    except OSError as exc:
        if is_dir:
            raise ValueError(f"backbone directory {name} is not a transformers snapshot: {exc}") from exc
        raise OSError(
            f"could not load backbone {name!r} (revision {revision or 'default'}): weights are not "
            f"available offline here. " + _OFFLINE_HELP.format(name=name)
        ) from exc


def load_backbone(name: str, revision: str | None = None, *, seed: int = 0, device: str = "auto") -> Backbone:
    """Load a DINOv3 backbone.

    Args:
        name: "tiny-vit", "tiny-convnext", a local snapshot directory or a hub id.
        revision: Hub revision (branch, tag or commit); ignored for tiny models and
            local directories.
        seed: Seed for the random weights of the tiny models.
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".

    Returns:
        The backbone in eval mode on the chosen device.
    """
    if name in TINY_BACKBONES:
        model = _tiny_model(name, seed)
        revision = None
    else:
        model = _pretrained_model(name, revision)
    model_type = getattr(model.config, "model_type", "")
    if model_type == "dinov3_vit":
        arch = "vit"
        patch = patch_size_of(model_type, model.config.to_dict())
        channels = int(model.config.hidden_size)
        prefix = 1 + int(getattr(model.config, "num_register_tokens", 0))
    elif model_type == "dinov3_convnext":
        arch = "convnext"
        patch = patch_size_of(model_type, model.config.to_dict())
        channels = int(model.config.hidden_sizes[-1])
        prefix = 0
    else:
        raise ValueError(f"backbone {name!r} is a {model_type or type(model).__name__!r} model, not DINOv3 ViT/ConvNeXt")
    digest = weights_hash(model)
    dev = resolve_device(device, "features.device")
    model = model.to(dev).eval()
    logger.info("backbone %s (%s, patch %d, %d channels) on %s", name, arch, patch, channels, dev)
    return Backbone(model, name, revision, arch, patch, channels, prefix, digest, dev)
