"""tools/convert_checkpoint.py --to hf: a checkpoint of any layout (or a safetensors or Hugging
Face export) as a Hugging Face model directory that transformers loads with
trust_remote_code=True, on a machine that never installed this project:

    config.json                     model_type magneto, auto_map, the model's hyperparameters
    configuration_magneto.py        the shipped model code (hf_model/, copied verbatim: torch
    modeling_magneto.py             and transformers only)
    model.safetensors               or model-0000k-of-0000n.safetensors and
                                    model.safetensors.index.json above --max-shard-size
                                    (transformers' own sharding rule)
    generation_config.json          decoders
    tokenizer.json, tokenizer_config.json   checked to give the run's ids (data/hf_tokenizer.py)

Weights stream one parameter at a time, as in the safetensors export: every shard file is open
at once with its header written up front, and each parameter goes to its shard as it arrives.
The tokenizer is converted and checked first, so a tokenizer that cannot be exported exactly
fails in seconds; everything is written under a temp name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch

from ..data.hf_tokenizer import (HFDirectoryTokenizer, tokenizer_of_record, tokenizer_of_tag,
                                 write_hf_tokenizer)
from ..files import atomic_write
from ..model import ModelConfig
from .export import (DTYPES, check_shapes, full_parameters, model_shapes, open_consolidated,
                     refuse_existing, staged_output, write_safetensors_files)
from .hf_format import CONFIG, INDEX, HFDirectory, hf_config, hf_name
from .tags import CheckpointError, saved_config

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_model")
TEMPLATE_FILES = ("configuration_magneto.py", "modeling_magneto.py")
DEFAULT_MAX_SHARD_SIZE = "5GB"


class ExportSource(NamedTuple):
    model: ModelConfig
    tokenizer: Optional[Callable[[], object]]  # -> the run's tokenizer; None when unknown
    parameters: Callable[[str], Iterator[Tuple[str, torch.Tensor]]]  # work dir -> (name, full
                                                # tensor) in model_shapes order, one at a time


def export_source(input_dir: str, log=print) -> ExportSource:
    """A checkpoint tag (has config.yaml), or a consolidated export of either kind."""
    if os.path.isfile(os.path.join(input_dir, "config.yaml")):
        cfg = saved_config(input_dir)
        return ExportSource(cfg.model, lambda: tokenizer_of_tag(input_dir, cfg),
                            lambda work_dir: full_parameters(input_dir, work_dir, log))
    export = open_consolidated(input_dir)
    model = export.model_config()
    check_shapes(export, model)
    if isinstance(export, HFDirectory):
        tokenizer = lambda: HFDirectoryTokenizer(input_dir)  # noqa: E731
    else:
        record = export.config.get("tokenizer")
        tokenizer = (lambda: tokenizer_of_record(record)) if record else None
    read = export.reader()
    return ExportSource(model, tokenizer,
                        lambda work_dir: ((name, read(name)) for name in model_shapes(model)))


def export_hf(input_dir: str, out_dir: str, dtype: str = "fp32",
              max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
              tokenizer=None, log=print,
              progress: Callable = lambda it, total: it) -> str:
    """input -> out_dir, a Hugging Face model directory (see the module docstring)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    refuse_existing(out_dir)
    source = export_source(input_dir, log)
    hf_config(source.model, {}, dtype)  # refuses a model the shipped code cannot express
    if tokenizer is None and source.tokenizer is None:
        raise CheckpointError(f"--input {input_dir} does not record its tokenizer (an export "
                              "older than the record); pass --tokenizer MODEL_OR_DIR")
    tokenizer = tokenizer or source.tokenizer()
    if tokenizer.vocab_size != source.model.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but "
                              f"the model's vocabulary is {source.model.vocab_size}; pass the "
                              "run's tokenizer with --tokenizer")
    shapes = model_shapes(source.model)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    try:  # huggingface_hub's rule, which save_pretrained follows: in order, a new shard when
        # the next tensor would pass the limit, a larger tensor alone
        split = split_state_dict_into_shards_factory(
            shapes, get_storage_size=lambda shape: shape.numel() * itemsize,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=int(max_shard_size) if max_shard_size.isdigit() else max_shard_size)
    except ValueError as err:
        raise CheckpointError(f"--max-shard-size {max_shard_size}: {err}") from None
    with staged_output(out_dir) as temp:
        special = write_hf_tokenizer(tokenizer, temp, source.model.max_seq_len,
                                     masked_lm=source.model.arch == "encoder")
        config = hf_config(source.model, special, dtype)
        atomic_write(os.path.join(temp, CONFIG), json.dumps(config, indent=2) + "\n")
        if source.model.arch == "decoder":
            _write_generation_config(temp, special)
        for name in TEMPLATE_FILES:
            shutil.copyfile(os.path.join(TEMPLATE_DIR, name), os.path.join(temp, name))
        files = {os.path.join(temp, file): names
                 for file, names in split.filename_to_tensors.items()}
        write_safetensors_files(files, shapes, DTYPES[dtype], source.parameters(temp),
                                {"format": "pt"}, progress, rename=hf_name)
        if split.is_sharded:
            atomic_write(os.path.join(temp, INDEX), json.dumps(
                {"metadata": split.metadata,
                 "weight_map": {hf_name(n): f for n, f in split.tensor_to_filename.items()}},
                indent=2) + "\n")
    return out_dir


def _write_generation_config(directory: str, special: dict) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=special["bos"], eos_token_id=special["eos"],
                     pad_token_id=special["pad"]).save_pretrained(directory)
