"""The ``veilnet`` command line, run in-process through ``node.cli.main`` (the real subprocess
run is in tests/network/test_cli_network.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import Manifest, Pipeline
from node.cli import main


def independent_cid(data: bytes) -> str:
    raw = b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def mlp_onnx(path: Path, width: int = 8, layers: int = 4) -> Path:
    """x -> [MatMul, Add, Relu] x layers -> y; layer i writes h{i} (the last one writes y)."""
    rng = np.random.default_rng(21)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        for name, shape in ((f"W{i}", (width, width)), (f"b{i}", (width,))):
            inits.append(numpy_helper.from_array(
                (rng.standard_normal(shape) / np.sqrt(width)).astype(np.float32), name))
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"l{i}/mm"]),
                  helper.make_node("Add", [f"l{i}/mm", f"b{i}"], [f"l{i}/add"]),
                  helper.make_node("Relu", [f"l{i}/add"], [out])]
        prev = out
    graph = helper.make_graph(
        nodes, "cli_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--help"], ["usage: veilnet", "model"]),
        (["model", "--help"], ["usage: veilnet model", "import", "encrypt", "verify", "run"]),
        (["model", "import", "--help"], ["usage: veilnet model import", "SOURCE", "--out",
                                         "--node-shards", "--cut"]),
        (["model", "encrypt", "--help"], ["usage: veilnet model encrypt", "DIR", "--out",
                                          "--seed"]),
        (["model", "verify", "--help"], ["usage: veilnet model verify", "DIR", "--node-only"]),
        (["model", "run", "--help"], ["usage: veilnet model run", "TEXT", "--json",
                                      "--threads"]),
    ],
    ids=["veilnet", "model", "import", "encrypt", "verify", "run"],
)
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]) -> None:
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    for word in words:
        assert word in out


def test_query_help_says_what_is_secret(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "query", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--allow-unverified" in text
    assert "DEPLOY/client/ is the secret" in text and "mode 0600" in text
    assert "key.json is not read by queries" in text


@pytest.mark.parametrize("argv", [[], ["model"], ["model", "frobnicate"],
                                  ["model", "import", "minilm"]],
                         ids=["nothing", "model-only", "unknown-subcommand", "missing-out"])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "usage: veilnet" in err
    assert out == ""


# --- verify --------------------------------------------------------------------------------------


def test_verify_ok(capsys: pytest.CaptureFixture[str], minilm_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "model", "verify", str(minilm_dir))
    assert code == 0
    assert out.startswith("ok")
    assert independent_cid((minilm_dir / "manifest.json").read_bytes()) in out
    assert "4 shard files" in out
    code, out, _ = run_cli(capsys, "model", "verify", "--node-only", str(minilm_dir))
    assert code == 0 and "2 shard files" in out


def test_verify_deployment_ok(capsys: pytest.CaptureFixture[str], deployment_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "model", "verify", str(deployment_dir))
    assert code == 0 and out.startswith("ok")


def test_verify_tampered(capsys: pytest.CaptureFixture[str], minilm_dir: Path,
                         tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(minilm_dir, copy_dir)
    tail = Manifest.load(copy_dir).tail
    path = copy_dir / tail.path
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "model", "verify", str(copy_dir))
    assert code == 1
    assert "FAIL" in out and f"shard {tail.index}" in out and tail.cid in out
    assert "ok" not in out
    # a node only holds node shards, and those are intact
    code, out, _ = run_cli(capsys, "model", "verify", "--node-only", str(copy_dir))
    assert code == 0


def test_verify_missing_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "model", "verify", str(tmp_path / "nowhere"))
    assert code == 2
    assert "veilnet: error:" in err and "no such manifest" in err


# --- import argument errors ----------------------------------------------------------------------


@pytest.mark.parametrize("k", ["0", "7", "-1"])
def test_import_minilm_node_shards_out_of_range(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, k: str) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "model", "import", "minilm", "--node-shards", k,
                                "--out", str(out))
    assert code == 2
    assert "--node-shards" in err and "between 1 and 6" in err
    assert stdout == ""
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_import_onnx_without_cut(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = mlp_onnx(tmp_path / "some.onnx")
    code, stdout, err = run_cli(capsys, "model", "import", str(src), "--out",
                                str(tmp_path / "out"))
    assert code == 2
    assert "some.onnx" in err and "--cut" in err
    assert stdout == ""
    assert not (tmp_path / "out").exists()


def test_import_minilm_with_cut(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stdout, err = run_cli(capsys, "model", "import", "minilm", "--cut", "a", "b",
                                "--out", str(tmp_path / "out"))
    assert code == 2
    assert "--cut" in err and "--node-shards" in err
    assert stdout == ""
    assert not (tmp_path / "out").exists()


def test_import_onnx_node_shards_mismatch(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    src = mlp_onnx(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "model", "import", str(src), "--cut", "h0", "h1", "h2",
                           "--node-shards", "3", "--out", str(tmp_path / "out"))
    assert code == 2 and "--node-shards" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("cuts", "needle"), [(["h0", "nope"], "'nope'"),
                                              (["x", "h1"], "'x'"),
                                              (["h1", "h0"], "'h1'")])
def test_import_onnx_bad_cuts(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                              cuts: list[str], needle: str) -> None:
    src = mlp_onnx(tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "model", "import", str(src), "--cut", *cuts, "--out",
                           str(tmp_path / "out"))
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("veilnet: error:") and needle in error
    assert not (tmp_path / "out").exists()


def test_import_missing_onnx_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "model", "import", str(tmp_path / "absent.onnx"), "--cut",
                           "a", "b", "--out", str(tmp_path / "out"))
    assert code == 2 and "absent.onnx" in err


# --- import / encrypt / run a user model ---------------------------------------------------------


def test_import_encrypt_user_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = mlp_onnx(tmp_path / "m.onnx")
    model_dir = tmp_path / "model"
    code, out, err = run_cli(capsys, "model", "import", str(src), "--cut", "h0", "h1", "h2",
                             "--out", str(model_dir))
    assert code == 0, err
    report = json.loads(out)
    assert report["cid"] == independent_cid((model_dir / "manifest.json").read_bytes())
    assert [s["role"] for s in report["shards"]] == ["client-head", "node", "node",
                                                     "client-tail"]
    for shard in report["shards"]:
        assert independent_cid((model_dir / f"{shard['cid']}.onnx").read_bytes()) == shard["cid"]
    assert "veilnet:" in err  # progress goes to stderr

    deploy = tmp_path / "deploy"
    code, out, err = run_cli(capsys, "model", "encrypt", str(model_dir), "--out", str(deploy),
                             "--seed", "5")
    assert code == 0, err
    report = json.loads(out)
    assert report["cid"] == independent_cid((deploy / "manifest.json").read_bytes())
    assert Path(report["key"]) == deploy / "client" / "key.json"
    assert len(report["node_shards"]) == 2
    for cid in report["node_shards"]:
        assert independent_cid((deploy / "shards" / f"{cid}.onnx").read_bytes()) == cid

    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(Pipeline(deploy).run({"x": x})["y"],
                               Pipeline(model_dir).run({"x": x})["y"], atol=1e-4)

    # encrypting again into the now non-empty deployment directory is refused
    before = sorted(p.name for p in deploy.rglob("*"))
    code, out, err = run_cli(capsys, "model", "encrypt", str(model_dir), "--out", str(deploy))
    assert code == 2
    assert "not empty" in err and str(deploy) in err
    assert out == ""
    assert sorted(p.name for p in deploy.rglob("*")) == before
    assert list(tmp_path.glob(".deploy.partial-*")) == []

    # a model without a tokenizer cannot embed texts
    code, _, err = run_cli(capsys, "model", "run", str(deploy), "hello")
    assert code == 2 and "tokenizer" in err


def test_encrypt_into_nonempty_dir(capsys: pytest.CaptureFixture[str], minilm_dir: Path,
                                   tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "notes.txt").write_text("do not touch")
    code, out, err = run_cli(capsys, "model", "encrypt", str(minilm_dir), "--out", str(deploy))
    assert code == 2
    assert "not empty" in err
    assert out == ""
    assert [p.name for p in deploy.iterdir()] == ["notes.txt"]
    assert list(tmp_path.glob(".deploy.partial-*")) == []


# --- run -----------------------------------------------------------------------------------------


def test_run_json_matches_plaintext_pipeline(capsys: pytest.CaptureFixture[str],
                                             minilm_dir: Path, deployment_dir: Path) -> None:
    texts = ["A man is eating food.", "Der schnelle braune Fuchs.", "x"]
    code, out, err = run_cli(capsys, "model", "run", str(deployment_dir), *texts, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"embeddings"}
    got = np.array(doc["embeddings"])
    assert got.shape == (3, 384)
    expected = Pipeline(minilm_dir).embed(texts)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_run_text_output(capsys: pytest.CaptureFixture[str], minilm_dir: Path) -> None:
    texts = ["first sentence", "second one"]
    code, out, _ = run_cli(capsys, "model", "run", str(minilm_dir), *texts, "--threads", "1")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    expected = Pipeline(minilm_dir).embed(texts)
    for line, text, row in zip(lines, texts, expected, strict=True):
        assert repr(text) in line and "(384 dims)" in line
        assert f"{row[0]:+.4f}" in line
