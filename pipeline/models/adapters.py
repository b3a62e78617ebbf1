"""Architecture adapters: one table maps a model family to its neuron site and weights.

The neuron is one coordinate of the INPUT of the MLP's output projection (post-nonlinearity,
post-gate). Adding an architecture is one entry in FAMILIES. A family without an entry is
mapped by the common module names (`infer_family`), and the module picked is logged.

Mixture-of-experts layers (Family.moe): a neuron is (layer, expert, index). transformers 5 fuses
the experts into 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with no module
per expert, so the layer's neuron vector, of width S + E*I, is laid out
[shared-expert neurons (S, if any), expert 0 (I), ..., expert E-1 (I)] and its weights are the
matching concatenations. An expert's neurons are act(g) * u on the tokens routed to it and 0
elsewhere (pipeline.models.moe captures them); shared-expert neurons see every token. The dense
layers of such a model (Qwen-MoE's mlp_only_layers, decoder_sparse_step) are ordinary layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronSite:
    layer: int
    name: str                 # qualified module name, e.g. "transformer.h.0.mlp.c_proj"
    module: torch.nn.Module   # the output projection; its forward input is the neuron vector.
                              # At a mixture-of-experts layer: the fused experts module, whose
                              # forward input (hidden_states, top_k_index, top_k_weights) is NOT
                              # the neuron vector (pipeline.models.moe captures that)
    width: int                # d_mlp of this layer (S + E*I at a mixture-of-experts layer)
    # int16 per neuron at a mixture-of-experts layer: -1 for shared-expert neurons, e for expert e;
    # None at a dense layer (not compared: an array has no single truth value)
    expert: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts layer keeps its parts, relative to a layer. A layer without
    `experts` is a dense layer of the family's ordinary MLP."""

    block: str = "mlp"              # the sparse block: its output is the layer's MLP output
    experts: str = "mlp.experts"    # fused: gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn;
                                    # forward(hidden_states [n, H], top_k_index, top_k_weights [n, k])
    router: str = "mlp.gate"        # weight [E, H]: the router logits
    shared: str | None = None       # a shared expert: a gated MLP (gate_proj, up_proj, down_proj)
                                    # that every token goes through
    shared_gate: str | None = None  # Linear(H, 1): the shared expert's output is scaled by its sigmoid


@dataclass(frozen=True)
class Family:
    layers: tuple[str, ...]   # candidate paths of the layer list (LM-head model first, then base)
    w_out: str                # output projection, relative to a layer
    w_in: str                 # projection feeding the nonlinearity, relative to a layer
    w_up: str | None = None   # the ungated branch of a gated MLP
    conv1d: bool = False      # GPT-2's Conv1D stores weight as [in, out]
    causal: bool = True
    fused: bool = False       # w_in and w_up are one projection: gate the first half of its
                              # outputs, up the second (Phi-3's gate_up_proj, split by chunk(2))
    moe: Experts | None = None  # mixture of experts; the fields above name the dense layers' MLP


_DECODER = ("model.layers", "layers")
_GATED = Family(_DECODER, "mlp.down_proj", "mlp.gate_proj", w_up="mlp.up_proj")
_GPT = ("transformer.h", "h")

FAMILIES: dict[str, Family] = {
    "gpt2": Family(_GPT, "mlp.c_proj", "mlp.c_fc", conv1d=True),
    "gpt_neo": Family(_GPT, "mlp.c_proj", "mlp.c_fc"),  # GPT-2's names, but nn.Linear
    "gptj": Family(_GPT, "mlp.fc_out", "mlp.fc_in"),
    "falcon": Family(_GPT, "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "gpt_neox": Family(("gpt_neox.layers", "layers"), "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "llama": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "mistral": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    # Gemma 3 with its vision tower (4B and up): the text layers sit under language_model
    "gemma3": Family(("model.language_model.layers", "language_model.layers"), "mlp.down_proj",
                     "mlp.gate_proj", w_up="mlp.up_proj"),
    "olmo": _GATED,
    "olmo2": _GATED,
    "stablelm": _GATED,
    # mixtures of experts (transformers 5 layout): Mixtral and Qwen3-MoE have routed experts only,
    # Qwen2-MoE adds a shared expert; the Qwens' mlp_only_layers are dense gated MLPs
    "mixtral": Family(_DECODER, "mlp.down_proj", "mlp.gate_proj", w_up="mlp.up_proj",
                      moe=Experts()),
    "qwen2_moe": Family(_DECODER, "mlp.down_proj", "mlp.gate_proj", w_up="mlp.up_proj",
                        moe=Experts(shared="mlp.shared_expert",
                                    shared_gate="mlp.shared_expert_gate")),
    "qwen3_moe": Family(_DECODER, "mlp.down_proj", "mlp.gate_proj", w_up="mlp.up_proj",
                        moe=Experts()),
    "phi3": Family(_DECODER, "mlp.down_proj", "mlp.gate_up_proj", w_up="mlp.gate_up_proj",
                   fused=True),
    "phi": Family(_DECODER, "mlp.fc2", "mlp.fc1"),
    "starcoder2": Family(_DECODER, "mlp.c_proj", "mlp.c_fc"),
    "opt": Family(("model.decoder.layers", "decoder.layers"), "fc2", "fc1"),
    "bert": Family(("bert.encoder.layer", "encoder.layer"), "output.dense", "intermediate.dense", causal=False),
    "roberta": Family(("roberta.encoder.layer", "encoder.layer"), "output.dense",
                      "intermediate.dense", causal=False),
    "electra": Family(("electra.encoder.layer", "encoder.layer"), "output.dense",
                      "intermediate.dense", causal=False),
    "distilbert": Family(("distilbert.transformer.layer", "transformer.layer"), "ffn.lin2",
                         "ffn.lin1", causal=False),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)
MOE_FAMILIES = tuple(k for k, v in FAMILIES.items() if v.moe is not None)
_TABLE = "pipeline/models/adapters.py"  # named in the errors: where a family's entry goes

# For a family without an entry: where the layer list usually is, and the usual names of
# (output projection, input projection, ungated branch) under one parent, most specific first.
LAYER_LISTS = ("model.layers", "layers", "transformer.h", "h", "model.decoder.layers",
               "decoder.layers", "gpt_neox.layers", "transformer.layers", "encoder.layer",
               "transformer.layer", "transformer.blocks", "blocks")
MLP_NAMES = (("down_proj", "gate_proj", "up_proj"), ("down_proj", "up_proj", None),
             ("c_proj", "c_fc", None), ("fc2", "fc1", None),
             ("dense_4h_to_h", "dense_h_to_4h", None), ("output.dense", "intermediate.dense", None),
             ("w2", "w1", "w3"), ("w2", "w1", None), ("fc_out", "fc_in", None),
             ("lin2", "lin1", None))
_ENCODER_DECODERS = ("t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus", "marian",
                     "led", "switch_transformers")
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _get(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@dataclass(frozen=True)
class MoeParts:
    """The modules of one mixture-of-experts layer of a loaded model, and its widths.

    Weights come in the neuron layout [shared (S), expert 0 (I), ..., expert E-1 (I)]. The
    concatenations are copies: Mixtral-8x7B's w_in of one layer is 4096 x 114,688 (0.9 GB in
    bf16), so take one layer's at a time."""

    block: torch.nn.Module                # the sparse block; its output is the MLP output
    experts: torch.nn.Module              # the fused experts
    router: torch.nn.Module               # weight [E, H]
    shared: torch.nn.Module | None        # shared expert (gate_proj, up_proj, down_proj)
    shared_gate: torch.nn.Module | None   # Linear(H, 1), sigmoid-scales the shared output
    n_experts: int                        # E
    d_expert: int                         # I, neurons per expert
    d_shared: int                         # S, shared-expert neurons (0 without one)

    @property
    def width(self) -> int:
        return self.d_shared + self.n_experts * self.d_expert

    def layout(self) -> np.ndarray:
        """int16 per neuron: -1 for a shared-expert neuron, e for a neuron of expert e."""
        return np.concatenate([np.full(self.d_shared, -1, np.int16),
                               np.repeat(np.arange(self.n_experts, dtype=np.int16),
                                         self.d_expert)])

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) as the experts' forward applies them with
        F.linear (views of the parameters, undone if the module stores them transposed)."""
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        if getattr(self.experts, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return gate_up, down

    def _routed_in(self, half: int) -> torch.Tensor:
        """[E*I, H]: the gate (half 0) or up (half 1) rows of every expert, expert-major."""
        gate_up = self.fused()[0].detach()
        return gate_up.chunk(2, dim=1)[half].reshape(-1, gate_up.shape[-1])

    def _cat_in(self, shared: str, half: int) -> torch.Tensor:
        rows = [self._routed_in(half)]
        if self.shared is not None:
            rows.insert(0, self.shared.get_submodule(shared).weight.detach())
        return torch.cat(rows).T

    def w_in(self) -> torch.Tensor:
        """[H, S + E*I] gate weights."""
        return self._cat_in("gate_proj", 0)

    def w_up(self) -> torch.Tensor:
        """[H, S + E*I] up weights."""
        return self._cat_in("up_proj", 1)

    def w_out(self) -> torch.Tensor:
        """[S + E*I, H] output weights (down_proj rows of each expert, then stacked)."""
        down = self.fused()[1].detach()
        rows = [down.transpose(1, 2).reshape(-1, down.shape[1])]
        if self.shared is not None:
            rows.insert(0, self.shared.down_proj.weight.detach().T)
        return torch.cat(rows)


# The experts layouts of transformers' use_experts_implementation that MoeParts reads; another
# (biases, interleaved gate/up, no gate, a norm after each expert) would give wrong neurons
_EXPERTS_FLAGS = {"has_bias": False, "has_gate": True, "is_concatenated": True,
                  "has_post_expert_norm": False}


class Adapter:
    """Neuron sites and weights of one family; works on LM-head and base models alike."""

    def __init__(self, family: str, spec: Family):
        self.family, self.spec = family, spec
        self.gated = spec.w_up is not None
        self.causal = spec.causal
        # a mixture-of-experts family (its layers may still be dense: moe_parts says which)
        self.moe = spec.moe is not None

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

    def moe_parts(self, model, layer: int) -> MoeParts | None:
        """The parts of a mixture-of-experts layer; None for a dense layer."""
        where = self.spec.moe
        if where is None:
            return None
        block = self.block(model, layer)
        experts = _get(block, where.experts)
        if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            return None
        odd = [k for k, v in _EXPERTS_FLAGS.items() if getattr(experts, k, v) != v]
        if odd or experts.gate_up_proj.ndim != 3:
            raise UserError(f"the experts of layer {layer} of this {self.family} model are stored "
                            f"in a layout the adapter does not read ({', '.join(odd) or 'not 3-D'}):"
                            " use a transformers version whose experts are fused [E, 2I, H]")
        shared = _get(block, where.shared) if where.shared else None
        gate_up = experts.gate_up_proj
        n_experts = gate_up.shape[0]
        d_expert = gate_up.shape[2 if getattr(experts, "is_transposed", False) else 1] // 2
        return MoeParts(block.get_submodule(where.block), experts,
                        block.get_submodule(where.router), shared,
                        _get(block, where.shared_gate) if where.shared_gate else None,
                        n_experts, d_expert,
                        0 if shared is None else shared.down_proj.weight.shape[1])

    def sites(self, model) -> list[NeuronSite]:
        path = self._layers_path(model)
        out = []
        for i in range(len(model.get_submodule(path))):
            parts = self.moe_parts(model, i)
            if parts is not None:
                out.append(NeuronSite(i, f"{path}.{i}.{self.spec.moe.experts}", parts.experts,
                                      parts.width, parts.layout()))
                continue
            module = model.get_submodule(f"{path}.{i}.{self.spec.w_out}")
            width = module.weight.shape[0] if self.spec.conv1d else module.weight.shape[1]
            out.append(NeuronSite(i, f"{path}.{i}.{self.spec.w_out}", module, width))
        return out

    def _weight(self, module) -> torch.Tensor:
        """Weight as [in, out]."""
        w = module.weight.detach()
        return w if self.spec.conv1d else w.T

    def _part(self, t: torch.Tensor, half: int) -> torch.Tensor:
        """The gate (half 0) or up (half 1) outputs of a fused projection (last axis)."""
        return t.chunk(2, dim=-1)[half] if self.spec.fused else t

    def w_in(self, model, layer: int) -> torch.Tensor:
        """[d_model, d_mlp]: column n holds the input weights of neuron n (the gate weights at
        a mixture-of-experts layer, in its neuron layout)."""
        parts = self.moe_parts(model, layer)
        if parts is not None:
            return parts.w_in()
        return self._part(self._weight(self._layer_module(model, layer, self.spec.w_in)), 0)

    def w_up(self, model, layer: int) -> torch.Tensor | None:
        """[d_model, d_mlp] of the ungated branch of a gated MLP, else None."""
        if not self.gated:
            return None
        parts = self.moe_parts(model, layer)
        if parts is not None:
            return parts.w_up()
        return self._part(self._weight(self._layer_module(model, layer, self.spec.w_up)), 1)

    def gate_modules(self, model, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(gate projection, up projection) of a gated MLP: their outputs are g and u (one
        module twice when fused: its outputs are [g, u])."""
        if self.moe_parts(model, layer) is not None:
            raise UserError(f"layer {layer} is a mixture-of-experts layer, whose g and u are no "
                            "module's outputs: capture them with pipeline.models.moe")
        return (self._layer_module(model, layer, self.spec.w_in),
                self._layer_module(model, layer, self.spec.w_up))

    def b_in(self, model, layer: int) -> torch.Tensor | None:
        if self.moe_parts(model, layer) is not None:
            return None  # experts with biases are refused by moe_parts
        bias = getattr(self._layer_module(model, layer, self.spec.w_in), "bias", None)
        return None if bias is None else self._part(bias.detach(), 0)

    def w_out(self, model, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row n holds the output weights of neuron n (at a
        mixture-of-experts layer, in its neuron layout: an expert's rows are scaled by its routing
        weight in the output, the shared expert's by sigmoid(shared_gate))."""
        parts = self.moe_parts(model, layer)
        if parts is not None:
            return parts.w_out()
        return self._weight(self._layer_module(model, layer, self.spec.w_out))

    def unembed(self, model) -> torch.Tensor:
        """[d_model, vocab]: the LM head, or the tied input embeddings of a base model."""
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            head = model.get_input_embeddings()
        unembed = head.weight.detach().T
        d_model = self.d_model(model)
        if unembed.shape[0] != d_model:  # ELECTRA's head maps the stream to a smaller embedding
            raise UserError(f"this {self.family} model's vocabulary projection reads "
                            f"{unembed.shape[0]}-wide embeddings, not the {d_model}-wide residual "
                            "stream, so the vocabulary statistics of its neurons are undefined: "
                            "use a checkpoint whose embedding size equals its hidden size")
        return unembed

    def d_model(self, model) -> int:
        """Width of the residual stream the MLPs write to (no concatenated copy at an MoE layer)."""
        parts = self.moe_parts(model, 0)
        if parts is not None:
            return int(parts.fused()[1].shape[1])
        return int(self.w_out(model, 0).shape[1])

    def base_model(self, model) -> torch.nn.Module:
        """The trunk without the LM head (extraction needs no logits)."""
        base = getattr(model, "base_model", model)
        return base if base is not None else model


def family_spec(config) -> Family | None:
    """The FAMILIES entry of a config's model_type, None for a family without one; an
    encoder-decoder, and a mixture of experts without an entry, are refused."""
    family = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or family in _ENCODER_DECODERS:
        raise UserError(f"model type {family!r} is an encoder-decoder, which has no adapter: "
                        "neurons are defined for decoder-only and encoder-only models; use one of "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    if family in FAMILIES:
        return FAMILIES[family]
    experts = max((n for n in (getattr(config, k, None) for k in _EXPERT_COUNTS)
                   if isinstance(n, int)), default=0)
    if experts > 1:
        raise UserError(f"model type {family!r} is a mixture of experts ({experts} experts a "
                        "layer) that has no adapter: its neurons are (layer, expert, index) and "
                        f"the supported mixtures of experts are {', '.join(MOE_FAMILIES)}; use one "
                        f"of them, a dense model, or add a Family(..., moe=Experts(...)) in {_TABLE}")
    return None


def config_is_causal(config) -> bool:
    """Whether a family without an entry is a causal LM: an encoder is one with a masked-LM
    class that is not configured as a decoder."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return (bool(getattr(config, "is_decoder", False))
            or type(config) not in MODEL_FOR_MASKED_LM_MAPPING)


def _projection(module) -> tuple[int, int] | None:
    """(in, out) widths of a linear layer (nn.Linear or GPT-2's Conv1D), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    return tuple(weight.shape) if _is_conv1d(module) else (weight.shape[1], weight.shape[0])


def _is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _mlp_in(block: torch.nn.Module) -> list[tuple[str, str, str | None]]:
    """(w_out, w_in, w_up) paths under one block, by the first of MLP_NAMES that matches with
    consistent widths (in's outputs = out's inputs), at every parent where it matches."""
    parents = [name for name, _ in block.named_modules()]
    for out_name, in_name, up_name in MLP_NAMES:
        found = []
        for parent in parents:
            rel = [f"{parent}.{n}" if parent else n for n in (out_name, in_name, up_name) if n]
            shapes = [_projection(_get(block, r)) for r in rel]
            if all(shapes) and all(s[1] == shapes[0][0] for s in shapes[1:]):
                found.append((rel[0], rel[1], rel[2] if up_name else None))
        if found:
            return found
    return []


def infer_family(model: torch.nn.Module) -> Family:
    """A Family for a model without a FAMILIES entry, found by the common names of the layer
    list and of the MLP projections (LAYER_LISTS, MLP_NAMES); one-line UserError otherwise."""
    family = getattr(model.config, "model_type", None)
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = LAYER_LISTS + tuple(f"{prefix}.{p}" for p in LAYER_LISTS if prefix)
    paths = [p for p in candidates if isinstance(_get(model, p), torch.nn.ModuleList)
             and len(model.get_submodule(p)) > 0]
    for path in paths:
        blocks = model.get_submodule(path)
        found = _mlp_in(blocks[0])
        if len(found) > 1:
            raise UserError(f"model type {family!r} has no adapter and its layers ({path}) hold "
                            f"several MLP-like pairs ({', '.join(f[0] for f in found)}): add "
                            f"FAMILIES[{family!r}] = Family(({path!r},), w_out=<the MLP's "
                            f"output projection>, w_in=<its input projection>) in {_TABLE}")
        if found and all(_get(b, found[0][0]) is not None for b in blocks):
            w_out, w_in, w_up = found[0]
            layers = (path, path.removeprefix(f"{prefix}.")) if prefix else (path,)
            log.info("model type %r has no FAMILIES entry: the neuron site is %s.<layer>.%s "
                     "(input projection %s%s)", family, path, w_out, w_in,
                     f", ungated branch {w_up}" if w_up else "")
            return Family(tuple(dict.fromkeys(layers)), w_out, w_in, w_up=w_up,
                          conv1d=_is_conv1d(blocks[0].get_submodule(w_out)),
                          causal=config_is_causal(model.config))
    where = (f"no MLP output projection ({', '.join(sorted({n[0] for n in MLP_NAMES}))}) "
             f"under {paths[0]}.0" if paths else
             f"no layer list ({', '.join(LAYER_LISTS)})")
    layers = repr((paths[0],)) if paths else "(<layer list>,)"
    raise UserError(f"model type {family!r} has no adapter and {where} was found by name: add "
                    f"FAMILIES[{family!r}] = Family({layers}, w_out=<output projection>, "
                    f"w_in=<input projection>) in {_TABLE}")


def adapter_for(model) -> Adapter:
    spec = family_spec(model.config) or infer_family(model)
    return Adapter(getattr(model.config, "model_type", None), spec)
