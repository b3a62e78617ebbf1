-- Per universal result: neurons compared, universal neurons, and the largest excess
-- correlation (mean max r - mean baseline max r) with the neuron that has it.
with u as (
    select * from universal_neurons
),
final as (
    select
        run_id as name,
        count(*) as neurons,
        count_if(universal) as universal,
        max(excess) as max_excess,
        arg_max(layer, excess) as max_layer,
        arg_max(neuron, excess) as max_neuron
    from u
    group by run_id
)
select * from final
order by name;
