"""bench/step_regions.py: the split denoiser sends each timestep to the side of the split it belongs to (an
unconditional model below gets no labels), and the spaced lists cover each side with the stride asked."""

from __future__ import annotations

import torch
from bench_scripts import load_bench_script

from tmpq.sampling.conditioning import Conditioning


def test_split_denoiser_routes_by_timestep_and_drops_labels_for_an_unconditional_side():
    mod = load_bench_script("step_regions")
    calls = []
    high = lambda x, t, cond: calls.append(("high", int(t[0]), cond is not None)) or x + 1  # noqa: E731
    low = lambda x, t: calls.append(("low", int(t[0]))) or x - 1  # noqa: E731
    split = mod.SplitDenoiser(high, low, 300, low_conditional=False)
    x, cond = torch.zeros(2, 1, 4, 4), Conditioning.cycle(torch.tensor([1, 2]), 2)
    assert torch.equal(split(x, torch.full((2,), 300), cond), x + 1)
    assert torch.equal(split(x, torch.full((2,), 299), cond), x - 1)
    assert calls == [("high", 300, True), ("low", 299)]


def test_spaced_lists_include_both_ends():
    mod = load_bench_script("step_regions")
    assert mod.spaced(990, 300, 10)[0] == 990 and mod.spaced(990, 300, 10)[-1] == 300
    assert mod.spaced(250, 0, 50) == [250, 200, 150, 100, 50, 0]
