# Two commands do all set-up on a fresh machine:
#   make demo      -> the tiny k1.5 RL demo on CPU
#   make demo-vision -> the tiny vision demo (arithmetic drawn as pictures) on CPU
#   make test      -> the full test suite on 8 fake CPU devices (what CI runs)
#   make test-fast -> the unit tier: everything not marked slow
#   make bench     -> every benchmark (ratios to in-run references) -> runs/bench/results.{json,md}
PY := .venv/bin/python
WORKDIR ?= runs/demo

.venv/.installed: setup.py
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

install: .venv/.installed

demo: install
	$(PY) -m launch.train_rl --config=experiments/rl_arith.py:tiny --workdir=$(WORKDIR)

VISION_WORKDIR ?= runs/vision
demo-vision: install
	$(PY) -m launch.train_rl --config=experiments/vision_arith.py:tiny --workdir=$(VISION_WORKDIR)

# The code sandbox runs model-written programs under bubblewrap; installed when missing
# (apt-get, as root on Debian/Ubuntu).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq bubblewrap)

PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -q

test: install sandbox
	$(PYTEST) --durations=15

test-fast: install sandbox
	$(PYTEST) -m "not slow" --durations=10

bench:
	PYTHONPATH=$(CURDIR) JAX_PLATFORMS=cpu $(PY) benchmarks/run_all.py

bench-readme:
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/run_all.py --readme

.PHONY: install demo demo-vision sandbox test test-fast bench bench-readme
