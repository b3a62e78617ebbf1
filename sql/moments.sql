-- Central moments from power sums about a shift K: s_k = sum over the n values of (x - K)^k.
-- The one definition used everywhere (neuron_summary, universal, vocabulary composition).
-- With K near the mean (the accumulators fix K per neuron at the first block), no digits are
-- lost when the mean is large against the spread. Units: those of x (var: x^2).
create or replace macro moment_mean(n, shift, s1) as shift + s1 / n;

create or replace macro moment_var(n, s1, s2) as greatest(s2 / n - (s1 / n) * (s1 / n), 0);

-- skew = E[(x - mu)^3] / sigma^3
create or replace macro moment_skew(n, s1, s2, s3) as case when moment_var(n, s1, s2) > 0 then
    (s3 / n - 3 * (s1 / n) * (s2 / n) + 2 * pow(s1 / n, 3)) / pow(moment_var(n, s1, s2), 1.5) end;

-- kurtosis = E[(x - mu)^4] / sigma^4 (3 for a normal distribution)
create or replace macro moment_kurt(n, s1, s2, s3, s4) as case when moment_var(n, s1, s2) > 0 then
    (s4 / n - 4 * (s1 / n) * (s3 / n) + 6 * pow(s1 / n, 2) * (s2 / n) - 3 * pow(s1 / n, 4))
    / pow(moment_var(n, s1, s2), 2) end;
