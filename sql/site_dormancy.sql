-- Dormancy per layer and checkpoint for the site: every row of the dormancy table (read as
-- dormancy_rows, whose layer column is `layer`) with its run's finish time, which orders
-- checkpoints that have no step number. pct_dormant in %.
with d as (
    select * from dormancy_rows
),
r as (
    select run_id, finished_at from runs
),
final as (
    select
        d.model, d.revision, d.step, d.definition, d.threshold, d.run_id, d.layer,
        d.num_neurons, d.num_dormant, d.pct_dormant, r.finished_at
    from d
    left join r using (run_id)
)
select * from final
order by model, definition, threshold, step nulls last, finished_at, layer;
