-- The subset grid: one row per subset of a run, with how it was picked and its size.
with s as (
    select * from subsets
),
final as (
    select
        run_id, subset,
        any_value(method) as method,
        any_value(weight) as weight,
        any_value(threshold) as threshold,  -- edges kept have weight > threshold
        any_value(ratio) as ratio,          -- share of the base graph's nodes selected
        count(*) as size,
        count(distinct layer) as layers,
        max(score) as max_score
    from s
    group by run_id, subset
)
select * from final
order by run_id, method, threshold, ratio, subset;
