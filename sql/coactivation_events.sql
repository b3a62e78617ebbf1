-- Reference co-activation engine: the definition of C = B_a^T B_b as a join.
-- events_a(row, neuron), events_b(row, neuron): one row per active (token row, neuron) of
-- layer a and layer b over the same token rows.
-- Output: one row per neuron pair active together at least once; count in token rows.
with a as (
    select row, neuron as neuron_a from events_a
),
b as (
    select row, neuron as neuron_b from events_b
),
final as (
    select neuron_a, neuron_b, count(*) as count  -- token rows where both are active
    from a
    join b using (row)
    group by neuron_a, neuron_b
)
select * from final;
