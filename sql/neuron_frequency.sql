-- Activation count and frequency per neuron, as the reference neuron_frequency.csv names them
-- (its readers look up `neuron_id` and `activation_count`).
-- activation_count = token rows where the neuron was active; activation_frequency = that / token rows.
with s as (
    select * from neuron_stats where run_id = $run_id
),
final as (
    select
        neuron_id,
        layer,
        neuron as dimension,
        active_count as activation_count,
        active_count::double / count as activation_frequency
    from s
)
select * from final
order by neuron_id;
