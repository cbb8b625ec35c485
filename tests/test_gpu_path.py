"""What a GPU cluster runs and this CPU machine does not, checked with a fake device: which GPU a
rank takes, the environment megatron's TP layers need, the peak-TFLOP/s table behind MFU, the
process-group timeout, the ZeRO defaults on GPUs, ZeRO-Offload's checks, and two numerical
guards of the parallel layers (the sharded LayerNorm's variance, per-stage dropout seeds)."""
import re
from datetime import timedelta

import pytest
import torch

from magneto_dist.config import ConfigError, load_config, validate
from magneto_dist.dims import ParallelDims
from magneto_dist.parallel import state
from magneto_dist.training import metrics


@pytest.mark.parametrize("local_rank,local_world,visible,device", [
    (0, 8, 8, 0), (5, 8, 8, 5),     # deepspeed / torchrun: every rank sees the node's GPUs
    (3, 8, 1, 0), (7, 8, 1, 0),     # srun --gpus-per-task=1: each rank sees its own GPU
    (1, 4, 8, 1),                   # fewer ranks than GPUs
])
def test_each_rank_takes_a_gpu_it_can_see(local_rank, local_world, visible, device):
    """set_device(local_rank) failed ('invalid device ordinal') under a per-task GPU mask."""
    assert state.cuda_device_index(local_rank, local_world, visible) == device


@pytest.mark.parametrize("local_rank,local_world,visible", [(5, 8, 4), (2, 1, 2)])
def test_ranks_outnumbering_devices_is_an_error_naming_the_mask(local_rank, local_world, visible,
                                                                monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible))))
    with pytest.raises(ConfigError, match=rf"this rank sees {visible} CUDA devices "
                                          rf"\(CUDA_VISIBLE_DEVICES=[0-9,]+\), so ranks would "
                                          r"share a GPU: start one rank per visible GPU"):
        state.cuda_device_index(local_rank, local_world, visible)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda as a machine with `count` GPUs named `name` shows it; set_device recorded."""
    chosen = []

    def install(count=8, name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        return chosen
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    return install


@pytest.mark.parametrize("tp,preset,expected", [(2, None, "1"), (1, None, None), (4, "8", "8")])
def test_tensor_parallel_runs_get_one_cuda_connection(fake_gpus, monkeypatch, tp, preset,
                                                      expected):
    """megatron-core's TP layers start the input-gradient all-reduce asynchronously and count
    on CUDA_DEVICE_MAX_CONNECTIONS=1 to launch it before the weight-gradient GEMM."""
    chosen = fake_gpus(count=1)
    if preset:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", preset)
    state.set_local_device(local_rank=3, local_world_size=8, tp=tp)
    assert chosen == [0]
    import os
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("Tesla V100-PCIE-16GB", 112.0), ("Tesla V100-SXM2-32GB", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("AMD Instinct MI300X", 1307.4),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4080", None),
])
def test_peak_tflops_match_the_device_variant(name, peak):
    """A substring match gave H100 PCIe (756), H100 NVL and H200 NVL (835) the SXM part's 989,
    and an L40 the L4's 121."""
    assert metrics.peak_tflops_for(name) == peak


def test_a_device_not_in_the_table_gets_no_mfu_and_says_so(fake_gpus):
    fake_gpus(name="NVIDIA A10G")
    said = []
    assert metrics.device_peak_tflops(None, log=said.append) is None
    assert said == ["no MFU: 'NVIDIA A10G' is not in the peak-TFLOP/s table "
                    "(training/metrics.py); set logging.peak_tflops to its dense bf16 peak"]
    assert metrics.device_peak_tflops(70.0) == 70.0  # the configured peak wins


def test_process_group_timeout_reaches_deepspeed_and_megatron(monkeypatch):
    """DeepSpeed's process group gave up after its default 10 minutes (a large model's first
    save takes longer); parallel.timeout_minutes now sets it, and megatron's groups."""
    import deepspeed
    calls = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.update(ds=kw))
    monkeypatch.setattr(state.ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(state.ps, "initialize_model_parallel",
                        lambda **kw: calls.update(megatron=kw))
    cfg = load_config(None, ["parallel.timeout_minutes=45"])
    state.init_distributed(cfg.parallel.timeout_minutes)
    state.initialize_groups(2, 1, cfg.parallel.timeout_minutes)
    assert calls["ds"]["timeout"] == timedelta(minutes=45)
    assert calls["megatron"]["distributed_timeout_minutes"] == 45
    with pytest.raises(ConfigError, match=r"parallel.timeout_minutes=0 must be at least 1"):
        validate(load_config(None, ["parallel.timeout_minutes=0"]), 1)


@pytest.mark.parametrize("overrides,world,overlap", [
    (["train.zero_stage=1"], 2, True), (["train.zero_stage=2"], 2, True),
    (["train.zero_stage=1", "parallel.pipeline_model_parallel_size=2"], 2, None),
    (["train.zero_stage=3"], 2, None),  # DeepSpeed's own ZeRO-3 default overlaps already
])
def test_zero_overlaps_gradient_reduction_on_gpus(fake_gpus, overrides, world, overlap):
    from magneto_dist.training.engine import deepspeed_config
    fake_gpus()
    cfg = load_config(None, overrides)
    zero = deepspeed_config(cfg, ParallelDims.of(cfg, world))["zero_optimization"]
    assert zero.get("overlap_comm") is overlap
    assert "contiguous_gradients" not in zero  # the CPU-only setting stays off GPUs


def test_zero_does_not_overlap_on_cpu():
    from magneto_dist.training.engine import deepspeed_config
    cfg = load_config(None, ["train.zero_stage=2"])
    assert "overlap_comm" not in deepspeed_config(cfg, ParallelDims.of(cfg, 2))["zero_optimization"]


OFFLOAD = "deepspeed.zero_optimization.offload_optimizer"


@pytest.mark.parametrize("overrides,message", [
    ([f"{OFFLOAD}.device=cpu", "train.zero_stage=0"],
     f"{OFFLOAD}.device=cpu needs ZeRO: set train.zero_stage to 1, 2 or 3"),
    ([f"{OFFLOAD}.device=nvme", f"{OFFLOAD}.nvme_path=/tmp", "train.zero_stage=2"],
     f"{OFFLOAD}.device=nvme: DeepSpeed offloads to NVMe under ZeRO-3 only"),
    (["deepspeed.zero_optimization.offload_param.device=cpu", "train.zero_stage=2"],
     "offload_param.device=cpu: only ZeRO-3 partitions (and so offloads) parameters"),
    ([f"{OFFLOAD}.device=nvme", "train.zero_stage=3"],
     f"{OFFLOAD}.device=nvme needs {OFFLOAD}.nvme_path"),
    (["deepspeed.zero_optimization.offload_param.device=nvme",
      "deepspeed.zero_optimization.offload_param.nvme_path=/tmp", "train.zero_stage=3"],
     "offload_param.device=nvme: DeepSpeed's async_io op cannot be built on this machine (it "
     "needs libaio"),
])
def test_offload_settings_deepspeed_would_get_wrong_are_refused(overrides, message, monkeypatch):
    """ZeRO-1/2 took an NVMe device as CPU memory without a word, and NVMe without the async_io
    op failed in its JIT build at the first step."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from magneto_dist.training.engine import check_deepspeed_section
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_deepspeed_section(cfg, ParallelDims.of(cfg, 1))


def test_nvme_offload_under_zero3_passes_where_async_io_builds(monkeypatch, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from magneto_dist.training.engine import check_deepspeed_section, offloaded_optimizer
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    cfg = load_config(None, [f"{OFFLOAD}.device=nvme", f"{OFFLOAD}.nvme_path={tmp_path}",
                             "train.zero_stage=3"])
    check_deepspeed_section(cfg, ParallelDims.of(cfg, 1))
    assert offloaded_optimizer(cfg.deepspeed) == "nvme"
    assert offloaded_optimizer({}) is None


def test_sharded_layernorm_of_a_near_constant_row_is_finite(monkeypatch):
    """E[x^2] - E[x]^2 of values near 1000 came out below zero in fp32 and the norm's output
    was NaN; the variance is clamped at 0. (TP size 1 here: the sums are this rank's.)"""
    from magneto_dist.model.norms import LayerNorm
    from magneto_dist.parallel import tensor_parallel

    monkeypatch.setattr(tensor_parallel.state, "tp_size", lambda: 1)
    monkeypatch.setattr(tensor_parallel, "_tp_sum", lambda x: x)
    norm = tensor_parallel.ShardedLayerNorm(LayerNorm(128, eps=1e-5))
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    torch.manual_seed(0)
    flat = 1000 + 1e-3 * torch.randn(64, 128)
    assert torch.isfinite(norm(flat)).all()
    ordinary = torch.randn(8, 128)
    torch.testing.assert_close(norm(ordinary), torch.nn.functional.layer_norm(ordinary, (128,)))


def test_stage_seeds_follow_megatron():
    """The default stream of pipeline stage s is seeded seed + 100 s (Megatron-LM's
    _set_random_seed), the TP stream seed + 100 s + 2718 + tp_rank: stages draw other dropout
    masks, TP ranks of a stage the same replicated ones."""
    from magneto_dist.parallel.random import seed_streams

    draws = {}
    for tp_rank, pp_rank in ((0, 0), (1, 0), (0, 1)):
        rng = seed_streams(7, tp_rank, pp_rank)
        default = torch.rand(4)
        with rng.fork():
            draws[tp_rank, pp_rank] = (default, torch.rand(4))
    assert torch.equal(draws[0, 0][0], draws[1, 0][0])       # replicated region: same masks
    assert not torch.equal(draws[0, 0][1], draws[1, 0][1])   # TP region: per-rank masks
    assert not torch.equal(draws[0, 0][0], draws[0, 1][0])   # another stage: other masks
    torch.manual_seed(107)
    assert torch.equal(torch.rand(4), draws[0, 1][0])
    torch.manual_seed(107 + 2718)
    assert torch.equal(torch.rand(4), draws[0, 1][1])


def test_gpu_check_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    """tools/gpu_check.sh checks the GPU path; on this CPU machine it must stop at once with
    exit 2 and say why, not train on the CPU and call that a GPU check. Its Python verdicts
    (heredocs) must at least compile, since no CPU run executes them."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script, encoding="utf-8").read()
    verdicts = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert len(verdicts) == 5  # four checks of their own, one shared by the layout checks
    for i, source in enumerate(verdicts):
        compile(source, f"gpu_check.sh verdict {i}", "exec")
    (flex,) = re.findall(r"run flex_documents 300 \"\$PYTHON\" -c '\n(.*?)\n'; then", text, re.S)
    compile(flex, "gpu_check.sh flex_documents", "exec")  # runs only on CUDA
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: no CUDA device is visible" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def _gpu_check_verdicts():
    """Each verdict's name -> (its Python source, the arguments after OUT it is run with): the
    heredocs of `verdict NAME`, and the shared one of every `tracks_one_gpu NAME REF RUN WHAT`."""
    import os
    import shlex
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "tools", "gpu_check.sh"), encoding="utf-8").read()
    verdicts = {name: (source, []) for name, source in
                re.findall(r"verdict ([\w.]+) <<'EOF'\n(.*?)\nEOF\n", text, re.S)}
    (shared,) = re.findall(r'verdict "\$1" "\$2" "\$3" "\$4" <<\'EOF\'\n(.*?)\nEOF\n', text, re.S)
    for call in re.findall(r"^\s+tracks_one_gpu (.+)$", text, re.M):
        name, *args = shlex.split(call)
        verdicts[name] = (shared, args)
    return verdicts


def _fake_run(out, name, losses, **extra):
    import json
    (out / name).mkdir(parents=True)
    rows = [dict(split="train", step=10 * (i + 1), loss=loss, tokens_per_s=1e5, **extra)
            for i, loss in enumerate(losses)]
    (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("good", [True, False])
def test_gpu_check_verdicts_judge_the_files_a_gpu_run_writes(tmp_path, good):
    """The verdicts run only on a GPU machine; here they read fabricated run directories of the
    shape the runs write (metrics.jsonl, deepspeed_config.json, the bench log), so an import or
    a file name gone stale fails on this CPU and not on the first GPU lent (a verdict read
    training.metrics.read_metrics after it moved to metrics_file). Good numbers pass, bad fail."""
    import json
    import subprocess
    import sys

    out = tmp_path
    drop = 0.0 if good else 3.0  # a bad run does not learn
    _fake_run(out, "default_bf16", [7.0, 6.0 + drop, 5.0 + drop])
    (out / "default_bf16" / "deepspeed_config.json").write_text(json.dumps(
        {"data_types": {"grad_accum_dtype": "fp32" if good else "bf16"},
         "communication_data_type": "fp32"}))
    _fake_run(out, "track_fp32", [7.0, 6.0, 5.0])
    _fake_run(out, "track_bf16", [7.01, 6.02, 5.01 + drop])
    _fake_run(out, "tp2_bf16", [7.01, 6.03, 5.02 + 2 * drop])
    _fake_run(out, "tp2_sp_bf16", [7.01, 6.03, 5.02 + 2 * drop])
    _fake_run(out, "documents_bf16", [7.0, 6.1, 5.2])
    _fake_run(out, "cp2_bf16", [7.01, 6.11, 5.21 + 2 * drop])
    _fake_run(out, "fp16", [7.0] + [6.5] * 3 + [6.0 + drop], skipped_steps=1)
    (out / "bench_1.3b.log").write_text(
        "trainer        812.0      10,090    150.20   15.2%     1.031\noverhead: 1.031x\n"
        if good else "RuntimeError: CUDA out of memory\n")
    verdicts = _gpu_check_verdicts()
    assert sorted(verdicts) == ["bench_1.3b", "bf16_tracks_fp32", "cp2_tracks_one_gpu",
                                "default_bf16", "fp16_loss_scaling", "tp2_sp_tracks_one_gpu",
                                "tp2_tracks_one_gpu"]
    for name, (source, args) in verdicts.items():
        proc = subprocess.run([sys.executable, "-", str(out), *args], input=source, text=True,
                              capture_output=True, timeout=120)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert (proc.returncode == 0) == good, (name, proc.stdout, proc.stderr)
