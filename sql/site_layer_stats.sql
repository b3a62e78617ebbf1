-- Per layer of one run: neurons, mean activation frequency (share of accumulated rows where
-- active), neurons never active, mean and largest activation. $run_id.
with s as (
    select * from neuron_stats where run_id = $run_id
),
final as (
    select
        layer,
        count(*) as neurons,
        avg(case when count > 0 then active_count::double / count end) as mean_frequency,
        count_if(active_count = 0) as never_active,
        sum(sum) / nullif(sum(count), 0) as mean_activation,  -- activation units
        max(max) as max_activation
    from s
    group by layer
)
select * from final
order by layer;
