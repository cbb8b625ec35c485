"""Shard-only start-up, checked inside layout_worker.py's rank group: every CPU tensor that
parallelize() allocates is tracked while it lives, and the peak is compared with this rank's
shard plus one full parameter (and, to show the check can fail, with building the full model
first, the path every rank took before)."""
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from magneto_dist.config import load_config
from magneto_dist.model import InitWeights, build_model, model_skeleton
from magneto_dist.dims import ParallelDims
from magneto_dist.parallel.setup import parallelize
from magneto_dist.training.tasks import GPTTask

VOCAB = 1000


class LiveCpuBytes(TorchDispatchMode):
    """Bytes of CPU storage alive now and at most, over every op run inside the mode (a
    storage is counted once, from the op that made it until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            if getattr(storage, "_tracked", False) or storage.nbytes() == 0:
                continue
            storage._tracked = True  # the storage's Python object lives as long as it does
            self.live += storage.nbytes()
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._freed, storage.nbytes())
        return out


def _config(tp: int, pp: int):
    return load_config(None, ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4",
                              "model.ffn_hidden_size=256", f"model.vocab_size={VOCAB}",
                              "model.max_seq_len=16", "model.tie_embeddings=false",
                              f"parallel.tensor_model_parallel_size={tp}",
                              f"parallel.pipeline_model_parallel_size={pp}",
                              "train.micro_batch_size=1", "train.global_batch_size=2"])


def _unique_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


def shard_only_startup(tp: int, pp: int) -> dict:
    cfg = _config(tp, pp)
    task = GPTTask(VOCAB, tensor_parallel=tp > 1)
    skeleton = model_skeleton(cfg.model)
    largest_full = max(p.numel() * 4 for p in skeleton.parameters())
    full_model_bytes = sum(p.numel() * 4 for p in skeleton.parameters())
    weights = InitWeights(skeleton, cfg.model, seed=3)
    dims = ParallelDims.of(cfg, dist.get_world_size())
    with LiveCpuBytes() as meta_path:
        par = parallelize(skeleton, cfg, dims, weights, pipeline_loss=task.pipeline_loss)
    shard = _unique_bytes(list(par.module.parameters()) + list(par.module.buffers()))
    reference = build_model(cfg.model, seed=3)  # the single-process weights, for the values
    full = dict(reference.named_parameters())
    same = all(torch.equal(p, full[n]) for n, p in par.module.named_parameters()
               if n in full and not getattr(p, "tensor_model_parallel", False))
    with LiveCpuBytes() as full_path:
        parallelize(build_model(cfg.model, seed=3), cfg, dims, pipeline_loss=task.pipeline_loss)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {
        "peak": meta_path.peak, "largest_allocation": meta_path.largest, "shard": shard,
        "largest_full_param": largest_full, "full_model": full_model_bytes,
        "full_path_peak": full_path.peak, "replicated_params_equal_single_process": same})
    return results
