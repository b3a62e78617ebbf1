-- Top-k token rows of every neuron of one layer, with the text before each token.
-- Input: `candidates` (neuron, row, value) registered by the caller, the union of
-- top_tokens_block.sql over all row blocks. $run_id, $layer, $k (rows per neuron),
-- $context (tokens of left context, same sample).
with c as (
    select neuron, row, value from candidates
),
top as (
    select
        neuron, row, value,
        row_number() over (partition by neuron order by value desc, row) as rank
    from c
    qualify rank <= $k
),
t as (
    select row, sample, position, token from tokens where run_id = $run_id
),
hits as (
    select top.neuron, top.rank, top.row, top.value, t.sample, t.position, t.token
    from top join t using (row)
),
ctx as (
    select h.neuron, h.row, string_agg(c.token, '' order by c.position) as context
    from hits h
    join t c on c.sample = h.sample
        and c.position >= h.position - $context and c.position < h.position
    group by h.neuron, h.row
),
final as (
    select
        $layer::integer as layer, h.neuron::integer as neuron, h.rank, h.row, h.sample,
        h.position, h.token, coalesce(ctx.context, '') as context, h.value
    from hits h
    left join ctx using (neuron, row)
)
select * from final
order by neuron, rank;
