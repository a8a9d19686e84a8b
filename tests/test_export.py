"""Export and reload: bit-identical samples, no unpickling, clear errors for damaged exports."""

from __future__ import annotations

import json

import pytest
import torch

import tmpq
from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError
from tmpq.export import MANIFEST, TENSORS, export_sampler
from tmpq.quant import build_supernet
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import SearchSpace


@pytest.fixture(scope="module")
def compressed(make_denoiser, calib, small_spec) -> CompressedSampler:
    """Two bit phases with different widths per layer, on a non-rule timestep list."""
    sn = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    space = SearchSpace.from_supernet(sn, steps=(4,), phase_bounds=(500,))
    import random

    rng = random.Random(3)
    cand = space.random(rng)
    assert cand.bits[0] != cand.bits[1]
    return CompressedSampler.from_candidate(sn, space, cand, NoiseSchedule(), (1, 32, 32))


def test_export_reload_is_bit_identical(compressed, tmp_path):
    ref = compressed.sample(6, seed=11, batch_size=3)
    out = compressed.export(tmp_path / "exp", info={"fid": 12.5, "fid_samples": 100})
    loaded = tmpq.load(out)
    again = loaded.sample(6, seed=11, batch_size=3)
    assert torch.equal(ref, again)
    assert loaded.timesteps == compressed.timesteps
    assert loaded.bitops() == compressed.bitops()
    assert loaded.info["fid"] == 12.5
    assert "tmpq.load" in (out / "README.md").read_text()


def test_export_ships_integer_codes_not_float_weights(compressed, tmp_path):
    from safetensors.torch import load_file

    out = compressed.export(tmp_path / "exp")
    tensors = load_file(str(out / TENSORS))
    unit = next(n for n, u in compressed.supernet.units.items() if u.kind == "conv" and n.endswith("conv1"))
    assert f"fp.{unit}.weight" not in tensors
    codes = [k for k in tensors if k.startswith(f"q.{unit}.w") and k.endswith("_codes")]
    assert codes and all(tensors[k].dtype == torch.uint8 for k in codes)
    weight = compressed.supernet.units[unit].base.weight
    for k in codes:  # bit-packed: a b-bit layer takes b/8 of a byte per weight
        bits = int(k.split(".w")[-1].split("_")[0])
        assert tensors[k].numel() == (weight.numel() * bits + 7) // 8
    used = {compressed.phase_configs[p][unit][0] for p in range(len(compressed.phase_configs))}
    assert {int(k.split(".w")[-1].split("_")[0]) for k in codes} == used  # only the widths the sampler uses


def test_export_refuses_to_overwrite(compressed, tmp_path):
    out = compressed.export(tmp_path / "exp")
    before = (out / MANIFEST).read_text()
    with pytest.raises(TmpqError, match="already holds an export"):
        export_sampler(compressed, out)
    assert (out / MANIFEST).read_text() == before


def test_export_never_writes_over_files_it_did_not_write(compressed, tmp_path):
    """A user's directory with their own README.md and weights: refused, every file left as it was."""
    d = tmp_path / "userproj"
    d.mkdir()
    (d / "README.md").write_text("x")
    (d / "weights.safetensors").write_text("y")
    for overwrite in (False, True):
        with pytest.raises(TmpqError, match="did not write"):
            export_sampler(compressed, d, overwrite=overwrite)
    assert {p.name: p.read_text() for p in d.iterdir()} == {"README.md": "x", "weights.safetensors": "y"}
    f = tmp_path / "afile"
    f.write_text("z")
    with pytest.raises(TmpqError, match="is a file"):
        export_sampler(compressed, f)
    assert f.read_text() == "z"


def test_overwrite_replaces_an_earlier_export_and_keeps_other_files(compressed, tmp_path):
    out = compressed.export(tmp_path / "exp")
    (out / "notes.txt").write_text("mine")
    export_sampler(compressed, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert tmpq.load(out).timesteps == compressed.timesteps


def test_load_rejects_truncated_tensor_file(compressed, tmp_path):
    out = compressed.export(tmp_path / "exp")
    data = (out / TENSORS).read_bytes()
    (out / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(TmpqError, match="truncated or modified"):
        tmpq.load(out)


def test_load_rejects_tampered_tensor_file(compressed, tmp_path):
    out = compressed.export(tmp_path / "exp")
    data = bytearray((out / TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (out / TENSORS).write_bytes(bytes(data))
    with pytest.raises(TmpqError, match="checksum"):
        tmpq.load(out)


def test_load_rejects_bad_manifests(compressed, tmp_path):
    with pytest.raises(TmpqError, match="not a tmpq export"):
        tmpq.load(tmp_path / "nothing")
    out = compressed.export(tmp_path / "exp")
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text("{")
    with pytest.raises(TmpqError, match="not valid JSON"):
        tmpq.load(out)
    bad = dict(m, phases=[{"no.such.layer": [8, 8]}, *m["phases"][1:]])
    (out / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(TmpqError, match="inconsistent or incomplete"):
        tmpq.load(out)
    (out / MANIFEST).write_text(json.dumps(dict(m, version=99)))
    with pytest.raises(TmpqError, match="re-export"):
        tmpq.load(out)
    (out / MANIFEST).write_text(json.dumps(dict(m, sample_shape=[1, 16, 16])))
    with pytest.raises(TmpqError, match="sample_shape"):  # not "resize the images": the manifest is at fault
        tmpq.load(out)


def test_phase_count_must_match_bounds(compressed):
    with pytest.raises(TmpqError, match="one allocation per phase"):
        CompressedSampler(
            compressed.supernet, compressed.schedule, compressed.timesteps, compressed.phase_configs[:1], (500,)
        )
