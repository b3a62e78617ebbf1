-- Every neuron of one run with the scores a site ranks neuron pages by:
--   frequency = share of accumulated rows where the neuron is active (its run's rule)
--   mean      = mean activation, max = largest activation (activation units)
--   excess    = excess correlation across models (universal_neurons of result $universal)
--   gradient  = mean |dL/da| over token positions (neuron_gradients of result $gradients)
-- $run_id; $universal and $gradients: result names, or null for none.
with s as (
    select * from neuron_stats where run_id = $run_id
),
u as (
    select neuron_id, excess, universal
    from universal_neurons
    where run_id = $universal
),
g as (
    select neuron_id, grad_mean, grad_mean_abs
    from gradient_rows  -- neuron_gradients, its unit column named `neuron`
    where run_id = $gradients and kind = 'neuron'
),
final as (
    select
        s.neuron_id, s.layer, s.neuron, s.count, s.active_count,
        case when s.count > 0 then s.active_count::double / s.count else 0 end as frequency,
        case when s.count > 0 then s.sum / s.count else 0 end as mean,
        case when s.count > 0 then s.sum_abs / s.count else 0 end as mean_abs,
        case when s.count > 0 then s.max end as max,
        case when s.count > 0 then s.min end as min,
        u.excess,
        u.universal,
        g.grad_mean,
        g.grad_mean_abs as gradient
    from s
    left join u using (neuron_id)
    left join g using (neuron_id)
)
select * from final
order by neuron_id;
