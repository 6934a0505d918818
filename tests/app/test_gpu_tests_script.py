"""scripts/gpu_tests.sh: the three parts of `pytest -m gpu` cover every GPU test file exactly once."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_tests.sh"


def _parts() -> dict[str, list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "list"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return {line.split(":")[0]: line.split(":", 1)[1].split() for line in out.strip().splitlines()}


def test_every_gpu_test_file_is_in_exactly_one_part():
    parts = _parts()
    assert sorted(parts) == ["a", "b", "c"]
    listed = [f for files in parts.values() for f in files]
    assert len(listed) == len(set(listed))                      # no file runs twice
    whole_dirs = [d for d in listed if (ROOT / d).is_dir()]
    gpu_files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if re.search(r"mark\.gpu|\"gpu\"", path.read_text()):
            gpu_files.append(str(path.relative_to(ROOT)))
    assert gpu_files, "no GPU test found: the marker's spelling changed?"
    for f in gpu_files:
        assert f in listed or any(f.startswith(d.rstrip("/") + "/") for d in whole_dirs), f"{f} is in no part"


def test_a_file_in_no_part_is_refused(tmp_path):
    """The script refuses to run when a tests/fast file with GPU tests is missing from its lists."""
    for f in (ROOT / "tests" / "fast").glob("test_*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    env = dict(os.environ, GPU_TESTS_SCAN=str(tmp_path))
    ok = subprocess.run(["bash", str(SCRIPT), "list"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0, ok.stdout
    (tmp_path / "test_zz_stray.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    r = subprocess.run(["bash", str(SCRIPT), "list"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and "tests/fast/test_zz_stray.py is in no part" in r.stdout
