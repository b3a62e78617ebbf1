-- Gated neurons of one run: the share of accumulated entries and mean |a| of each sign
-- combination of (g, u) (GLUScope's four). $run_id; $neuron_ids: the global ids wanted.
with s as (
    select * from sign_stats
    where run_id = $run_id and list_contains($neuron_ids, neuron_id)
),
final as (
    select
        neuron_id, layer, neuron, combination, count,
        count::double / nullif(sum(count) over (partition by neuron_id), 0) as share,
        mean_abs
    from s
)
select * from final
order by neuron_id, combination;
