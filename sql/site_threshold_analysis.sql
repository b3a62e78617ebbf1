-- Co-activation graph statistics per edge-weight threshold, per run.
with t as (
    select * from threshold_analysis
),
final as (
    select * from t
)
select * from final
order by run_id, weight, threshold;
