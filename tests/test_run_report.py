"""tools/run_report.py on run directories written by hand: what the page and its PNG show, each
kind of event marked where it happened, several runs side by side, and bad input. Real runs
(1 rank, 2 ranks, resumed) are rendered by tests/dist/test_observe.py."""
import json
import math
import os

import numpy as np
import yaml
from matplotlib.figure import Figure

from magneto_dist.report import figures
from magneto_dist.report.page import write_report
from magneto_dist.report.runs import load_run, unique_labels
from tools.run_report import main

SEQ, BATCH = 32, 8


def train(step, t, skipped=0, mfu=None):
    return {"split": "train", "step": step, "loss": 7.0 * math.exp(-step / 40) + 2.0,
            "lr": 1e-3, "grad_norm": 1.0 + 0.1 * math.sin(step), "tokens_per_s": 9000.0,
            "tflops_per_device": 0.01, "mfu": mfu, "memory_gb": 0.5,
            "consumed_samples": BATCH * step, "skipped_steps": skipped, "time": t}


def write_run(run_dir, rows, incidents=(), layout=None):
    os.makedirs(run_dir, exist_ok=True)
    startup = {"split": "startup", "step": 1, "startup_seconds": 3.0, "compile_seconds": None,
               "layout": layout or {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1}, "time": 1.0}
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [startup, *rows])
    with open(os.path.join(run_dir, "restarts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in incidents)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": {"max_seq_len": SEQ, "num_layers": 2, "norm": "magneto"},
                        "train": {"global_batch_size": BATCH, "lr": 1e-3}}, f)
    return str(run_dir)


def resumed_run(run_dir):
    """40 steps; a spike row (the spike helper's split) at 12; killed after step 24 and resumed
    from step 20 (the launcher's incident says why); steps 3-4 skipped; a straggler at 30."""
    rows = [train(s, 10.0 + s, skipped=int(s in (3, 4))) for s in range(1, 25)]
    rows.append({"split": "spike", "step": 12, "loss": 9.0, "action": "skipped", "time": 22.5})
    rows.append({"split": "resume", "step": 20, "tag": "global_step20", "time": 60.0,
                 "process_start": 55.0, "load_start": 58.0})
    rows += [train(s, 40.0 + s) for s in range(21, 41)]
    rows.append({"split": "straggler", "step": 30, "rank": 1, "host": "node-b",
                 "section": "data", "ratio": 300.0, "slowdown": 6.2, "late_s": 0.5,
                 "step_s": 0.6, "first_step": 21, "time": 70.5})
    rows += [{"split": "valid", "step": s, "loss": 4.0, "ppl": 54.6, "time": 40.0 + s}
             for s in (20, 40)]
    incident = {"time": 50.0, "attempt": 0, "node": "node-a", "rank": 1, "cause": "hang",
                "step_reached": 24, "resumed_from": 20, "seconds_lost": 4.0,
                "seconds_stalled": 10.0, "where": None, "slow": []}
    return write_run(run_dir, rows, [incident], {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1})


def pixels(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def curve_pixels(path, run=0) -> int:
    """Pixels of the PNG in the colour of the `run`-th run's curves (tab10): a drawn curve has
    thousands, a blank or empty panel only its legend's few."""
    import matplotlib
    rgb = np.array(matplotlib.colormaps["tab10"](run)[:3])
    return int((np.abs(pixels(path)[:, :, :3] - rgb).max(axis=2) < 0.08).sum())


def test_the_page_shows_every_event_where_it_happened(tmp_path, monkeypatch):
    run = resumed_run(tmp_path / "run")
    drawn = []
    real = figures.draw_curves
    monkeypatch.setattr("magneto_dist.report.page.draw_curves",
                        lambda runs, path: drawn.append(real(runs, path)))
    page = write_report([run], str(tmp_path / "out"))
    (fig,) = drawn
    marks = {}
    for ax in fig.axes:
        for artist in ax.get_children():
            marks.setdefault(artist.get_gid(), []).append(artist)
    tokens = lambda step: step * BATCH * SEQ  # noqa: E731
    (spike,) = marks["spike"]
    assert list(spike.get_xdata()) == [tokens(12)] and list(spike.get_ydata()) == [9.0]
    (straggler,) = marks["straggler"]
    assert list(straggler.get_xdata()) == [tokens(30)]
    (skipped,) = marks["skipped"]
    assert list(skipped.get_xdata()) == [tokens(3), tokens(4)]
    assert len(marks["restart"]) == 6  # the resume at step 20, in every panel
    assert all(line.get_xdata()[0] == tokens(20) for line in marks["restart"])
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"skipped", "hang", "rank 1: data"} <= texts, texts
    with open(page) as f:
        text = f.read()
    assert '<img src="curves.png"' in text
    for expected in ("node-b", "global_step20", "<td>hang</td>", "<td>skipped</td>",
                     "TP1 x PP1 x DP2 (ZeRO-1), 2 ranks", "model.num_layers: 2"):
        assert expected in text, expected
    image = pixels(tmp_path / "out" / "curves.png")
    assert image.shape[1] >= 1500 and image.std() > 0.05  # not a blank canvas
    assert curve_pixels(tmp_path / "out" / "curves.png") > 3000  # and the curves are on it


def test_the_replayed_steps_are_drawn_once(tmp_path):
    run = load_run(resumed_run(tmp_path / "run"))
    assert [r["step"] for r in run.train] == list(range(1, 41))
    assert [r["step"] for r in run.split("spike")] == [12]  # before the resume point: kept
    assert run.restarts() == [{"step": 20, "tag": "global_step20", "cause": "hang"}]
    assert list(run.tokens([10, 50])) == [10 * BATCH * SEQ, 50 * BATCH * SEQ]


def test_runs_side_by_side_share_the_axes_and_list_the_keys_that_differ(tmp_path):
    a = write_run(tmp_path / "a" / "run", [train(s, float(s), mfu=0.3) for s in range(1, 11)])
    b = write_run(tmp_path / "b" / "run", [train(s, float(s), mfu=0.2) for s in range(1, 6)])
    with open(os.path.join(b, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["train"]["lr"] = 3e-3
    with open(os.path.join(b, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    assert main([a, b, "--out", str(tmp_path / "both")]) == 0
    with open(tmp_path / "both" / "report.html") as f:
        text = f.read()
    assert "a/run" in text and "b/run" in text  # told apart by their parents
    assert "<td>train.lr</td><td>0.001</td><td>0.003</td>" in text
    assert "30.0%" in text and "20.0%" in text  # median MFU
    assert min(curve_pixels(tmp_path / "both" / "curves.png", run) for run in (0, 1)) > 2000


def test_every_title_label_and_legend_stays_on_the_canvas(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    runs = [load_run(resumed_run(tmp_path / name)) for name in ("one", "two")]
    figures.draw_curves(runs, str(tmp_path / "x.png"))
    (fig,) = saved
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
    boxes += [t.get_window_extent(renderer) for t in (fig._suptitle, *fig.legends)]
    assert len(boxes) == 8
    for box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1 \
            and box.y1 <= fig.bbox.y1 + 1, box


def test_a_run_without_steps_renders_and_a_directory_without_metrics_is_refused(tmp_path,
                                                                               capsys):
    empty = write_run(tmp_path / "fresh", [])
    assert main([empty]) == 0
    png = os.path.join(empty, "report", "curves.png")
    assert pixels(png).std() > 0.05 and curve_pixels(png) < 200  # panels that say so, no curve
    assert main([str(tmp_path / "nothing")]) == 2
    assert "is not a run directory: it has no metrics.jsonl" in capsys.readouterr().err


def test_labels_are_the_shortest_unique_tails():
    assert unique_labels(["/x/a/run", "/x/b/run"]) == ["a/run", "b/run"]
    assert unique_labels(["/x/one", "/y/two"]) == ["one", "two"]


def test_each_attempt_s_layout_is_listed_once_with_cp_named_when_used(tmp_path):
    run_dir = write_run(tmp_path / "run", [train(1, 2.0)], layout={"tp": 1, "pp": 1, "dp": 1,
                                                                  "zero_stage": 1})
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        for layout in ({"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1},
                       {"tp": 2, "cp": 2, "pp": 1, "dp": 1, "zero_stage": 1}):
            f.write(json.dumps({"split": "startup", "step": 2, "layout": layout, "time": 3.0})
                    + "\n")
    assert load_run(run_dir).layouts() == ["TP1 x PP1 x DP1 (ZeRO-1), 1 rank",
                                           "TP2 x CP2 x PP1 x DP1 (ZeRO-1), 4 ranks"]
