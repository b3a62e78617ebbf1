"""Architecture adapters: one table maps a model family to its neuron site and weights.

The neuron is one coordinate of the INPUT of the MLP's output projection (post-nonlinearity,
post-gate). Adding an architecture is one entry in FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.errors import UserError


@dataclass(frozen=True)
class NeuronSite:
    layer: int
    name: str                 # qualified module name, e.g. "transformer.h.0.mlp.c_proj"
    module: torch.nn.Module   # the output projection; its forward input is the neuron vector
    width: int                # d_mlp of this layer


@dataclass(frozen=True)
class Family:
    layers: tuple[str, ...]   # candidate paths of the layer list (LM-head model first, then base)
    w_out: str                # output projection, relative to a layer
    w_in: str                 # projection feeding the nonlinearity, relative to a layer
    w_up: str | None = None   # the ungated branch of a gated MLP
    conv1d: bool = False      # GPT-2's Conv1D stores weight as [in, out]
    causal: bool = True


_DECODER = ("model.layers", "layers")
_GATED = Family(_DECODER, "mlp.down_proj", "mlp.gate_proj", w_up="mlp.up_proj")

FAMILIES: dict[str, Family] = {
    "gpt2": Family(("transformer.h", "h"), "mlp.c_proj", "mlp.c_fc", conv1d=True),
    "gpt_neox": Family(("gpt_neox.layers", "layers"), "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "llama": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "mistral": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "opt": Family(("model.decoder.layers", "decoder.layers"), "fc2", "fc1"),
    "bert": Family(("bert.encoder.layer", "encoder.layer"), "output.dense", "intermediate.dense", causal=False),
    "roberta": Family(("roberta.encoder.layer", "encoder.layer"), "output.dense",
                      "intermediate.dense", causal=False),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def _get(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class Adapter:
    """Neuron sites and weights of one family; works on LM-head and base models alike."""

    def __init__(self, family: str, spec: Family):
        self.family, self.spec = family, spec
        self.gated = spec.w_up is not None
        self.causal = spec.causal

    def _layers_path(self, model) -> str:
        for path in self.spec.layers:
            if isinstance(_get(model, path), torch.nn.ModuleList):
                return path
        raise UserError(f"cannot find the layers of this {self.family} model "
                        f"(looked for {', '.join(self.spec.layers)})")

    def block(self, model, layer: int) -> torch.nn.Module:
        """The transformer block of a layer (an element of the layer list): its forward input
        is the residual stream entering the layer (hook_resid_pre)."""
        blocks = model.get_submodule(self._layers_path(model))
        if not 0 <= layer < len(blocks):
            raise UserError(f"layer {layer} is out of range: the model has {len(blocks)} layers")
        return blocks[layer]

    def _layer_module(self, model, layer: int, rel: str) -> torch.nn.Module:
        return self.block(model, layer).get_submodule(rel)

    def sites(self, model) -> list[NeuronSite]:
        path = self._layers_path(model)
        out = []
        for i in range(len(model.get_submodule(path))):
            module = model.get_submodule(f"{path}.{i}.{self.spec.w_out}")
            width = module.weight.shape[0] if self.spec.conv1d else module.weight.shape[1]
            out.append(NeuronSite(i, f"{path}.{i}.{self.spec.w_out}", module, width))
        return out

    def _weight(self, module) -> torch.Tensor:
        """Weight as [in, out]."""
        w = module.weight.detach()
        return w if self.spec.conv1d else w.T

    def w_in(self, model, layer: int) -> torch.Tensor:
        """[d_model, d_mlp]: column n holds the input weights of neuron n."""
        return self._weight(self._layer_module(model, layer, self.spec.w_in))

    def w_up(self, model, layer: int) -> torch.Tensor | None:
        """[d_model, d_mlp] of the ungated branch of a gated MLP, else None."""
        if not self.gated:
            return None
        return self._weight(self._layer_module(model, layer, self.spec.w_up))

    def b_in(self, model, layer: int) -> torch.Tensor | None:
        bias = getattr(self._layer_module(model, layer, self.spec.w_in), "bias", None)
        return None if bias is None else bias.detach()

    def w_out(self, model, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row n holds the output weights of neuron n."""
        return self._weight(self._layer_module(model, layer, self.spec.w_out))

    def unembed(self, model) -> torch.Tensor:
        """[d_model, vocab]: the LM head, or the tied input embeddings of a base model."""
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            head = model.get_input_embeddings()
        return head.weight.detach().T

    def base_model(self, model) -> torch.nn.Module:
        """The trunk without the LM head (extraction needs no logits)."""
        base = getattr(model, "base_model", model)
        return base if base is not None else model


def adapter_for(model) -> Adapter:
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise UserError(f"model type {family!r} has no adapter: supported are "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    return Adapter(family, FAMILIES[family])
