from __future__ import annotations

from tmpq.models.denoiser import UNetDenoiser
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search.profile import change_profile
from tmpq.search.space import group_starts


def test_change_profile_is_a_usable_grouping(make_tiny_unet):
    den = UNetDenoiser(make_tiny_unet())
    prof = change_profile(den, NoiseSchedule(), (1, 32, 32), num_samples=2, num_steps=10)
    assert len(prof) == 1000 and all(v >= 0 for v in prof) and sum(prof) > 0
    assert prof == change_profile(den, NoiseSchedule(), (1, 32, 32), num_samples=2, num_steps=10)  # seeded
    starts = group_starts("change", 6, 1000, prof)
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 1000
