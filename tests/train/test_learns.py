"""The README's main command, shortened for CI: the default model on the synthetic motion
task learns well above chance. (The full default run reaches > 90%; see the README.)"""

import json

from divattn.__main__ import main


def test_default_run_shortened_learns_well_above_chance(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "-o", str(out), "train.epochs=4", "data.synthetic.train_size=2048",
               "data.synthetic.val_size=512", "log.tensorboard=false", "log.progress=false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_items"] == 512 and summary["epochs"] == 4
    # four classes: chance is 25%; 512 items put chance's spread near 2%
    assert summary["val_top1"] >= 40.0, summary
