"""Presto encoder port against the official reference outputs (shared/reference/presto)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tilefm.errors import WeightsError
from tilefm.models.presto import (
    BAND_NAMES,
    CHANNEL_GROUPS,
    RAW_BAND_NAMES,
    PrestoEncoder,
    load_presto,
    normalize,
    run_reference,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "models" / "presto" / "default_model.pt"
REF_DIR = SHARED / "reference" / "presto"
CASES = ("s2_only", "s2_srtm", "s2_3steps")
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> PrestoEncoder:
    return load_presto(WEIGHTS)


def _ref(case: str) -> dict:
    with np.load(REF_DIR / f"{case}.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _embed(model, x, mask, dw, ll, month, **kw) -> np.ndarray:
    with torch.inference_mode():
        return model(x, mask, dw, ll, month, **kw).numpy()


def test_band_constants():
    assert len(RAW_BAND_NAMES) == 16 and len(BAND_NAMES) == 17
    ref = _ref("s2_only")
    assert list(ref["raw_band_names"]) == list(RAW_BAND_NAMES)
    assert list(ref["x_band_names"]) == list(BAND_NAMES)
    assert sorted(c for chs in CHANNEL_GROUPS.values() for c in chs) == list(range(17))


@pytest.mark.parametrize("case", CASES)
def test_embedding_matches_reference(model, case):
    result = run_reference(model, REF_DIR / f"{case}.npz")
    ref = _ref(case)
    assert result["pixels"] == ref["embedding"].shape[0]
    assert result["embedding"].shape == ref["embedding"].shape
    assert result["embedding"].dtype == np.float32
    assert result["max_abs_diff"] < TOL, result["max_abs_diff"]


@pytest.mark.parametrize("case", CASES)
def test_month_forms_agree(model, case):
    ref = _ref(case)
    args = (ref["x"], ref["mask"], ref["dynamic_world"], ref["latlons"])
    n = ref["x"].shape[0]
    for month in (int(ref["month"]), torch.full((n,), int(ref["month"])), torch.as_tensor(ref["months"])):
        emb = _embed(model, *args, month)
        assert np.abs(emb - ref["embedding"]).max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_tokens_match_reference(model, case):
    ref = _ref(case)
    px = ref["token_pixels"]
    with torch.inference_mode():
        out = model.forward_tokens(
            ref["x"][px], ref["mask"][px], ref["dynamic_world"][px], ref["latlons"][px], int(ref["month"])
        )
    keep = out["keep"].numpy()
    names = np.asarray(out["names"])
    for i in range(len(px)):
        assert list(names[keep[i]]) == list(ref["token_names"])
    for key in ("tokens_in", "tokens_blocks", "tokens_out"):
        got = np.stack([out[key][i].numpy()[keep[i]] for i in range(len(px))])
        diff = np.abs(got - ref[key]).max()
        assert diff < TOL, (key, diff)


@pytest.mark.parametrize("case", CASES)
def test_normalize_reproduces_inputs(case):
    ref = _ref(case)
    present = ref["mask"][..., :16] == 0  # the files' raw is 0 where a modality is absent
    x, mask = normalize(ref["raw"], present)
    assert x.dtype == np.float32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, ref["mask"])
    valid = ref["mask"] == 0
    assert np.abs(x[valid] - ref["x"][valid]).max() <= 1e-6
    # the placeholders of masked channels are the official ones too (raw 0 normalised)
    np.testing.assert_array_equal(x[..., :16], ref["x"][..., :16])


def test_normalize_ndvi_rules():
    raw = np.zeros((3, 1, 16), np.float32)
    raw[:, 0, RAW_BAND_NAMES.index("B4")] = [1000, 0, 1000]
    raw[:, 0, RAW_BAND_NAMES.index("B8")] = [3000, 0, 3000]
    present = np.ones_like(raw, dtype=bool)
    present[2, 0, RAW_BAND_NAMES.index("B8")] = False
    raw[2, 0, RAW_BAND_NAMES.index("B8")] = np.nan  # absent values may be anything
    x, mask = normalize(raw, present)
    assert x[0, 0, 16] == pytest.approx(0.5)
    assert x[1, 0, 16] == 0 and mask[1, 0, 16] == 0  # B8 + B4 <= 0 -> 0, still present
    assert mask[2, 0, 16] == 1 and np.isfinite(x).all()


def test_mixed_masks_in_one_batch(model):
    """Half the pixels with SRTM masked, half with it: each pixel as if run alone."""
    ref = _ref("s2_srtm")
    x, mask, dw, ll = ref["x"], ref["mask"].copy(), ref["dynamic_world"], ref["latlons"]
    srtm = list(CHANNEL_GROUPS["SRTM"])
    drop = np.arange(len(x)) % 2 == 0
    mask[np.ix_(drop, [0], srtm)] = 1
    mixed = _embed(model, x, mask, dw, ll, 1)
    alone_a = _embed(model, x[drop], mask[drop], dw[drop], ll[drop], 1)
    alone_b = _embed(model, x[~drop], mask[~drop], dw[~drop], ll[~drop], 1)
    assert np.abs(mixed[drop] - alone_a).max() < 1e-5
    assert np.abs(mixed[~drop] - alone_b).max() < 1e-5
    # SRTM masked == the s2_only case; SRTM kept == the s2_srtm case
    assert np.abs(mixed[drop] - _ref("s2_only")["embedding"][drop]).max() < TOL
    assert np.abs(mixed[~drop] - ref["embedding"][~drop]).max() < TOL
    # chunking does not change the result
    chunked = _embed(model, x, mask, dw, ll, 1, chunk_size=37)
    assert np.abs(chunked - mixed).max() < 1e-5


def test_mixed_masks_multitemporal(model):
    """Pixels dropping different tokens at different timesteps, vs one pixel at a time."""
    ref = _ref("s2_3steps")
    n = 12
    x, mask = ref["x"][:n], ref["mask"][:n].copy()
    dw, ll, months = ref["dynamic_world"][:n].copy(), ref["latlons"][:n], ref["months"][:n]
    rgb, swir = list(CHANNEL_GROUPS["S2_RGB"]), list(CHANNEL_GROUPS["S2_SWIR"])
    mask[1, 1, rgb[1]] = 1  # partial group drops the whole RGB token at t1
    mask[2, :, swir] = 1
    mask[3, 0, 14] = 1  # SRTM looks at timestep 0 only
    mask[4, 1:, 14:16] = 1  # ... so this changes nothing
    mask[5, :, :] = 1  # only the location token left
    mask[6, 2, :] = 1
    dw[7] = [3, 9, 5]  # Dynamic World tokens
    mixed = _embed(model, x, mask, dw, ll, torch.as_tensor(months))
    for i in range(n):
        alone = _embed(model, x[i : i + 1], mask[i : i + 1], dw[i : i + 1], ll[i : i + 1], months[i : i + 1])
        assert np.abs(mixed[i] - alone[0]).max() < 1e-5, i
    assert np.abs(mixed[4] - ref["embedding"][4]).max() < TOL
    assert np.abs(mixed[0] - ref["embedding"][0]).max() < TOL


def test_masked_values_do_not_matter(model):
    ref = _ref("s2_3steps")
    x, mask = ref["x"].copy(), ref["mask"].copy()
    mask[::3, 1, 2:5] = 1  # also some per-pixel masking
    args = (ref["dynamic_world"], ref["latlons"], int(ref["month"]))
    base = _embed(model, x, mask, *args)
    rng = np.random.default_rng(0)
    noisy = np.where(mask == 1, rng.normal(0, 100, x.shape).astype(np.float32), x)
    assert np.abs(_embed(model, noisy, mask, *args) - base).max() <= 1e-6
    nans = np.where(mask == 1, np.float32(np.nan), x)
    assert np.abs(_embed(model, nans, mask, *args) - base).max() <= 1e-6


def test_load_presto_errors(tmp_path):
    with pytest.raises(WeightsError):
        load_presto(tmp_path / "missing.pt")
    no_encoder = tmp_path / "decoder_only.pt"
    torch.save({"decoder.weight": torch.zeros(2)}, no_encoder)
    with pytest.raises(WeightsError, match="encoder"):
        load_presto(no_encoder)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        load_presto(garbage)


def test_loaded_model_state(model):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    assert set(model.state_dict()) == set(enc)


def test_normalize_torch_equals_numpy() -> None:
    """The GPU path normalises in torch: the same float32 values, masks and NDVI rule as numpy."""
    import torch

    from tilefm.models.presto import RAW_BAND_NAMES, normalize, normalize_torch

    rng = np.random.default_rng(7)
    raw = rng.uniform(-100, 12000, (5000, 1, len(RAW_BAND_NAMES))).astype(np.float32)
    present = rng.random(raw.shape) > 0.2
    raw[~present] = np.nan  # ignored where missing
    raw[:50, :, RAW_BAND_NAMES.index("B4")] = -raw[:50, :, RAW_BAND_NAMES.index("B8")]  # B8 + B4 <= 0
    x, mask = normalize(raw, present)
    xt, mt = normalize_torch(torch.from_numpy(raw), torch.from_numpy(present))
    np.testing.assert_array_equal(xt.numpy(), x)
    np.testing.assert_array_equal(mt.numpy(), mask)
