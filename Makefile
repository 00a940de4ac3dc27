# fasttrain: `make demo` sets up and trains on the embedded dataset; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-stages install clean

$(STAMP): pyproject.toml fasttrain/data/_jpeg.c  # the C file: rebuilds the crop decoder
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fasttrain train --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# The suite without its slow end-to-end and fault-injection runs (kill -9, 2-rank stops, NaN on one rank):
# for a quick check while editing; CI runs the full `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/fasttrain bench --out runs/bench

bench-stages: $(STAMP)
	$(PY) -m pytest benchmarks/test_stages.py --benchmark-only -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info
