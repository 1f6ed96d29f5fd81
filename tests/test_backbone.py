"""Backbone loading: tiny models, hashes, local snapshots and the offline error."""

from __future__ import annotations

import pytest
import torch

from dinopipe.backbone import load_backbone, weights_hash


def test_tiny_models_are_seeded_and_read_their_geometry():
    a = load_backbone("tiny-vit", seed=0, device="cpu")
    b = load_backbone("tiny-vit", seed=0, device="cpu")
    c = load_backbone("tiny-vit", seed=1, device="cpu")
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert (a.architecture, a.patch_size, a.channels, a.num_prefix_tokens) == ("vit", 16, 32, 5)
    n = load_backbone("tiny-convnext", device="cpu")
    assert (n.architecture, n.patch_size, n.channels) == ("convnext", 32, 32)


def test_tokens_grid_shape():
    bb = load_backbone("tiny-vit", device="cpu")
    out = bb.tokens(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 32, 2, 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.tokens(torch.randn(1, 3, 30, 48))


def test_local_snapshot_directory(tmp_path):
    bb = load_backbone("tiny-convnext", seed=3, device="cpu")
    bb.model.save_pretrained(tmp_path / "snap")
    loaded = load_backbone(str(tmp_path / "snap"), device="cpu")
    assert loaded.weights_hash == bb.weights_hash == weights_hash(bb.model)
    assert loaded.architecture == "convnext"


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="backbone directory not found"):
        load_backbone(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_backbone("facebook/dinov3-vits16-pretrain-lvd1689m")
