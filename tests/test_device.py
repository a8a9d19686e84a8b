"""Where the model runs: device names resolved with one clear error, the batch size a device wants, the fused
fake-quantizer the GPU path uses (bit-identical to the CPU chain), local workers spread over GPUs, models and
samplers moved whole; on a CUDA machine, the journey itself on the GPU."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tmpq.cli import app
from tmpq.device import default_batch_size, module_device, resolve_device
from tmpq.errors import TmpqError
from tmpq.quant.primitives import affine_qparams, fake_quantize_, fake_quantize_fused, fused_qparams
from tmpq.search.parallel import WorkerSpec, lane_spec

CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_there_is_one_and_names_are_checked():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(TmpqError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(TmpqError, match="CUDA device"):
        resolve_device("cuda:99" if CUDA else "cuda")


def test_a_bad_device_is_one_message_and_exit_2():
    res = CliRunner().invoke(app, ["sample", "--device", "tpu", "--out", "x.png"])
    assert res.exit_code == 2 and "tpu" in res.output and "Traceback" not in res.output


def test_batch_size_follows_the_device():
    assert default_batch_size("cpu") == 64 and default_batch_size("cuda") == 512
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu") and module_device(object()).type == "cpu"


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("split", [None, 3])
def test_the_fused_fake_quantizer_equals_the_in_place_chain(bits, split):
    """The GPU path's one kernel and the CPU path's six in-place ops give the same floats, bit for bit."""
    x = torch.randn(4, 7, 5, 5, generator=torch.Generator().manual_seed(bits)) * 3
    scale, zp = affine_qparams(torch.tensor([-2.5, -0.7]), torch.tensor([3.1, 5.3]), bits)
    ref = x.clone()
    parts = [ref] if split is None else [ref[:, :split], ref[:, split:]]
    for i, part in enumerate(parts):
        fake_quantize_(part, scale[i], zp[i], bits)
    got = fake_quantize_fused(x, fused_qparams(scale.tolist(), [int(z) for z in zp], split, 7, x.device), bits)
    assert torch.equal(got, ref)


def test_local_workers_spread_over_the_gpus(monkeypatch):
    spec = WorkerSpec("m:f", {"device": "cuda", "run_dir": "r"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [lane_spec(spec, i).kwargs["device"] for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert lane_spec(spec, 1).kwargs["run_dir"] == "r"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert lane_spec(spec, 1) is spec  # one GPU: every worker shares it
    cpu = WorkerSpec("m:f", {"device": "cpu"})
    assert lane_spec(cpu, 2) is cpu


def test_a_loaded_model_moves_whole(make_tiny_unet):
    from tmpq.models.denoiser import UNetDenoiser
    from tmpq.models.loading import LoadedModel
    from tmpq.sampling.schedules import NoiseSchedule

    loaded = LoadedModel(UNetDenoiser(make_tiny_unet(0)), NoiseSchedule(), (1, 32, 32), "tiny", None)
    assert loaded.to("cpu") is loaded and loaded.device == torch.device("cpu")


@pytest.mark.skipif(not CUDA, reason="CUDA only")
def test_fake_quant_sampling_on_cuda_is_close_to_the_cpu(make_denoiser, calib, small_spec):
    """The super-network calibrated on the GPU samples like the CPU one (float rounding apart), and its
    activation quantizers take the fused path there."""
    from tmpq.quant import build_supernet
    from tmpq.sampling.ddim import DDIMSampler, generate
    from tmpq.sampling.schedules import NoiseSchedule, make_timesteps

    cpu = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    gpu = build_supernet(make_denoiser().cuda(), calib, small_spec, progress=False)
    assert module_device(gpu).type == "cuda"
    ddim = DDIMSampler(NoiseSchedule(), make_timesteps("uniform", 5, 1000))
    outs = []
    for sn in (cpu, gpu):
        sn.set_config(sn.uniform_config(6, 8))
        outs.append(generate(sn, ddim, 8, (1, 32, 32), progress=False))
    assert outs[1].device.type == "cpu" and (outs[0] - outs[1]).abs().mean() < 0.05
