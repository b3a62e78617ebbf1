-- The $k neurons of largest excess correlation of universal result $name.
with u as (
    select * from universal_neurons where run_id = $name
),
final as (
    select neuron_id, layer, neuron, matches, mean_corr, mean_baseline, excess, universal
    from u
    order by excess desc nulls last, neuron_id
    limit $k
)
select * from final;
