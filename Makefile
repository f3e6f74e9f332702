# Two commands do all the set-up on a fresh machine:
#   make demo   - the whole pipeline on embedded defaults, with a synthetic fleet of agents
#   make test   - virtualenv, install, Kafka broker, pytest, broker stop
VENV      ?= .venv
PYTHON    ?= python3
BIN        = $(VENV)/bin
TEST_DIR  ?= $(CURDIR)/.meterline-test
TEST_PORT ?= 19092
PYTEST_ARGS ?=
# 4 processes on 2 cores: most tests wait on a broker or a timeout; a module whose fixture is costly stays on one (xdist_group).
# Tests marked `alone` (real-time pacing, broker faults) run after, by themselves.
XDIST     ?= -n 4 --dist loadgroup
TEST_ENV   = METERLINE_DATA_DIR=$(TEST_DIR) METERLINE_KAFKA_PORT=$(TEST_PORT) METERLINE_KAFKA_CONTROLLER_PORT=$$(($(TEST_PORT)+1))

.PHONY: install test demo bench schemas clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,instrumentations]'
	touch $@

test: install
	$(TEST_ENV) $(BIN)/meterline kafka start
	status=0; export $(TEST_ENV) METERLINE_KAFKA_BOOTSTRAP=$${METERLINE_KAFKA_BOOTSTRAP:-127.0.0.1:$(TEST_PORT)}; \
		$(BIN)/pytest $(XDIST) -m "not alone" $(PYTEST_ARGS) || status=$$?; \
		$(BIN)/pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ] || status=1; \
	$(TEST_ENV) $(BIN)/meterline kafka stop; exit $$status

demo: install
	$(BIN)/meterline demo

bench: install
	$(BIN)/meterline kafka start
	$(BIN)/python -m bench

schemas: install
	$(BIN)/python -m meterline.schemas.export
	$(BIN)/python -m meterline.streams.faust_gen

clean:
	-$(BIN)/meterline kafka stop
	rm -rf .meterline .meterline-test
