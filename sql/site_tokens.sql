-- The token rows of one run (row r of every Zarr array is row r here). $run_id.
with t as (
    select row, sample, position, token_id, token, included
    from tokens
    where run_id = $run_id
),
final as (
    select * from t
)
select * from final
order by row;
