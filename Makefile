# make train / make test create or refresh .venv first (when pyproject.toml is newer), then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers for make test / test-fast: one per core of the 2-core reference machine (0: in one process)
TEST_WORKERS ?= 2

.PHONY: install train test test-fast lint format tensorboard sweep bench bench-predict bench-scale bench-ft bench-ft-stages bench-engines bench-stream bench-data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create or refresh .venv with the pinned stack and dev tools

train: $(STAMP) ## train (offline default: synthetic shapes on efficientnet_lite0); ARGS="experiment=lite0_fe data.root=..."
	$(PY) -m src.train $(ARGS)

test: $(STAMP) ## the whole suite, slow tests included (what CI runs)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-fast: $(STAMP) ## skip the slow tests
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tensorboard: $(STAMP) ## open TensorBoard over every run and sweep
	$(VENV)/bin/tensorboard --logdir logs

sweep: $(STAMP) ## the README's lr x dropout sweep; ARGS adds overrides (e.g. data.root=...)
	$(PY) -m src.train -m experiment=lite0_fe model.optimizer.lr=0.001,0.01 model.head.dropout=0.2,0.4 $(ARGS)

clean: ## remove run outputs, caches and generated data (not .venv)
	rm -rf logs/train logs/eval logs/predict logs/export logs/audit logs/optimize .cache data/synthetic_shapes .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -exec rm -rf {} +

bench: $(STAMP) ## seed loop vs the project's FE runs on hymenoptera; writes docs/benchmarks.md (DATA=... to change)
	$(PY) -m benchmarks.bench_fe $(if $(DATA),--data $(DATA)) $(ARGS)

bench-predict: $(STAMP) ## src.predict's images/s over hymenoptera's 397 photos against the forward pass alone; writes a section of docs/benchmarks.md
	$(PY) -m benchmarks.predict_speed $(if $(DATA),--data $(DATA)) $(ARGS)

bench-scale: $(STAMP) ## lite0_fe on 10,000 generated images: embed rate, peak RSS, cache size, cached rerun, +100 images; writes a section of docs/benchmarks.md
	$(PY) -m benchmarks.bench_scale $(ARGS)

bench-engines: $(STAMP) ## lite0's frozen forward under eager fp32/bf16, torch.compile and ONNX Runtime on hymenoptera val; writes a section of docs/benchmarks.md
	$(PY) -m benchmarks.embed_engines $(if $(DATA),--data $(DATA)) $(ARGS)

bench-stream: $(STAMP) ## a training epoch's data from the folder vs LitData shards (local, and read as object storage) on hymenoptera; writes a section of docs/benchmarks.md
	$(PY) -m benchmarks.streaming $(if $(DATA),--data $(DATA)) $(ARGS)

bench-ft-stages: $(STAMP) ## a lite0_ft epoch at each fine-tuning stage, cache on and off, on hymenoptera; writes a section of docs/benchmarks.md
	$(PY) -m benchmarks.ft_stages $(if $(DATA),--data $(DATA)) $(ARGS)

bench-ft: $(STAMP) ## lite0_fe vs lite0_ft (cache on and off) over 3 seeds on hymenoptera; writes docs/fe_vs_ft.md
	$(PY) -m benchmarks.fe_vs_ft $(if $(DATA),--data $(DATA)) $(ARGS)

bench-data: $(STAMP) ## splitting, audit, near-duplicates and k-fold cost on hymenoptera merged into one folder; writes docs/data_figures.md
	$(PY) -m benchmarks.your_data $(if $(DATA),--data $(DATA)) $(ARGS)
