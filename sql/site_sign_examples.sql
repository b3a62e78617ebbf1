-- Gated neurons of one run: the top-|a| token rows of each sign combination.
-- $run_id; $neuron_ids: the global ids wanted.
with e as (
    select * from sign_examples
    where run_id = $run_id and list_contains($neuron_ids, neuron_id)
),
final as (
    select neuron_id, layer, neuron, combination, rank, row, value, abs_value
    from e
)
select * from final
order by neuron_id, combination, rank;
