"""`hfpatch kernels list` and `hfpatch kernels build`, in-process (the builder is stubbed where it would compile)."""
from __future__ import annotations

import json

import pytest

from hfpatch.apps import cli
from hfpatch.kernels import cpu_build, list_kernels


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_op_its_backends_auto_choice_and_build_state(capsys, monkeypatch):
    monkeypatch.delenv("HFPATCH_KERNELS", raising=False)
    monkeypatch.setattr(cpu_build, "build", lambda source: pytest.fail("list must not build"))
    code, out, _ = run_cli(capsys, "kernels", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(list_kernels())
    sparse = rows["sparse_decode_attention"]
    assert sparse["backends"] == ["torch", "triton", "cpu"] and sparse["compiled_source"] == "sparse_decode.cpp"
    assert sparse["build_state"] in ("loaded", "built", "not built") or sparse["build_state"].startswith("failed")
    assert rows["logprob_gather"]["auto_cpu"] == "torch (no CPU implementation)"
    code, out, _ = run_cli(capsys, "kernels", "list")
    assert code == 0 and "sparse_decode_attention" in out and "HFPATCH_KERNELS unset (auto)" in out


def test_list_reports_a_failed_build_and_the_environment_switch(capsys, monkeypatch):
    monkeypatch.setitem(cpu_build._failures, "sparse_decode.cpp", "RuntimeError: no compiler")
    code, out, _ = run_cli(capsys, "kernels", "list", "--json")
    row = {r["name"]: r for r in json.loads(out)}["lowrank_sparse_decode"]
    assert row["build_state"] == "failed: RuntimeError: no compiler"
    assert row["auto_cpu"].startswith("torch (the compiled kernel failed")
    monkeypatch.setenv("HFPATCH_KERNELS", "torch")
    code, out, _ = run_cli(capsys, "kernels", "list", "--json")
    assert all(r["auto_cpu"] == "torch (HFPATCH_KERNELS=torch)" for r in json.loads(out))


def test_build_builds_every_compiled_source_with_progress(capsys, monkeypatch):
    built = []
    monkeypatch.setattr(cpu_build, "missing_tools", lambda: [])
    monkeypatch.setattr(cpu_build, "build", lambda source: built.append(source))
    code, out, err = run_cli(capsys, "kernels", "build")
    assert code == 0, err
    assert built == list(cpu_build.compiled_sources()) and "sparse_decode.cpp" in built
    assert "[1/" in out and "sparse_decode.cpp" in out and "ready in" in out


def test_build_without_a_compiler_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(cpu_build, "missing_tools", lambda: ["a C++ compiler ('c++' is not on PATH; e.g. apt-get install g++, or set CXX)"])
    monkeypatch.setattr(cpu_build, "build", lambda source: pytest.fail("must not try to build"))
    code, out, err = run_cli(capsys, "kernels", "build")
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hfpatch: error:")]
    assert len(lines) == 1 and "C++ compiler" in lines[0] and "apt-get install g++" in lines[0]


def test_build_failure_names_the_source_and_reason(capsys, monkeypatch):
    monkeypatch.setattr(cpu_build, "missing_tools", lambda: [])
    monkeypatch.setattr(cpu_build, "build", lambda source: "CalledProcessError: error: expected ';'")
    code, out, err = run_cli(capsys, "kernels", "build")
    assert code == 2 and "FAILED: CalledProcessError" in out
    assert "sparse_decode.cpp (CalledProcessError" in err


def test_missing_tools_names_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert any("no-such-compiler-xyz" in m for m in cpu_build.missing_tools())
