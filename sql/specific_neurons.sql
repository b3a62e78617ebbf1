-- Token- and position-specific neurons: active far more often for one key than overall.
-- active_events(row, layer, neuron): the active bits of the analysed rows;
-- analysed_rows(row): the analysed token rows of run $run_id.
-- $min_count: keys seen at least this often among the analysed rows;
-- $min_ratio: keep P(active | key) / P(active) >= this; $top: rows kept per kind.
-- Probabilities are shares of the analysed rows (P(active) included).
with analysed as (
    select t.row, t.token_id, t.token, t.position
    from tokens t
    semi join analysed_rows a on a.row = t.row
    where t.run_id = $run_id
),
keyed as (
    select row, 'token' as kind, token_id::bigint as key, token as key_text from analysed
    union all
    select row, 'position' as kind, position::bigint as key, position::varchar as key_text
    from analysed
),
rows_total as (
    select count(*)::double as n from analysed
),
keys as (
    select kind, key, any_value(key_text) as key_text, count(*) as key_count
    from keyed
    group by kind, key
    having count(*) >= $min_count
),
neuron_p as (
    select layer, neuron, count(*) / (select n from rows_total) as p_active
    from active_events
    group by layer, neuron
),
hits as (
    select k.kind, k.key, e.layer, e.neuron, count(*) as hits
    from active_events e
    join keyed k using (row)
    semi join keys using (kind, key)
    group by k.kind, k.key, e.layer, e.neuron
),
scored as (
    select
        h.kind, h.key, k.key_text, h.layer, h.neuron, h.hits, k.key_count,
        h.hits::double / k.key_count as p_given_key,
        p.p_active,
        (h.hits::double / k.key_count) / p.p_active as ratio
    from hits h
    join keys k using (kind, key)
    join neuron_p p using (layer, neuron)
),
ranked as (
    select *, row_number() over (
        partition by kind order by ratio desc, hits desc, key, layer, neuron) as rank
    from scored
    where ratio >= $min_ratio
),
final as (
    select kind, key, key_text, layer, neuron, hits, key_count, p_given_key, p_active, ratio
    from ranked
    where rank <= $top
)
select * from final
order by kind desc, ratio desc, hits desc, key, layer, neuron;
