# VALD: every target creates .venv on first use (stamp file), so `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# make train [GPUS=N] [ACCELERATOR=cpu|gpu|auto] [NODES=M] [DATA=name] [DATA_ROOT=path] [EXPERIMENT=name] [ARGS="k=v ..."]
GPUS ?= 0
NODES ?= 1
ACCELERATOR ?= $(if $(filter-out 0,$(GPUS)),gpu,cpu)
DEVICES := $(if $(filter-out 0,$(GPUS)),$(GPUS),1)
DDP := $(if $(or $(filter-out 0 1,$(GPUS)),$(filter-out 1,$(NODES))),1,)
# on GPUs the GPU-sized system (model=gpu) unless ARGS picks a model
TRAIN_OVERRIDES = $(if $(filter gpu,$(ACCELERATOR)),trainer=gpu $(if $(filter model=%,$(ARGS)),,model=gpu)) \
	$(if $(DATA),data=$(DATA)) $(if $(DATA_ROOT),'data.root=$(DATA_ROOT)') \
	$(if $(EXPERIMENT),experiment=$(EXPERIMENT)) \
	trainer.accelerator=$(ACCELERATOR) trainer.devices=$(DEVICES) trainer.num_nodes=$(NODES) \
	$(if $(DDP),trainer.strategy=ddp) $(ARGS)

# make attribute|induce|evaluate [GPUS=N] [ACCELERATOR=cpu] [NODES=M] [DATA=name DATA_ROOT=path] [ARGS="k=v ..."]: one process
# per device through Lightning's predict, the same outputs on any count; rerun on the same output_dir to resume
RUN_OVERRIDES = device=$(if $(filter gpu,$(ACCELERATOR)),cuda,cpu) devices=$(DEVICES) num_nodes=$(NODES) \
	$(if $(DATA),data=$(DATA)) $(if $(DATA_ROOT),'data.root=$(DATA_ROOT)') $(ARGS)

.PHONY: lock install lint test test-fast demo demo-heldout demo-covid-layout demo-freetext train train-autoencoder train-classifier encode-latents \
	attribute induce evaluate app app-shot browser tensorboard bench repro clean

$(STAMP): setup.cfg requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# make test: every test, the fast ones first, then the slow ones (training runs, torch.compile, 2-process DDP: marked
# `slow` in tests/); make test-fast: the fast ones alone. PYTEST_ARGS="-x -k name" passes options on to pytest.
# pytest's exit code 5 (no test selected, e.g. a -k that matches only fast tests) is not a failure.
pytest = $(PY) -m pytest $(1) $(PYTEST_ARGS) || [ $$? -eq 5 ]

# ruff: the format and the lint rules of pyproject.toml; `make test` runs it first
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

test: lint browser
	$(call pytest,-m "not slow")
	$(call pytest,-m slow)

test-fast: $(STAMP)
	$(call pytest,-m "not slow")

train-autoencoder: $(STAMP)
	$(PY) experiments/train_autoencoder.py $(TRAIN_OVERRIDES)

train-classifier: $(STAMP)
	$(PY) experiments/train_classifier.py $(TRAIN_OVERRIDES)

train: $(STAMP)
	$(PY) experiments/train.py $(TRAIN_OVERRIDES)

# the latent store of stage 2's data, encoded by every device of the run (train with ARGS="latent_store.enabled=true")
encode-latents: $(STAMP)
	$(PY) experiments/encode_latents.py $(TRAIN_OVERRIDES)

attribute: $(STAMP)
	$(PY) experiments/counterfactual_attribution.py $(RUN_OVERRIDES)

induce: $(STAMP)
	$(PY) experiments/zero_shot_induction.py $(RUN_OVERRIDES)

evaluate: $(STAMP)
	$(PY) experiments/evaluate.py $(RUN_OVERRIDES)

demo: $(STAMP)
	bash experiments/demo.sh

# the same demo, defaults unchanged, on phantoms of another kind (datamodules/phantoms_heldout.py), about as long as make demo:
# logs/heldout/, outputs/heldout/report.md = docs/heldout.md. How far the defaults carry beyond what chose them.
demo-heldout: $(STAMP)
	bash experiments/demo_heldout.sh

# the web app on the demo model (or CHECKPOINT=... CLASSIFIER=...), http://127.0.0.1:$(PORT) (default 7860)
app: $(STAMP)
	$(PY) experiments/app.py $(if $(CHECKPOINT),'checkpoint=$(CHECKPOINT)') \
		$(if $(CLASSIFIER),'classifier_checkpoint=$(CLASSIFIER)') $(if $(PORT),port=$(PORT)) $(ARGS)

# Debian's Chromium for the browser tests, installed once (apt-get; as root, or through sudo)
browser:
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser tests"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# after `make demo`: one counterfactual request in Chromium timed on the demo model, and docs/app.png for the README
app-shot: $(STAMP) browser
	$(PY) experiments/app_screenshot.py $(ARGS)

# After `make demo`: the real-data path (CovidRadiographyDataModule, its split, its prompts) on phantoms written to
# disk in the COVID-19 Radiography Database layout, lesion masks beside them, scored like the synthetic run.
COVID_PHANTOMS := data/phantoms_covid_layout
COVID_DATA := data=covid_radiography data.root=$(COVID_PHANTOMS) data.image_size=64 data.num_workers=0
demo-covid-layout: $(STAMP)
	rm -rf $(COVID_PHANTOMS) outputs/demo/covid_layout
	$(PY) -m datamodules.synthetic --out $(COVID_PHANTOMS) --split test --num 1280
	$(PY) experiments/counterfactual_attribution.py $(COVID_DATA) progress=false output_dir=outputs/demo/covid_layout/attribution
	$(PY) experiments/evaluate.py $(COVID_DATA) output_dir=outputs/demo/covid_layout/evaluation

# After `make demo`: free-text training, tested (about 15 min): the phantoms as a MIMIC-CXR-JPG tree with generated
# reports, stage 2 trained on them through data=mimic_cxr, scored beside the template-prompt model ->
# outputs/demo/freetext/report.md (docs/freetext.md)
demo-freetext: $(STAMP)
	bash experiments/demo_freetext.sh
	cp outputs/demo/freetext/report.md docs/freetext.md

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir logs --host 127.0.0.1 --port $(or $(PORT),6006)

# training and counterfactual throughput against the diffusers references -> outputs/bench/bench.{json,md}
# (about 5-7 min on 2 cores, 2 of them compiling; ARGS="compile=false" for the eager lines only)
bench: $(STAMP)
	$(PY) experiments/benchmark.py $(ARGS)

# which machine settings change a seeded training run (threads, CPU kernels) -> outputs/repro/ (about 2 min)
repro: $(STAMP)
	$(PY) experiments/reproducibility.py $(ARGS)

clean:
	rm -rf logs outputs .pytest_cache build *.egg-info $(COVID_PHANTOMS) data/phantoms_mimic
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

lock: $(STAMP)
	(echo "# Every package of the environment, pinned: 'make install' resolves exactly this stack (regenerate with 'make lock')."; \
	 $(PY) -m pip freeze --exclude-editable | grep -v "^vald") > requirements.lock
