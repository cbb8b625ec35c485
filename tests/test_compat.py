"""Every touch of a library's internals (magneto_dist/compat) is checked at import: with the
pinned versions the checks pass, and when an upgrade removes or reshapes what a touch needs, the
check fails loudly naming the library, what is gone and the versions, instead of the run going
silently wrong. Each touch is removed here in turn to see its check fail."""
import os
import subprocess
import sys

import pytest
from deepspeed.checkpoint import constants as ds_constants
from deepspeed.checkpoint import ds_to_universal
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText
from torch.distributed.elastic import timer
from torch.distributed.elastic.agent.server import api as agent_api
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.rendezvous import utils as rdzv_utils
from torch.distributed.launcher import api as launcher_api

import torch._dynamo.utils
from torch.distributed import distributed_c10d
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel import layers as tp_layers

from magneto_dist.compat import (CompatError, cuda_memory, ds_engine, ds_universal, ds_zero,
                                 dynamo, elastic, megatron, torch_groups, torch_modules)


def _without_fragment(*args, **kwargs):
    """A stand-in whose source reads none of what the real function did."""


ds_comm_torch = sys.modules["deepspeed.comm.torch"]
# (compat module, owner, attribute, replacement: None deletes it), one row per touch
TOUCHES = [
    (ds_universal, ds_to_universal, "main", lambda: None),
    (ds_universal, ds_to_universal, "parse_arguments", None),
    (ds_universal, ds_constants, "OPTIMIZER_STATE_DICT", None),
    (ds_universal, DeepSpeedZeroOptimizer_Stage3,
     "load_hp_checkpoint_state_from_checkpoint_dir_stage3", None),
    (ds_engine, DeepSpeedEngine, "_take_model_step", _without_fragment),
    (ds_engine, PipelineModule, "_count_layer_params", None),
    (ds_engine, PipelineModule, "_partition_layers", _without_fragment),
    (ds_engine, ds_comm_torch, "build_shm_op", _without_fragment),
    (ds_engine, DeepSpeedEngine, "_configure_checkpointing", _without_fragment),
    (ds_engine, DeepSpeedEngine, "save_checkpoint", _without_fragment),
    (ds_engine, DeepSpeedEngine, "_save_checkpoint", _without_fragment),
    (ds_engine, DeepSpeedEngine, "_save_zero_checkpoint", _without_fragment),
    (ds_engine, PipelineEngine, "module_state_dict", _without_fragment),
    (ds_engine, PipelineModule, "save_state_dict", _without_fragment),
    (ds_zero, DeepSpeedZeroOptimizer, "__init__", _without_fragment),
    (ds_zero, DeepSpeedZeroOptimizer, "step", _without_fragment),
    (ds_zero, DeepSpeedZeroOptimizer_Stage3, "_create_fp16_partitions_with_defragmentation",
     _without_fragment),
    (ds_zero, DeepSpeedZeroOptimizer_Stage3, "_create_fp32_partitions", _without_fragment),
    (megatron, MegatronTokenizerText, "__init__", _without_fragment),
    (megatron, BlendedMegatronDatasetBuilder, "__init__", lambda self, cls, sizes, config: None),
    (megatron, gpt_dataset.GPTDataset, "_build_document_sample_shuffle_indices",
     _without_fragment),
    (megatron, ColumnParallelLinear, "forward", _without_fragment),
    (megatron, tp_layers.linear_with_grad_accumulation_and_async_allreduce, "warned", None),
    (megatron, tp_layers, "linear_with_grad_accumulation_and_async_allreduce",
     _without_fragment),
    (dynamo, torch._dynamo.utils, "calculate_time_spent", _without_fragment),
    (cuda_memory, torch.cuda.memory, "_record_memory_history", None),
    (cuda_memory, torch.cuda.memory, "_record_memory_history", lambda enabled=None: None),
    (cuda_memory, torch.cuda.memory, "_dump_snapshot", None),
    (cuda_memory, torch.cuda.memory, "_dump_snapshot", lambda path: None),
    (dynamo, torch._dynamo.config, "ignore_logging_functions", None),
    (dynamo, torch._dynamo.config, "recompile_limit", None),
    (dynamo, torch._dynamo.config, "accumulated_recompile_limit", None),
    (dynamo, torch._inductor.config, "fallback_random", None),
    (elastic, LocalElasticAgent, "_monitor_workers", lambda self, group, extra: None),
    (elastic, agent_api.SimpleElasticAgent, "_rendezvous", None),
    (elastic, LocalElasticAgent, "_setup_local_watchdog", _without_fragment),
    (elastic, LocalElasticAgent, "_log_watchdog_event", lambda self, event: None),
    (elastic, agent_api.SimpleElasticAgent, "_invoke_run", _without_fragment),
    (elastic, timer.FileTimerServer, "_reap_worker", lambda self, pid: None),
    (elastic, timer.FileTimerServer, "_run_watchdog", _without_fragment),
    (elastic, launcher_api, "launch_agent", _without_fragment),
    (elastic, rdzv_utils, "_matches_machine_hostname", None),
    (torch_modules, torch.nn.Module, "register_parameter", _without_fragment),
    (torch_modules, torch.nn.Module, "named_parameters", _without_fragment),
    (torch_groups, type(distributed_c10d._world), "pg_map", None),
    (torch_groups, torch.distributed, "destroy_process_group", _without_fragment),
]


@pytest.mark.parametrize("module", [ds_universal, ds_engine, ds_zero, megatron, dynamo, elastic,
                                    cuda_memory, torch_groups, torch_modules],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_the_pinned_versions_pass_every_check(module):
    module.check()


@pytest.mark.parametrize("module, owner, name, replacement", TOUCHES,
                         ids=[f"{getattr(o, '__name__', o)}.{n}" for _, o, n, _ in TOUCHES])
def test_a_touch_that_an_upgrade_removed_fails_loudly(module, owner, name, replacement,
                                                      monkeypatch):
    if replacement is None:
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, name, replacement)
    with pytest.raises(CompatError) as caught:
        module.check()
    message = str(caught.value)
    assert module.LIBRARY in message and "written for" in message, message
    assert "requirements.txt" in message, message


def test_a_module_without_load_hooks_fails_loudly(monkeypatch):
    """NoExtraState clears torch's private list of state-dict load hooks."""
    class Bare:
        pass

    monkeypatch.setattr(megatron.nn, "Module", Bare)
    with pytest.raises(CompatError, match="_load_state_dict_pre_hooks"):
        megatron.check()


def test_changed_ds_to_universal_arguments_fail_loudly(monkeypatch):
    """We call ds_to_universal.main with its argparse namespace built by hand."""
    real = ds_to_universal.parse_arguments

    def with_a_new_option():
        args = real()
        args.new_required_option = 1
        return args

    monkeypatch.setattr(ds_to_universal, "parse_arguments", with_a_new_option)
    with pytest.raises(CompatError, match="ds_to_universal arguments"):
        ds_universal.check()


def test_the_agent_safe_timer_server_never_kills_the_agent():
    """Stock FileTimerServer SIGKILLs the agent when asked to reap the agent's own pid; ours
    declines. Run in a child process, so a regression kills the child, not the test run."""
    code = ("import os; from magneto_dist.compat.elastic import AgentSafeFileTimerServer as S\n"
            "server = S.__new__(S)\n"
            "assert server._reap_worker(os.getpid(), 9)\n"
            "print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr[-2000:]
