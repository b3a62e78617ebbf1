-- Gradient results of neurons: name, model and revision, units.
with g as (
    select * from neuron_gradients where kind = 'neuron'
),
final as (
    select run_id as name, any_value(model) as model, any_value(revision) as revision,
        count(*) as neurons
    from g
    group by run_id
)
select * from final
order by name;
