-- Neurons consistent across samples of the same prompt: share of a prompt's samples in which
-- the neuron is active at some generated token. active_events(row, layer, neuron);
-- $run_id; $min_share in [0, 1].
with t as (
    select row, prompt, prompt_sample from tokens
    where run_id = $run_id and generated
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
