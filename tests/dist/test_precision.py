"""bf16 through the checkpoint tables. bf16 runs accumulate and all-reduce gradients in fp32
(training/engine.py GRADIENT_DTYPE), so DeepSpeed steps them with other optimizers than before:
ZeRO-1 (and the pipeline) through its BF16_Optimizer, which writes its own checkpoint files
(bf16_zero_pp_rank_*), ZeRO-2/3 with a separate fp32 gradient buffer. Resume, resharding and
the converter are run again in bf16 here.

bf16 matmul is very slow on this CPU for large matrices; the tiny test model's are fast.
"""
import json

import pytest
import torch

from .gpt_runs import check_ok, copy_tag, gpt, read_metrics
from .ranks import run_ranks
from .test_convert import FROZEN, PP2, TP2, convert_here, frozen_run, weights
from .test_reshard import COMMON, DP2_ZERO1, DP2_ZERO3, TP1
from .test_reshard import TP2 as TP2_LAYOUT

BF16 = "train.precision=bf16"
# bf16 rounds every activation to 8 bits, so a layout change (other TP sums, other reduction
# order) moves the tiny model's loss by itself: straight TP2 vs TP1 and DP2 ZeRO-1 vs ZeRO-3
# runs from the same weights differed by up to 7e-4 per step. A resumed run may differ from
# the run it continues by that much; a lost optimizer state or data position moves it by more.
RESHARD_TOLERANCE = 2e-3


@pytest.mark.parametrize("ranks,layout", [(1, ["train.zero_stage=1"]),
                                          (2, ["train.zero_stage=2"]),
                                          (4, [TP2, PP2, "train.zero_stage=1"])],
                         ids=["1rank-zero1", "dp2-zero2", "tp2-pp2-zero1"])
def test_bf16_resume_is_exact(tmp_path, cache_dir, ranks, layout):
    """10 steps straight == its checkpoint of step 5 resumed, 5 more, bit for bit; and the
    config written to RUN_DIR/deepspeed_config.json is the fp32-accumulating one DeepSpeed
    got."""
    common = [*COMMON, BF16, *layout]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check_ok(run_ranks(gpt(straight, cache_dir, *common), ranks))
    copy_tag(straight, resumed)
    out = check_ok(run_ranks(gpt(resumed, cache_dir, *common), ranks))
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    expected = [r["loss"] for r in read_metrics(straight)]
    assert len(expected) == 10 and [r["loss"] for r in read_metrics(resumed)] == expected[5:]
    handed = json.loads((straight / "deepspeed_config.json").read_text())
    assert handed["bf16"]["enabled"] and handed["data_types"] == {"grad_accum_dtype": "fp32"}
    assert handed["communication_data_type"] == "fp32"
    if "train.zero_stage=1" in layout:  # DeepSpeed's BF16_Optimizer wrote this checkpoint
        assert list((straight / "checkpoints" / "global_step10").glob("bf16_zero_pp_rank_*"))


@pytest.mark.parametrize("a,b", [(TP2_LAYOUT, TP1), (DP2_ZERO1, DP2_ZERO3)],
                         ids=["tp2-to-tp1", "dp2_zero1-to-dp2_zero3"])
def test_bf16_resume_in_another_layout_continues(tmp_path, cache_dir, a, b):
    """A bf16 optimizer's checkpoint through the universal form into another TP size, and
    into ZeRO-3 (another optimizer and file format): steps 6-10 continue the straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check_ok(run_ranks(gpt(straight, cache_dir, *COMMON, BF16, *a["args"]), a["ranks"],
                       timeout=300))
    copy_tag(straight, resumed)
    out = check_ok(run_ranks(gpt(resumed, cache_dir, *COMMON, BF16, *b["args"]), b["ranks"],
                             timeout=300))
    assert "changing layouts: global_step5 was written by" in out, out[-3000:]
    assert "step 5, 40 samples consumed" in out
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [6, 7, 8, 9, 10]
    diffs = {step: abs(got[step] - expected[step]) for step in got}
    assert max(diffs.values()) < RESHARD_TOLERANCE, (diffs, got, expected)


def test_bf16_exports_of_tp1_and_tp2_pp2_are_equal(tmp_path, cache_dir, shared_run):
    """With train.lr=0 the fp32 master weights stay what DeepSpeed made them from, the bf16
    weights (the initialization rounded to bf16: DeepSpeed's bf16 optimizers copy their fp32
    masters from the bf16 model), in every layout: the exports of a BF16_Optimizer run (TP1)
    and a bf16 pipeline run (TP2 x PP2) equal an fp32 run's export rounded to bf16, bit for
    bit. The fp32 run is the session's frozen TP1 run (tests/dist/test_convert.py's)."""
    sources = {"fp32": frozen_run(shared_run, cache_dir, "tp1")}
    for name, (layout, ranks) in {"tp1": ([], 1), "tp2_pp2": ([TP2, PP2], 4)}.items():
        sources[name] = tmp_path / name
        check_ok(run_ranks(gpt(sources[name], cache_dir, *FROZEN, BF16, *layout), ranks))
    exports = {}
    for name, run_dir in sources.items():
        convert_here("--input", run_dir / "checkpoints" / "global_step2", "--to", "safetensors",
                     "--output", tmp_path / f"export_{name}")
        exports[name] = weights(tmp_path / f"export_{name}")
    reference = exports["fp32"]
    assert "embed.word.weight" in reference
    for name in ("tp1", "tp2_pp2"):
        assert sorted(exports[name]) == sorted(reference), name
        for param, tensor in reference.items():
            assert torch.equal(exports[name][param], tensor.bfloat16().float()), (name, param)
