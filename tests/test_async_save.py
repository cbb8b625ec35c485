"""The pieces of asynchronous checkpointing, without processes: the snapshot is step N's state
whatever happens to the live tensors afterwards, files appear whole or not at all, and a failed
background write surfaces in the training thread."""
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from magneto_dist.checkpoint import integrity, savers
from magneto_dist.checkpoint.tags import CheckpointDir
from magneto_dist.checkpoint.async_save import (BackgroundWriter, SnapshotCheckpointEngine,
                                                WriteBatch, snapshot, tensor_bytes,
                                                write_durably)
from magneto_dist.checkpoint.write_process import WriterProcess
from magneto_dist.config import load_config
from magneto_dist.errors import NoSpaceError
from magneto_dist.dims import ParallelDims
from magneto_dist.resilience.watchdog import StepWatchdog


class LossScaler:
    """Stands for DeepSpeed's loss scaler, an object in the ZeRO state dict that steps mutate."""

    def __init__(self, scale):
        self.cur_scale = scale


def test_a_snapshot_keeps_step_n_while_the_live_tensors_move_on():
    flat = torch.arange(10.0)
    state = {"param": flat[2:5], "moments": [flat.clone(), {"step": torch.tensor(3)}], "lr": 0.1,
             "loss_scaler": LossScaler(2.0 ** 16), "shape": torch.Size([2, 5])}
    copy = snapshot(state)
    flat.add_(100.0)                              # step N+1 changes the live tensors in place
    state["moments"][1]["step"] += 1
    state["loss_scaler"].cur_scale /= 2
    assert copy["param"].tolist() == [2.0, 3.0, 4.0]
    assert copy["moments"][1]["step"].item() == 3 and copy["lr"] == 0.1
    assert copy["loss_scaler"].cur_scale == 2.0 ** 16 and copy["shape"] == torch.Size([2, 5])
    # a view of a large buffer is copied compactly: torch.save would write its whole storage
    assert copy["param"].untyped_storage().nbytes() == 3 * 4
    assert tensor_bytes(copy) == 3 * 4 + 10 * 4 + 8


def test_a_durable_write_leaves_the_whole_file_and_no_temp_and_digests_it(tmp_path):
    path = str(tmp_path / "f.pt")
    entry = write_durably({"w": torch.ones(4)}, path)
    # the digest of the bytes as they went out is the file's, as the resume check reads it
    assert entry == integrity.record(str(tmp_path), ["f.pt"])["f.pt"]
    assert torch.load(path)["w"].tolist() == [1.0] * 4
    assert os.listdir(tmp_path) == ["f.pt"]


def test_the_writer_writes_in_the_background_and_reports_its_failure(tmp_path):
    writer = BackgroundWriter()
    batch = WriteBatch("global_step1", [(str(tmp_path / "a.pt"), {"x": torch.zeros(2)}),
                                        (str(tmp_path / "b.pt"), {"y": torch.ones(2)})])
    writer.submit(batch)
    assert writer.wait() is batch and batch.bytes_written > 0
    assert sorted(batch.records) == ["a.pt", "b.pt"]
    assert batch.bytes_written == sum(e["size"] for e in batch.records.values())
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"] and not writer.busy()
    writer.submit(WriteBatch("global_step2", [(str(tmp_path / "no" / "c.pt"), {})]))
    with pytest.raises(FileNotFoundError):
        writer.wait()
    assert writer.wait() is None  # nothing in flight any more


def test_the_engine_collects_snapshots_inside_a_managed_save_and_writes_outside_one(tmp_path):
    engine = SnapshotCheckpointEngine()
    live = torch.zeros(3)
    with engine.collecting(WriteBatch("t")) as batch:
        engine.save({"w": live}, str(tmp_path / "model.pt"))
    live.fill_(7.0)
    assert os.listdir(tmp_path) == []                       # nothing written yet
    assert batch.files[0][1]["w"].tolist() == [0.0, 0.0, 0.0] and batch.snapshot_bytes == 12
    engine.save({"w": live}, str(tmp_path / "direct.pt"))    # DeepSpeed's own use: written now
    assert torch.load(tmp_path / "direct.pt")["w"].tolist() == [7.0] * 3
    assert not engine.preserves_storage_sharing()


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class TimerClient:
    """Stands for torch elastic's FileTimerClient: records the deadlines asked for."""

    def __init__(self):
        self.deadlines = []

    def acquire(self, scope, deadline):
        self.deadlines.append(deadline)

    def release(self, scope):
        pass


def background_save(tmp_path, write):
    """An AsyncSaver on a stand-in engine whose write of one file goes through `write`."""
    cfg = load_config(None, [])
    engine = SimpleNamespace(_config=None, device=torch.device("cpu"))
    watchdog = StepWatchdog("30", timer_file=None)
    watchdog.enabled, watchdog.client = True, TimerClient()
    logged = []
    saver = savers.AsyncSaver(engine, str(tmp_path), cfg, ParallelDims.of(cfg, 1),
                              log=logged.append, keepalive=watchdog.renew, write=write)
    tag_dir = tmp_path / "global_step2"
    tag_dir.mkdir()
    batch = WriteBatch("global_step2", [(str(tag_dir / "model.pt"), {"w": torch.ones(8)})],
                       root=str(tag_dir), step=2)
    saver.writer.submit(batch)
    saver.current = savers.PendingSave(2, "global_step2", {"consumed_samples": 32}, batch, 0.1)
    return saver, watchdog, logged


def test_waiting_for_a_write_that_progresses_renews_the_watchdog_then_marks_the_tag(
        tmp_path, one_rank_group, monkeypatch):
    monkeypatch.setattr(savers, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(savers, "POLL_S", 0.02)

    def slow(obj, path, zipfile, count):  # 1.2 s of steady progress, then the file
        for _ in range(12):
            time.sleep(0.1)
            count(10)
        return write_durably(obj, path, zipfile, count)
    saver, watchdog, logged = background_save(tmp_path, slow)
    with watchdog.expires(long=True):
        saver.flush(at_step=5, reason="the save of step 4 is due")
    assert len(watchdog.client.deadlines) >= 5  # the first, then renewals during the wait
    assert saver.waits == 1 and "the save of step 4 is due while global_step2 is still being " \
                                "written: waiting for it" in logged[0]
    # complete, with the digest the writer took of the bytes it wrote
    assert CheckpointDir(str(tmp_path)).complete_tags() == ["global_step2"]
    assert CheckpointDir(str(tmp_path)).tag("global_step2").damage() is None
    assert (tmp_path / "latest").read_text() == "global_step2"


def test_a_write_that_stalls_does_not_renew_the_watchdog(tmp_path, one_rank_group, monkeypatch):
    monkeypatch.setattr(savers, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(savers, "POLL_S", 0.02)

    def stalled(obj, path, zipfile, count):  # no byte for 1 s (a hung filesystem)
        time.sleep(1.0)
        return write_durably(obj, path, zipfile, count)
    saver, watchdog, _ = background_save(tmp_path, stalled)
    start = time.time()
    with watchdog.expires(long=True):
        saver.flush(at_step=5)
    renewed_at = [d - watchdog.allowance(True) for d in watchdog.client.deadlines[1:]]
    assert renewed_at and min(renewed_at) > start + 0.9  # none while it stalled


def test_snapshots_reuse_their_shared_memory_and_a_full_dev_shm_is_named(monkeypatch):
    staging = {}
    first = snapshot({"w": torch.ones(3), "n": torch.tensor(1)}, staging, ("f.pt",))
    second = snapshot({"w": torch.full((3,), 2.0), "n": torch.tensor(2)}, staging, ("f.pt",))
    assert first["w"].is_shared() and second["w"].data_ptr() == first["w"].data_ptr()
    assert second["w"].tolist() == [2.0] * 3 and second["n"].item() == 2

    def no_room(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")
    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    with pytest.raises(NoSpaceError, match=r"checkpoint.async_save: no shared memory left .*"
                                           r"No space left on device.* enlarge /dev/shm"):
        snapshot({"new": torch.ones(5)}, staging, ("f.pt",))


def test_the_writer_process_writes_digests_and_reports_a_failure(tmp_path):
    process = WriterProcess()
    counted = []
    state = snapshot({"w": torch.arange(1000.0)}, {}, ("a.pt",))
    entry = process.write(state, str(tmp_path / "a.pt"), True, counted.append)
    assert entry == integrity.record(str(tmp_path), ["a.pt"])["a.pt"]
    assert sum(counted) == entry["size"]  # its progress, as the bytes went out
    assert torch.load(tmp_path / "a.pt")["w"].equal(torch.arange(1000.0))
    with pytest.raises(FileNotFoundError, match="no/b.pt"):
        process.write(state, str(tmp_path / "no" / "b.pt"), True, counted.append)
    process.process.kill()  # a writer that died is named, not waited for
    process.process.join()
    with pytest.raises(RuntimeError, match="the checkpoint writer process died"):
        process.write(state, str(tmp_path / "c.pt"), True, counted.append)
