"""The universal form's record (verified before reuse) and the one-converter-per-filesystem lock
whose waiters watch progress instead of a fixed timeout, without DeepSpeed: fake forms, fake
holders, short stall times."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from magneto_dist import files
from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.checkpoint import reshard
from magneto_dist.files import ProgressLock


def fake_form(tmp_path):
    """A complete tag and a universal form of it as _convert leaves it (built.json last)."""
    tag_dir = tmp_path / "global_step5"
    tag_dir.mkdir(parents=True)
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps({"step": 5, "files": {}}))
    final = tag_dir / ckpt.UNIVERSAL
    for name in ("decoder.layers.0.ffn.fc1.weight", "embed.word.weight"):
        (final / "zero" / name).mkdir(parents=True)
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            (final / "zero" / name / f"{state}.pt").write_bytes(os.urandom(64))
    os.symlink("decoder.layers.0.ffn.fc1.weight", final / "zero" / "1.layer.fc1.weight")
    reshard.write_built(str(final), str(tag_dir), 1.0)
    return tag_dir, final


def problem(tag_dir, final):
    return reshard.universal_problem(str(final), reshard.source_identity(str(tag_dir)))


def test_a_damaged_universal_form_is_not_reused(tmp_path):
    """Deleting one parameter file of TAG/universal used to go unnoticed ("reusing the universal
    form", the weight left at its fresh init, the next tag marked complete with it)."""
    tag_dir, final = fake_form(tmp_path)
    assert problem(tag_dir, final) is None
    param = final / "zero" / "decoder.layers.0.ffn.fc1.weight"
    (param / "fp32.pt").unlink()
    assert problem(tag_dir, final) == f"{param}/fp32.pt is missing"
    tag_dir, final = fake_form(tmp_path / "b")
    with open(final / "zero" / "embed.word.weight" / "exp_avg.pt", "r+b") as f:
        f.write(b"\0" * 8)
    assert "embed.word.weight/exp_avg.pt has other contents than when saved" in \
        problem(tag_dir, final)


@pytest.mark.parametrize("change,expected", [
    ("extra", "zero/stray.pt was not part of it when built"),
    ("link", "its links (parameter aliases) changed since it was built"),
    ("source", "built from {'tag': 'global_step5', 'marker': "),
    ("old", "built without a record of its files (an older version)"),
    ("none", "not built"),
])
def test_a_universal_form_that_differs_in_any_way_is_not_reused(tmp_path, change, expected):
    tag_dir, final = fake_form(tmp_path)
    if change == "extra":
        (final / "zero" / "stray.pt").write_bytes(b"x")
    elif change == "link":
        os.remove(final / "zero" / "1.layer.fc1.weight")
        os.symlink("embed.word.weight", final / "zero" / "1.layer.fc1.weight")
    elif change == "source":  # the tag was saved again since
        (tag_dir / ckpt.COMPLETE).write_text(json.dumps({"step": 5, "files": {}, "time": 1}))
    elif change == "old":
        (final / reshard.BUILT).write_text('{"seconds": 3.0}')
    else:
        (final / reshard.BUILT).unlink()
    assert expected in problem(tag_dir, final)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_holder_and_a_dead_one_is_taken_over(tmp_path):
    path = str(tmp_path / "universal.lock")
    first, second = ProgressLock(path), ProgressLock(path)
    assert first.acquire() and not second.acquire()
    assert second.stale_holder() is None  # alive, on this host
    with open(path, "w") as f:  # the holder was killed
        json.dump({"host": socket.gethostname(), "pid": dead_pid(), "token": "t"}, f)
    assert second.stale_holder().endswith("is gone")
    assert second.take_over() and second.holder()["token"] == second.token
    first.release()  # not its lock any more: left alone
    assert second.holder()["token"] == second.token
    second.release()
    assert not os.path.exists(path)


def write_holder(path, progress, host="node-b", pid=1):
    with open(path + ".new", "w") as f:
        json.dump({"host": host, "pid": pid, "token": "b", "progress": progress}, f)
    os.replace(path + ".new", path)


def test_a_converter_on_another_host_is_stale_only_when_it_stops_progressing(tmp_path):
    """Waiters used to give up after a fixed 1,800 s (exit 3), which a 6.7B conversion can
    take; now they wait as long as the converter's progress moves, and no longer."""
    path = str(tmp_path / "universal.lock")
    waiter = ProgressLock(path, stall_s=0.5)
    for progress in range(12):  # 1.2 s of a moving converter, well past stall_s
        write_holder(path, progress)
        assert waiter.stale_holder() is None
        time.sleep(0.1)
    time.sleep(0.6)
    assert waiter.stale_holder().startswith("node-b pid 1 made no progress for ")


def test_the_holders_heartbeat_writes_its_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(ProgressLock, "HEARTBEAT_S", 0.05)
    path = str(tmp_path / "universal.lock")
    holder, waiter = ProgressLock(path), ProgressLock(path, stall_s=0.3)
    done = [0]
    assert holder.acquire()
    holder.start_heartbeat(lambda: done[0])
    for _ in range(10):
        done[0] += 1
        time.sleep(0.1)
        assert waiter.stale_holder() is None
    assert waiter.holder()["progress"] > 0
    time.sleep(0.5)  # the work stops; the heartbeat goes on but says nothing new
    assert "made no progress" in waiter.stale_holder()
    holder.release()
    assert not os.path.exists(path)


def test_a_loader_waits_while_the_conversion_progresses(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "STALL_S", 0.5)
    monkeypatch.setattr(reshard, "POLL_S", 0.05)
    tag_dir, built = fake_form(tmp_path / "built")
    final = tmp_path / "global_step5" / ckpt.UNIVERSAL
    final.parent.mkdir(exist_ok=True)
    (final.parent / ckpt.COMPLETE).write_text((tag_dir / ckpt.COMPLETE).read_text())

    def converter():
        for progress in range(15):  # 1.5 s, three times the stall time
            write_holder(f"{final}.lock", progress)
            time.sleep(0.1)
        os.rename(built, final)  # the same source identity: an identical marker
    thread = threading.Thread(target=converter)
    thread.start()
    reshard._wait_as_loader(str(final), reshard.source_identity(str(final.parent)),
                            str(tmp_path / "failed"))
    thread.join()
    assert (final / reshard.BUILT).exists()


def test_a_loader_gives_up_without_progress_or_on_the_builders_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "STALL_S", 0.3)
    monkeypatch.setattr(reshard, "POLL_S", 0.05)
    final = str(tmp_path / "universal")
    with pytest.raises(reshard.ReshardError, match=r"without progress \(no converter\)"):
        reshard._wait_as_loader(final, {"tag": "global_step5", "marker": None}, "absent")
    write_holder(final + ".lock", 7)
    with pytest.raises(reshard.ReshardError, match=r"without progress \(node-b pid 1 made no "):
        reshard._wait_as_loader(final, {"tag": "global_step5", "marker": None}, "absent")
    failed = tmp_path / "universal.failed"
    failed.write_text("CheckpointError: converting failed")
    with pytest.raises(reshard.ReshardError, match="local rank 0 failed to build the universal "
                       "form .*: CheckpointError: converting failed"):
        reshard._wait_as_loader(final, {"tag": "global_step5", "marker": None}, str(failed))


def test_a_universal_form_is_built_where_its_parent_does_not_exist_yet(tmp_path, monkeypatch):
    """An export builds it one level down in scratch space (work/universal/universal): the lock
    beside it needs that folder (FileNotFoundError before)."""
    tag_dir, _ = fake_form(tmp_path)
    final = tmp_path / "work" / "universal" / "universal"

    def convert(tag_dir_, final_, lock, log, quiet, faults, rank):
        assert os.path.exists(f"{final_}.lock")  # held while converting
        os.makedirs(final_)
    monkeypatch.setattr(reshard, "_convert", convert)
    assert reshard.build_universal(str(tag_dir), log=lambda m: None, final=str(final)) == \
        str(final)
    assert final.is_dir() and not os.path.exists(f"{final}.lock")
