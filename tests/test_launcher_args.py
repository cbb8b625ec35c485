"""What launch/ft_launch.py decides before it starts anything: the node counts the configured
batch can use, the rendezvous settings and hang detection. In one process, no rendezvous."""
import pytest

from magneto_dist.launcher import cli


def refused(argv):
    with pytest.raises(cli.LaunchError) as caught:
        cli.prepare(argv)
    return str(caught.value)


def test_a_node_range_the_global_batch_cannot_keep_is_refused_naming_the_counts_that_work():
    """gpt_1.3b on 8 GPUs per node (TP1: DP 8 per node), micro-batch 4, global batch 512: of
    4-8 nodes only 4 and 8 keep the batch. Losing one of 8 nodes re-formed on 7 and every
    survivor exited 2 (never retried); now the range is refused at start-up."""
    message = refused(["--nnodes", "4:8", "--nproc-per-node", "8", "--rdzv-endpoint", "h:1",
                       "launch/pretrain_gpt.py", "--config", "configs/gpt_1.3b.yaml"])
    assert message.startswith(
        "--nnodes 4:8 with --nproc-per-node 8 (TP1 x PP1, train.micro_batch_size=4, "
        "train.global_batch_size=512, train.zero_stage=1): the run cannot continue on 5, 6, 7 "
        "node(s) (on 5: train.global_batch_size=512 is not divisible by "
        "train.micro_batch_size x data-parallel size = 4 x 40; use a multiple of 160); node "
        "counts that work: 4, 8. Give --nnodes only working counts (e.g. --nnodes 8), or "
        "train.global_batch_size=26880 (a multiple of 26880"), message
    message = refused(["--nnodes", "7:8", "--nproc-per-node", "8", "--rdzv-endpoint", "h:1",
                       "launch/pretrain_gpt.py", "--config", "configs/gpt_1.3b.yaml"])
    assert "on 7: train.global_batch_size=512 is not divisible by train.micro_batch_size x " \
        "data-parallel size = 4 x 56" in message and "global_batch_size=1792 (" in message
    tiny = ["--rdzv-endpoint", "h:1", "launch/pretrain_gpt.py", "train.micro_batch_size=2"]
    message = refused(["--nnodes", "1:4", "--nproc-per-node", "2", *tiny,
                       "train.global_batch_size=16"])
    assert "cannot continue on 3 node(s)" in message and "work: 1, 2, 4" in message, message
    assert "(e.g. --nnodes 1:2)" in message, message
    # ZeRO-0 cannot change its data-parallel size at all (the universal checkpoint needs ZeRO)
    message = refused(["--nnodes", "1:2", "--nproc-per-node", "2", *tiny, "train.zero_stage=0"])
    assert "cannot continue on 1 node(s) (on 1: a layout change needs ZeRO's" in message
    args = cli.parser().parse_args(["--nnodes", "1:2", "--nproc-per-node", "2", *tiny])
    assert cli.node_count_problem(args, cli.training_config(args.training_script, tiny[3:])) \
        is None  # global batch 16 = micro-batch 2 x DP 2 x 4, or 2 x DP 4 x 2


def test_bad_flags_are_one_line():
    assert refused(["--nnodes", "0:2", "launch/pretrain_gpt.py"]) == \
        "--nnodes 0:2: needs 1 <= MIN <= MAX"
    assert refused(["--nnodes", "two", "launch/pretrain_gpt.py"]) == \
        "--nnodes 'two': a number of nodes, or MIN:MAX"
    assert refused(["--step-timeout", "soon", "launch/pretrain_gpt.py"]) == \
        "--step-timeout 'soon': a number of seconds, 0, or auto"


def test_rendezvous_defaults_tolerate_a_busy_network_and_the_users_keys_win():
    """A node is dropped after 3 missed keep-alives; at 1 s apart a few seconds of a busy
    network or store dropped a live node (and cost every node a restart)."""
    conf = dict(item.split("=") for item in cli.rdzv_conf("").split(","))
    assert int(conf["keep_alive_interval"]) * int(conf["keep_alive_max_attempt"]) >= 15
    assert cli.rdzv_conf("is_host=false,keep_alive_interval=2") == (
        "last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3,is_host=false")


def test_hangs_are_watched_by_default_and_said_so():
    """Without --step-timeout a stopped rank hung the job for the collective timeout (30 min)
    with nothing printed."""
    args = cli.parser().parse_args(["launch/pretrain_gpt.py"])
    assert args.step_timeout == "auto"
    assert cli.hang_watch_line("auto").startswith(
        "hangs are watched (--step-timeout auto): a rank whose step takes over 5x the median "
        "step time, at least 60 s (10x that for the first steps")
    assert cli.hang_watch_line("0").startswith("hangs are not watched (--step-timeout 0)")
