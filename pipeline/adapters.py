"""Architecture adapters: one table maps a model family to its neuron site and weights.

The neuron is one coordinate of the INPUT of the MLP's output projection (post-nonlinearity,
post-gate). Every stage hooks that one place, for extraction, ablation and gradients alike.

Adding an architecture is one entry in FAMILIES (keyed by `config.model_type`): where the layer
list lives (LM-head model first, then the bare trunk), and, relative to one layer, the output
projection (the site), the projection feeding the nonlinearity (W_in) and, for gated MLPs, the
ungated branch (W_up). Weight layouts are read from the module type (nn.Linear stores
[out, in], GPT-2's Conv1D stores [in, out]), so the table holds names only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronSite:
    layer: int
    name: str                 # qualified module name, e.g. "transformer.h.0.mlp.c_proj"
    module: torch.nn.Module   # the output projection; its forward INPUT is the neuron vector
    width: int                # d_mlp of this layer
    # the layer's block, when the family flattens [batch, seq] before the MLP (OPT): its input
    # gives the hooks the shape to restore, so every hook sees [batch, seq, d_mlp]
    block: torch.nn.Module | None = None


@dataclass(frozen=True)
class Family:
    layers: tuple[str, ...]    # candidate paths of the layer list: LM-head model, then base model
    w_out: str                 # output projection (the neuron site), relative to a layer
    w_in: str                  # projection feeding the nonlinearity (the gate of a gated MLP)
    w_up: str | None = None    # ungated branch of a gated MLP (multiplies the nonlinearity)
    causal: bool = True        # False for bidirectional encoders (BERT-style)
    unembed_pre: tuple[str, ...] = ()  # optional projection applied before the LM head
    flat: bool = False         # the MLP runs on [batch * seq, d] (hooks restore [batch, seq, d])


def _decoder(w_out: str = "mlp.down_proj", w_in: str = "mlp.gate_proj",
             w_up: str | None = "mlp.up_proj") -> Family:
    """Llama-style decoders: `model.layers.{i}.mlp` (or `layers.{i}.mlp` in the base model)."""
    return Family(("model.layers", "layers"), w_out, w_in, w_up)


def _encoder(prefix: str) -> Family:
    """BERT-style encoders: `<prefix>.encoder.layer.{i}` (or `encoder.layer.{i}`)."""
    return Family((f"{prefix}.encoder.layer", "encoder.layer"), "output.dense",
                  "intermediate.dense", causal=False)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(("transformer.h", "h"), "mlp.c_proj", "mlp.c_fc"),
    "gpt_neo": Family(("transformer.h", "h"), "mlp.c_proj", "mlp.c_fc"),
    "gptj": Family(("transformer.h", "h"), "mlp.fc_out", "mlp.fc_in"),
    "gpt_neox": Family(("gpt_neox.layers", "layers"), "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "llama": _decoder(),
    "mistral": _decoder(),
    "qwen2": _decoder(),
    "qwen3": _decoder(),
    "gemma": _decoder(),
    "gemma2": _decoder(),
    "gemma3_text": _decoder(),
    "olmo": _decoder(),
    "opt": Family(("model.decoder.layers", "decoder.layers"), "fc2", "fc1",
                  unembed_pre=("model.decoder.project_out", "decoder.project_out"), flat=True),
    "bert": _encoder("bert"),
    "roberta": _encoder("roberta"),
    "xlm-roberta": _encoder("roberta"),
    "distilbert": Family(("distilbert.transformer.layer", "transformer.layer"), "ffn.lin2",
                         "ffn.lin1", causal=False),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def _find(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:  # missing, or an attribute that is None (e.g. OPT's project_out)
        return None


def _in_out(module: torch.nn.Module) -> torch.Tensor:
    """Weight of a projection as [in, out], detached."""
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        return weight.detach().T
    if type(module).__name__ == "Conv1D" and weight is not None:  # transformers.pytorch_utils
        return weight.detach()
    raise UserError(f"module {type(module).__name__} is neither nn.Linear nor Conv1D: the adapter "
                    "table entry of this architecture points at the wrong module")


class Adapter:
    """Neuron sites and weights of one family; works on LM-head and base models alike."""

    def __init__(self, family: str, spec: Family):
        self.family = family
        self.spec = spec
        self.gated = spec.w_up is not None
        self.causal = spec.causal

    def __repr__(self) -> str:
        return f"Adapter({self.family!r})"

    # -- layers and sites
    def layers_path(self, model: torch.nn.Module) -> str:
        """Qualified name of the layer list in this (LM-head or base) model."""
        for path in self.spec.layers:
            if isinstance(_find(model, path), torch.nn.ModuleList):
                return path
        raise UserError(f"cannot find the layers of this {self.family} model "
                        f"{type(model).__name__} (looked for {', '.join(self.spec.layers)})")

    def _module(self, model: torch.nn.Module, layer: int, rel: str) -> torch.nn.Module:
        path = self.layers_path(model)
        n_layers = len(model.get_submodule(path))
        if not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} does not exist: the model has {n_layers} layers "
                            f"(0-{n_layers - 1})")
        return model.get_submodule(f"{path}.{layer}.{rel}")

    def sites(self, model: torch.nn.Module) -> list[NeuronSite]:
        """One NeuronSite per layer, in layer order."""
        path = self.layers_path(model)
        out = []
        for i in range(len(model.get_submodule(path))):
            name = f"{path}.{i}.{self.spec.w_out}"
            module = model.get_submodule(name)
            block = model.get_submodule(f"{path}.{i}") if self.spec.flat else None
            out.append(NeuronSite(i, name, module, int(_in_out(module).shape[0]), block))
        return out

    # -- weights
    def w_in(self, model: torch.nn.Module, layer: int) -> torch.Tensor:
        """[d_model, d_mlp]: column n holds the input weights of neuron n (the gate if gated)."""
        return _in_out(self._module(model, layer, self.spec.w_in))

    def b_in(self, model: torch.nn.Module, layer: int) -> torch.Tensor | None:
        """[d_mlp] bias before the nonlinearity, or None."""
        bias = getattr(self._module(model, layer, self.spec.w_in), "bias", None)
        return None if bias is None else bias.detach()

    def w_up(self, model: torch.nn.Module, layer: int) -> torch.Tensor | None:
        """[d_model, d_mlp] of the ungated branch of a gated MLP, or None."""
        if self.spec.w_up is None:
            return None
        return _in_out(self._module(model, layer, self.spec.w_up))

    def b_up(self, model: torch.nn.Module, layer: int) -> torch.Tensor | None:
        if self.spec.w_up is None:
            return None
        bias = getattr(self._module(model, layer, self.spec.w_up), "bias", None)
        return None if bias is None else bias.detach()

    def w_out(self, model: torch.nn.Module, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row n holds the output weights of neuron n."""
        return _in_out(self._module(model, layer, self.spec.w_out))

    def b_out(self, model: torch.nn.Module, layer: int) -> torch.Tensor | None:
        bias = getattr(self._module(model, layer, self.spec.w_out), "bias", None)
        return None if bias is None else bias.detach()

    def unembed(self, model: torch.nn.Module) -> torch.Tensor:
        """[d_model, vocab]: the LM head (BERT: its decoder), else the input embeddings.

        A base model has no head: its input embeddings stand in, which is exact for tied
        embeddings only. Final norms and MLM transforms before the head are not included.
        """
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None:
            if not getattr(model.config, "tie_word_embeddings", True):
                log.warning("%s has no LM head and untied embeddings: using the input "
                            "embeddings as the unembedding", type(model).__name__)
            head = model.get_input_embeddings()
        w = head.weight.detach().T  # nn.Linear / nn.Embedding: [vocab, d] -> [d, vocab]
        for path in self.spec.unembed_pre:
            pre = _find(model, path)
            if pre is not None:
                w = _in_out(pre) @ w
                break
        return w

    def base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The trunk without the LM head (extraction needs no logits); the sites are shared."""
        base = getattr(model, "base_model", None)
        return base if isinstance(base, torch.nn.Module) else model


def adapter_for(model) -> Adapter:
    """The adapter of a model (or of a config): UserError for a family without an entry."""
    config = getattr(model, "config", model)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise UserError(f"model type {family!r} has no neuron adapter: supported families are "
                        f"{', '.join(SUPPORTED_FAMILIES)} (add one entry to "
                        "pipeline/adapters.py FAMILIES)")
    return Adapter(family, FAMILIES[family])
