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
