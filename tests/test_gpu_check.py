"""scripts/gpu-check --cpu: the GPU check's own steps, with tiny shapes on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gptlib.paths import REPO_ROOT


def test_gpu_check_cpu_mode_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([str(REPO_ROOT / "scripts" / "gpu-check"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["passed"] and result["machine"]["mode"] == "cpu"
    from gptlib.device import cpu_has_bf16

    precision = "bf16" if cpu_has_bf16() else "fp32"
    assert {(row["precision"], row["side"]) for row in result["bench"]} == {
        (precision, "reference"), (precision, "gptlib")}
    assert all(row["tokens_per_s"] > 0 for row in result["bench"])
    (resume,) = result["resume"]
    assert resume["killed_mid_run"] and resume["killed_at"] == "step-3" and resume["identical"]
    assert resume["max_abs_difference"] == 0.0
    assert result["two_ranks"]["backend"] == "gloo" and result["two_ranks"]["world_size"] == 2
    assert "resume after SIGKILL, compile off: killed at step-3, 12 steps: bit-identical" in done.stdout
    assert "2 ranks: gloo" in done.stdout
