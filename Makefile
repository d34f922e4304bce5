# prep: two commands on a fresh machine -- `make dataset` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RAW    ?= raw
OUT    ?= processed
SIZE   ?= 32
PREP   := $(BIN)/prep --workdir $(OUT)
STAMP  := $(VENV)/.installed

.PHONY: install dataset test verify-train bench clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "prep needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The whole pipeline on RAW; fills RAW with the bundled digits sample when it has no class folders.
dataset: install
	@if [ -z "$$(find '$(RAW)' -mindepth 1 -maxdepth 1 -type d ! -name '.*' 2>/dev/null | head -n 1)" ]; then \
		$(PREP) sample digits '$(RAW)'; fi
	$(PREP) run '$(RAW)' --size $(SIZE)

test: install
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf '$(OUT)' .pytest_cache bench/work

distclean: clean
	rm -rf $(VENV) *.egg-info
