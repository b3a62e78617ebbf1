-- One gated neuron's four sign combinations of (g, u): their share of the accumulated entries,
-- mean |a|, and the top examples of each (largest |a|) with the text before the token.
-- $run_id, $layer, $neuron, $context (tokens of left context).
with s as (
    select combination, count, count::double / sum(count) over () as share, mean_abs
    from sign_stats
    where run_id = $run_id and layer = $layer and neuron = $neuron
),
e as (
    select combination, rank, row, value
    from sign_examples
    where run_id = $run_id and layer = $layer and neuron = $neuron
),
t as (
    select row, sample, position, token from tokens where run_id = $run_id
),
hits as (
    select e.combination, e.rank, e.row, e.value, t.sample, t.position, t.token
    from e join t using (row)
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
        s.combination,
        s.count,
        s.share,
        s.mean_abs,
        h.rank,
        h.row,
        h.token,
        coalesce(ctx.context, '') as context,
        h.value
    from s
    left join hits h using (combination)
    left join ctx using (row)
)
select * from final
order by combination, rank;
