"""Tiny random-weight models built from an architecture's own config class (no hub access).

Used by ``fastft-inspect MODEL_TYPE`` and by tests: the architecture's code is the real one, only
the sizes are small (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 128).

Shrinking only the main sizes leaves other attributes at their full-size defaults (a rotary width of
64 in a head of 16, 24 layer types for 2 layers...). ``consistency_fixes`` derives values that agree
with the tiny sizes from the attributes a config has; it never looks at the model type, so an
architecture no one listed gets the same treatment.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_ROUNDS = 4  # a fix may reveal the next inconsistency (e.g. new layer types need rope entries)


def tiny_config(model_type: str, **overrides: Any) -> PreTrainedConfig:
    """The config of ``model_type`` with tiny sizes; for multimodal configs, their text part."""
    cls = _config_class(model_type)
    sizes = {**TINY_SIZES, **overrides}
    # Pass each size under the class's own field name (attribute_map), so that what __post_init__
    # derives from it sees the tiny value; a size the class derives itself (a read-only property
    # such as head_dim) cannot be passed at all.
    aliases = getattr(cls, "attribute_map", {})
    kwargs = {aliases.get(k, k): v for k, v in sizes.items() if k in overrides or _settable(cls, k)}
    for _ in range(_ROUNDS):
        fixes = {k: v for k, v in consistency_fixes(_draft(cls, kwargs), sizes).items() if k not in overrides}
        if not fixes:
            break
        kwargs.update(fixes)
    return cls(**kwargs)


def build_tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def random_batch(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and labels inside the model's vocabulary, on the model's device."""
    # Some input embeddings also hold prompt/special rows the LM head cannot predict: take the smaller.
    sizes = [128]
    if hasattr(model, "get_input_embeddings"):
        sizes = [model.get_input_embeddings().num_embeddings]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, nn.Linear):
            sizes.append(head.out_features)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(sizes), (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def consistency_fixes(config: Any, sizes: dict[str, Any] = TINY_SIZES) -> dict[str, Any]:
    """Constructor arguments that make ``config``'s attributes agree with ``sizes``; empty if they do."""
    fixes: dict[str, Any] = {}
    for rule in (_head_count_fixes, _rotary_fixes, _latent_attention_fixes, _state_space_fixes,
                 _per_layer_fixes, _layer_count_fixes, _rope_per_layer_type_fixes, _expert_fixes, _width_fixes):
        fixes.update(rule(config, sizes))
    return {k: v for k, v in fixes.items() if not _same(_get(config, k), v)}


# --- the rules: each looks at which attributes the config has, never at its model type ---------------

def _head_count_fixes(config: Any, sizes: dict) -> dict:
    # Without a head_dim of its own, a config's other head counts (decoder_attention_heads...) split
    # the hidden size, so they must divide it.
    if "head_dim" in _fields(config):
        return {}
    return {name: sizes["num_attention_heads"] for name in _fields(config)
            if name.endswith("attention_heads") and isinstance(_get(config, name), int)
            and _get(config, name) > 0 and sizes["hidden_size"] % _get(config, name)}


def _rotary_fixes(config: Any, sizes: dict) -> dict:
    # A partial rotary width (rotary_dim) must fit in the head; keep it partial, as the full model does.
    rotary = _get(config, "rotary_dim")
    head = sizes["head_dim"]
    return {"rotary_dim": head // 2} if isinstance(rotary, int) and rotary > head else {}


def _latent_attention_fixes(config: Any, sizes: dict) -> dict:
    # Multi-head latent attention (kv_lora_rank): rope/nope/value head parts sized like the tiny head,
    # and one K/V head per query head (keys and values are expanded from the latent per head).
    if not isinstance(_get(config, "kv_lora_rank"), int):
        return {}
    head = sizes["head_dim"]
    fixes = {"kv_lora_rank": 2 * head, "num_key_value_heads": sizes["num_attention_heads"]}
    for name in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if _has(config, name):
            fixes[name] = head
    if isinstance(_get(config, "q_lora_rank"), int):  # None means queries without a low-rank path
        fixes["q_lora_rank"] = 2 * head
    if isinstance(_get(config, "index_head_dim"), int):  # a sparse-attention indexer's own heads
        fixes.update(index_head_dim=head, index_n_heads=min(_get(config, "index_n_heads") or 1, 4))
    return fixes


def _state_space_fixes(config: Any, sizes: dict) -> dict:
    # A state-space mixer splits expand * hidden into num_heads heads of head_dim.
    expand, heads = _get(config, "expand"), _get(config, "num_heads")
    if not (isinstance(expand, int) and isinstance(heads, int) and "head_dim" in _fields(config)):
        return {}
    heads = expand * sizes["hidden_size"] // sizes["head_dim"]
    fixes = {"num_heads": heads}
    groups = _get(config, "n_groups")
    if isinstance(groups, int) and heads % groups:
        fixes["n_groups"] = 1
    return fixes


def _per_layer_fixes(config: Any, sizes: dict) -> dict:
    """Per-layer type lists (layer_types, mlp_layer_types...) with one entry per tiny layer."""
    layers = sizes["num_hidden_layers"]
    depth = _get(config, "num_hidden_layers")  # a config may take its depth from such a list: then it agrees
    fixes: dict[str, Any] = {}
    longer: dict[int, dict[str, list]] = {}  # lists written for the full depth, by length
    canonical = {field: alias for alias, field in getattr(config, "attribute_map", {}).items()}
    for name in _fields(config):
        value, kind = _get(config, name), canonical.get(name, name)
        if kind == "layer_types" and value is None:
            fixes[name] = ["full_attention"] * layers  # left to the checkpoint: plain attention
        elif _is_run_length(value):  # [[types, repeat], ...] patterns, e.g. attention_types
            flat = [t for types, repeat in value for _ in range(repeat) for t in types]
            if len(flat) > layers and len(flat) != depth:
                fixes[name] = [[[t], 1] for t in _pick(flat, layers)]
        elif kind.endswith("layer_types") and isinstance(value, (list, tuple)) \
                and len(value) > layers and len(value) != depth:
            longer.setdefault(len(value), {})[name] = list(value)
    for lists in longer.values():  # shrink together, keeping each distinct combination while there is room
        rows = _pick(list(zip(*lists.values())), layers)
        fixes.update({name: [row[j] for row in rows] for j, name in enumerate(lists)})
    return fixes


def _layer_count_fixes(config: Any, sizes: dict) -> dict:
    # Counts of a subset of layers (num_kv_shared_layers, num_dense_layers...) sized for the full
    # depth can cover every tiny layer; take half, so layers of both kinds remain.
    layers = sizes["num_hidden_layers"]
    subsets = [name for name in _fields(config) if name.startswith("num_") and name.endswith("_layers")
               and name not in ("num_layers", "num_hidden_layers")]
    return {name: layers // 2 for name in subsets
            if isinstance(_get(config, name), int) and _get(config, name) >= layers}


def _rope_per_layer_type_fixes(config: Any, sizes: dict) -> dict:
    # rope_parameters left empty for the checkpoint to fill per layer type: one default entry per type.
    rope, types = _get(config, "rope_parameters"), _get(config, "layer_types")
    if not (rope == {} and isinstance(types, (list, tuple))):
        return {}
    theta = _get(config, "default_theta")
    theta = theta if isinstance(theta, (int, float)) else 10000.0
    return {"rope_parameters": {t: {"rope_type": "default", "rope_theta": theta} for t in dict.fromkeys(types)}}


def _expert_fixes(config: Any, sizes: dict) -> dict:
    # An MoE config (it sizes its experts) whose expert counts are left to the checkpoint.
    if not isinstance(_get(config, "moe_intermediate_size"), int):
        return {}
    return {name: 2 if ("per_tok" in name or "top_k" in name) else 1 if "shared" in name else 4
            for name in _fields(config) if "experts" in name and _get(config, name) is None}


def _width_fixes(config: Any, sizes: dict) -> dict:
    # Other widths left at full size: expert/shared FFN widths (moe_intermediate_size,
    # expert_ffn_hidden_size...) and extra token tables indexed by the same ids (vocab_size_*).
    fixes = {}
    for name in _fields(config):
        value = _get(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        ffn = "intermediate_size" in name or name.endswith("ffn_hidden_size")
        if ffn and value > sizes["intermediate_size"]:
            fixes[name] = sizes["intermediate_size"]
        elif name.startswith("vocab_size_") and value > sizes["vocab_size"]:
            fixes[name] = sizes["vocab_size"]
    return fixes


# --- helpers ------------------------------------------------------------------------------------

def _config_class(model_type: str) -> type:
    """The config class to build: the model type's own, or its text part's where that is a causal LM."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model type {model_type!r}: transformers knows no config for it")
    cls = CONFIG_MAPPING[model_type]
    full = _draft(cls, {})
    text = full.get_text_config() if hasattr(full, "get_text_config") else full
    if text is not full and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cls = CONFIG_MAPPING[text.model_type]
    elif MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.keys().isdisjoint({model_type, cls.model_type}):
        raise ValueError(f"model type {model_type!r} has no causal-LM class in transformers")
    return cls


def _draft(cls: type, kwargs: dict) -> Any:
    """``cls(**kwargs)`` without the class validators, which may reject what the rules then fix."""
    draft = cls.__new__(cls)
    getattr(cls.__init__, "__wrapped__", cls.__init__)(draft, **kwargs)
    return draft


def _pick(items: list, n: int) -> list:
    """``n`` of ``items`` in their order: the first of each distinct item, then the earliest others."""
    firsts = [i for i, item in enumerate(items) if item not in items[:i]][:n]
    rest = [i for i in range(len(items)) if i not in firsts][: n - len(firsts)]
    return [items[i] for i in sorted(firsts + rest)]


def _is_run_length(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple)) and isinstance(v[1], int)
        for v in value)


def _fields(config: Any) -> list[str]:
    cls = config if isinstance(config, type) else type(config)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _get(config: Any, name: str, default: Any = None) -> Any:
    try:  # a per-layer (heterogeneous) attribute refuses global access: read the stored value
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001
        return vars(config).get(name, default)


def _has(config: Any, name: str) -> bool:
    return name in _fields(config) or name in vars(config)


def _settable(cls: type, name: str) -> bool:
    attr = inspect.getattr_static(cls, name, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False
