-- Candidates for the top-k rows of every neuron of one layer, within one block of rows.
-- $run_id, $layer, rows [$row_start, $row_stop), $k (rows per neuron). The exact top-k of a
-- neuron over the run is the top-k of the union of its per-block candidates (same order:
-- value descending, then row ascending). value: activation units (float16 stored, as double).
with v as (
    select row, neuron, value
    from layer_values($run_id, 'acts', $layer, $row_start, $row_stop)
),
final as (
    select neuron, row, value
    from v
    qualify row_number() over (partition by neuron order by value desc, row) <= $k
)
select * from final;
