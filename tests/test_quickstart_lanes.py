"""The quickstart's two lanes (recipes/quickstart/run.py, Stages): real subprocesses side by side, each lane's
stages in order, one torch thread each, and a failure on either lane named with its log."""

import sys
from pathlib import Path

import pytest

from tests.stages import recipe_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def Stages():
    return recipe_module(ROOT / "recipes" / "quickstart" / "run.py").Stages


def py(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time, pathlib\n" + code]


def test_the_second_lane_runs_beside_the_first_in_its_own_order(Stages, tmp_path):
    stages = Stages(tmp_path, lanes=2)
    seen = tmp_path / "seen"
    with stages.two_lanes():
        # the second lane's first stage waits for the first lane's: this passes only if both run at once
        stages.beside("waits", *py(f"""
for _ in range(400):
    if pathlib.Path({str(tmp_path / 'first')!r}).exists():
        break
    time.sleep(0.05)
else:
    sys.exit('the first lane never ran beside me')
print('threads', os.environ['OMP_NUM_THREADS'])
open({str(seen)!r}, 'a').write('waits\\n')"""))
        stages.beside("after it", *py(f"open({str(seen)!r}, 'a').write('after it\\n')"))
        stages.run("first", *py(f"""
pathlib.Path({str(tmp_path / 'first')!r}).write_text(os.environ['OMP_NUM_THREADS'])
end = time.process_time() + 0.3
while time.process_time() < end:
    pass"""))
    assert seen.read_text() == "waits\nafter it\n"  # in the order queued, both finished when the block ends
    assert (tmp_path / "first").read_text() == "1"
    assert (tmp_path / "logs" / "waits.log").read_text() == "threads 1\n"
    assert set(stages.timings) == {"waits", "after it", "first"}
    assert stages.timings["first"]["cpu_s"] >= 0.3  # the stage's own CPU time, not the other lane's


def test_a_failure_on_the_second_lane_stops_it_and_is_named_with_its_log(Stages, tmp_path):
    stages = Stages(tmp_path, lanes=2)
    with pytest.raises(SystemExit, match=r"stage 'broken' failed with exit code 3 \(its log is .*broken\.log\)"):
        with stages.two_lanes():
            stages.beside("broken", *py("print('what went wrong'); sys.exit(3)"))
            stages.beside("needs it", *py(f"open({str(tmp_path / 'ran')!r}, 'w')"))
            stages.run("meanwhile", *py("pass"))
    assert not (tmp_path / "ran").exists()
    assert (tmp_path / "logs" / "broken.log").read_text() == "what went wrong\n"
    assert "meanwhile" in stages.timings and "broken" not in stages.timings


def test_a_failure_on_the_first_lane_starts_nothing_more_on_the_second(Stages, tmp_path):
    stages = Stages(tmp_path, lanes=2)
    with pytest.raises(SystemExit, match="stage 'first' failed with exit code 1 \\(its log is above\\)"):
        with stages.two_lanes():
            stages.beside("running", *py("time.sleep(1)"))
            stages.beside("queued", *py(f"open({str(tmp_path / 'ran')!r}, 'w')"))
            stages.run("first", *py("sys.exit(1)"))
    assert "running" in stages.timings and not (tmp_path / "ran").exists()


def test_one_lane_runs_every_stage_here_in_order(Stages, tmp_path, capfd):
    stages = Stages(tmp_path, lanes=1)
    with stages.two_lanes():
        stages.beside("second", *py("print('second')"))
        stages.run("first", *py("print('first')"))
    assert capfd.readouterr().out.split("\n").count("second") == 1
    assert list(stages.timings) == ["second", "first"] and not (tmp_path / "logs").exists()
