"""The pieces of asynchronous checkpointing, without processes: the snapshot is step N's state
whatever happens to the live tensors afterwards, files appear whole or not at all, and a failed
background write surfaces in the training thread."""
import os

import pytest
import torch

from magneto_dist.checkpoint import integrity
from magneto_dist.checkpoint.async_save import (BackgroundWriter, SnapshotCheckpointEngine,
                                                WriteBatch, snapshot, tensor_bytes,
                                                write_durably)


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
