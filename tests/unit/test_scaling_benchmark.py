"""benchmarks/scaling.py's bookkeeping: the pair agreement rule and the cluster path (--emit, then --collect)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scaling  # noqa: E402


def _point(label: str, measured: float, predicted: float, n: int = 1024, family: str = "softmax") -> dict:
    return {"family": family, "seq_len": n, "label": label, "measured_s": measured, "predicted_s": predicted}


def test_pairs_agree_in_order_or_as_a_tie():
    points = [
        _point("a", 1.00, 2.0),
        _point("b", 1.50, 3.0),  # a < b measured and predicted: agree
        _point("c", 1.02, 2.05),  # a ~ c both within 5%: agree as a tie; b > c both: agree
        _point("d", 0.50, 4.0),  # faster than all measured, slowest predicted: three disagreements
        _point("e", 9.0, 1.0, n=2048),  # alone at its length: no pair
    ]
    result = scaling.pair_agreement(points, tie=0.05)
    assert result["pairs"] == 6 and result["agree"] == 3
    assert result["agree_strict"] == 3  # a-c in order too
    assert result["pairs_beyond_tie"] == 5 and result["agree_beyond_tie"] == 2
    assert len(result["disagreements"]) == 3 and all(
        " d " in line or "vs d" in line for line in result["disagreements"]
    )


def test_emit_then_collect(tmp_path, monkeypatch):
    grid = tmp_path / "grid"
    argv = ["scaling.py", "--emit", str(grid), "--nproc", "2", "--lengths", "256", "--set", "train.steps=3"]
    monkeypatch.setattr(sys, "argv", argv)
    scaling.main()
    record = json.loads((grid / "grid.json").read_text())
    lines = (grid / "configs.txt").read_text().splitlines()
    assert len(lines) == len(record["points"]) == len(scaling.grid([256], 2, list(scaling.FAMILIES)))
    # what the cluster's runs leave behind: a metrics file per run (here written by hand)
    for entry in record["points"]:
        cfg = scaling.run_config(entry, 2, 3, str(grid / "runs"), ("train.steps=3",))
        assert cfg.train.steps == 3 and Path(entry["config"]).is_file()
        sent = {name: nbytes for name, nbytes in scaling.predict(cfg, scaling.load_profile("h100"))["bytes"].items()}
        rows = [{"step": i + 1, "step_time_s": 0.1 * (i + 1), "comm_bytes_sent": sent} for i in range(3)]
        run_dir = Path(entry["run_dir"])
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, _, name = scaling._collect(scaling.argparse.Namespace(collect=str(grid), profile="h100", steps=None))
    assert name == "h100" and len(results) == len(record["points"])
    assert all(r["bytes_equal"] and r["measured_s"] == pytest.approx(0.25) for r in results)
