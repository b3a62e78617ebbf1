-- One view per warehouse table over tables/<table>/run_id=<run>/*.parquet.
-- Paths are relative to the storage root (the connection's file_search_path);
-- run_id comes from the hive partition folder.
create or replace view tokens as
select * from read_parquet('tables/tokens/*/*.parquet', hive_partitioning = true);

create or replace view neurons as
select * from read_parquet('tables/neurons/*/*.parquet', hive_partitioning = true);

create or replace view neuron_stats as
select * from read_parquet('tables/neuron_stats/*/*.parquet', hive_partitioning = true);

create or replace view runs as
select * from read_parquet('tables/runs/*/*.parquet', hive_partitioning = true);

create or replace view trace as
select * from read_parquet('tables/trace/*/*.parquet', hive_partitioning = true);

create or replace view coactivation_pairs as
select * from read_parquet('tables/coactivation_pairs/*/*.parquet', hive_partitioning = true);

create or replace view dormancy as
select * from read_parquet('tables/dormancy/*/*.parquet', hive_partitioning = true);

create or replace view important_neurons as
select * from read_parquet('tables/important_neurons/*/*.parquet', hive_partitioning = true);

create or replace view specific_neurons as
select * from read_parquet('tables/specific_neurons/*/*.parquet', hive_partitioning = true);

create or replace view consistent_neurons as
select * from read_parquet('tables/consistent_neurons/*/*.parquet', hive_partitioning = true);

create or replace view token_clusters as
select * from read_parquet('tables/token_clusters/*/*.parquet', hive_partitioning = true);

create or replace view edges as
select * from read_parquet('tables/edges/*/*.parquet', hive_partitioning = true);

create or replace view threshold_analysis as
select * from read_parquet('tables/threshold_analysis/*/*.parquet', hive_partitioning = true);

create or replace view subsets as
select * from read_parquet('tables/subsets/*/*.parquet', hive_partitioning = true);

create or replace view ablation_generations as
select * from read_parquet('tables/ablation_generations/*/*.parquet', hive_partitioning = true);

create or replace view ablation_effects as
select * from read_parquet('tables/ablation_effects/*/*.parquet', hive_partitioning = true);

create or replace view neuron_properties as
select * from read_parquet('tables/neuron_properties/*/*.parquet', hive_partitioning = true);

create or replace view neuron_gradients as
select * from read_parquet('tables/neuron_gradients/*/*.parquet', hive_partitioning = true);

create or replace view correlation_summary as
select * from read_parquet('tables/correlation_summary/*/*.parquet', hive_partitioning = true);

create or replace view universal_neurons as
select * from read_parquet('tables/universal_neurons/*/*.parquet', hive_partitioning = true);

create or replace view universal_properties as
select * from read_parquet('tables/universal_properties/*/*.parquet', hive_partitioning = true);

create or replace view sign_stats as
select * from read_parquet('tables/sign_stats/*/*.parquet', hive_partitioning = true);

create or replace view sign_examples as
select * from read_parquet('tables/sign_examples/*/*.parquet', hive_partitioning = true);
