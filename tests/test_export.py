"""Consolidated exports without an engine: the streamed safetensors writer, the checks that
guard checkpoint.init_from, loading, and tools/convert_checkpoint.py's refusals (exit 3, the
input untouched)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from magneto_dist.checkpoint import export
from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.config import config_to_dict, dump_config, load_config
from magneto_dist.model import build_model
from magneto_dist.dims import ParallelDims

from tools import convert_checkpoint

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
         "model.ffn_hidden_size=64", "model.max_seq_len=16", "model.vocab_size=50"]


def export_of(tmp_path, cfg, shapes_changed=None, extra=None):
    """An export directory as tools/convert_checkpoint.py writes it, from a fresh model."""
    torch.manual_seed(0)
    weights = {n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()}
    weights.update(shapes_changed or {})
    weights.update(extra or {})
    out = tmp_path / "export"
    out.mkdir()
    save_file(weights, str(out / export.WEIGHTS))
    (out / export.CONFIG).write_text(json.dumps({"model": config_to_dict(cfg)["model"]}))
    return out, weights


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_safetensors_file_reads_back_with_safetensors_alone(tmp_path, dtype):
    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7), "c": torch.randn(2, 2, 2)}
    shapes = {name: t.shape for name, t in tensors.items()}
    path = str(tmp_path / "w.safetensors")
    export.write_safetensors(path, shapes, export.DTYPES[dtype], iter(tensors.items()),
                             {"format": "pt"})
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor.to(export.DTYPES[dtype]))


def test_consolidated_export_reads_back_exactly(tmp_path):
    cfg = load_config(None, SMALL)
    out, weights = export_of(tmp_path, cfg)
    export.check_consolidated(str(out), cfg)
    full = export.consolidated_weights(str(out))
    for name, _ in build_model(cfg.model).named_parameters():
        assert torch.equal(full(name), weights[name]), name


def digested_export(tmp_path, tensors):
    """An export as export_safetensors writes it: the file streamed, each tensor's digest in
    config.json."""
    out = tmp_path / "digested"
    out.mkdir()
    digests = export.write_safetensors(str(out / export.WEIGHTS),
                                       {n: t.shape for n, t in tensors.items()}, torch.float32,
                                       iter(tensors.items()), {"format": "pt"})
    (out / export.CONFIG).write_text(json.dumps({"model": {}, "digest": "xxh3_64",
                                                 "digests": digests}))
    return out


def test_init_from_refuses_a_tensor_changed_since_export_by_name(tmp_path):
    tensors = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(8)}
    out = digested_export(tmp_path, tensors)
    full = export.consolidated_weights(str(out))
    assert torch.equal(full("a.weight"), tensors["a.weight"])
    data = bytearray((out / export.WEIGHTS).read_bytes())
    data[-4:] = torch.tensor([123.0]).numpy().tobytes()  # b.weight's last value, same size
    (out / export.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors: parameter 'b.weight' has "
                       r"other contents than when exported \(xxh3_64 [0-9a-f]{16}, [0-9a-f]{16} "
                       r"recorded\); export the checkpoint again"):
        export.consolidated_weights(str(out))("b.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_init_from_refuses_non_finite_weights_by_name(tmp_path, bad):
    """An export of a run that had diverged trained on NaN from its first step."""
    weights = torch.randn(3, 3)
    weights[1, 2] = bad
    out = digested_export(tmp_path, {"a.weight": torch.randn(2), "decoder.w": weights})
    full = export.consolidated_weights(str(out))
    full("a.weight")
    with pytest.raises(ckpt.CheckpointError, match=r"parameter 'decoder.w' has 1 NaN or inf "
                       r"value\(s\) of 9; start from an export of a checkpoint written before"):
        full("decoder.w")


def test_init_from_refuses_what_does_not_fit_the_model(tmp_path):
    cfg = load_config(None, SMALL)
    with pytest.raises(ckpt.CheckpointError, match="not a consolidated export"):
        export.check_consolidated(str(tmp_path / "absent"), cfg)
    out, _ = export_of(tmp_path, cfg, shapes_changed={
        "decoder.layers.1.ffn.fc1.weight": torch.zeros(64, 31)})
    with pytest.raises(ckpt.CheckpointError,
                       match=r"parameter 'decoder.layers.1.ffn.fc1.weight' is "
                       r"\[64, 31\], the model config needs \[64, 32\]"):
        export.check_consolidated(str(out), cfg)
    wider = load_config(None, SMALL + ["model.ffn_hidden_size=128"])
    with pytest.raises(ckpt.CheckpointError, match="holds another model: model.ffn_hidden_size: "
                       "checkpoint 64, config 128"):
        export.check_consolidated(str(out), wider)
    (out / export.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ckpt.CheckpointError, match="unreadable safetensors file"):
        export.check_consolidated(str(out), cfg)
    (out / export.CONFIG).write_text('{"model_type": "gpt2"}')  # another library's model
    with pytest.raises(ckpt.CheckpointError, match="config.json: not the config of an export of "
                       "this project"):
        export.check_consolidated(str(out), cfg)


def test_init_from_refuses_parameters_the_model_lacks(tmp_path):
    cfg = load_config(None, SMALL)
    out, _ = export_of(tmp_path, cfg, extra={"decoder.layers.2.ffn.fc1.weight": torch.zeros(1)})
    with pytest.raises(ckpt.CheckpointError, match="parameters the model does not have: "
                       r"\['decoder.layers.2.ffn.fc1.weight'\]"):
        export.check_consolidated(str(out), cfg)


def fake_tag(tmp_path, complete=True, zero_stage=1):
    tag_dir = tmp_path / "checkpoints" / "global_step5"
    tag_dir.mkdir(parents=True)
    cfg = load_config(None, SMALL + [f"train.zero_stage={zero_stage}"])
    dump_config(cfg, str(tag_dir / "config.yaml"))
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        (tag_dir / ckpt.COMPLETE).write_text(json.dumps({
            "step": 5, "world_size": 1, "layout": ParallelDims.of(cfg, 1).layout,
            "files": ckpt.record_tag(str(tag_dir))}))
    return tag_dir


def convert(capsys, *argv):
    code = convert_checkpoint.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,expected", [
    ("not_a_dir", "is not a directory; pass a checkpoint tag"),
    ("no_config", "is not a checkpoint of this project (no config.yaml)"),
    ("incomplete", "is incomplete (no complete.json: its save was interrupted)"),
    ("damaged", "is damaged: "),
    ("output_exists", "already exists; choose a new directory"),
    ("zero0_universal", "was written without ZeRO (train.zero_stage=0)"),
])
def test_converter_refuses_bad_input_with_exit_3_and_writes_nothing(tmp_path, capsys, case,
                                                                    expected):
    tag_dir, out, to = tmp_path / "checkpoints" / "global_step5", tmp_path / "out", "universal"
    if case == "no_config":
        tag_dir.mkdir(parents=True)
    elif case != "not_a_dir":
        fake_tag(tmp_path, complete=case != "incomplete",
                 zero_stage=0 if case == "zero0_universal" else 1)
    if case == "damaged":
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if case == "output_exists":
        out.mkdir()
        to = "safetensors"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = convert(capsys, "--input", str(tag_dir), "--to", to, "--output", str(out))
    assert code == 3 and expected in err, err
    assert err.startswith("checkpoint error: --input" if case != "output_exists"
                          else "checkpoint error: --output")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
