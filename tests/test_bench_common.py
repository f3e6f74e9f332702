"""bench/common.py, what the bench scripts share: --help that teaches, the results file, the one-line refusal
when no local broker can be measured. The scripts run as a reader runs them: `python -m bench.<name>`."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# bench/ is scripts, not an installed package: load the module from its file (stdlib imports only at the top)
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def bench(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("name,option,step", [
    ("sizing", "--events", "3. The projection"), ("pipeline", "--events", "2. Baseline"),
    ("restore", "--scopes", "the CPU part of a"), ("sink_statements", "--events", "hence the wrapper"),
    ("sink_insert", "--events", "C  a ledger without usage_hourly_mv"), ("worker_stages", "--events", "the ratio is of the minima"),
    ("profile", "--events", "- bare: a plain confluent-kafka consume")])
def test_help_prints_the_whole_docstring_how_to_run_and_what_it_measures(name, option, step):
    """bench.common.parser's layout for every script: the docstring's first line, the options, then the rest of it."""
    done = bench(f"bench.{name}", "--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    listed = out.index(f"  {option} {option[2:].upper()}", out.index("options:"))  # the option, in the list
    assert listed < out.index(f"-m bench.{name} [{option}") < out.index(step)  # then how to run it, what it measures


def test_sizing_refuses_in_one_line_without_a_local_broker(tmp_path):
    done = bench("bench.sizing", "--events", "10", METERLINE_DATA_DIR=str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: no local broker under {tmp_path / 'kafka'}: start one (`meterline kafka start`), "
                                   "set METERLINE_DATA_DIR to the one running, or give the figures with --assume")


def test_end_to_end_refuses_in_one_line_without_a_local_broker(tmp_path):
    """Without it the broker's CPU per event read 0.0 and its JIT went unwarmed, and the table did not say so."""
    done = bench("bench.pipeline", "--end-to-end", "--events", "10", METERLINE_DATA_DIR=str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: no local broker under {tmp_path / 'kafka'}: start one (`meterline kafka start`), "
                                   "set METERLINE_DATA_DIR to the one running, or measure a broker elsewhere with "
                                   "--broker-warmup-s 0 (its CPU then reads 0)")


def test_a_result_section_is_appended_under_the_files_title(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    common.append_result("x", "## first\n\n| a |\n", "X benchmark")
    path = common.append_result("x", "\n## second\n", "X benchmark")
    assert path.read_text() == "# X benchmark\n\n## first\n\n| a |\n\n## second\n"


def test_the_command_line_names_the_brokers_measured(monkeypatch):
    monkeypatch.setenv("METERLINE_KAFKA_BOOTSTRAP", "10.0.0.7:9092")
    assert common.command("pipeline", "--events 5") == "METERLINE_KAFKA_BOOTSTRAP=10.0.0.7:9092 .venv/bin/python -m bench.pipeline --events 5"


def test_code_loads_the_other_checkouts_package_not_this_trees(tmp_path):
    """--code DIR (load_code): a baseline's modules are what the bench then imports, so a before/after in one run
    really measures two trees (without it, the editable install would quietly serve this tree's)."""
    (tmp_path / "streams").mkdir()
    (tmp_path / "streams" / "spend.py").write_text("WHERE = 'baseline'\n")
    done = subprocess.run([sys.executable, "-c", "from bench.common import load_code; load_code('streams', "
                           f"{str(tmp_path)!r}); from meterline.streams import spend; print(spend.WHERE)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "baseline"
    untouched = subprocess.run([sys.executable, "-c", "from bench.common import load_code; load_code('streams', None); "
                                "from meterline.streams import spend; print(spend.__file__)"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert untouched.stdout.strip() == str(ROOT / "streams" / "spend.py"), untouched.stderr


def test_worker_stages_times_every_stage_for_this_tree_and_a_baseline():
    """bench.worker_stages over the shared stages (bench.common.worker_stages, which bench.compiled times too): each
    of them, this tree's and a baseline's (here the same streams/, loaded a second time), with their ratio."""
    done = bench("bench.worker_stages", "--events", "300", "--sessions", "30", "--repeat", "2", "--code", str(ROOT),
                 "--stages", ",".join(common.STAGES))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == list(common.STAGES)
    assert all("; before " in line and "after/before " in line for line in lines)
