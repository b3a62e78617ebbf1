-- Per neuron of universal result $name's reference model and other model: the best match and
-- the baseline's best. $neuron_ids: the global ids wanted.
with c as (
    select * from correlation_summary
    where run_id = $name and list_contains($neuron_ids, neuron_id)
),
final as (
    select neuron_id, layer, neuron, model_b, max_corr, argmax_layer, argmax_neuron,
        baseline_max, excess
    from c
)
select * from final
order by neuron_id, model_b;
