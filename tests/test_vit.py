"""The ViT encoder: DOFA key layout, safetensors checkpoints, seeded init, any band set, and the
ONNX export against the torch fp32 reference on real tiles of the sample scene."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from tilefm.backends.onnx_export import export_onnx
from tilefm.backends.onnxruntime import OrtRunner
from tilefm.card import ModelCard
from tilefm.errors import WeightsError
from tilefm.grid import plan_tiles, resolution
from tilefm.io.read import read_tile
from tilefm.io.scene import open_scene
from tilefm.models import get_card
from tilefm.models.base import normalize
from tilefm.models.store import pull, weights_path
from tilefm.models.vit import ViTEncoder, card_wavelengths, dofa_state, load_vit, save_vit, state_sha256
from tilefm.models.vit_tiles import ViTTileModel

BBOX = (-11.5, 24.7, -11.3, 24.85)


def tiny_card(**weights: object) -> ModelCard:
    """vit-small's card with a 2-layer, 64-wide trunk: the same code, seconds instead of minutes."""
    card = get_card("vit-small").model_dump()
    card["vit"].update(dim=64, depth=2, heads=4)
    card["output"]["channels"] = 64
    card["weights"] = weights or {"seed": 3}
    return ModelCard.model_validate(card)


@pytest.fixture(scope="module")
def tiles(scene_dir: Path) -> list:
    scene = open_scene({"s2": str(scene_dir)})
    card = get_card("vit-small")
    plan = plan_tiles(scene.footprint, 10, bbox=BBOX)
    return [read_tile(scene, card, t, 0) for t in plan.tiles[:2]]


def test_cards_say_there_is_no_checkpoint() -> None:
    for name, dim in (("vit-small", 384), ("vit-base", 768)):
        card = get_card(name)
        assert card.architecture == "vit" and card.vit.dim == dim and card.output.channels == dim
        assert not card.weights.checkpoint and card.weights.seed is not None
        assert "NO CHECKPOINT" in card.description and "throughput" in card.description
        assert weights_path(card, Path("/nonexistent")) is None
    with pytest.raises(WeightsError, match="no published checkpoint"):
        pull(get_card("vit-small"), Path("/tmp/unused"))


def test_key_layout_follows_dofa_v1() -> None:
    keys = set(ViTEncoder(tiny_card().vit).state_dict())
    for k in (
        "cls_token", "norm.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.norm1.weight", "patch_embed.fclayer.w1.weight",
        "patch_embed.weight_generator.fc_weight.weight",
        "patch_embed.weight_generator.fc_bias.bias", "patch_embed.weight_generator.weight_tokens",
        "patch_embed.weight_generator.bias_token",
        "patch_embed.weight_generator.transformer_encoder.layers.0.self_attn.in_proj_weight",
    ):  # fmt: skip
        assert k in keys, k
    assert "pos_embed" not in keys  # fixed sin/cos, rebuilt for the grid
    # a DOFA classification checkpoint: `module.` prefix, fc_norm, a head and a 14x14 pos_embed
    state = {
        f"module.{k}": v
        for k, v in ViTEncoder(tiny_card().vit).state_dict().items()
        if not k.startswith("norm.")
    }
    state |= {
        "module.fc_norm.weight": torch.ones(64),
        "module.fc_norm.bias": torch.zeros(64),
        "module.head.weight": torch.zeros(45, 64),
        "module.pos_embed": torch.zeros(1, 197, 64),
    }
    assert set(dofa_state(state)) == keys


def test_safetensors_checkpoint_round_trip(tmp_path: Path) -> None:
    seeded = tiny_card()
    net = load_vit(seeded, None)
    assert state_sha256(net) == state_sha256(load_vit(seeded, None))  # the seed fixes the weights
    path = tmp_path / "vit.safetensors"
    save_vit(net, path)
    card = tiny_card(
        file="vit.safetensors", sha256=hashlib.sha256(path.read_bytes()).hexdigest(), url=path.as_uri()
    )
    loaded = load_vit(card, path)
    x = torch.randn(1, 3, 256, 256)
    bands = card_wavelengths(card)[:3]
    with torch.no_grad():
        assert torch.equal(net.bind(bands)(x), loaded.bind(bands)(x))
    other = ViTEncoder(tiny_card().vit.model_copy(update={"depth": 1}))
    save_vit(other, tmp_path / "short.safetensors")
    with pytest.raises(WeightsError, match="depth-2"):
        load_vit(card, tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="safetensors"):
        load_vit(card, tmp_path / "junk.safetensors")


def test_any_band_set() -> None:
    card = tiny_card()
    net = load_vit(card, None)
    wl = card_wavelengths(card)  # 10 S2 bands, VV, VH, elevation
    with torch.no_grad():
        for bands in ([0, 1, 2], [10, 11], list(range(13))):
            y = net.bind([wl[i] for i in bands])(torch.zeros(2, len(bands), 256, 256))
            assert y.shape == (2, 64, 16, 16)
        # different wavelengths, different kernels
        a, _ = net.patch_embed.kernel([0.49])
        b, _ = net.patch_embed.kernel([3.5])
    assert not torch.allclose(a, b)


def test_inputs_are_the_bands_with_data_normalised(tiles: list) -> None:
    """A reader's input for the encoder: the card's bands that have data on the tile (S2's
    ten here, not S1's or the DEM's), each normalised as the card says, gaps at 0."""
    spec = get_card("vit-small").model_dump()
    for i, band in enumerate(spec["inputs"][0]["bands"]):  # S2's shift is 0: make it count
        band["mean"] = 900.0 + 10 * i
    card = ModelCard.model_validate(spec)
    model = ViTTileModel(card, "torch", None)
    valid = tiles[0].valid.copy()
    valid[3, :40] = False  # a band with a gap
    valid[5] = False  # a band without data
    gappy = dataclasses.replace(tiles[0], valid=valid)
    for t in [*tiles, gappy]:
        bands, x, _ = model.inputs(t)
        assert bands.indices == tuple(int(i) for i in np.flatnonzero(t.valid.any(axis=(1, 2))))
        sel = list(bands.indices)
        want = np.where(t.valid[sel], normalize(card, t.data)[sel], 0.0)
        assert x.dtype == np.float32 and x.flags.c_contiguous
        np.testing.assert_array_equal(x, want)
    assert bands.indices == (0, 1, 2, 3, 4, 6, 7, 8, 9) and not x[3, :40].any() and x[3, 40:].any()


def test_tile_model_onnx_matches_torch_on_real_tiles(tiles: list) -> None:
    card = get_card("vit-small")
    model = ViTTileModel(card, "torch", None)
    bands, x0, weight = model.inputs(tiles[0])
    valid = tiles[0].valid[list(bands.indices)].all(axis=0)  # no halo: every band had data there
    assert bands.indices == tuple(range(10)) and valid.mean() > 0.5  # the S2 bands, no S1/DEM
    assert list(bands.wavelengths_um) == model.wavelengths[:10]  # a Sentinel-2 scene: the card's
    assert weight.shape == (16, 16) and weight.dtype == np.float32
    x = np.stack([model.inputs(t)[1] for t in tiles])
    ref = model.embed(bands, x)
    assert ref.shape == (len(tiles), 384, 16, 16)
    bound = model.net.bind(list(bands.wavelengths_um))
    ort = OrtRunner(export_onnx(bound, x.shape[1:]))
    for n in (1, len(tiles)):  # the batch axis is dynamic
        got = ort(x[:n])
        rel = np.abs(got - ref[:n]).max() / np.abs(ref[:n]).max()
        assert rel < 1e-4, rel
    # the card's default: one output pixel per patch, the embeddings themselves
    outs = model.encode(tiles)
    assert outs[0].values.shape == (384, 16, 16) and outs[0].weight.shape == (16, 16)
    np.testing.assert_array_equal(outs[0].values, ref[0])
    seen = valid.reshape(16, 16, 16, 16).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(outs[0].weight > 0, seen)
    # upsampled to pixels: bilinear keeps each patch's mean roughly where the patch is
    up = ViTTileModel(
        card.model_copy(update={"vit": card.vit.model_copy(update={"upsample": "bilinear"})}), "torch", None
    )
    outs = up.encode(tiles)
    assert outs[0].values.shape == (384, 256, 256) and outs[0].weight.shape == (256, 256)
    np.testing.assert_allclose(
        outs[0].values[:, 112:128, 112:128].mean(axis=(1, 2)), ref[0, :, 7, 7], atol=0.5
    )


#: Landsat 8/9 OLI's surface reflectance bands as USGS names them -> the sample's equivalent
OLI_FILES = {"SR_B2": "B02", "SR_B3": "B03", "SR_B4": "B04", "SR_B5": "B8A", "SR_B6": "B11", "SR_B7": "B12"}
#: and their centre wavelengths (USGS), in the card's band order (B02 B03 B04 B8A B11 B12)
OLI_UM = (0.482, 0.561, 0.655, 0.865, 1.609, 2.201)


def test_each_sensor_binds_its_own_wavelengths(scene_dir: Path, tmp_path: Path) -> None:
    """A wavelength-conditioned encoder is given each band's true centre: Landsat OLI's (from
    its band names, or from what a STAC item declares), not the card's Sentinel-2 table, and a
    Sentinel-2 scene gets what it always got."""
    from test_band_mapping import _write_landsat

    from tilefm.io.read import scene_bands

    folder = tmp_path / "LC09_L2SP_203043_20200219_20200220_02_T1"
    folder.mkdir()
    for sr, band in OLI_FILES.items():
        _write_landsat(scene_dir / f"{band}.tif", folder / f"{folder.name}_{sr}.TIF")
    card = tiny_card()
    landsat, s2 = open_scene({"s2": str(folder)}), open_scene({"s2": str(scene_dir)})
    tile = plan_tiles(landsat.footprint, 10, bbox=BBOX).tiles[0]
    assert scene_bands(landsat, card) == dict(
        zip([f"s2:{b}" for b in OLI_FILES.values()], OLI_UM, strict=True)
    )

    model = ViTTileModel(card, "torch", None)
    model.warm(["s2"], scene_bands(landsat, card))  # builds the runner the tiles then use
    t = read_tile(landsat, card, tile, 0)
    (bands, x, _), (s2_bands, _, _) = model.inputs(t), model.inputs(read_tile(s2, card, tile, 0))
    names = [b.name for b in card.inputs[0].bands]
    assert bands.indices == tuple(names.index(b) for b in OLI_FILES.values())
    assert bands.wavelengths_um == OLI_UM
    assert s2_bands.wavelengths_um == tuple(card_wavelengths(card)[:10])  # Sentinel-2's, as before
    got = model.run(model.preparer([t]))[0].values
    assert list(model._runners) == [bands]  # the warmed one
    with torch.no_grad():
        want = model.net.bind(list(OLI_UM))(torch.from_numpy(x[None])).numpy()[0]
        msi = model.net.bind([card_wavelengths(card)[i] for i in bands.indices])(torch.from_numpy(x[None]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got - msi.numpy()[0]).max() > 100 * 1e-5  # the wavelengths matter

    # a STAC item's declared centre wavelength is the band's
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": folder.name, "bbox": [-12, 24, -11, 25],
        "geometry": {
            "type": "Polygon", "coordinates": [[[-12, 24], [-11, 24], [-11, 25], [-12, 25], [-12, 24]]]
        },
        "properties": {"datetime": "2020-02-19T11:00:00Z", "platform": "landsat-9"}, "links": [],
        "assets": {
            "blue": {
                "href": str(folder / f"{folder.name}_SR_B2.TIF"), "type": "image/tiff",
                "eo:bands": [{"name": "SR_B2", "common_name": "blue", "center_wavelength": 0.48}],
                "raster:bands": [{"scale": 2.75e-05, "offset": -0.2, "nodata": 0}],
            },
        },
    }  # fmt: skip
    (tmp_path / "item.json").write_text(json.dumps(item))
    assert scene_bands(open_scene({"s2": str(tmp_path / "item.json")}), card) == {"s2:B02": 0.48}


@pytest.mark.integration
def test_cli_run_end_to_end(scene_dir: Path, tmp_path: Path) -> None:
    import rasterio

    out = tmp_path / "vit.tif"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "vit-small",
        "--zoom",
        "10",
        "--bbox=-11.5,24.7,-11.45,24.75",
        "--out",
        str(out),
        "--executor",
        "local",
        "--backend",
        "torch",
    )
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as ds:
        assert ds.count == 384 and ds.tags()["TILEFM_BACKEND"] == "torch"
        # per-patch outputs: the mosaic is the z10 tiles' z6 parent, one pixel per 16 x 16 patch
        tags = ds.tags()
        assert (tags["TILEFM_ZOOM"], tags["TILEFM_TILE_ZOOM"], tags["TILEFM_OUTPUT_STRIDE"]) == (
            "6",
            "10",
            "16",
        )
        assert abs(ds.res[0] - resolution(6)) < 1e-6 and (ds.width, ds.height) == (256, 256)
        a = ds.read(1, masked=True)
        assert 0 < a.count() < 256 * 256  # the planned tiles' patches hold values, the rest is nodata


@pytest.mark.integration
def test_cli_run_in_int8_keeps_the_embeddings(scene_dir: Path, tmp_path: Path) -> None:
    """`--precision int8`: `auto` takes onnxruntime (the backend that runs int8), the output says
    so, and its embeddings match an fp32 run of the same tiles within the int8 limits."""
    import rasterio

    from tilefm.backends.compare import agreement

    args = [
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "vit-small",
        "--zoom",
        "11",
        "--bbox=-11.5,24.7,-11.4,24.8",
        "--executor",
        "local",
    ]
    pixels = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.tif"
        # fp32 on onnxruntime named, as `auto` takes a GPU's torch-cuda where there is one
        backend = ["--backend", "onnxruntime"] if precision == "fp32" else []
        r = run_cli("run", *args, "--precision", precision, *backend, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert f"on onnxruntime ({precision})" in r.stderr
        with rasterio.open(out) as ds:
            assert (ds.tags()["TILEFM_BACKEND"], ds.tags()["TILEFM_PRECISION"]) == ("onnxruntime", precision)
            a = ds.read(masked=True)
        seen = ~np.ma.getmaskarray(a[0])
        pixels[precision] = a.data[:, seen].T.astype(np.float32)  # [pixels, 384]
    assert pixels["fp32"].shape == pixels["int8"].shape and len(pixels["fp32"]) >= 256
    a = agreement(pixels["int8"], pixels["fp32"])
    # float16 storage adds ~5e-4 to both sides
    assert a.ok("int8"), str(a)
    assert a.rel_error > 1e-3  # the int8 graph ran, not fp32 twice


def test_float16_outputs_make_the_same_cog(scene_dir: Path, tmp_path: Path) -> None:
    """Where the COG stores float16, a GPU runner hands the embeddings back rounded to float16
    (`half_outputs`): the same COG, bit for bit, as from float32 outputs, tiles cut by the
    scene's edge included. Here on the CPU runner, rounded as a GPU rounds (ties to even)."""
    import dataclasses

    import rasterio

    from tilefm.backends import BackendOptions
    from tilefm.engine.pipeline import RunSpec, batches, prepare, publish
    from tilefm.engine.runtime import LocalExecutor, WorkerSpec
    from tilefm.models.vit_tiles import half_outputs
    from tilefm.settings import get_settings
    from tilefm.values import Encoding

    card = tiny_card()
    assert half_outputs(card, "torch-cuda") and half_outputs(card, "tensorrt")
    assert (
        not half_outputs(card, "torch")
        and not half_outputs(card, "torch-cuda", "float32")
        and not half_outputs(card, "torch-cuda", "int8")
    )
    upsampled = card.model_copy(update={"vit": card.vit.model_copy(update={"upsample": "bilinear"})})
    assert not half_outputs(upsampled, "torch-cuda")  # the host would average them: float32
    spec = RunSpec(
        scene={"s2": str(scene_dir)},
        model="vit-small",
        zoom=12,
        out=str(tmp_path / "unused.tif"),
        bbox=(-12.0, 24.9, -11.9, 24.98),
        executor="local",
        date=None,
    )
    prep = dataclasses.replace(prepare(spec), card=card, backend="torch", weights=None)
    worker = WorkerSpec(card=card, backend="torch", weights=None)
    arrays, weights = {}, []
    for out_dtype in ("float32", "float16"):
        from tilefm.models.vit_tiles import ViTTileModel

        model = ViTTileModel(card, "torch", None, options=BackendOptions(max_batch=8, out_dtype=out_dtype))
        ex = LocalExecutor(worker, readers=2, prefetch=1, kind="thread", model=model)
        try:
            outputs = [o for b in ex.map(prep.scene, batches(prep.plan.tiles, 8)) for o in b]
        finally:
            ex.close()
        assert {o.values.dtype.name for o in outputs} == {out_dtype}
        weights = [float(o.weight.mean()) for o in outputs]
        dst = tmp_path / f"{out_dtype}.tif"
        publish(prep, Encoding.for_card(card), outputs, str(dst), get_settings())
        with rasterio.open(dst) as ds:
            arrays[out_dtype] = ds.read(out_dtype="float32")
    assert any(w == 1 for w in weights) and any(0 < w < 1 for w in weights), (
        weights
    )  # both of the stitcher's paths
    a, b = arrays["float32"], arrays["float16"]
    assert 0 < np.isfinite(a).mean() < 1
    np.testing.assert_array_equal(a, b)  # NaN where nothing came, in both
