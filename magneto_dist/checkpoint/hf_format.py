"""The Hugging Face model directory of an export, as the rest of the project sees it: how the
model config and parameter names map onto it, and reading one back (checkpoint.init_from=DIR,
or the input of another export).

The modeling code shipped in the directory (hf_model/) mirrors the model's own module tree under
`model.` (the transformers convention for a base model inside a head model), with the heads at
the top, so names map by a prefix and shapes are the model's own.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import torch

from ..errors import CheckpointError
from ..model import mup
from ..model.config import ModelConfig
from ..model.init import stack_gains

CONFIG = "config.json"
MODEL_TYPE = "magneto"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEADS = ("lm_head", "mlm_dense", "mlm_norm")  # outside the base model, as in transformers
# The model config field -> its config.json key (transformers' usual names where one exists).
CONFIG_KEYS = {
    "arch": "magneto_arch", "norm": "norm_scheme", "norm_type": "norm_type",
    "init_style": "init_style", "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings",
    "position": "position_embedding_type", "rope_base": "rope_theta",
    "activation": "hidden_act", "tie_embeddings": "tie_word_embeddings", "dropout": "dropout",
    "bias": "use_bias", "norm_eps": "norm_eps", "embedding_init_std": "embedding_init_std",
    "qk_norm": "qk_norm", "num_query_groups": "num_key_value_heads",
    "parametrization": "parametrization", "mup_base_hidden_size": "mup_base_hidden_size",
    "mup_base_head_dim": "mup_base_head_dim",
}
# Keys an export made before the field existed lacks: read back as the field's default.
LATER_KEYS = ("qk_norm", "num_key_value_heads", "parametrization", "mup_base_hidden_size",
              "mup_base_head_dim")
# arch -> (transformers class in modeling_magneto.py, the Auto class that loads it)
HEAD_CLASSES = {"decoder": ("MagnetoForCausalLM", "AutoModelForCausalLM"),
                "encoder": ("MagnetoForMaskedLM", "AutoModelForMaskedLM")}


def hf_name(name: str) -> str:
    return name if name.split(".", 1)[0] in HEADS else f"model.{name}"


def native_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def hf_config(cfg: ModelConfig, special_ids: Dict[str, Optional[int]], dtype: str) -> dict:
    """config.json of an export; CheckpointError for a model the shipped code cannot express."""
    if cfg.arch not in HEAD_CLASSES:
        raise CheckpointError(f"model.arch={cfg.arch!r} cannot be exported to Hugging Face "
                              f"(the shipped model code has {' and '.join(HEAD_CLASSES)} "
                              "models); use --to safetensors")
    head, auto = HEAD_CLASSES[cfg.arch]
    gains = stack_gains(cfg, cfg.arch)  # the stack's side is named like its arch
    return {
        "architectures": [head], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_magneto.MagnetoConfig",
                     "AutoModel": "modeling_magneto.MagnetoModel",
                     auto: f"modeling_magneto.{head}"},
        **{key: getattr(cfg, field) for field, key in CONFIG_KEYS.items()},
        "residual_alpha": gains["residual_alpha"], "init_gain": gains["init_gain"],
        # muP's factors as numbers (the shipped code computes nothing from the base width)
        "attention_scale": mup.attention_scale(cfg), "logit_multiplier": mup.output_multiplier(cfg),
        **{f"{name}_token_id": token for name, token in special_ids.items() if name != "unk"},
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype], "use_cache": True,
    }


def is_hf_directory(directory: str) -> bool:
    """A directory whose config.json says model_type magneto."""
    try:
        with open(os.path.join(directory, CONFIG), encoding="utf-8") as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


class HFDirectory:
    """An export read back: its model config (the model's own fields), every parameter's shape
    by the model's own names, and one tensor at a time (safetensors reads only its bytes)."""

    def __init__(self, directory: str):
        self.directory = self.where = directory
        with open(os.path.join(directory, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        missing = [key for key in CONFIG_KEYS.values()
                   if key not in config and key not in LATER_KEYS]
        if missing:
            raise CheckpointError(f"{directory}/{CONFIG}: no {', '.join(missing)}; not a "
                                  "Magneto export of tools/convert_checkpoint.py --to hf")
        self.model = {field: config[key] for field, key in CONFIG_KEYS.items() if key in config}
        self.model["num_decoder_layers"] = None
        self.files = self._weight_files()

    def _weight_files(self) -> Dict[str, str]:
        """hf name -> the safetensors file holding it."""
        from safetensors import SafetensorError, safe_open

        index = os.path.join(self.directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(f"{index}: unreadable index ({err})") from err
            return {name: os.path.join(self.directory, file) for name, file in weight_map.items()}
        single = os.path.join(self.directory, WEIGHTS)
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{single}: unreadable safetensors file ({err})") from err

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.model)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{self.directory}/{CONFIG}: {err}") from err

    def shapes(self) -> Dict[str, List[int]]:
        from safetensors import SafetensorError, safe_open

        shapes = {}
        for path in sorted(set(self.files.values())):
            names = [name for name, file in self.files.items() if file == path]
            try:
                with safe_open(path, framework="pt") as f:
                    missing = sorted(set(names) - set(f.keys()))
                    if missing:
                        raise CheckpointError(f"{self.directory}/{INDEX} puts {missing[0]!r} in "
                                              f"{path}, which does not hold it")
                    shapes.update({native_name(name): list(f.get_slice(name).get_shape())
                                   for name in names})
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
        return shapes

    def reader(self) -> Callable[[str], torch.Tensor]:
        from safetensors import safe_open

        def full(name: str) -> torch.Tensor:
            with safe_open(self.files[hf_name(name)], framework="pt") as f:
                return f.get_tensor(hf_name(name))
        return full

    def digests(self) -> Dict[str, str]:
        """Tensor digests (export.checked_tensor): a Hugging Face export records none."""
        return {}
