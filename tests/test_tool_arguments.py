"""Flags of tools/generate.py and tools/plan_memory.py that cannot work: one line naming the
flag, exit 2, before any checkpoint or config is read (they were tracebacks, or a plan for a
negative number of devices with exit 0)."""
import pytest

from tools import generate, plan_memory


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "error: --prompt is empty: give the text to continue"),
    (["--prompt", "x", "--top-k", "0"], "error: --top-k 0: sample from at least 1 token"),
    (["--prompt", "x", "--max-new-tokens", "0"], "error: --max-new-tokens 0: generate at least"),
    (["--prompt", "x", "--temperature", "-1"], "error: --temperature -1: must be at least 0"),
])
def test_generate_refuses_flags_that_cannot_sample(tmp_path, capsys, flags, message):
    assert generate.main(["--run", str(tmp_path / "no_run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_generate_names_a_run_without_checkpoints(tmp_path, capsys):
    assert generate.main(["--run", str(tmp_path), "--prompt", "x"]) == 3
    assert capsys.readouterr().err == \
        f"checkpoint error: no complete checkpoint in {tmp_path}/checkpoints\n"


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0"], "error: --nodes 0: must be at least 1"),
    (["--nodes", "-1"], "error: --nodes -1: must be at least 1"),
    (["--gpus-per-node", "0"], "error: --gpus-per-node 0: must be at least 1"),
    (["--device-memory", "0"], "error: --device-memory 0: GiB per device, more than 0"),
])
def test_plan_memory_refuses_a_cluster_that_cannot_exist(capsys, flags, message):
    assert plan_memory.main(["--config", "configs/gpt_1.3b.yaml", *flags]) == 2
    assert capsys.readouterr().out == message + "\n"
