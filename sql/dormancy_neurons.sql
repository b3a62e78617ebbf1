-- Per-neuron dormancy of one run, from neuron_stats alone (no second pass over activations).
-- $run_id; $definition: 'tau' | 'never_active' | 'max_abs'; $threshold: tau; $epsilon: for max_abs.
--   tau (Sokar et al. 2023): score = mean|a_i| / (mean over the layer of mean|a_k| + 1e-9),
--                            dormant iff score <= tau
--   never_active:            dormant iff the neuron was never active (active_count = 0)
--   max_abs:                 dormant iff max |a| <= epsilon
with stats as (
    select s.*, n.site
    from neuron_stats s
    join neurons n on n.run_id = s.run_id and n.neuron_id = s.neuron_id
    where s.run_id = $run_id
),
per_neuron as (
    select
        layer, neuron, neuron_id, site, count, sum, max, active_count,
        -- a neuron no accumulated row reached (an expert never routed to) counts as silent
        case when count > 0 then sum_abs / count else 0 end as mean_abs,  -- activation units
        case when count > 0 then sum / count else 0 end as mean,
        case when count > 0 then greatest(abs(min), abs(max)) else 0 end as max_abs
    from stats
),
scored as (
    select *, mean_abs / (avg(mean_abs) over (partition by layer) + 1e-9) as score
    from per_neuron
),
final as (
    select
        layer, neuron, neuron_id, site, count, sum, max, active_count, mean, mean_abs, max_abs,
        score,
        case $definition
            when 'tau' then score <= $threshold
            when 'never_active' then active_count = 0
            when 'max_abs' then max_abs <= $epsilon
        end as dormant
    from scored
)
select * from final
order by layer, neuron;
