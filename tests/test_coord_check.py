"""tools/coord_check.py: its growth figures come from the recorded RMS values, and muP keeps
the logits flat in width where the standard parametrization lets them grow."""
import json

from tools import coord_check


def test_growth_figures_are_the_recorded_rms_ratios(tmp_path, capsys):
    coord_check.main(["--widths", "32", "128", "--head-dim", "16", "--num-layers", "1",
                      "--steps", "2", "--seq-len", "8", "--batch-size", "2",
                      "--vocab-size", "64", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    recorded = json.loads((tmp_path / "coord_check.json").read_text())
    ratio = {name: recorded[name]["128"]["logits"][-1] / recorded[name]["32"]["logits"][-1]
             for name in ("standard", "mup")}
    assert last == ("coordinate check: output-logit growth over widths 32->128 after 2 steps: "
                    f"standard {ratio['standard']:.2f}x, mup {ratio['mup']:.2f}x")
    assert all(len(r["logits"]) == 3 and "layer 0" in r for r in recorded["mup"].values())
    # the claim the check exists for: 4x the width, the standard logits grow and muP's do not
    assert ratio["standard"] > 1.5 and 0.5 < ratio["mup"] < 1.5, ratio
    assert (tmp_path / "coord_check.png").stat().st_size > 0
