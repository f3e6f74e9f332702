"""The test run's own machinery: what `make test` relies on to keep a costly module fixture on one process."""
from __future__ import annotations

import re
import subprocess
import sys


def test_loadgroup_runs_a_group_on_one_process(tmp_path):
    """pytest 9.2 moved node ids where pytest-xdist 3.8's loadgroup no longer sets its `@group` suffix: every
    xdist_group was then split over the processes (each built the module fixtures again). pyproject pins below it."""
    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "@pytest.mark.parametrize('i', [pytest.param(i, marks=pytest.mark.xdist_group('g')) for i in range(8)])\n"
        "def test_p(i):\n"
        "    print('WORKER', os.environ['PYTEST_XDIST_WORKER'])\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this repo's options
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "-p", "no:randomly", "-p", "no:cacheprovider",
                          "-n", "2", "--dist", "loadgroup", "-rA", "-v", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(set(re.findall(r"PASSED (\S+@g)\b", run.stdout))) == 8, run.stdout[-3000:]
    assert len(set(re.findall(r"WORKER (gw\d+)", run.stdout))) == 1, run.stdout[-3000:]
