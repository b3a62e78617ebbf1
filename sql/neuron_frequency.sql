-- Activation count and frequency per neuron (the reference neuron_frequency.csv).
-- count = token rows where the neuron was active; frequency = count / token rows.
with s as (
    select * from neuron_stats where run_id = $run_id
),
final as (
    select
        neuron_id as id,
        layer,
        neuron as dimension,
        active_count as count,
        active_count::double / count as frequency
    from s
)
select * from final
order by id;
