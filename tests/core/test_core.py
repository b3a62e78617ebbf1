"""Core pieces: layer specs, run ids, schemas, bit packing, prompts CSV."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import arrays, tables
from pipeline.core.errors import UserError
from pipeline.core.inputs import read_prompts
from pipeline.core.layers import parse_layers
from pipeline.core.storage import slug, validate_run_id


@pytest.mark.parametrize("spec,expected", [
    (None, [0, 1, 2, 3]), ("all", [0, 1, 2, 3]), ("0-2", [0, 1, 2]), ("3,1", [1, 3]),
    ("0-1,3", [0, 1, 3]), ("2", [2]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["4", "0-9", "a", "3-1", "1,,2", "-1"])
def test_parse_layers_rejects(spec):
    with pytest.raises(UserError) as e:
        parse_layers(spec, 4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["a/b", "..", "a/../b", "", "x\\y", "-lead"])
def test_run_id_rejects_paths(bad):
    with pytest.raises(UserError):
        validate_run_id(bad)


def test_slug_is_a_valid_run_id():
    assert validate_run_id(slug("EleutherAI/pythia-70m", "step1000", "my file.txt"))


def test_schema_validation():
    good = {"neuron_id": [0], "layer": [0], "neuron": [0], "value": [1.5], "active": [True]}
    out = tables.to_arrow("trace", good)
    assert out.schema.field("value").type == pa.float32()
    with pytest.raises(tables.SchemaError):
        tables.to_arrow("trace", {**good, "extra": [1]})
    with pytest.raises(tables.SchemaError):
        tables.to_arrow("trace", {k: v for k, v in good.items() if k != "active"})
    with pytest.raises(tables.SchemaError):
        tables.to_arrow("trace", {**good, "layer": [None]})


@given(st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_roundtrip(tokens, width, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(tokens, width, generator=gen) > 0.5
    packed = arrays.pack_mask(mask)
    assert packed.shape == (tokens, arrays.packed_width(width))
    assert np.array_equal(packed, np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert np.array_equal(arrays.unpack_mask(packed, width), mask.numpy())


def _write(tmp_path, text):
    p = tmp_path / "p.csv"
    p.write_text(text)
    return p


def test_prompts_csv(tmp_path):
    p = _write(tmp_path, 'prompts,number_of_new_tokens,num_samples\n"Hi, there",5,2\nYo,3,1\n')
    prompts = read_prompts(p)
    assert [(x.text, x.new_tokens, x.num_samples) for x in prompts] == [("Hi, there", 5, 2), ("Yo", 3, 1)]


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("prompt,number_of_new_tokens,num_samples\nHi,5,2\n", "prompts"),
    ("prompts,new_tokens,num_samples\nHi,5,2\n", "number_of_new_tokens"),
    ("prompts,number_of_new_tokens,num_samples\nHi,five,2\n", "not a whole number"),
    ("prompts,number_of_new_tokens,num_samples\n", "no prompts"),
    ("prompts,number_of_new_tokens,num_samples\nHi,0,2\n", "at least 1"),
])
def test_prompts_csv_errors(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        read_prompts(_write(tmp_path, text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_prompts_missing_file(tmp_path):
    with pytest.raises(UserError):
        read_prompts(tmp_path / "nope.csv")
