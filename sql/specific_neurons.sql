-- Token- or position-specific neurons: active far more often for one key than overall.
-- active_events(row, layer, neuron) over the analysed rows; analysed_rows(row, key, key_text);
-- $min_count: keys seen at least this often; $min_ratio: P(active | key) / P(active) threshold;
-- $top: rows kept. P(active) is measured over the same analysed rows.
with rows_total as (
    select count(*)::double as n from analysed_rows
),
keys as (
    select key, any_value(key_text) as key_text, count(*) as key_count
    from analysed_rows
    group by key
    having count(*) >= $min_count
),
neuron_p as (
    select layer, neuron, count(*) / (select n from rows_total) as p_active
    from active_events
    group by layer, neuron
),
hits as (
    select r.key, e.layer, e.neuron, count(*) as hits
    from active_events e
    join analysed_rows r using (row)
    join keys k using (key)
    group by r.key, e.layer, e.neuron
),
final as (
    select
        h.key, k.key_text, h.layer, h.neuron, h.hits, k.key_count,
        h.hits::double / k.key_count as p_given_key,
        p.p_active,
        (h.hits::double / k.key_count) / p.p_active as ratio
    from hits h
    join keys k using (key)
    join neuron_p p using (layer, neuron)
    where (h.hits::double / k.key_count) / p.p_active >= $min_ratio
)
select * from final
order by ratio desc, hits desc, key, layer, neuron
limit $top;
