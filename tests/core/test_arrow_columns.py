"""tables.arrow_column builds Arrow arrays on NumPy buffers: the values equal pyarrow's own
conversion of the same column (pa.array with the type), what it cannot build exactly is left to
pa.table and the schema cast, and a stage writing a table does not import pandas."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import tables

RNG = np.random.default_rng(7)

NUMBER_TYPES = [pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.float32(),
                pa.float64()]


def _as_pyarrow_would(values, type):
    """The truth: pyarrow's own conversion, then the schema cast to_arrow makes."""
    return pa.array(values).cast(type, safe=True) if isinstance(values, np.ndarray) else \
        pa.array(values, type=type)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
@pytest.mark.parametrize("type", NUMBER_TYPES, ids=str)
def test_numpy_numbers_and_bools_equal_pyarrows_conversion(type, n):
    for source in (np.bool_, np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64):
        values = (RNG.integers(0, 2, n) if source is np.bool_ else RNG.integers(0, 100, n)
                  ).astype(source)
        if pa.types.is_boolean(type) and source is not np.bool_:
            continue
        column = tables.arrow_column(values, type)
        assert isinstance(column, pa.Array)
        column.validate(full=True)
        assert column.equals(_as_pyarrow_would(values, type)), (type, source, n)


@pytest.mark.parametrize("n", [1, 8, 9, 100])
@pytest.mark.parametrize("type", NUMBER_TYPES + [pa.string()], ids=str)
def test_lists_with_nulls_equal_pyarrows_conversion(type, n):
    if pa.types.is_string(type):
        pool = ["", "a", "é", " the", "日本", "\n", "x" * 300]
        values = [pool[i % len(pool)] for i in RNG.integers(0, 100, n)]
    elif pa.types.is_boolean(type):
        values = [bool(v) for v in RNG.integers(0, 2, n)]
    elif pa.types.is_floating(type):
        values = [float(v) / 8 for v in RNG.integers(-100, 100, n)]
    else:
        values = [int(v) for v in RNG.integers(-100, 100, n)]
    for nulls in (set(), {0}, set(range(0, n, 3)), set(range(n))):
        column_values = [None if i in nulls else v for i, v in enumerate(values)]
        column = tables.arrow_column(column_values, type)
        assert isinstance(column, pa.Array)
        column.validate(full=True)
        assert column.null_count == len(nulls)
        assert column.equals(pa.array(column_values, type=type)), (type, n, nulls)


def test_object_arrays_of_text_are_strings():
    values = np.array(["a", "bc", "", "ü"], dtype=object)
    column = tables.arrow_column(values, pa.string())
    assert isinstance(column, pa.Array) and column.to_pylist() == ["a", "bc", "", "ü"]


@pytest.mark.parametrize("values, type", [
    (np.array([2**40]), pa.int32()),       # out of the type's range
    (np.array([1.5]), pa.int64()),         # not a whole number
    ([1, "a"], pa.int64()),                # a string among numbers
    ([2**70], pa.int64()),                 # past any NumPy integer
    ([1, 2], pa.string()),                 # numbers for a string column
    (np.arange(4).reshape(2, 2), pa.int64()),
    ([[1, 2], [3]], pa.list_(pa.int64())),  # a list column: pyarrow's conversion
])
def test_what_it_cannot_build_exactly_is_left_to_pyarrow(values, type):
    assert tables.arrow_column(values, type) is values


def test_a_value_out_of_the_schemas_range_is_still_a_schema_error():
    good = {"neuron_id": [0], "layer": [0], "neuron": [0], "value": [1.5], "active": [True]}
    assert tables.to_arrow("trace", good).column("layer").to_pylist() == [0]
    for bad in ({"layer": [2**40]}, {"layer": np.array([2**40])}, {"layer": [1.5]},
                {"active": ["yes"]}):
        with pytest.raises(tables.SchemaError):
            tables.to_arrow("trace", {**good, **bad})


def test_writing_a_table_does_not_import_pandas(tmp_path):
    code = (
        "import sys, numpy as np; from pipeline.core import tables; "
        "from pipeline.core.storage import Storage; "
        f"s = Storage({str(tmp_path)!r}); "
        "n = 5; tables.write_part(s, 'tokens', 'r', {'row': np.arange(n), "
        "'sample': np.zeros(n, np.int32), 'prompt': np.full(n, -1, np.int32), "
        "'prompt_sample': np.full(n, -1, np.int32), 'position': np.arange(n, dtype=np.int32), "
        "'token_id': np.arange(n, dtype=np.int32), 'token': np.array(list('abcde'), dtype=object), "
        "'generated': np.zeros(n, bool), 'num_active': np.ones(n, np.int32), "
        "'included': np.ones(n, bool)}, 'part-0'); "
        "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "tables" / "tokens").rglob("*.parquet")))
    assert table.column("token").to_pylist() == list("abcde")
    assert table.column("included").to_pylist() == [True] * 5
