-- Some neurons of one model across every run of it (its checkpoints): the tau-dormancy score
-- of Sokar et al. (2023), as sql/dormancy_neurons.sql defines it: mean|a| of the neuron over
-- the mean of mean|a| over its layer (+ 1e-9), and its activation frequency.
-- $model (runs.model); $neuron_ids: the global ids wanted.
with r as (
    select run_id, revision, finished_at from runs where model = $model
),
s as (
    select
        s.run_id, s.neuron_id, s.layer, s.neuron, s.count, s.active_count,
        case when s.count > 0 then s.sum_abs / s.count else 0 end as mean_abs
    from neuron_stats s
    join r using (run_id)
),
scored as (
    select *, mean_abs / (avg(mean_abs) over (partition by run_id, layer) + 1e-9) as score
    from s
),
final as (
    select
        sc.neuron_id, sc.layer, sc.neuron, r.run_id, r.revision, r.finished_at, sc.score,
        sc.mean_abs,
        case when sc.count > 0 then sc.active_count::double / sc.count else 0 end as frequency
    from scored sc
    join r using (run_id)
    where list_contains($neuron_ids, sc.neuron_id)
)
select * from final
order by neuron_id, finished_at;
