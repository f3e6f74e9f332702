"""bench/compiled.py, the compiled-vs-pure experiment: its copies load in place of this tree's streams/ (not the
editable install's), and its stage measurement runs on the pure code without a broker or a compiler."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_a_copy_is_what_loads_and_its_stages_are_measured(tmp_path):
    tree = python(f"from pathlib import Path; from bench.compiled import build; print(build(Path({str(tmp_path)!r}), 'pure'))")
    assert tree.returncode == 0, tree.stderr
    tree = tree.stdout.strip()
    assert (Path(tree) / "meterline" / "streams" / "spend.py").read_text() == (ROOT / "streams" / "spend.py").read_text()
    done = python(f"import json; from bench.compiled import load, stage_costs, messages, STAGES\n"
                  f"compiled = load({tree!r})\n"
                  "import meterline.streams.worker as w\n"
                  "print(json.dumps([compiled, w.__file__, stage_costs(messages(300, 30, 'usage')), len(STAGES)]))")
    assert done.returncode == 0, done.stderr
    compiled, worker_file, stages, names = json.loads(done.stdout.splitlines()[-1])
    assert compiled == [] and worker_file.startswith(tree)  # the copy's worker, not this tree's
    assert len(stages) == names and all(us > 0 for us in stages)


def test_a_copy_missing_a_module_is_refused_not_filled_from_this_tree(tmp_path):
    (tmp_path / "meterline" / "streams").mkdir(parents=True)  # an empty copy: the editable finder would supply ours
    done = python(f"from bench.compiled import load; load({str(tmp_path)!r})")
    assert done.returncode != 0 and "AssertionError" in done.stderr and str(ROOT / "streams" / "spend.py") in done.stderr
