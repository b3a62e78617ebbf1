-- Weights of co-activation edges.
-- edges(layer_a, neuron_a, layer_b, neuron_b, count): co-activation counts (token rows)
-- active(layer, neuron, active_count): token rows where each neuron is active
-- $tokens = token rows T of the run; $max_count = largest count over every pair of the run.
--   normalized = count / max count                    (the reference weight, in [0, 1])
--   jaccard    = count / (n_a + n_b - count)          (in [0, 1]; 0 when count = 0)
--   npmi       = ln(p_ab / (p_a p_b)) / -ln(p_ab)     (p = count / T, in [-1, 1];
--                -1 when count = 0, 1 when p_ab = 1)
with e as (
    select * from edges
),
counted as (
    select
        e.layer_a, e.neuron_a, e.layer_b, e.neuron_b, e.count,
        na.active_count as n_a,  -- token rows
        nb.active_count as n_b   -- token rows
    from e
    join active as na on na.layer = e.layer_a and na.neuron = e.neuron_a
    join active as nb on nb.layer = e.layer_b and nb.neuron = e.neuron_b
),
final as (
    select
        layer_a, neuron_a, layer_b, neuron_b, count,
        count::double / greatest($max_count, 1) as normalized,
        case when count = 0 then 0.0
             else count::double / (n_a + n_b - count) end as jaccard,
        case when count = 0 then -1.0
             when count = $tokens then 1.0
             -- p_ab / (p_a p_b) = count T / (n_a n_b); -ln(p_ab) = -ln(count / T)
             else ln(count::double * $tokens / (n_a::double * n_b)) / -ln(count::double / $tokens)
        end as npmi
    from counted
)
select * from final
order by layer_a, neuron_a, layer_b, neuron_b;
