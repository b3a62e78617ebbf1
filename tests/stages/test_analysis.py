"""Analysis queries against brute force over the unpacked masks and the tokens table."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pipeline.core import arrays, tables
from pipeline.stages.analysis import AnalysisConfig, analyze
from pipeline.core.errors import UserError
from pipeline.stages.extract import ExtractConfig, extract
from pipeline.core.storage import Storage


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, micro_model_dir):
    storage = Storage(tmp_path_factory.mktemp("an"))
    csv = storage.root / "p.csv"
    csv.write_text('prompts,number_of_new_tokens,num_samples\n"the value of",6,4\n"raise error",5,3\n')
    extract(ExtractConfig(model=str(micro_model_dir), prompts=str(csv), run="a"), storage,
            progress=False)
    out = analyze(AnalysisConfig(run="a", min_token_count=2, min_ratio=1.5, top=100000,
                                 min_share=0.75, clusters=3), storage)
    group = arrays.open_group(storage.arrays("a"), mode="r")
    masks = {l: arrays.unpack_mask(group[f"active/L{l}"][:], 40) for l in range(3)}
    tokens = tables.read_partition(storage, "tokens", "a").to_pydict()
    return storage, out, masks, tokens


def brute_specific(masks, keys, min_count, min_ratio):
    n = len(keys)
    counts = defaultdict(int)
    for k in keys:
        counts[k] += 1
    found = {}
    for l, m in masks.items():
        for j in range(m.shape[1]):
            p = sum(bool(m[r, j]) for r in range(n)) / n
            if p == 0:
                continue
            for key, c in counts.items():
                if c < min_count:
                    continue
                hits = sum(1 for r in range(n) if keys[r] == key and m[r, j])
                if hits and (hits / c) / p >= min_ratio:
                    found[(key, l, j)] = (hits, (hits / c) / p)
    return found


@pytest.mark.parametrize("kind,column", [("token", "token_id"), ("position", "position")])
def test_specific_neurons_brute_force(analysed, kind, column):
    _, out, masks, tokens = analysed
    expect = brute_specific(masks, tokens[column], 2, 1.5)
    got = out["specific_neurons"].filter(out["specific_neurons"]["kind"] == kind)
    pairs = {(k, l, n): (h, r) for k, l, n, h, r in
             zip(got["key"], got["layer"], got["neuron"], got["hits"], got["ratio"])}
    assert pairs.keys() == expect.keys()
    for key, (hits, ratio) in expect.items():
        assert pairs[key][0] == hits and pairs[key][1] == pytest.approx(ratio)


def test_consistent_neurons_brute_force(analysed):
    _, out, masks, tokens = analysed
    active_in = defaultdict(set)
    samples = defaultdict(set)
    for r in range(len(tokens["row"])):
        if not tokens["generated"][r]:
            continue
        p, s = tokens["prompt"][r], tokens["prompt_sample"][r]
        samples[p].add(s)
        for l, m in masks.items():
            for j in np.flatnonzero(m[r]):
                active_in[(p, l, int(j))].add(s)
    expect = {k for k, v in active_in.items() if len(v) / len(samples[k[0]]) >= 0.75}
    got = out["consistent_neurons"]
    assert set(zip(got["prompt"], got["layer"], got["neuron"])) == expect


def test_important_and_clusters(analysed):
    storage, out, masks, _ = analysed
    imp = out["important_neurons"].filter(out["important_neurons"]["rank_by"] == "frequency")
    freq = np.concatenate([masks[l].mean(0) for l in range(3)])
    assert imp["frequency"][0] == pytest.approx(freq.max())
    clusters = out["token_clusters"]
    assert clusters.height == len(masks[0]) and set(clusters["cluster"]) <= {0, 1, 2}
    for name in ("important_neurons.png", "token_clusters.png", "specific_neurons.png"):
        assert (storage.reports("a") / name).stat().st_size > 1000
    assert tables.read_partition(storage, "specific_neurons", "a").num_rows == out["specific_neurons"].height


def test_bad_config():
    with pytest.raises(UserError):
        AnalysisConfig(run="a", min_share=0)
    with pytest.raises(UserError):
        AnalysisConfig(run="a", clusters=0)
