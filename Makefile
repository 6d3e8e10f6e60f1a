# Two commands on a fresh machine: `make demo` (extract + probe on the embedded default, ending with the answer)
# and `make test` (ruff, then the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DS     := $(VENV)/bin/diffstore
STORE  ?= data/default.zarr

.PHONY: install test demo cka cka-networks transfer bench clean

install: $(VENV)/.installed

# torch is installed first, pinned to the CPU build these machines use; pyproject.toml only asks for a range
# (torch>=2.3), which that install already satisfies, so nothing later pulls another build. ".[test]" holds
# every extra (plots, xarray, dask, s3, sd), so demo, cka and the tests find what they import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(VENV)/bin/ruff check diffstore bench pipelines tests examples
	$(PY) -m pytest

# The answer needs its controls: the same architecture with random weights, and raw pixels.
demo: install
	$(DS) extract --store $(STORE)
	$(DS) extract --store $(STORE) --random-init 0
	$(DS) probe --store $(STORE) --baseline pixels --plot $(basename $(STORE))-probe

cka: install
	$(PY) pipelines/cka.py --store $(STORE) --out data/cka

# Diffusion blocks x ResNet-50 blocks (Fig. 6 bottom). Offline: seeded random ResNet weights (a control) at 64 px;
# `make cka-networks WEIGHTS=resnet50-11ad3fa6.pth` uses a torchvision weight file you downloaded, at 224 px.
cka-networks: install
	$(PY) pipelines/cka_networks.py --store $(STORE) --out data/cka-networks $(if $(WEIGHTS),--weights $(WEIGHTS))

# The transfer protocol (Fig. 4/5) over ImageFolder datasets: `make transfer DATASETS=cub=DIR,flowers=DIR`.
# Without DATASETS, the CIFAR-10 stand-in: two disjoint class subsets cut from ../shared/datasets/cifar10-jpg.tar.gz.
# The heads' recipe is cut for a CPU (500 steps, one lr and weight decay); the comparison network is a ResNet-50
# with random weights at 64 px (a control: no weights are downloaded).
TRANSFER_DATA ?= data/transfer-data
STAND_IN := vehicles=$(TRANSFER_DATA)/vehicles,animals=$(TRANSFER_DATA)/animals
transfer: install
	$(if $(DATASETS),,test -d $(TRANSFER_DATA) || $(PY) pipelines/cifar_folders.py --out $(TRANSFER_DATA))
	DIFFSTORE_RESNET50_SIZE=64 $(PY) pipelines/transfer.py --out data/transfer --random-init 0 \
		--datasets $(or $(DATASETS),$(STAND_IN)) \
		--compare py:examples/plugins/resnet50.py:factory --compare-name resnet50-64px --compare-random-init 0 \
		--steps 500 --lrs 0.003 --weight-decays 0.05

docs: install
	$(PY) -m diffstore.reference > docs/cli.md

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) data/*.zarr data/*-probe data/*-repfusion data/*-cka data/cka data/cka-networks \
		data/transfer data/transfer-data
