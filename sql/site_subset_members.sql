-- Members of every subset, most central first.
with s as (
    select run_id, subset, rank, neuron_id, layer, neuron, score from subsets
),
final as (
    select * from s
)
select * from final
order by run_id, subset, rank;
