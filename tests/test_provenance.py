from pathlib import Path

from tmpq.provenance import cpu_model, provenance


def test_every_result_names_the_cpu_model_not_only_its_instruction_set():
    machine = provenance()["machine"]
    assert machine["cpu"] == cpu_model() and machine["cpu"].strip()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        if names:
            assert machine["cpu"] == names[0]
