# Two commands on a fresh machine:  `make demo` (the main job, embedded default)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_INDEX ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel where the pip index serves it (a plain PyPI resolve pulls the multi-GB CUDA build;
	# there: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anisora-ray align --config configs/local.yaml --resume   # continues (or reprints) a previous run

test: $(STAMP)
	$(PY) -m pytest tests --durations=15

bench: $(STAMP)
	$(PY) benchmarks/generation_throughput.py
	$(PY) benchmarks/scoring_throughput.py
	$(PY) benchmarks/pairs_pipeline.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
