# Everything installs itself: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
THREADS ?= 2

.PHONY: help install data browser demo test test-fast baseline bench bench-globalmp bench-alds bench-latency \
	bench-pagcp bench-speed bench-odd-widths bench-zoo baseline-mtnet screenshot gate-baselines clean

help:
	@echo "make demo            set up, then prune the built-in model to 90% sparsity with one epoch of fine-tuning"
	@echo "make test            set up, then run every test (slow ones included)"
	@echo "make test-fast       the tests without the slow marker"
	@echo "make baseline        retrain the shipped built-in classifier (baseline-mtnet: the multitask model)"
	@echo "make bench           every benchmark, results under reports/"
	@echo "make bench-latency   MACs ratio against measured speed-up on every backend -> reports/latency.md"
	@echo "make bench-pagcp     PAGCP against Torch-Pruning's channel pruning on the multitask model"
	@echo "make bench-zoo       which torchvision models GlobalMP, ALDS and PAGCP handle -> reports/zoo.md (about an hour)"
	@echo "make bench-speed     every method at a size and a latency target, speed-up and accuracy -> reports/speed.md"
	@echo "make bench-odd-widths  what odd low-rank widths cost inside a model on ONNX Runtime -> reports/odd_widths.md"
	@echo "make screenshot      a real run's report.html in headless chromium -> reports/report-html.png"
	@echo "make gate-baselines  rewrite tests/gate/*.report.json, the baselines the project's own gate checks"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.14.1 and torchvision==0.29.1 come from this machine's disk through pip; see README.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# Fashion-MNIST from Debian when root; otherwise compress falls back to torchvision's download and, failing
# that, says what to install.
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' (compress will try torchvision's download)"; fi

demo: install data
	$(BIN)/compress prune --method globalmp --sparsity 0.9 --finetune-epochs 1 --threads $(THREADS) \
		--out runs/demo --force

test: install data browser
	$(BIN)/python -m pytest

test-fast: install data
	$(BIN)/python -m pytest -m "not slow"

baseline: install data
	$(BIN)/compress train --model rescnn --data fashion-mnist --epochs 10 --lr 0.1 --seed 0 \
		--threads $(THREADS) --out runs/baseline-rescnn --force --install-baseline

# The built-in multitask model (class, mask and position on a 56x56 Fashion-MNIST canvas): about 7-10 min per epoch.
baseline-mtnet: install data
	$(BIN)/compress train --model mtnet --data fashion-mnist-canvas --epochs 4 --lr 0.05 --seed 0 \
		--threads $(THREADS) --out runs/baseline-mtnet --force --install-baseline

bench-globalmp: install data
	$(BIN)/python benchmarks/bench_globalmp.py --threads $(THREADS)

# One thread unless THREADS is given on the command line: it runs beside another benchmark on a two-core machine.
bench-alds: THREADS = 1
bench-alds: install data
	$(BIN)/python benchmarks/bench_alds.py --threads $(THREADS)

bench-latency: install data
	$(BIN)/python benchmarks/bench_latency.py --threads 1

# Debian's chromium renders report.html headless (`make screenshot`, and the slow screenshot test, which is skipped
# with its reason when chromium is absent); installed here when root.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
		echo "note: could not install chromium; the screenshot test will be skipped"; \
	else echo "note: chromium is not installed ('sudo apt-get install chromium'); the screenshot test will be skipped"; fi

screenshot: install data browser
	@command -v chromium >/dev/null || { echo "chromium is missing: run 'sudo apt-get install chromium'"; exit 1; }
	$(BIN)/compress prune --sparsity 0.9 --finetune-epochs 1 --export onnx --int8 --measure --threads $(THREADS) \
		--out runs/screenshot --force --quiet
	$(BIN)/python benchmarks/screenshot_report.py runs/screenshot/report.html reports/report-html.png --height 3600

bench-pagcp: install data
	$(BIN)/python benchmarks/bench_pagcp.py --threads $(THREADS)

# One thread (the cost tables are priced at one): about an hour on a two-core machine, the first run also trains
# resnet18 and mobilenet_v2 (cached under runs/bench-speed/, with the cost tables).
bench-speed: install data
	$(BIN)/python benchmarks/bench_speed.py --threads 1

# Odd low-rank widths against their NCHWc-padded twins, measured and as the cost table predicts them (under a
# minute once bench-speed has trained mobilenet_v2; the first run trains it).
bench-odd-widths: install data
	$(BIN)/python benchmarks/odd_widths.py

# The baselines of the project's own gate (tests/test_self_gate.py): the shipped recipes, no fine-tuning, one
# thread as in the tests. Regenerate only when a change is meant to move them, and say so in the commit.
gate-baselines: install data
	for r in globalmp alds pagcp; do \
		$(BIN)/compress prune --recipe recipes/$$r.yaml --finetune-epochs 0 --no-latency --quiet --threads 1 \
			--out runs/gate-$$r --force && cp runs/gate-$$r/report.json tests/gate/$$r.report.json || exit 1; \
	done

# Every torchvision classification model of the zoo through each method, one process per case with a time limit,
# one thread; not part of `make bench` or `make test` (about an hour).
bench-zoo: install data
	$(BIN)/python benchmarks/bench_zoo.py --threads 1

bench: bench-globalmp bench-alds bench-latency bench-pagcp bench-speed bench-odd-widths

clean:
	rm -rf runs .pytest_cache
