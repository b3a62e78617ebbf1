-- Weights of co-activation edges of one layer pair.
-- pair_counts(layer_a, neuron_a, layer_b, neuron_b, count, n_a, n_b): count > 0 edges, with the
-- active counts n_a, n_b of both neurons; $tokens = token rows T; $max_count = largest count of
-- the run (the reference normaliser).
--   normalized = count / max count                      (reference, in [0, 1])
--   jaccard    = count / (n_a + n_b - count)            (in [0, 1])
--   npmi       = ln(p_ab / (p_a p_b)) / -ln(p_ab)        (in [-1, 1]; 1 when p_ab = 1)
with e as (
    select * from pair_counts
),
final as (
    select
        layer_a, neuron_a, layer_b, neuron_b, count,
        count::double / $max_count as normalized,
        count::double / (n_a + n_b - count) as jaccard,
        case
            when count = $tokens then 1.0
            else ln(count::double * $tokens / (n_a::double * n_b))
                 / -ln(count::double / $tokens)
        end as npmi
    from e
)
select * from final
order by layer_a, neuron_a, layer_b, neuron_b;
