"""Bring your own model: diffusers pipelines and models (local dirs, the same code path as hub ids), prediction
types and beta schedules from the scheduler config, `module:factory` denoisers, clear errors otherwise."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.builtin import build_unet, builtin_unet_config
from tmpq.models.loading import load_model
from tmpq.sampling.schedules import NoiseSchedule


def rgb_unet(out_mult: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3 * out_mult,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture(scope="module")
def v_pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=rgb_unet(), scheduler=sched).save_pretrained(d)
    return d


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_from_scheduler_config_is_bit_identical(beta_schedule):
    d = DDPMScheduler(beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02)
    assert torch.equal(NoiseSchedule.from_scheduler_config(dict(d.config)).alphas_cumprod, d.alphas_cumprod)


def test_pipeline_dir_loads_with_its_schedule_and_v_prediction_becomes_epsilon(v_pipeline):
    loaded = load_model(str(v_pipeline))
    assert loaded.schedule.beta_schedule == "squaredcos_cap_v2" and loaded.schedule.prediction_type == "v_prediction"
    assert loaded.sample_shape == (3, 16, 16) and loaded.weights_path is not None
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        v = loaded.denoiser.unet(x, t).sample
        eps = loaded.denoiser(x, t)
    a = loaded.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v  # diffusers' v-prediction definition of x0
    assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_loading_a_pipeline_prints_no_warning_about_accelerate(v_pipeline):
    """diffusers warns on every model load that `accelerate` is missing (it asks for low-memory loading by default);
    tmpq asks for that only where accelerate is installed, so a user's output carries no such warning."""
    import importlib.util
    import logging

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: diffusers has nothing to warn about")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("diffusers")  # diffusers' loggers report here and do not propagate to the root
    log.addHandler(handler)
    try:
        load_model(str(v_pipeline))
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "accelerate" in m]


def test_sample_and_x0_prediction_and_learned_variance(tmp_path):
    d = tmp_path / "p"
    DDPMPipeline(unet=rgb_unet(out_mult=2), scheduler=DDPMScheduler(prediction_type="sample")).save_pretrained(d)
    loaded = load_model(str(d))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    with torch.no_grad():
        x0 = loaded.denoiser.unet(x, t).sample[:, :3]
        eps = loaded.denoiser(x, t)
    a = loaded.schedule.alphas_cumprod[300]
    assert eps.shape == x.shape and torch.allclose(eps, (x - a.sqrt() * x0) / (1 - a).sqrt(), atol=1e-5)


def test_bare_model_dir_assumes_a_default_schedule_and_says_so(tmp_path):
    rgb_unet().save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.schedule == NoiseSchedule() and "assumed DDPM" in loaded.notes[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"transformer": ["diffusers", "DiTTransformer2DModel"], "unet": None}, "non-UNet denoiser"),
        ({"unet": ["diffusers", "UNet2DConditionModel"]}, "no text_encoder"),
        ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, "not supported"),
        ({"text_encoder": ["transformers", "CLIPTextModel"]}, "unconditional UNet2DModel"),
    ],
)
def test_unsupported_pipelines_name_what_is_supported(v_pipeline, tmp_path, edit, message):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(v_pipeline, d)
    index = json.loads((d / "model_index.json").read_text())
    index.update(edit)
    (d / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    with pytest.raises(TmpqError, match=message) as e:
        load_model(str(d))
    assert "Supported:" in str(e.value) and "UNet2DConditionModel" in str(e.value)


def test_factory_models_and_bad_specs(monkeypatch, tmp_path):
    loaded = load_model("toy_models:tiny")
    assert loaded.sample_shape == (1, 8, 8) and loaded.denoiser(torch.zeros(1, 1, 8, 8), torch.tensor([5])).shape
    with pytest.raises(TmpqError, match="must return"):
        load_model("toy_models:bad")
    with pytest.raises(TmpqError, match="cannot be imported"):
        load_model("no_such_module:fn")
    with pytest.raises(TmpqError, match="not found"):
        load_model(str(tmp_path / "missing"))
    import diffusers.utils.constants
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network wait: the constants are read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(TmpqError, match="could not load"):
        load_model("no-such-org/no-such-model")  # a hub id: diffusers' own loader, offline here


def test_pipeline_search_export_load_sample_end_to_end(v_pipeline, tmp_path):
    """An RGB v-prediction pipeline through the CLI: the classifier FID does not fit it, the pixel proxy does."""
    runner = CliRunner()
    run = tmp_path / "run"
    base = ["search", "--model", str(v_pipeline), "--run-dir", str(run), "--like", "W8A8", "--budget-steps", "3"]
    base += ["--steps", "3", "--generations", "2", "--population", "4", "--calib-samples", "2", "--calib-steps", "3"]
    base += ["--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4", "--recon-iters", "4"]
    res = runner.invoke(app, base)
    assert res.exit_code == 2 and "--proxy-space pixels" in res.output
    res = runner.invoke(app, [*base, "--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "exp"
    assert runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(out)]).exit_code == 0
    loaded = tmpq.load(out)
    assert loaded.schedule.prediction_type == "v_prediction" and loaded.sample_shape == (3, 16, 16)
    assert torch.equal(loaded.sample(3, seed=1), tmpq.CompressionResult.open(run).sampler().sample(3, seed=1))


# --- a model directory is data: no unpickling, no imports it names, one clear error for each damage ---


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, monkeypatch):
    DDPMPipeline(unet=rgb_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "p", safe_serialization=False)
    rgb_unet().save_pretrained(tmp_path / "m", safe_serialization=False)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a model directory")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for d, where in ((tmp_path / "p", "the unet of"), (tmp_path / "m", "")):
        with pytest.raises(TmpqError, match="only pickle weights") as e:
            load_model(str(d))
        msg = str(e.value)
        assert msg.startswith(where) and "diffusion_pytorch_model.bin" in msg
        assert "safetensors only" in msg and "save_pretrained(..., safe_serialization=True)" in msg


def _trap_module(tmp_path, monkeypatch, name: str):
    """A module that leaves a marker file when imported: proves that a refused model_index.json imported nothing."""
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_suffix('.imported').touch()\n"
        "class UNet2DModel: ...\nclass AutoencoderKL: ...\nclass CLIPTextModel: ...\nclass DDPMScheduler: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / f"{name}.imported"


@pytest.mark.parametrize(
    ("key", "edit"),
    [
        ("unet", {"unet": ["TRAP", "UNet2DModel"]}),
        ("unet", {"unet": ["transformers", "UNet2DModel"]}),
        ("scheduler", {"scheduler": ["TRAP", "DDPMScheduler"]}),
        ("scheduler", {"scheduler": ["diffusers", "DiffusionPipeline"]}),
        ("vqvae", {"vqvae": ["TRAP", "AutoencoderKL"]}),
        ("vae", {"vae": ["diffusers", "StableDiffusionPipeline"]}),
        (
            "text_encoder",
            {
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["TRAP", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
            },
        ),
        (
            "tokenizer",
            {
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "AutoTokenizer"],
            },
        ),
    ],
)
def test_model_index_may_name_only_supported_classes_and_nothing_is_imported(
    v_pipeline, tmp_path, monkeypatch, key, edit
):
    name = f"tmpq_trap_{tmp_path.name}".replace("-", "_")
    marker = _trap_module(tmp_path, monkeypatch, name)
    d = tmp_path / "p"
    shutil.copytree(v_pipeline, d)
    index = json.loads((d / "model_index.json").read_text())
    index.update({k: [name if v[0] == "TRAP" else v[0], v[1]] for k, v in edit.items()})
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TmpqError, match=f"for its {key}; tmpq loads only") as e:
        load_model(str(d))
    assert "Fix the entry" in str(e.value)
    assert not marker.exists()


def test_malformed_model_index_entries_are_named(v_pipeline, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(v_pipeline, d)
    index = json.loads((d / "model_index.json").read_text())
    for bad, message in (
        ({**index, "unet": ["diffusers"]}, "not \\[library, class\\]"),
        ({**index, "unet": ["diffusers", 3]}, "not \\[library, class\\]"),
        (["diffusers", "UNet2DModel"], "not a JSON object"),
    ):
        (d / "model_index.json").write_text(json.dumps(bad))
        with pytest.raises(TmpqError, match=message):
            load_model(str(d))


def test_broken_json_configs_are_named_not_taken_for_missing_files(v_pipeline, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(v_pipeline, d)
    (d / "model_index.json").write_text('{"_class_name": "DDPMPipeline", ')
    with pytest.raises(TmpqError, match="model_index.json is not valid JSON") as e:
        load_model(str(d))
    assert "config.json" not in str(e.value)
    shutil.copytree(v_pipeline, tmp_path / "s")
    (tmp_path / "s" / "scheduler" / "scheduler_config.json").write_text("not json")
    with pytest.raises(TmpqError, match="scheduler_config.json is not valid JSON"):
        load_model(str(tmp_path / "s"))  # not a silently assumed default schedule
    rgb_unet().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(TmpqError, match="config.json is not valid JSON"):
        load_model(str(tmp_path / "m"))


def _tmpq_train_file(path, config: dict, state_config: dict | None = None, **meta) -> str:
    """A safetensors UNet as `tmpq train` writes it: the weights, the UNet config (and more) in the metadata."""
    state = build_unet(state_config or config).state_dict()
    meta = {"unet_config": json.dumps(config), **meta}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return str(path)


def test_damaged_tmpq_train_files_are_one_clear_error(tmp_path):
    small, large = builtin_unet_config((8, 16)), builtin_unet_config((16, 32))
    assert load_model(_tmpq_train_file(tmp_path / "ok.safetensors", small)).sample_shape == (1, 32, 32)
    with pytest.raises(TmpqError, match="weights do not fit its unet_config .*size mismatch") as e:
        load_model(_tmpq_train_file(tmp_path / "shapes.safetensors", small, state_config=large))
    assert "tmpq train" in str(e.value)
    bad = tmp_path / "json.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad), metadata={"unet_config": "{not json"})
    with pytest.raises(TmpqError, match="'unet_config' metadata that is not valid JSON"):
        load_model(str(bad))
    with pytest.raises(TmpqError, match="'noise_schedule' metadata that is not a valid noise schedule"):
        load_model(_tmpq_train_file(tmp_path / "s.safetensors", small, noise_schedule="{broken"))
    with pytest.raises(TmpqError, match="'noise_schedule' metadata that is not a valid noise schedule"):
        load_model(_tmpq_train_file(tmp_path / "k.safetensors", small, noise_schedule='{"no_such_key": 1}'))


FACTORIES = """
import torch
from torch import nn
from tmpq.sampling.schedules import NoiseSchedule


class Conv(nn.Module):
    def __init__(self, out_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(1, out_channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def raises():
    raise RuntimeError("weights missing on this machine")


def wrong_output_shape():
    return Conv(out_channels=2), NoiseSchedule(), (1, 8, 8)


class Pair(Conv):
    def forward(self, x, t):
        return x, x


def returns_a_tuple():
    return Pair(), NoiseSchedule(), (1, 8, 8)


def wrong_sample_shape():
    return Conv(), NoiseSchedule(), (3, 8, 8)


def bad_sample_shape():
    return Conv(), NoiseSchedule(), ("one", 8, 8)


def wrong_shape_loaded_model():
    from tmpq.models.loading import LoadedModel

    return LoadedModel(Conv(out_channels=2), NoiseSchedule(), (1, 8, 8), "x", None)


def fine():
    return Conv(), NoiseSchedule(), [1, 8, 8]


not_a_function = 3
"""


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("raises", "raised RuntimeError: weights missing on this machine; fix the factory"),
        ("wrong_output_shape", r"returned \(1, 2, 8, 8\) for an input of shape \(1, 1, 8, 8\)"),
        ("wrong_shape_loaded_model", r"returned \(1, 2, 8, 8\) for an input of shape \(1, 1, 8, 8\)"),
        ("returns_a_tuple", "its denoiser returned tuple"),
        ("wrong_sample_shape", r"fails on a batch of its sample shape \(1, 3, 8, 8\) \(RuntimeError"),
        ("bad_sample_shape", "must be positive integers"),
        ("not_a_function", "not a function"),
    ],
)
def test_factory_failures_are_one_clear_error(tmp_path, monkeypatch, factory, message):
    module = f"tmpq_factories_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{module}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model(f"{module}:fine").sample_shape == (1, 8, 8)
    with pytest.raises(TmpqError, match=message) as e:
        load_model(f"{module}:{factory}")
    assert f"{module}:{factory}" in str(e.value)


def test_factory_module_that_fails_on_import_is_one_clear_error(tmp_path, monkeypatch):
    module = f"tmpq_broken_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{module}.py").write_text("raise ValueError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TmpqError, match=f"importing {module} raised ValueError: needs a GPU; fix that module"):
        load_model(f"{module}:fn")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a Hub that is never reached: every request huggingface_hub would make is
    recorded and fails as a network outage does."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    requests = []

    def unreachable(url, *args, **kwargs):
        requests.append(url)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", unreachable)

    def cache(repo_id: str, directory):
        """Put a saved model into the cache as a download of `repo_id` would."""
        repo = tmp_path / "hf_cache" / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(directory, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)

    return requests, cache


def test_malformed_hub_ids_are_refused_before_any_request(hub):
    requests, _ = hub
    for spec in ("no such/model here", "org/name/extra", "org--x/name", "org/name.git"):
        with pytest.raises(TmpqError, match="neither an existing path nor a Hugging Face Hub id"):
            load_model(spec)
    assert requests == []


def test_offline_hub_id_fails_at_once_naming_hf_hub_offline(hub, monkeypatch):
    requests, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: huggingface_hub's own constant still says online
    with pytest.raises(TmpqError, match="could not load 'no-such-org/no-such-model': HF_HUB_OFFLINE is set") as e:
        load_model("no-such-org/no-such-model")
    assert "not in the local Hugging Face cache" in str(e.value) and requests == []


def test_unreachable_hub_fails_after_one_request_or_loads_from_the_cache(hub, v_pipeline, tmp_path):
    requests, cache = hub
    with pytest.raises(TmpqError, match="the Hugging Face Hub cannot be reached and it is not in the local"):
        load_model("no-such-org/no-such-model")
    assert len(requests) == 1  # one quick probe, not huggingface_hub's retries of every file
    cache("tmpq-test/pixel", v_pipeline)
    loaded = load_model("tmpq-test/pixel")  # the hub code path (hf_hub_download, from_pretrained) on a cached repo
    assert loaded.schedule.prediction_type == "v_prediction" and loaded.sample_shape == (3, 16, 16)
    assert "loaded from the local Hugging Face cache" in loaded.notes[-1]
    DDPMPipeline(unet=rgb_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "b", safe_serialization=False)
    cache("tmpq-test/pickled", tmp_path / "b")
    with pytest.raises(TmpqError, match="unet of 'tmpq-test/pickled' has no .safetensors weights.*safe_serialization"):
        load_model("tmpq-test/pickled")
