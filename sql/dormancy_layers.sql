-- Per-layer dormancy summary over the per-neuron flags of dormancy_neurons.sql
-- (registered as dormant_neurons). avg_activation = mean activation over every token and neuron
-- of the layer; max_activation = largest activation of the layer.
with n as (
    select * from dormant_neurons
),
final as (
    select
        layer,
        any_value(site) as site,
        count(*) as num_neurons,
        count_if(dormant) as num_dormant,
        100.0 * count_if(dormant) / count(*) as pct_dormant,
        sum(sum) / sum(count) as avg_activation,
        max(max) as max_activation
    from n
    group by layer
)
select * from final
order by layer;
