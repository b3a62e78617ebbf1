-- Mean, variance, skew and kurtosis of every row of `power_sums` (n, shift, s1..s4), in row order.
with final as (
    select
        moment_mean(n, shift, s1) as mean,
        moment_var(n, s1, s2) as var,
        moment_skew(n, s1, s2, s3) as skew,
        moment_kurt(n, s1, s2, s3, s4) as kurt
    from power_sums
    order by idx
)
select * from final;
