-- Text generated from each prompt's first sample with each subset ablated (subset 'none' is
-- the baseline), for the ablation page. $run_id.
with g as (
    select * from ablation_generations
    where run_id = $run_id and sample_index = 0
),
final as (
    select mode, prompt, subset, generated_text
    from g
)
select * from final
order by mode, prompt, subset = 'none' desc, subset;
