-- Table macros: the nearest neurons of one neuron, by co-activation or by correlation across
-- models. They call the Python functions coact_block (of every warehouse connection, see
-- sql/array_macros.sql) and universal_corr (put on the connection by
-- pipeline.stages.similar.register).

-- Co-activation neighbours of neuron (layer_index, neuron_index) of a run: every neuron of a
-- layer counted with layer_index (the run's coactivation_pairs, either orientation; a pair L:L
-- gives its own layer) that fired with it at least once, the neuron itself left out, ranked by
-- metric_name ('jaccard' or 'npmi') and cut to the best k.
--   count    = included token rows where both are active
--   active_a = included rows where the neuron is active, active_b = the neighbour's
--   (neuron_stats.active_count); tokens = the run's included rows (T)
--   jaccard  = count / (active_a + active_b - count)                  (in (0, 1])
--   npmi     = ln(p_ab / (p_a p_b)) / -ln(p_ab), p = rows / T         (in [-1, 1]; 1 when p_ab = 1)
-- The formulas are those of sql/edge_weights.sql (the edge weights of the co-activation graph).
create or replace macro similar_neurons(run, layer_index, neuron_index, metric_name, k) as table
with partners as (
    select distinct case when layer_a = layer_index then layer_b else layer_a end as layer
    from coactivation_pairs
    where run_id = run and (layer_a = layer_index or layer_b = layer_index)
),
counted as (
    select count(*) filter (where included) as tokens  -- token rows
    from tokens
    where run_id = run
),
query_neuron as (
    select active_count as active_a  -- token rows
    from neuron_stats
    where run_id = run and layer = layer_index and neuron = neuron_index
),
rows_of_counts as (  -- the nonzero counts of the neuron with every neuron of the layer
    select layer, coact_block(run, layer_index, layer, neuron_index, neuron_index + 1) as c
    from partners
),
cells as (
    select layer, unnest(c.neuron_b) as neuron, unnest(c.count) as count
    from rows_of_counts
),
neighbours as (
    select c.layer, c.neuron, c.count, q.active_a, s.active_count as active_b, t.tokens
    from cells c
    join neuron_stats s on s.run_id = run and s.layer = c.layer and s.neuron = c.neuron
    cross join query_neuron q
    cross join counted t
    where c.count > 0 and not (c.layer = layer_index and c.neuron = neuron_index)
),
weighted as (
    select
        layer, neuron, count, active_a, active_b, tokens,
        count::double / (active_a + active_b - count) as jaccard,
        case when count = tokens then 1.0
             -- p_ab / (p_a p_b) = count T / (n_a n_b); -ln(p_ab) = -ln(count / T)
             else ln(count::double * tokens / (active_a::double * active_b))
                  / -ln(count::double / tokens)
        end as npmi
    from neighbours
),
chosen as (
    select
        *,
        case metric_name when 'jaccard' then jaccard when 'npmi' then npmi end as weight
    from weighted
),
ranked as (
    select
        row_number() over (order by c.weight desc, c.count desc, c.layer, c.neuron) as rank,
        c.layer, c.neuron, n.neuron_id, c.count, c.active_a, c.active_b, c.tokens,
        c.jaccard, c.npmi, c.weight
    from chosen c
    left join neurons n on n.run_id = run and n.layer = c.layer and n.neuron = c.neuron
),
final as (
    select * from ranked
    where rank <= k
    order by rank
)
select * from final;

-- Correlation neighbours of neuron (layer_index, neuron_index) of the reference model of a
-- `nwh universal` result: in every other model, the k neurons (of any layer) with the largest
-- Pearson r over the result's token rows (its blocks corr/m<i>/L<a>_L<b>), with the baseline's
-- best r for the neuron (correlation_summary.baseline_max) beside them.
create or replace macro correlated_neurons(result, layer_index, neuron_index, k) as table
with cells as (
    select unnest(universal_corr(result, layer_index, neuron_index)) as cell
),
flat as (
    select cell.model_b as model_b, cell.layer as layer, cell.neuron as neuron, cell.corr as corr
    from cells
),
ranked as (
    select
        f.model_b,
        row_number() over (partition by f.model_b order by f.corr desc, f.layer, f.neuron) as rank,
        f.layer, f.neuron, f.corr,
        s.baseline_max,
        f.corr - s.baseline_max as excess
    from flat f
    left join correlation_summary s
        on s.run_id = result and s.model_b = f.model_b
       and s.layer = layer_index and s.neuron = neuron_index
),
final as (
    select * from ranked
    where rank <= k
    order by model_b, rank
)
select * from final;
