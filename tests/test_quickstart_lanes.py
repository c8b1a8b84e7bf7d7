"""The quickstart's parallel stages (recipes/quickstart/run.py, Stages.parallel): real subprocesses two at a time,
one torch thread each, every stage after the stages it needs, and a failure named with its log."""

import os
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


def wait_for(path: Path, then: str) -> list[str]:
    """A stage that passes only if `path` appears while it runs (another stage beside it writes it)."""
    return py(f"""
for _ in range(400):
    if pathlib.Path({str(path)!r}).exists():
        break
    time.sleep(0.05)
else:
    sys.exit('nothing ran beside me')
{then}""")


def test_two_stages_run_side_by_side_and_each_starts_after_what_it_needs(Stages, tmp_path):
    stages = Stages(tmp_path, jobs=2)
    seen, first = tmp_path / "seen", tmp_path / "first"
    append = "open({!r}, 'a').write({!r})".format
    with stages.parallel():
        stages.run("waits", *wait_for(first, f"print('threads', os.environ['OMP_NUM_THREADS']); {append(str(seen), 'waits ')}"))
        # queued second, but it needs "waits": the second worker skips it for "first", which lets "waits" finish
        stages.run("after it", *py(append(str(seen), "after-it ")), after=["waits"],
                   then=lambda: seen.write_text(seen.read_text() + "then"))
        stages.run("first", *py(f"""
pathlib.Path({str(first)!r}).write_text(os.environ['OMP_NUM_THREADS'])
end = time.process_time() + 0.3
while time.process_time() < end:
    pass"""))
        assert not seen.exists()  # queued, not run, until the block ends
    assert seen.read_text() == "waits after-it then"  # `then` runs when its stage is done
    assert first.read_text() == "1"
    assert (tmp_path / "logs" / "waits.log").read_text() == "threads 1\n"
    assert set(stages.timings) == {"waits", "after it", "first"}
    assert stages.timings["first"]["cpu_s"] >= 0.3  # the stage's own CPU time, not the other worker's


def test_a_failure_starts_nothing_more_and_is_named_with_its_log(Stages, tmp_path):
    stages = Stages(tmp_path, jobs=2)
    broken = tmp_path / "broken-started"
    with pytest.raises(SystemExit, match=r"stage 'broken' failed with exit code 3 \(its log is .*broken\.log\)"):
        with stages.parallel():
            stages.run("running", *wait_for(broken, "time.sleep(0.5)"))  # still running when "broken" fails
            stages.run("broken", *py(f"pathlib.Path({str(broken)!r}).touch(); print('what went wrong'); sys.exit(3)"))
            stages.run("needs it", *py(f"open({str(tmp_path / 'ran')!r}, 'w')"), after=["broken"])
            stages.run("independent", *py(f"open({str(tmp_path / 'ran')!r}, 'w')"))
    assert not (tmp_path / "ran").exists()
    assert (tmp_path / "logs" / "broken.log").read_text() == "what went wrong\n"
    assert set(stages.timings) == {"running"}  # it finished; nothing started after the failure


def test_a_stage_after_one_no_earlier_stage_is_named_is_refused(Stages, tmp_path):
    stages = Stages(tmp_path, jobs=2)
    with pytest.raises(ValueError, match=r"stage 'b' is queued after \['nowhere'\]"):
        with stages.parallel():
            stages.run("b", *py("pass"), after=["nowhere"])
    assert not stages.timings


def test_one_job_runs_every_stage_here_in_order(Stages, tmp_path, capfd):
    stages = Stages(tmp_path, jobs=1)
    with stages.parallel():
        stages.run("second", *py("print('second')"))
        stages.run("first", *py("print('first')"), after=["second"])
    assert capfd.readouterr().out.split("\n").count("second") == 1
    assert list(stages.timings) == ["second", "first"] and not (tmp_path / "logs").exists()


def test_a_lone_queued_stage_runs_here_with_every_thread(Stages, tmp_path, capfd):
    stages = Stages(tmp_path, jobs=2)
    done = []
    with stages.parallel():
        stages.run("alone", *py("print('alone', os.environ.get('OMP_NUM_THREADS'))"), then=lambda: done.append(1))
    assert f"alone {os.environ.get('OMP_NUM_THREADS')}" in capfd.readouterr().out  # not forced to 1 thread
    assert done == [1] and not (tmp_path / "logs").exists()


def test_a_failing_then_is_raised_and_stops_the_stages_after_it(Stages, tmp_path):
    stages = Stages(tmp_path, jobs=2)

    def broken():
        raise OSError("cannot rename")

    with pytest.raises(OSError, match="cannot rename"):
        with stages.parallel():
            stages.run("a", *py("pass"), then=broken)
            stages.run("b", *py(f"open({str(tmp_path / 'ran')!r}, 'w')"), after=["a"])
    assert not (tmp_path / "ran").exists()
