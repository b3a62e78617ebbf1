-- Per gradient result: the $k neurons of largest mean |dL/da| (over token positions), from
-- gradient_rows (neuron_gradients with its unit column named `neuron`).
with g as (
    select * from gradient_rows where kind = 'neuron'
),
ranked as (
    select *,
        row_number() over (partition by run_id order by grad_mean_abs desc, neuron_id) as rank
    from g
),
final as (
    select run_id as name, model, revision, rank, layer, neuron, neuron_id, grad_mean,
        grad_mean_abs
    from ranked
    where rank <= $k
)
select * from final
order by name, rank;
