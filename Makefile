# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# torch is pinned through constraints.txt (2.13.0): this machine's pip takes the local CPU wheel,
# a GPU machine takes the CUDA build of the same version from PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup test demo lint bench compare

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $@

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: setup
	$(VENV)/bin/ruff check reallm tests benchmarks train.py

# The main job: compress ../shared/models/stories260K with a preset (phase 1, data-free), evaluate
# the checkpoint and the original on TinyStories (context 512), print bits and perplexities.
PRESET ?= vq-3bit
RUN ?= runs/demo-$(PRESET)
MODEL ?= $(SHARED)/models/stories260K
EVAL_TEXT ?= $(SHARED)/data/tinystories_valid.txt
CPU := --trainer.accelerator cpu

demo: setup
	@test -d $(MODEL) || { echo "error: $(MODEL) not found (the demo needs ../shared)"; exit 1; }
	rm -rf $(RUN)
	$(PY) train.py fit --config configs/ae.yaml --config configs/methods/$(PRESET).yaml \
	    --model.init_args.model_name_or_path $(MODEL) $(CPU) --run_dir $(RUN)/compress
	$(PY) train.py validate --config configs/eval.yaml --model.init_args.checkpoint $(RUN)/compress/reallm \
	    --model.init_args.method $(PRESET) --data.init_args.path $(EVAL_TEXT) --data.init_args.seq_len 512 \
	    $(CPU) --run_dir $(RUN)/eval
	$(PY) train.py validate --config configs/eval.yaml --model.init_args.model_name_or_path $(MODEL) \
	    --data.init_args.path $(EVAL_TEXT) --data.init_args.seq_len 512 $(CPU) --run_dir $(RUN)/original
	$(PY) -m reallm.run.report $(RUN)/original $(RUN)/compress $(RUN)/eval
