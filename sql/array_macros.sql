-- Table macros over a run's Zarr arrays (kind 'acts' = float16 activations, 'active' = 0/1 masks).
-- They call the Python functions zarr_column / zarr_block registered on the connection.

-- Every row of one neuron: (row, layer, neuron, value).
create or replace macro neuron_values(run, kind, layer_index, neuron_index) as table
with col as (
    select zarr_column(run, kind, layer_index, neuron_index) as vals
),
final as (
    select
        unnest(range(len(vals))) as row,
        layer_index as layer,
        neuron_index as neuron,
        unnest(vals) as value
    from col
)
select * from final;

-- A slice of rows of one layer in long form: (row, layer, neuron, value), rows in [row_start, row_stop).
create or replace macro layer_values(run, kind, layer_index, row_start, row_stop) as table
with block as (
    select
        zarr_block(run, kind, layer_index, row_start, row_stop) as vals,
        zarr_width(run, kind, layer_index) as width
),
cells as (
    select unnest(range(len(vals))) as i, unnest(vals) as value, width from block
),
final as (
    select
        row_start + i // width as row,
        layer_index as layer,
        (i % width)::integer as neuron,
        value
    from cells
)
select * from final;

-- Co-activation counts of a layer pair (nwh coactivation; Zarr coact/L<a>_L<b>) in long form:
-- one row per neuron pair (neuron_a of layer first_layer, neuron_b of layer second_layer) active
-- together on at least one counted token row; count = those token rows (BIGINT). neuron_id_a,
-- neuron_id_b are the global ids (the `neurons` table). A pair counted as b:a is read transposed.
-- The Python function coact_block reads a block of rows of the counts at a time.
create or replace macro coactivation(run, first_layer, second_layer) as table
with blocks as (
    select unnest(range(0, coact_rows(run, first_layer, second_layer), 1024)) as start
),
cells as (
    select coact_block(run, first_layer, second_layer, start, start + 1024) as c from blocks
),
pairs as (
    select unnest(c.neuron_a) as neuron_a, unnest(c.neuron_b) as neuron_b, unnest(c.count) as count
    from cells
),
offsets as (
    select layer, any_value(layer_offset) as layer_offset
    from neurons
    where run_id = run and layer in (first_layer, second_layer)
    group by layer
),
final as (
    select
        first_layer::integer as layer_a,
        p.neuron_a,
        second_layer::integer as layer_b,
        p.neuron_b,
        p.count,
        (select layer_offset from offsets where layer = first_layer) + p.neuron_a as neuron_id_a,
        (select layer_offset from offsets where layer = second_layer) + p.neuron_b as neuron_id_b
    from pairs p
)
select * from final;
