-- Neurons consistent across samples of the same prompt: share of a prompt's samples in which
-- the neuron is active at some generated token. active_events(row, layer, neuron): the active
-- bits of the analysed rows; analysed_rows(row): the analysed token rows of run $run_id; a
-- prompt's samples are those with an analysed generated token. $min_share in (0, 1].
with t as (
    select t.row, t.prompt, t.prompt_sample
    from tokens t
    semi join analysed_rows a on a.row = t.row
    where t.run_id = $run_id and t.generated
),
samples as (
    select prompt, count(distinct prompt_sample) as num_samples from t group by prompt
),
per_sample as (
    select distinct t.prompt, t.prompt_sample, e.layer, e.neuron
    from active_events e
    join t using (row)
),
final as (
    select
        p.prompt, p.layer, p.neuron, count(*) as samples_active, s.num_samples,
        count(*)::double / s.num_samples as share
    from per_sample p
    join samples s using (prompt)
    group by p.prompt, p.layer, p.neuron, s.num_samples
    having count(*)::double / s.num_samples >= $min_share
)
select * from final
order by prompt, share desc, layer, neuron;
