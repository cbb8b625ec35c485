"""Context-parallel checks run inside layout_worker.py's rank group (CP = the whole world)."""
import torch
import torch.distributed as dist

from magneto_dist.model.attention import Documents, DotProductAttention
from magneto_dist.parallel import context_parallel, state
from magneto_dist.parallel.context_parallel import RingAttention, local_positions


def ring_attention_matches_full() -> dict:
    """The ring's output and its gradients of q, k and v equal full attention's on this rank's
    chunks, for causal, causal with packed documents and non-causal attention, and with each
    chunk's queries cut into tiles of 3 rows (8-row chunks: uneven tiles, the diagonal's keys
    cut per tile). Inputs are made alike on every rank, so each computes the reference."""
    world = dist.get_world_size()
    state.initialize_groups(1, 1, cp=world)
    g = torch.Generator().manual_seed(3)
    b, h, s, d = 2, 3, 8 * world, 8
    q, k, v, weight = (torch.randn(b, h, s, d, generator=g) for _ in range(4))
    # documents: several in the first sample, crossing chunk borders; one in the second
    ids = torch.stack([torch.randint(0, 4, (s,), generator=g).sort().values,
                       torch.zeros(s, dtype=torch.long)])
    mine = local_positions(state.cp_rank(), world, s)
    ring = RingAttention(state.cp_group())
    results = {}
    whole_chunks = context_parallel.TILE_BYTES
    for name, causal, docs in (("causal", True, False), ("documents", True, True),
                               ("bidirectional", False, False), ("tiled", True, True)):
        # bytes of a 3-row tile of fp32 scores: b x heads x 3 rows x 8 keys
        context_parallel.TILE_BYTES = 4 * b * h * 3 * 8 if name == "tiled" else whole_chunks
        full_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        full = DotProductAttention()(*full_in, causal=causal,
                                     documents=Documents(ids) if docs else None)
        (full * weight).sum().backward()
        local_in = [t[:, :, mine].clone().requires_grad_(True) for t in (q, k, v)]
        local = ring(*local_in, causal=causal,
                     documents=Documents(ids[:, mine]) if docs else None)
        (local * weight[:, :, mine]).sum().backward()
        diffs = [(local - full[:, :, mine]).abs().max().item()]
        diffs += [(a.grad - f.grad[:, :, mine]).abs().max().item()
                  for a, f in zip(local_in, full_in)]
        results[name] = max(diffs)
    context_parallel.TILE_BYTES = whole_chunks
    return results
