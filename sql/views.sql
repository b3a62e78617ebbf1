-- One view per warehouse table over tables/<table>/run_id=<run>/*.parquet.
-- Each view selects from files.<table>, which pipeline/core/warehouse.py defines over the
-- table's Parquet files (run_id from the hive partition folder, always a string), or as an
-- empty relation with the declared columns while the table has no data.
-- Paths are relative to the storage root: a DuckDB client resolves them against its working
-- directory or its file_search_path, unless the session sets the variable warehouse_root
-- (`nwh sql` sets it to the absolute root).

-- Training step of a checkpoint revision 'step<N>' (Pythia and the zoo); null for any other
-- revision ('main', a git hash), so checkpoints sort by step, not as text (step128 > step32).
create or replace macro revision_step(revision) as
    try_cast(regexp_extract(revision, '^step([0-9]+)$', 1) as bigint);

create or replace view tokens as
select * from files.tokens;

create or replace view neurons as
select * from files.neurons;

create or replace view neuron_stats as
select * from files.neuron_stats;

create or replace view runs as
select *, revision_step(revision) as step from files.runs;

create or replace view trace as
select * from files.trace;

create or replace view coactivation_pairs as
select * from files.coactivation_pairs;

-- step: the one logged (--step), else the step of the revision
create or replace view dormancy as
select * replace (coalesce(step, revision_step(revision)) as step) from files.dormancy;

create or replace view important_neurons as
select * from files.important_neurons;

create or replace view specific_neurons as
select * from files.specific_neurons;

create or replace view consistent_neurons as
select * from files.consistent_neurons;

create or replace view token_clusters as
select * from files.token_clusters;

create or replace view edges as
select * from files.edges;

create or replace view threshold_analysis as
select * from files.threshold_analysis;

create or replace view subsets as
select * from files.subsets;

create or replace view ablation_generations as
select * from files.ablation_generations;

create or replace view ablation_effects as
select * from files.ablation_effects;

create or replace view neuron_properties as
select * from files.neuron_properties;

create or replace view neuron_gradients as
select * from files.neuron_gradients;

create or replace view correlation_summary as
select * from files.correlation_summary;

create or replace view universal_neurons as
select * from files.universal_neurons;

create or replace view universal_properties as
select * from files.universal_properties;

create or replace view sign_stats as
select * from files.sign_stats;

create or replace view sign_examples as
select * from files.sign_examples;

create or replace view probe_scores as
select * from files.probe_scores;

create or replace view probe_weights as
select * from files.probe_weights;
