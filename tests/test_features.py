"""Feature extraction: geometry, planes, strides, backbones and signatures (tiny models, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe.backbone import load_backbone
from dinopipe.features import (
    FeatureParams,
    check_signature,
    context_raw_window,
    expected_signature,
    extract_features,
    signature,
)
from dinopipe.geometry import Geometry, check_ratio, slice_weights, sub_geometry


@pytest.fixture(scope="module")
def vit():
    return load_backbone("tiny-vit", device="cpu")


@pytest.fixture(scope="module")
def convnext():
    return load_backbone("tiny-convnext", device="cpu")


def _raw(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)


RAW = Geometry((32, 48, 64), (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
OUT = Geometry((16, 24, 32), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))


@pytest.mark.parametrize("planes", [["xy"], ["xz"], ["yz"], ["xy", "xz"], ["xz", "yz"], ["xy", "xz", "yz"]])
def test_shape_for_every_plane_subset(vit, planes):
    feats, info = extract_features(_raw(RAW.shape), RAW, OUT, vit, FeatureParams(planes=planes))
    assert feats.shape == (vit.channels, *OUT.shape)
    assert feats.dtype == np.float32
    assert set(info["image_size"]) == set(planes)
    assert np.isfinite(feats).all()


def test_convnext_shapes(convnext):
    feats, info = extract_features(_raw(RAW.shape), RAW, OUT, convnext, FeatureParams())
    assert convnext.patch_size == 32
    assert feats.shape == (convnext.channels, *OUT.shape)
    assert all(s % 32 == 0 for size in info["image_size"].values() for s in size)


def test_constant_along_z_gives_identical_xy_features(vit):
    plane = _raw(RAW.shape[1:])
    raw = np.broadcast_to(plane, RAW.shape).copy()
    feats, _ = extract_features(raw, RAW, OUT, vit, FeatureParams(planes=["xy"]))
    assert np.abs(feats - feats[:, :1]).max() == 0
    assert np.abs(feats[:, 0]).max() > 0


def test_three_planes_equal_mean_of_single_planes(vit):
    raw = _raw(RAW.shape, seed=1)
    single = [extract_features(raw, RAW, OUT, vit, FeatureParams(planes=[p]))[0] for p in ("xy", "xz", "yz")]
    three, _ = extract_features(raw, RAW, OUT, vit, FeatureParams())
    np.testing.assert_allclose(three, np.mean(single, axis=0), atol=1e-5)


def test_stride_8_doubles_token_grid(vit, monkeypatch):
    import dinopipe.features as features

    seen = []
    original = features._tokens_sliding

    def spy(backbone, images, plane, autocast):
        out = original(backbone, images, plane, autocast)
        seen.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(features, "_tokens_sliding", spy)
    raw = _raw(RAW.shape)
    extract_features(raw, RAW, OUT, vit, FeatureParams(planes=["xy"]))
    extract_features(raw, RAW, OUT, vit, FeatureParams(planes=["xy"], stride=8))
    coarse, fine = seen[0], seen[-1]
    assert fine == (2 * coarse[0], 2 * coarse[1])


def test_stride_sliding_window_tokens_are_shifted_runs(vit):
    """With stride 8 the interleaved grid holds the stride-16 tokens at even positions."""
    from dinopipe.features import _Plane, _prepare, _tokens_sliding

    raw = _raw(RAW.shape)
    plane = _Plane("xy", RAW, OUT, vit, FeatureParams(planes=["xy"], stride=8))
    images = _prepare(plane.take(raw, [0, 1]), plane, 0.0, 255.0, vit.device)
    fine = _tokens_sliding(vit, images, plane, autocast=False)
    coarse = vit.tokens(images)
    np.testing.assert_allclose(fine[:, :, ::2, ::2].numpy(), coarse.numpy(), atol=1e-5)


def test_stride_must_divide_patch(vit):
    with pytest.raises(ValueError, match="stride"):
        extract_features(_raw(RAW.shape), RAW, OUT, vit, FeatureParams(stride=5))


def test_anisotropic_and_non_cubic(vit):
    """40x4x4 nm raw onto a 40x8x8 nm label grid: shape and square pixels per plane."""
    raw_geom = Geometry((6, 40, 56), (40.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    out_geom = Geometry((6, 20, 28), (40.0, 8.0, 8.0), (0.0, 2.0, 2.0))
    feats, info = extract_features(_raw(raw_geom.shape), raw_geom, out_geom, vit, FeatureParams())
    assert feats.shape == (vit.channels, 6, 20, 28)
    # xz: z extent 240 nm at 4 nm pixels -> 60 px, padded to 64; x 224 nm -> 56 px -> 64
    assert info["image_size"]["xz"] == [64, 64]
    assert info["image_size"]["xy"] == [48, 64]


def test_output_grid_must_lie_inside_raw(vit):
    out = Geometry((16, 24, 40), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))  # x extends past the raw
    with pytest.raises(ValueError, match="not inside the raw extent"):
        extract_features(_raw(RAW.shape), RAW, out, vit, FeatureParams(), volume="v1")


def test_ratio_outside_range_names_volume():
    with pytest.raises(ValueError, match="vol_7.*axis x"):
        check_ratio((8, 8, 1), (8, 8, 16), "vol_7")
    with pytest.raises(ValueError, match="ratio"):
        check_ratio((200, 8, 8), (10, 8, 8), "v")
    check_ratio((4, 4, 4), (16, 16, 16), "ok")


def test_slice_weights_average_fine_raw_and_pick_nearest_coarse():
    # raw 8 nm, out 16 nm: every output slice averages two raw slices
    pairs = dict(slice_weights(0.0, 8.0, 8, 4.0, 16.0, 4))
    assert pairs == {j: [(j // 2, 0.5)] for j in range(8)}
    # raw 32 nm, out 16 nm: each output slice takes the nearest raw slice
    pairs = dict(slice_weights(8.0, 32.0, 2, 0.0, 16.0, 4))
    assert pairs == {0: [(0, 1.0), (1, 1.0)], 1: [(2, 1.0), (3, 1.0)]}


def test_antialiasing_along_slicing_axis(vit):
    """Raw finer than the output along z: the xy features average the raw slices."""
    raw_geom = Geometry((8, 32, 32), (8.0, 16.0, 16.0), (0.0, 0.0, 0.0))
    out_geom = Geometry((4, 32, 32), (16.0, 16.0, 16.0), (4.0, 0.0, 0.0))
    raw = _raw(raw_geom.shape, seed=3)
    feats, _ = extract_features(raw, raw_geom, out_geom, vit, FeatureParams(planes=["xy"]))
    per_slice, _ = extract_features(raw, raw_geom, raw_geom, vit, FeatureParams(planes=["xy"]))
    np.testing.assert_allclose(feats[:, 1], (per_slice[:, 2] + per_slice[:, 3]) / 2, atol=1e-5)


def test_intensity_scaling_is_per_volume(vit):
    """Scaling a slice's contrast alone changes features; a global affine change does not."""
    raw = _raw(RAW.shape, seed=4).astype(np.float32)
    a, _ = extract_features(raw, RAW, OUT, vit, FeatureParams(planes=["xy"]))
    b, _ = extract_features(raw * 3 + 10, RAW, OUT, vit, FeatureParams(planes=["xy"]))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_nan_raw_is_an_error(vit):
    raw = _raw(RAW.shape).astype(np.float32)
    raw[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        extract_features(raw, RAW, OUT, vit, FeatureParams())


def test_deterministic(vit):
    raw = _raw(RAW.shape)
    a, _ = extract_features(raw, RAW, OUT, vit, FeatureParams())
    b, _ = extract_features(raw, RAW, OUT, vit, FeatureParams())
    assert np.array_equal(a, b)


def test_signature_round_trip_and_mismatch(vit):
    params = FeatureParams(planes=["xy", "yz"])
    sig = signature(vit, params, RAW, OUT, (0.0, 255.0), {"xy": [48, 64]})
    check_signature(sig, expected_signature(params), "f.zarr")
    assert sig["precision"] == "fp32"  # the tiny backbone runs on the CPU: autocast does not apply
    for changed, key in [
        (FeatureParams(planes=["xy"]), "planes"),
        (FeatureParams(planes=["xy", "yz"], low=1.0), "normalisation.low"),
        (FeatureParams(planes=["xy", "yz"], backbone="tiny-convnext"), "model_id"),
        (FeatureParams(planes=["xy", "yz"], stride=8), "stride"),
        (FeatureParams(planes=["xy", "yz"], upsampler="up.py:build"), "upsampler"),
        (FeatureParams(planes=["xy", "yz"], context_nm=0), "context_nm"),
    ]:
        with pytest.raises(ValueError, match=f"signature key '{key}'"):
            check_signature(sig, expected_signature(changed), "f.zarr")


def test_upsampler_is_part_of_the_signature(vit, tmp_path):
    """Features made with a guided upsampler are not interchangeable with bilinear ones (or
    with another upsampler file): the spec and the file's hash are model keys."""
    from dinopipe.features import check_compatible

    (tmp_path / "up.py").write_text("def build(device):\n    return None\n")
    spec = f"{tmp_path / 'up.py'}:build"
    guided = signature(vit, FeatureParams(upsampler=spec), RAW, OUT, (0.0, 255.0), {"xy": [48, 64]})
    plain = signature(vit, FeatureParams(), RAW, OUT, (0.0, 255.0), {"xy": [48, 64]})
    assert plain["upsampler"] is None and guided["upsampler"] == spec and len(guided["upsampler_sha256"]) == 64
    check_signature(guided, expected_signature(FeatureParams(upsampler=spec)), "g.zarr")
    with pytest.raises(ValueError, match="signature key 'upsampler'"):
        check_signature(guided, expected_signature(FeatureParams()), "g.zarr")
    with pytest.raises(ValueError, match="signature key 'upsampler'"):
        check_compatible(plain, guided, "p.zarr", "g.zarr")
    (tmp_path / "up.py").write_text("def build(device):\n    return 1\n")  # same spec, other code
    changed = signature(vit, FeatureParams(upsampler=spec), RAW, OUT, (0.0, 255.0), {"xy": [48, 64]})
    with pytest.raises(ValueError, match="signature key 'upsampler_sha256'"):
        check_compatible(changed, guided, "c.zarr", "g.zarr")


def test_params_reject_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown key.*'plane'"):
        FeatureParams.from_config({"plane": ["xy"]})
    with pytest.raises(ValueError, match="planes"):
        FeatureParams.from_config({"planes": ["xy", "ab"]})
    with pytest.raises(ValueError, match="low/high"):
        FeatureParams.from_config({"low": 90, "high": 10})


BIG_RAW = Geometry((64, 96, 128), (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
BIG_OUT = Geometry((32, 48, 64), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))


def _blockwise(backbone, raw, params, block_shape, halo):
    from dinopipe.features import extract_features_blockwise

    out = np.full((backbone.channels, *BIG_OUT.shape), np.nan, dtype=np.float32)

    def write(core, block):
        assert np.isnan(out[(slice(None), *core)]).all(), "blocks overlap"
        out[(slice(None), *core)] = block

    info = extract_features_blockwise(raw, BIG_RAW, BIG_OUT, backbone, params, write, block_shape=block_shape, halo=halo)
    assert not np.isnan(out).any(), "blocks do not cover the volume"
    return out, info


def test_blockwise_along_slicing_axis_is_exact(vit):
    raw = _raw(BIG_RAW.shape, seed=5)
    params = FeatureParams(planes=["xy"])
    whole, _ = extract_features(raw, BIG_RAW, BIG_OUT, vit, params)
    blocked, info = _blockwise(vit, raw, params, (8, 48, 64), halo=0)
    assert info["blocks"] == 4
    assert np.array_equal(blocked, whole)


@pytest.mark.slow
def test_blockwise_with_halo_hides_seams(vit, convnext):
    """3D blocks: ConvNeXt with a halo covering its context equals the whole volume; a ViT
    (global attention within each slice) differs by a fraction of a percent, far less
    than without a halo."""
    raw = _raw(BIG_RAW.shape, seed=6)
    params = FeatureParams()
    whole, _ = extract_features(raw, BIG_RAW, BIG_OUT, convnext, params)
    blocked, info = _blockwise(convnext, raw, params, (16, 24, 32), halo=16)
    assert info["blocks"] == 8
    np.testing.assert_allclose(blocked, whole, atol=1e-5)

    # the halo alone (no raw context beyond each grown block: features.context_nm 0)
    bare = FeatureParams(context_nm=0)
    whole, _ = extract_features(raw, BIG_RAW, BIG_OUT, vit, bare)
    scale = np.abs(whole).mean()
    no_halo = np.abs(_blockwise(vit, raw, bare, (16, 24, 32), halo=0)[0] - whole).mean() / scale
    with_halo = np.abs(_blockwise(vit, raw, bare, (16, 24, 32), halo=16)[0] - whole).mean() / scale
    assert with_halo < 0.01
    assert with_halo < no_halo / 10
    # the default context (64 raw pixels) spans this volume's slices: every block's slices are whole
    whole, _ = extract_features(raw, BIG_RAW, BIG_OUT, vit, params)
    np.testing.assert_allclose(_blockwise(vit, raw, params, (16, 24, 32), halo=0)[0], whole, atol=1e-5)


def test_blocking_choice():
    params = FeatureParams(max_memory_mb=1.0, block_halo=4)
    assert params.blocking(32, (8, 8, 8)) is None  # 64 KB fits
    chosen = params.blocking(384, (100, 100, 100))
    assert chosen is not None and all(16 <= b <= 100 for b in chosen)
    assert FeatureParams(block_shape=[4, 5, 6]).blocking(1, (10, 10, 10)) == [4, 5, 6]
    with pytest.raises(ValueError, match="block_shape"):
        FeatureParams.from_config({"block_shape": [4, 5]})


UPSAMPLER = """
import torch


class Bilinear(torch.nn.Module):
    def forward(self, tokens, images):
        size = (tokens.shape[-2] * 16, tokens.shape[-1] * 16)
        return torch.nn.functional.interpolate(tokens, size=size, mode="bilinear", align_corners=False)


def build(device):
    return Bilinear().to(device)
"""


def test_guided_upsampler_extension_point(vit, tmp_path):
    """A guided upsampler from a local file: its output covers the padded image, so an
    upsampler that is bilinear itself reproduces the plain result."""
    from dinopipe.features import load_upsampler

    (tmp_path / "up.py").write_text(UPSAMPLER)
    raw = _raw(RAW.shape, seed=7)
    params = FeatureParams(planes=["xy"])
    plain, _ = extract_features(raw, RAW, OUT, vit, params)
    upsampler = load_upsampler(f"{tmp_path / 'up.py'}:build", vit.device)
    guided, _ = extract_features(raw, RAW, OUT, vit, params, upsampler=upsampler)
    np.testing.assert_allclose(guided, plain, atol=1e-4 * np.abs(plain).max())
    with pytest.raises(FileNotFoundError, match="features.upsampler"):
        load_upsampler(f"{tmp_path / 'missing.py'}:build", vit.device)
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_upsampler(f"{tmp_path / 'up.py'}:nope", vit.device)
    with pytest.raises(ValueError, match="path/to/file.py:factory"):
        load_upsampler(str(tmp_path / "up.py"), vit.device)


# A raw wider in-plane than the default context, and a crop of its label lattice in the middle.
CTX_RAW = Geometry((16, 256, 256), (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
CTX_OUT = Geometry((8, 128, 128), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))
CTX_CROP = (slice(2, 6), slice(56, 72), slice(60, 76))  # label voxels; raw pixels 112:144, 120:152 in-plane


def _crop_and_whole(backbone, params):
    raw = _raw(CTX_RAW.shape, seed=11)
    whole, _ = extract_features(raw, CTX_RAW, CTX_OUT, backbone, params)
    crop, _ = extract_features(raw, CTX_RAW, sub_geometry(CTX_OUT, CTX_CROP), backbone, params)
    return crop, whole[(slice(None), *CTX_CROP)]


@pytest.mark.slow
def test_crop_features_see_context_and_match_the_whole_volume(vit, convnext):
    """A crop's features, computed from the raw around it (features.context_nm), equal those
    of the same region computed from the whole volume: exactly for ConvNeXt (its receptive
    field fits in the context), within the blockwise tolerance for a ViT (global attention
    within each slice); without context the crop's faces see padding and differ far more."""
    context = FeatureParams(context_nm=512)  # 64 raw pixels on every side
    crop, whole = _crop_and_whole(convnext, context)
    np.testing.assert_allclose(crop, whole, atol=1e-5)
    bare, _ = _crop_and_whole(convnext, FeatureParams(context_nm=0))
    assert np.abs(bare - whole).max() > 100 * 1e-5

    crop, whole = _crop_and_whole(vit, FeatureParams())  # default: 4 patches of 16 raw pixels
    scale = np.abs(whole).mean()
    with_context = np.abs(crop - whole).mean() / scale
    without = np.abs(_crop_and_whole(vit, FeatureParams(context_nm=0))[0] - whole).mean() / scale
    assert with_context < 0.01
    assert with_context < without / 5


def test_context_window_is_clipped_to_the_raw_and_on_the_patch_grid():
    params = FeatureParams(context_nm=100)  # 13 raw pixels of 8 nm
    window, geom = context_raw_window(CTX_RAW, sub_geometry(CTX_OUT, CTX_CROP), params, 16)
    # raw under the crop: z 4:12, y 112:144, x 120:152; grown by 13, start down to a multiple of 16
    assert window == (slice(0, 16), slice(96, 157), slice(96, 165))
    assert geom.shape == (16, 61, 69) and geom.translation == (0.0, 96 * 8.0, 96 * 8.0)
    assert params.context_pixels(16, 8.0) == 13 and FeatureParams().context_pixels(16, 8.0) == 64
    assert FeatureParams(context_nm=0).context_pixels(32, 4.0) == 0
    with pytest.raises(ValueError, match="features.context_nm must be >= 0"):
        FeatureParams.from_config({"context_nm": -1})


def test_a_token_lands_at_the_hand_computed_output_voxels(vit, monkeypatch):
    """One hot token of one raw slice, followed by hand through patch, stride and resampling.

    Raw: 4 x 64 x 64 voxels of 8 nm, first centre at 0 nm (extent -4..508 nm on every axis).
    Output: 2 x 32 x 32 voxels of 16 nm, first centre at 4 nm (the same extent, so no context).
    An xy slice is a 64 x 64 image of 8 nm pixels (pixel m spans [m, m + 1), pixel 0 at -4 nm);
    16-pixel patches give a 4 x 4 token grid, token k centred at pixel 16 k + 8.
    Output voxel i (centre 4 + 16 i nm) sits at pixel (4 + 16 i + 4) / 8 = 2 i + 1, i.e. at
    token coordinate (2 i + 1 - 8) / 16, so token k = 1 falls between output voxels 11 and 12
    (each 1/16 token away: bilinear weight 15/16) and token k = 2 between voxels 19 and 20.
    Along z, output slice 1 averages raw slices 2 and 3 (weight 1/2 each).
    """
    import torch

    import dinopipe.features as features

    raw = np.zeros((4, 64, 64), np.uint8)
    raw[2] = 255  # only raw slice 2 gets the hot token
    raw_geom = Geometry((4, 64, 64), (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
    out_geom = Geometry((2, 32, 32), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))

    def one_hot(backbone, images, plane, autocast):
        assert tuple(images.shape[-2:]) == (64, 64)
        tokens = torch.zeros((len(images), backbone.channels, 4, 4))
        tokens[:, 0, 1, 2] = (images[:, 0, 0, 0] > 0).float()  # 1 for the bright slice, 0 otherwise
        return tokens

    monkeypatch.setattr(features, "_tokens_sliding", one_hot)
    feats, _ = extract_features(raw, raw_geom, out_geom, vit, FeatureParams(planes=["xy"], intensity="dtype"))

    def weights(k: int) -> np.ndarray:  # bilinear weight of token k at each output voxel along y or x
        t = (2 * np.arange(32) + 1 - 8) / 16
        return np.clip(1 - np.abs(t - k), 0, None)

    expected = np.zeros((2, 32, 32))
    expected[1] = 0.5 * np.outer(weights(1), weights(2))
    np.testing.assert_allclose(feats[0], expected, atol=1e-6)
    assert np.abs(feats[1:]).max() == 0
    peak = np.argwhere(feats[0] == feats[0].max())
    assert sorted(map(tuple, peak.tolist())) == [(1, 11, 19), (1, 11, 20), (1, 12, 19), (1, 12, 20)]
    assert feats[0].max() == pytest.approx(0.5 * (15 / 16) ** 2)


@pytest.mark.parametrize("plane_name", ["xy", "yz"])
def test_accumulate_copies_each_output_slice_once_then_adds(vit, plane_name):
    """Raw slice j's token grid is the constant j + 1; raw 2x finer, so output slice i is the
    mean of raw slices 2i and 2i + 1: 1.5 and 3.5 (times the plane scale), whatever the batches.

    The accumulator starts as NaN: the first contribution to an output slice must be copied in
    (also when the slice straddles two batches, the second part added), later calls add.
    """
    import torch

    import dinopipe.features as features

    raw_geom = Geometry((4, 4, 4), (8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
    out_geom = Geometry((2, 2, 2), (16.0, 16.0, 16.0), (4.0, 4.0, 4.0))
    plane = features._Plane(plane_name, raw_geom, out_geom, vit, FeatureParams(planes=[plane_name], context_nm=0))
    order = plane.contributions
    assert [j for j, _ in order] == [0, 1, 2, 3]
    acc = torch.full((vit.channels, 2, 2, 2), float("nan"))
    fresh = {0, 1}
    for batch in (order[:1], order[1:3], order[3:]):  # output slice 0 straddles batches 1 and 2
        tokens = torch.stack([torch.full((vit.channels, *plane.tokens_shape), j + 1.0) for j, _ in batch])
        features._accumulate(acc, tokens, plane, batch, 0.5, fresh)
    assert fresh == set()
    expected = torch.empty_like(acc)
    expected.select(1 + plane.axis, 0).fill_(0.5 * 1.5)
    expected.select(1 + plane.axis, 1).fill_(0.5 * 3.5)
    torch.testing.assert_close(acc, expected)
    tokens = torch.stack([torch.full((vit.channels, *plane.tokens_shape), j + 1.0) for j, _ in order])
    features._accumulate(acc, tokens, plane, order, 0.5)  # no fresh set: adds
    torch.testing.assert_close(acc, 2 * expected)


@pytest.mark.parametrize("map_scale", [1, 2])  # the token grid, and a map twice as fine (an upsampler's)
def test_separable_resampling_equals_grid_sample(vit, map_scale):
    """_accumulate's separable bilinear resampling against torch's grid_sample (border padding,
    align_corners) at the same token coordinates, on an anisotropic, non-cubic plane."""
    import torch
    import torch.nn.functional as F

    import dinopipe.features as features

    raw_geom = Geometry((12, 40, 72), (10.0, 6.0, 6.0), (0.0, 0.0, 0.0))
    out_geom = Geometry((6, 13, 23), (20.0, 17.0, 17.0), (5.0, 12.0, 9.0))
    for name in ("xy", "xz", "yz"):
        plane = features._Plane(name, raw_geom, out_geom, vit, FeatureParams(planes=[name], stride=8))
        shape = tuple(map_scale * n for n in plane.tokens_shape)
        batch = plane.contributions[:5]
        tokens = torch.randn(len(batch), vit.channels, *shape, generator=torch.Generator().manual_seed(3))
        acc = torch.zeros((vit.channels, *out_geom.shape))
        features._accumulate(acc, tokens, plane, batch, 0.5)
        coords = []
        for i in range(2):
            patch, stride = (plane.patch, plane.stride) if map_scale == 1 else (plane.padded[i] / shape[i],) * 2
            t = features._token_coords(plane._centres[i], plane._begins[i], plane.pixel_nm[i], patch, stride)
            coords.append(torch.as_tensor(2 * t / (shape[i] - 1) - 1, dtype=torch.float32))
        gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]
        expected = torch.zeros_like(acc)
        for k, (_, targets) in enumerate(batch):
            sampled = F.grid_sample(tokens[k : k + 1], grid, mode="bilinear", padding_mode="border",
                                    align_corners=True)[0]
            for i, w in targets:
                expected.select(1 + plane.axis, i).add_(sampled, alpha=0.5 * w)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(acc, expected, atol=1e-5, rtol=1e-5)
