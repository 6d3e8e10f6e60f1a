# Two commands on a fresh machine: `make demo` (extract + probe on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DS     := $(VENV)/bin/diffstore
STORE  ?= data/default.zarr

.PHONY: install test demo cka bench clean

install: $(VENV)/.installed

# torch is installed first with its pin so nothing later can pull another build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(DS) extract --store $(STORE)
	$(DS) probe --store $(STORE)

cka: install
	$(PY) pipelines/cka.py --store $(STORE) --out data/cka

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) data/*.zarr data/cka
