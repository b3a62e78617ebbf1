-- Per-neuron moments from the streaming sums of neuron_stats, by the macros of sql/moments.sql.
-- mean and mean_abs in activation units, variance (population) in their square; skew =
-- E[(a-mu)^3]/sigma^3, kurtosis = E[(a-mu)^4]/sigma^4 (3 for a normal distribution);
-- sparsity = share of rows with activation > the run's threshold.
with s as (
    select * from neuron_stats where run_id = $run_id
),
final as (
    select
        neuron_id, layer, neuron, count,
        moment_mean(count, shift, shifted_sum) as mean,
        moment_var(count, shifted_sum, shifted_sum_sq) as variance,
        sum_abs / count as mean_abs,
        moment_skew(count, shifted_sum, shifted_sum_sq, shifted_sum_cube) as skew,
        moment_kurt(count, shifted_sum, shifted_sum_sq, shifted_sum_cube, shifted_sum_quad)
            as kurtosis,
        min, max,
        active_count::double / count as sparsity
    from s
)
select * from final
order by neuron_id;
