-- Per run, ablation mode and subset: the subset's effect on held-out text against its random
-- controls (subsets of the same per-layer sizes): the controls' mean and sd (population), and
-- the empirical p-value (controls with an effect at least the subset's + 1) / (controls + 1).
-- kl: mean KL(baseline || ablated), nats/token; delta_loss: change of mean loss, nats/token.
with e as (
    select * from ablation_effects
),
s as (
    select * from e where kind = 'subset'
),
c as (
    select * from e where kind = 'control'
),
versus as (
    select
        s.run_id, s.mode, s.subset, s.size, s.layers, s.tokens, s.baseline_loss,
        s.kl, s.delta_loss, s.top1_agreement,
        count(c.kl) as controls,
        avg(c.kl) as kl_control_mean,
        stddev_pop(c.kl) as kl_control_std,
        (count_if(c.kl >= s.kl) + 1)::double / (count(c.kl) + 1) as kl_p_value,
        avg(c.delta_loss) as delta_loss_control_mean,
        stddev_pop(c.delta_loss) as delta_loss_control_std,
        (count_if(c.delta_loss >= s.delta_loss) + 1)::double / (count(c.delta_loss) + 1)
            as delta_loss_p_value,
        avg(c.top1_agreement) as top1_agreement_control_mean
    from s
    left join c on c.run_id = s.run_id and c.mode = s.mode and c.subset = s.subset
    group by all
),
meta as (
    select run_id, subset, any_value(method) as method, any_value(weight) as weight,
        any_value(threshold) as threshold, any_value(ratio) as ratio
    from subsets
    group by run_id, subset
),
final as (
    select versus.*, meta.method, meta.weight, meta.threshold, meta.ratio
    from versus
    left join meta using (run_id, subset)
)
select * from final
order by run_id, mode, kl_p_value, kl desc, subset;
