-- Weights of the co-activation edges of one layer pair (a, b), and the threshold filter.
-- pair_counts(neuron_a, neuron_b, count, n_a, n_b): one row per neuron pair of the two layers:
--   count = token rows where both are active (0: no edge), n_a, n_b = token rows where neuron_a,
--   neuron_b is active (the active counts of neuron_stats)
-- $tokens = token rows T of the run; $max_count = largest count over every pair of the run
-- $weight = normalized, jaccard or npmi: the weight returned and compared with $threshold
--   normalized = count / max count                    (the reference weight, in (0, 1])
--   jaccard    = count / (n_a + n_b - count)          (in (0, 1])
--   npmi       = ln(p_ab / (p_a p_b)) / -ln(p_ab)     (p = count / T, in [-1, 1]; 1 when p_ab = 1)
-- Output: the edges with weight > $threshold, in the order of pair_counts (no join, no sort:
-- DuckDB keeps the insertion order through projections and filters).
with edges as (
    select neuron_a, neuron_b, count, n_a, n_b  -- token rows
    from pair_counts
    where count > 0
),
weighted as (
    select
        neuron_a, neuron_b, count,
        count::double / greatest($max_count, 1) as normalized,
        count::double / (n_a + n_b - count) as jaccard,
        case when count = $tokens then 1.0
             -- p_ab / (p_a p_b) = count T / (n_a n_b); -ln(p_ab) = -ln(count / T)
             else ln(count::double * $tokens / (n_a::double * n_b)) / -ln(count::double / $tokens)
        end as npmi
    from edges
),
chosen as (
    select
        neuron_a, neuron_b, count,
        case $weight
            when 'normalized' then normalized
            when 'jaccard' then jaccard
            when 'npmi' then npmi
        end as weight
    from weighted
),
final as (
    select * from chosen
    where weight > $threshold
)
select * from final;
