-- Top-k token rows of one neuron by activation, with the text before each token.
-- $run_id, $layer, $neuron, $k (rows), $context (tokens of left context).
with v as (
    select row, value from neuron_values($run_id, 'acts', $layer, $neuron)
),
top as (
    select row, value from v order by value desc, row limit $k
),
t as (
    select row, sample, position, token from tokens where run_id = $run_id
),
hits as (
    select top.row, top.value, t.sample, t.position, t.token
    from top join t using (row)
),
ctx as (
    select h.row, string_agg(c.token, '' order by c.position) as context
    from hits h
    join t c on c.sample = h.sample
        and c.position >= h.position - $context and c.position < h.position
    group by h.row
),
final as (
    select
        dense_rank() over (order by h.value desc, h.row) as rank,
        h.row, h.sample, h.position, h.token, coalesce(ctx.context, '') as context,
        h.value
    from hits h
    left join ctx using (row)
)
select * from final
order by rank;
