# Set-up and the two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow test-all mutants clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision pinned explicitly so pip takes the local wheels and not a multi-GB download
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	# the PyTorch FCN port, as the oracle of the converter's parity tests; --no-deps: its chainer-based
	# 'fcn' dependency only downloads Caffe weights and is stubbed by the tests
	$(PY) -m pip install -q --no-deps torchfcn==1.9.7
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fcnseg demo

# the page tests drive Debian's Chromium through Playwright (browsers cannot be downloaded at test time)
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# the default run skips tests marked slow (pyproject addopts: -m 'not slow'); CI runs both groups (.ci/run).
# Every optional part (OpenVINO, Playwright with Chromium, torchfcn) is installed, so none of their tests skips;
# -ra lists any skip with its reason and the last line counts them.
test: $(STAMP) chromium
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# the heavy group: DDP, SIGKILL resume, Caffe import, the VGG16 nets beyond one (exit 5, "no tests
# collected", would mean nothing is marked slow any more: it fails, as it should)
test-slow: $(STAMP) chromium
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m slow

# the mutation check: each curated one-line bug of scripts/mutants.toml, applied to a temporary copy of src/,
# must make its tests fail; two at a time, one thread each, at most 240 s per mutant (within 15 minutes on 2 cores)
mutants: $(STAMP)
	$(PY) scripts/mutants.py --jobs 2

test-all: $(STAMP) chromium
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
