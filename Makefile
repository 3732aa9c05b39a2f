# Two commands do all set-up on a fresh machine: `make run` (the local stack) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test lint bench bench-quality bench-statesync bench-chaos clean redis-bin deploy-configs proto

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## run: Envoy on 127.0.0.1:8888 + the router + three simulated pods of demo-model (Ctrl-C stops all)
run: $(STAMP)
	$(VENV)/bin/extproc-router up $(UP_ARGS)

## test: unit, integration (real Envoy, real Redis) and end-to-end tests
test: $(STAMP) redis-bin
	$(PY) -m pytest $(PYTEST_ARGS)

## redis-bin: make sure a redis-server binary exists (tests start their own servers on free ports)
redis-bin:
	@command -v redis-server >/dev/null 2>&1 || scripts/install-redis.sh

## deploy-configs: regenerate the Envoy configs under deploy/ (compose file, Kubernetes ConfigMap)
deploy-configs: $(STAMP)
	$(PY) deploy/render.py

## proto: regenerate statesync/statesync_pb2.py (committed) from proto/statesync.proto; needs grpcio-tools (dev extra)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=statesync proto/statesync.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## bench: router overhead benchmark (prints figures, writes bench/results/overhead.json)
bench: $(STAMP)
	$(PY) bench/overhead.py

## bench-quality: routing quality on 4 model-timed simulated pods: shared-prefix, multi-turn and conversations evicted between turns; ours (incl. precise KV-event routing) vs sglang-router / vllm-router (~17 min)
bench-quality: $(STAMP)
	$(PY) bench/quality.py --workload all

## bench-statesync: 3 router replicas with and without Redis state sync vs one replica (~3 min)
bench-statesync: $(STAMP) redis-bin
	$(PY) bench/statesync.py

## bench-chaos: one fault at a time under streaming load: routers, Redis, pods, Envoy (~6 min; CHAOS_ARGS=--quick ~3 min,
## CHAOS_ARGS="--soak 20" the 20-minute soak instead). Writes bench/results/chaos.json (soak.json, soak.png)
bench-chaos: $(STAMP) redis-bin
	$(PY) bench/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .run bench/results .pytest_cache
