"""Consolidated weights: the full, layout-free parameters of a checkpoint of any layout, exported
as safetensors (with the model config as JSON) and read back into a model
(`checkpoint.init_from`, tools/generate.py); a Hugging Face export (hf_export.py) reads back
through the same checks.

An export records each tensor's content digest (integrity.py's XXH3-64 of its bytes, taken as
they are written) in config.json; a run starting from it checks every tensor it reads against
its digest and refuses one holding NaN or inf, by name.

The parameters come from the checkpoint's universal form (reshard.py: full fp32 master weights
by the model's own names, whatever TP x PP x DP x ZeRO wrote them), one at a time, so memory
holds one full parameter, not the model. A ZeRO-0 checkpoint has no universal form; its TP1 x PP1
module state is read directly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..config import Config, config_to_dict
from ..data.hf_tokenizer import tokenizer_of_tag, tokenizer_record
from ..dims import model_parallel_size, model_parallel_sizes, model_parallel_text
from ..files import atomic_write
from ..model import ModelConfig, build_model, model_skeleton
from . import integrity
from .hf_format import HFDirectory, is_hf_directory
from .reshard import build_universal, source_identity, universal_problem
from .tags import COMPLETE, UNIVERSAL, CheckpointError, Tag, model_differences, saved_config

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}


def check_input(tag_dir: str, exports_too: bool = False) -> None:
    """A complete, undamaged checkpoint tag (or, with exports_too, an export directory), or
    CheckpointError saying what it is instead."""
    tag_dir = tag_dir.rstrip("/")
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"--input {tag_dir} is not a directory; pass a checkpoint tag, "
                              "e.g. runs/gpt_tiny/checkpoints/global_step200")
    if not os.path.isfile(os.path.join(tag_dir, "config.yaml")):
        if exports_too and os.path.isfile(os.path.join(tag_dir, CONFIG)):
            return  # read and checked by open_consolidated
        raise CheckpointError(f"--input {tag_dir} is not a checkpoint of this project (no "
                              "config.yaml); pass RUN/checkpoints/global_stepN"
                              + (" or an export" if exports_too else ""))
    tag = Tag.at(tag_dir)
    if not tag.is_complete():
        raise CheckpointError(f"--input {tag_dir} is incomplete (no {COMPLETE}: its save was "
                              "interrupted); convert an older tag")
    problem = tag.damage()
    if problem:
        raise CheckpointError(f"--input {tag_dir} is damaged: {problem}")


def model_shapes(model_cfg) -> Dict[str, torch.Size]:
    """Every parameter's name and shape, from a model built on the meta device (no memory);
    a tied alias (lm_head.weight is embed.word.weight) appears once, under its owner's name."""
    return {name: p.shape for name, p in model_skeleton(model_cfg).named_parameters()}


def full_parameters(tag_dir: str, work_dir: str, log=print) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) for every model parameter, one at a time. A universal form is
    built under work_dir unless the tag has one."""
    cfg = saved_config(tag_dir)
    shapes = model_shapes(cfg.model)
    if cfg.train.zero_stage == 0:
        yield from _zero0_parameters(tag_dir, cfg, shapes)
        return
    universal = os.path.join(tag_dir, UNIVERSAL)
    if universal_problem(universal, source_identity(tag_dir)):  # the input is only read
        # one level down: DeepSpeed's converter also writes `latest_universal` beside its
        # output, which must stay inside work_dir/universal (an export removes that folder)
        universal = build_universal(tag_dir, log,
                                    final=os.path.join(work_dir, UNIVERSAL, UNIVERSAL))
    for name, shape in shapes.items():
        path = os.path.join(universal, "zero", name, "fp32.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{tag_dir}: the universal form has no parameter {name!r} "
                                  f"({path}); was the checkpoint written by another model?")
        yield name, _checked(name, torch.load(path, weights_only=False)["param"], shape, tag_dir)


def load_full_model(tag_dir: str, log=print):
    """The checkpoint's model, whole, on the CPU in fp32 (for evaluation or sampling on one
    process): its full weights read one parameter at a time."""
    import tempfile

    model = build_model(saved_config(tag_dir).model)
    params = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as work_dir, torch.no_grad():
        for name, full in full_parameters(tag_dir, work_dir, log):
            params[name].copy_(full)
    return model.eval()


def _zero0_parameters(tag_dir: str, cfg: Config, shapes) -> Iterator[Tuple[str, torch.Tensor]]:
    sizes = model_parallel_sizes(cfg)
    if model_parallel_size(sizes) > 1:
        raise CheckpointError(
            f"{tag_dir} was written without ZeRO (train.zero_stage=0) by "
            f"{model_parallel_text(sizes)}: it has no "
            "universal form to consolidate from; resume it on its own layout with "
            "train.exit_at_step and train.zero_stage=1, save, and convert that checkpoint")
    module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), mmap=True,
                        map_location="cpu", weights_only=False)["module"]
    for name, shape in shapes.items():
        yield name, _checked(name, module[name].float(), shape, tag_dir)


def _checked(name: str, tensor: torch.Tensor, shape, source: str) -> torch.Tensor:
    if tensor.shape != shape:
        raise CheckpointError(f"{source}: parameter {name!r} has shape {list(tensor.shape)}, "
                              f"the model config needs {list(shape)}")
    return tensor


def _tensor_digest(tensor: torch.Tensor) -> str:
    """The digest of a tensor's bytes as stored (its dtype, row-major)."""
    return integrity.buffer_digest(tensor.contiguous().view(torch.uint8).numpy())


class _SafetensorsFile:
    """One safetensors file written tensor by tensor. safetensors' own save_file needs every
    tensor in memory at once; its format is simple and documented (8-byte little-endian header
    size, a JSON header of dtypes, shapes and byte offsets, then the raw bytes), so with the
    shapes known up front the header goes first and each tensor is written as it arrives."""

    def __init__(self, path: str, shapes: Dict[str, torch.Size], dtype: torch.dtype,
                 metadata: Dict[str, str]):
        header, offset = {"__metadata__": metadata}, 0
        itemsize = torch.empty((), dtype=dtype).element_size()
        for name, shape in shapes.items():
            size = int(torch.Size(shape).numel()) * itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.pending, self.dtype, self.digests = iter(shapes), dtype, {}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)))
        self.file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self.pending, None)
        assert name == expected, (name, expected)  # tensors arrive in header order
        stored = tensor.to(self.dtype).contiguous()
        self.digests[name] = _tensor_digest(stored)
        self.file.write(stored.view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        assert next(self.pending, None) is None, "a tensor was never written"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_safetensors_files(files: Dict[str, List[str]], shapes: Dict[str, torch.Size],
                            dtype: torch.dtype, tensors: Iterator[Tuple[str, torch.Tensor]],
                            metadata: Dict[str, str],
                            progress: Callable = lambda it, total: it,
                            rename: Callable[[str], str] = lambda name: name
                            ) -> Dict[str, str]:
    """Stream tensors, which arrive in `shapes` order, into safetensors files (path -> the
    names it holds, each file's in `shapes` order), all open at once, so memory holds one
    tensor whatever the sharding. `rename` gives a tensor its name in the files. -> each
    tensor's digest, by its name in the files."""
    owner = {name: path for path, names in files.items() for name in names}
    writers = {path: _SafetensorsFile(path, {rename(n): shapes[n] for n in names}, dtype,
                                      metadata) for path, names in files.items()}
    try:
        for name, tensor in progress(tensors, len(shapes)):
            writers[owner[name]].write(rename(name), tensor)
        for writer in writers.values():
            writer.close()
        return {name: d for writer in writers.values() for name, d in writer.digests.items()}
    except BaseException:
        for writer in writers.values():  # the caller removes the half-written directory
            writer.file.close()
        raise


def write_safetensors(path: str, shapes: Dict[str, torch.Size], dtype: torch.dtype,
                      tensors: Iterator[Tuple[str, torch.Tensor]], metadata: Dict[str, str],
                      progress: Callable = lambda it, total: it) -> Dict[str, str]:
    """Stream tensors, in `shapes` order, into one safetensors file; -> each one's digest."""
    return write_safetensors_files({path: list(shapes)}, shapes, dtype, tensors, metadata,
                                   progress)


def refuse_existing(out_dir: str) -> None:
    if os.path.exists(out_dir):
        raise CheckpointError(f"--output {out_dir} already exists; choose a new directory")


@contextlib.contextmanager
def staged_output(out_dir: str) -> Iterator[str]:
    """A temp directory beside out_dir, renamed to it when the block completes and removed if
    it does not: out_dir is the whole export or nothing."""
    refuse_existing(out_dir)
    temp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    os.makedirs(temp)
    try:
        yield temp
        shutil.rmtree(os.path.join(temp, UNIVERSAL), ignore_errors=True)
        os.rename(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def export_safetensors(tag_dir: str, out_dir: str, dtype: str = "fp32", log=print,
                       progress: Callable = lambda it, total: it) -> str:
    """tag -> out_dir/{model.safetensors, config.json}, written under a temp name and renamed.
    config.json also records the run's tokenizer, for a later --to hf of this export."""
    cfg = saved_config(tag_dir)
    try:  # recorded for a later --to hf; the weights themselves do not need it
        record = tokenizer_record(tokenizer_of_tag(tag_dir, cfg))
    except CheckpointError as err:
        record = None
        log(f"WARNING: {err}; the export does not record its tokenizer (a --to hf of it will "
            "need --tokenizer)")
    with staged_output(out_dir) as temp:
        shapes = model_shapes(cfg.model)
        digests = write_safetensors(os.path.join(temp, WEIGHTS), shapes, DTYPES[dtype],
                                    full_parameters(tag_dir, temp, log),
                                    {"format": "pt", "source": os.path.abspath(tag_dir)},
                                    progress)
        atomic_write(os.path.join(temp, CONFIG), json.dumps(
            {"model": config_to_dict(cfg)["model"], "dtype": dtype,
             "tokenizer": record, "source": os.path.abspath(tag_dir),
             "digest": integrity.DIGEST, "digests": digests}, indent=1) + "\n")
    return out_dir


class SafetensorsExport:
    """An export_safetensors directory read back: the model config as saved, every
    parameter's shape, and one tensor at a time (safetensors reads only that tensor's bytes)."""

    def __init__(self, directory: str):
        self.config_path = os.path.join(directory, CONFIG)
        self.where = self.weights = os.path.join(directory, WEIGHTS)
        if not (os.path.isfile(self.config_path) and os.path.isfile(self.weights)):
            raise CheckpointError(
                f"{directory}: not a consolidated export (needs {CONFIG} and {WEIGHTS}, or a "
                "Hugging Face export; tools/convert_checkpoint.py --to safetensors|hf writes "
                "them)")
        try:
            with open(self.config_path, encoding="utf-8") as f:
                self.config = json.load(f)
            self.model = self.config["model"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.config_path}: not the config of an export of this "
                                  f"project (no model section: {err!r})") from None

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.model)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{self.config_path}: {err}") from err

    def shapes(self) -> Dict[str, List[int]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.weights, framework="pt") as f:
                return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.weights}: unreadable safetensors file ({err})") from err

    def reader(self) -> Callable[[str], torch.Tensor]:
        from safetensors import safe_open

        def full(name: str) -> torch.Tensor:
            with safe_open(self.weights, framework="pt") as f:
                return f.get_tensor(name)
        return full

    def digests(self) -> Dict[str, str]:
        """Each tensor's digest as exported (none in exports older than digests)."""
        return self.config.get("digests") or {}


def open_consolidated(directory: str):
    """An export of either kind (safetensors or Hugging Face), read back."""
    return HFDirectory(directory) if is_hf_directory(directory) else SafetensorsExport(directory)


def check_consolidated(init_dir: str, cfg: Config) -> None:
    """Refuse, before anything starts, an export that does not fit the configured model:
    another model config, a parameter of another shape, missing or extra parameters."""
    export = open_consolidated(init_dir)
    diffs = model_differences(export.model, cfg)
    if diffs:
        raise CheckpointError(f"checkpoint.init_from={init_dir} holds another model: "
                              f"{'; '.join(diffs)}")
    check_shapes(export, cfg.model)


def check_shapes(export, model_cfg: ModelConfig) -> None:
    """Every parameter of the model, of its shape, and nothing else, in an export read back."""
    shapes, found = model_shapes(model_cfg), export.shapes()
    for name, shape in shapes.items():
        if found.get(name) != list(shape):
            raise CheckpointError(
                f"{export.where}: parameter {name!r} is {found.get(name, 'missing')}, the model "
                f"config needs {list(shape)}")
    extra = sorted(set(found) - set(shapes))
    if extra:
        raise CheckpointError(f"{export.where}: parameters the model does not have: {extra[:5]}")


def checked_tensor(where: str, name: str, tensor: torch.Tensor, digest: Optional[str]
                   ) -> torch.Tensor:
    """An export's tensor as read, refused if its bytes differ from the recorded digest or it
    holds NaN or inf (training from it would be NaN from the first step)."""
    if digest is not None and _tensor_digest(tensor) != digest:
        raise CheckpointError(f"{where}: parameter {name!r} has other contents than when "
                              f"exported ({integrity.DIGEST} {_tensor_digest(tensor)}, {digest} "
                              "recorded); export the checkpoint again")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{where}: parameter {name!r} has {bad} NaN or inf value(s) of "
                              f"{tensor.numel()}; start from an export of a checkpoint "
                              "written before the run diverged")
    return tensor


def consolidated_weights(init_dir: str) -> Callable[[str], torch.Tensor]:
    """name -> an export's full tensor, read one at a time and checked (checked_tensor), for
    parallelize() to slice: a rank never holds the whole export."""
    export = open_consolidated(init_dir)
    read, digests = export.reader(), export.digests()
    return lambda name: checked_tensor(export.where, name, read(name), digests.get(name))
