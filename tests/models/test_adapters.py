"""The hooks at the adapter's sites and blocks: editing, ablation, and cleanup.

Per-family sites and weights are checked in test_architectures.py, loading in test_loading.py.
"""

from __future__ import annotations

import pytest
import torch
from test_architectures import V, block_input_reader, build, one_thread

from pipeline.models.adapters import adapter_for
from pipeline.models.hooks import ablate_neurons, capture_neurons, edit_block_inputs

pytestmark = pytest.mark.usefixtures(one_thread.__name__)  # the fixture, active in this module


@pytest.mark.parametrize("case", ["gpt2", "opt", "llama", "phi3", "gptj", "distilbert"])
def test_edit_block_inputs_replaces_the_stream(case):
    model = build(case)
    block = adapter_for(model).block(model, 1)
    ids = torch.randint(V, (2, 5))
    with torch.no_grad():
        clean = model(input_ids=ids)[0]
        with edit_block_inputs({1: block}, {1: lambda x: x}):
            same = model(input_ids=ids)[0]
        seen: list = []
        with edit_block_inputs({1: block}, {1: lambda x: 2 * x}):
            handle = block_input_reader(block, seen)  # registered after: sees the edited input
            try:
                doubled = model(input_ids=ids)[0]
            finally:
                handle.remove()
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert torch.equal(same, clean) and not torch.allclose(doubled, clean)
    torch.testing.assert_close(seen[0], 2 * hidden)
    assert not block._forward_pre_hooks


@pytest.mark.parametrize("case", ["gpt2", "llama", "bert", "phi3", "falcon"])
def test_zero_ablation_zeroes_only_those_neurons(case):
    model = build(case)
    sites = adapter_for(model).sites(model)
    ids = torch.randint(V, (2, 5))
    seen = {}
    with torch.no_grad(), capture_neurons(sites) as clean:
        model(input_ids=ids)
        clean = {k: v.clone() for k, v in clean.items()}
    # an independent reader hook, registered after the pipeline's edit hook, sees the edited input
    with torch.no_grad(), ablate_neurons(sites, {0: torch.tensor([1, 3])}):
        handle = sites[0].module.register_forward_pre_hook(
            lambda m, a: seen.__setitem__(0, a[0].detach().clone()))
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    assert (seen[0][..., [1, 3]] == 0).all() and (clean[0][..., [1, 3]] != 0).any()
    keep = [i for i in range(sites[0].width) if i not in (1, 3)]
    assert torch.equal(seen[0][..., keep], clean[0][..., keep])


def test_hooks_removed_after_exception():
    model = build("gpt2")
    sites = adapter_for(model).sites(model)
    with pytest.raises(RuntimeError):
        with capture_neurons(sites), ablate_neurons(sites, {1: torch.tensor([0])}):
            raise RuntimeError("boom")
    assert all(not s.module._forward_pre_hooks for s in sites)

