-- The most important neurons of a run: top $top by activation frequency and by mean activation.
with s as (
    select
        neuron_id, layer, neuron,
        active_count::double / count as frequency,   -- share of token rows where active
        sum / count as mean                          -- activation units
    from neuron_stats
    where run_id = $run_id
),
ranked as (
    select 'frequency' as rank_by, row_number() over (order by frequency desc, neuron_id) as rank, *
    from s
    union all
    select 'mean' as rank_by, row_number() over (order by mean desc, neuron_id) as rank, *
    from s
),
final as (
    select * from ranked where rank <= $top
)
select * from final
order by rank_by, rank;
