-- Per-neuron moments from the streaming sums of neuron_stats.
-- mean, variance (population), skew = E[(a-mu)^3]/sigma^3, kurtosis = E[(a-mu)^4]/sigma^4
-- (3 for a normal distribution), sparsity = share of rows with activation > the run's threshold.
with s as (
    select
        neuron_id, layer, neuron, count, min, max, active_count,
        sum / count as m1, sum_sq / count as m2, sum_cube / count as m3, sum_quad / count as m4,
        sum_abs / count as mean_abs
    from neuron_stats
    where run_id = $run_id
),
central as (
    select *,
        greatest(m2 - m1 * m1, 0) as var,
        m3 - 3 * m1 * m2 + 2 * m1 * m1 * m1 as c3,
        m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 * m1 * m1 * m1 as c4
    from s
),
final as (
    select
        neuron_id, layer, neuron, count,
        m1 as mean,
        var as variance,
        mean_abs,
        case when var > 0 then c3 / pow(var, 1.5) end as skew,
        case when var > 0 then c4 / (var * var) end as kurtosis,
        min, max,
        active_count::double / count as sparsity
    from central
)
select * from final
order by neuron_id;
