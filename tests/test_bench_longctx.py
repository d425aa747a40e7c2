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
    # per-step decode times: speed_new tokens, the first from the prefill, so speed_new - 1 timed steps
    assert all(len(r["step_ms"]) == 2 and all(s > 0 for s in r["step_ms"]) for r in rows.values())
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
    with pytest.warns(UserWarning, match="400 tokens is past this model's window of 256"):  # said, not refused
        result = longctx.run(model, tok, methods=methods, model_name="tiny", **TINY)
    check(result, methods)
    assert result["model_window"] == 256
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


def test_step_clock_times_each_decode_step_apart():
    clock = longctx._StepClock()
    clock.stamps = [10.0, 10.002, 10.005, 10.006]  # prefill ends at the first call; three decode steps follow
    assert clock.steps_ms() == [2.0, 3.0, 1.0]
    assert clock.per_token() == pytest.approx(0.002)


def test_cli_user_recipe_file_sizes_and_chart(tiny_dir, tmp_path, capsys):
    """What a user runs on their own model: a recipe file with an override, their own sizes, a chart."""
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"hfpatch_version": "1.0", "name": "mine", "description": "sink + window",
                                  "techniques": [{"type": "sink_window", "budget": 64, "sink": 2}]}))
    out = tmp_path / "out"
    code = main(["bench", "long-context", "--model", str(tiny_dir), "--recipe", f"{recipe}:sink=4",
                 "--recipe", "recycled-attention", "--needle-length", "260", "--trials", "1", "--budget", "64",
                 "--speed-length", "280", "--new-tokens", "4", "--no-perplexity", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "longctx.json").read_text())
    spec = f"{recipe}:sink=4"
    assert result["methods"] == [spec, "recycled-attention"] and result["ppl"] == {}
    assert set(result["niah"]["260"]) == {"full@all", f"{spec}@64", "recycled-attention@64"}
    rows = result["speed"]["280"]["methods"]
    assert f"{spec}, growable cache" in rows and all(len(r["step_ms"]) == 3 for r in rows.values())
    png = out / "longctx.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert str(png) in captured.err


def test_chart_without_needles_or_speed_is_still_drawn(tmp_path):
    result = {"machine": "m", "model": "tiny", "methods": ["quest"], "niah": {"300": {"full@all": "1/2",
              "quest@64": "0/2"}}, "ppl": {}, "speed": {}}
    written = longctx.save_report(result, tmp_path)
    assert [p.name for p in written] == ["longctx.json", "longctx.png"]
    assert longctx.save_report(result, tmp_path / "no_chart", chart=False)[-1].name == "longctx.json"


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "token-recycling"], "--recipe 'token-recycling' has no sparse decode attention"),
    (["--recipe", "./nowhere/mine.json"], "no such file"),
    (["--recipe", "recycled-attention:budgt=64"], "'budgt' matches no technique"),
    (["--needle-length", "10000000"], "longer than the prose on disk"),
    (["--needle-length", "40"], "needle length 40 is too short"),
    (["--no-perplexity", "--perplexity-length", "400"], "contradict"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, argv, message):
    code = main(["bench", "long-context", "--model", str(tiny_dir), "--out", str(tmp_path / "out"),
                 "--recipe", "sink-window", *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfpatch: error: ") and message in lines[0], captured.err
    assert not (tmp_path / "out" / "longctx.json").exists()


def test_a_recipe_the_model_refuses_is_named_before_measuring(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    model.config._attn_implementation = "flex_attention"  # what loading with that backend records
    with pytest.raises(ValueError, match=r"^recipe 'quest' on this model: .*sdpa"):
        longctx.run(model, tok, methods=("quest",), **TINY)
