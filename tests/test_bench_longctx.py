"""hfpatch.apps.bench.longctx and `hfpatch bench long-context` on a tiny random Llama with a character-level
tokenizer (no real model). Timings are not checked: only that every cell is there and consistent."""
from __future__ import annotations

import json

import pytest
from test_bench import char_tokenizer
from tiny_models import tiny_model

from hfpatch.apps.bench import longctx
from hfpatch.apps.cli import main

TINY = dict(niah_lengths=(300,), trials=2, ppl_lengths=(400,), ppl_docs=1, ppl_tail=6, budgets=(64, 128),
            speed_lengths=(300,), speed_new=3, speed_budget=64, rounds=1)


def check(result, methods):
    assert set(result["niah"]["300"]) == {"full@all"} | {f"{m}@{b}" for m in methods for b in (64, 128)}
    assert all(v.endswith("/2") and 0 <= int(v.split("/")[0]) <= 2 for v in result["niah"]["300"].values())
    ppl = result["ppl"]["400"]
    assert ppl["full@all"]["vs_full"] == "+0.00%" and all(c["tokens"] == 5 for c in ppl.values())
    rows = result["speed"]["300"]["methods"]
    assert list(rows) == ["full, DynamicCache", "full, growable cache"] + [f"{m}, growable cache" for m in methods]
    assert rows["full, DynamicCache"]["vs_full_dynamic"] == 1.0
    assert all(r["ms_per_token"] > 0 and r["vs_full_growable"] > 0 for r in rows.values())
    assert len(result["speed"]["300"]["load_average_1/5/15"]) == 3  # before + after each of 2 rounds
    report = longctx.format_report(result)
    for m in methods:
        assert m in report
    assert "| needle | 300 | 64 |" in report and "| perplexity, last 5 tokens | 400 | 128 |" in report
    assert "vs full, growable cache" in report and "cores" in report and "in-place" not in report


def test_run_gives_every_cell_side_by_side():
    model, tok = tiny_model("llama"), char_tokenizer()
    methods = ("recycled-attention:drift_threshold=0.9,stride=8", "tidal-decode")
    assert longctx.parse_method(methods[0]) == ("recycled-attention", {"drift_threshold": 0.9, "stride": 8})
    assert longctx.parse_method("tidal-decode:selection_layers=[2,12,20],budget=64") == (
        "tidal-decode", {"selection_layers": [2, 12, 20], "budget": 64})
    result = longctx.run(model, tok, methods=methods, model_name="tiny", **TINY)
    check(result, methods)
    assert result["settings"]["budgets"] == (64, 128)
    with pytest.raises(TypeError, match="unknown size settings"):
        longctx.run(model, tok, context=5)


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(longctx, "DEFAULTS", TINY)
    return tmp_path / "m"


def test_cli_long_context_subcommand(tiny_dir, tmp_path, capsys):
    code = main(["bench", "long-context", "--model", str(tiny_dir), "--recipe", "sink-window",
                 "--recipe", "quest", "--threads", "1", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| needle | 300 |" in captured.out and "sink-window, growable cache" in captured.out
    assert "new spelling" not in captured.err
    check(json.loads((tmp_path / "out" / "longctx.json").read_text()), ("sink-window", "quest"))


def test_cli_long_context_flag_still_works(tiny_dir, tmp_path, capsys):
    code = main(["bench", "--long-context", "--model", str(tiny_dir), "--recipe", "sink-window",
                 "--recipe", "quest", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "'hfpatch bench long-context' is the new spelling" in captured.err
    assert "| needle | 300 |" in captured.out and "sink-window, growable cache" in captured.out
    check(json.loads((tmp_path / "out" / "longctx.json").read_text()), ("sink-window", "quest"))
