-- The runs of the warehouse for the site's index: one row per finished run, with the number of
-- layer pairs whose co-activation counts are stored (0: `nwh coactivation` has not run).
with r as (
    select * from runs
),
pairs as (
    select run_id, count(*) as coact_pairs
    from coactivation_pairs
    group by run_id
),
final as (
    select
        r.run_id, r.model, r.revision, r.source, r.input_kind, r.input,
        r.num_rows,       -- token rows T
        r.num_samples, r.num_layers, r.num_neurons, r.active_rule, r.active_threshold,
        r.num_included,   -- token rows that entered the accumulators
        r.finished_at,
        r.seconds,        -- wall time of the extraction
        coalesce(pairs.coact_pairs, 0) as coact_pairs
    from r
    left join pairs using (run_id)
)
select * from final
order by run_id;
