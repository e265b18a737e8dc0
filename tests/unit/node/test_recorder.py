"""``--record-received``: the writer (node/recorder.py) and the reader (models/received.py)."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import trio

from models.received import FORMAT, INDEX_FILE, ReceivedFormatError, read_views
from node.recorder import ReceivedRecorder, safe_name

PEER = "12D3KooWExamplePeer"
SHARD = "bafkreiexampleshard"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_modes_and_index(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recorder = ReceivedRecorder(root)
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.ones((2, 3), dtype=np.int64)
    trio.run(lambda: recorder.record(protocol="/veilnet/infer/1", op="infer", request_id="r1",
                                     shard=SHARD, peer=PEER,
                                     inputs={"hidden": hidden, "attention/mask:0": mask}))
    assert recorder.record_sync(protocol="/veilnet/session/1", op="step", request_id="r1",
                                shard=SHARD, peer=PEER, inputs={"ids": mask[:, :1]},
                                session="ab" * 16)
    assert recorder.record_sync(protocol="/veilnet/infer/1", op="infer", request_id="../x",
                                shard=SHARD, peer=None, inputs={}, context=b"ctx",
                                ciphertexts=[b"one", b"three"])
    assert _mode(root) == 0o700
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 6 and all(_mode(p) == 0o600 for p in files)
    assert all(_mode(p) == 0o700 for p in root.rglob("*") if p.is_dir())
    line = json.loads((root / INDEX_FILE).read_text().splitlines()[0])
    assert line["format"] == FORMAT == "veilnet-received/1"
    assert set(line) == {"format", "time", "protocol", "op", "request_id", "shard", "session",
                         "peer", "inputs"}

    views = read_views(root)
    assert [(v.op, v.request_id, v.session) for v in views] == [
        ("infer", "r1", None), ("step", "r1", "ab" * 16), ("infer", "../x", None)]
    first = views[0].load()
    assert np.array_equal(first["hidden"], hidden) and first["hidden"].dtype == np.float32
    assert np.array_equal(first["attention/mask:0"], mask)
    assert views[0].inputs[1].file == "r1/attention_mask_0.npy"
    assert views[0].inputs[0].dtype == "float32" and views[0].inputs[0].shape == (2, 3, 4)
    assert views[1].inputs[0].file.startswith("r1-2/")  # a reused request id: a new directory
    assert views[0].peer == PEER and views[0].shard == SHARD and views[2].peer is None
    ckks = views[2].load()
    assert ckks == {"context": b"ctx", "ciphertexts": [b"one", b"three"]}
    assert all(not i.file.startswith("..") for i in views[2].inputs)


def test_size_cap_stops_recording(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = ReceivedRecorder(tmp_path / "rec", max_bytes=20_000)
    big = np.zeros(2000, dtype=np.float32)  # 8000 bytes
    kwargs = {"protocol": "/veilnet/infer/1", "op": "infer", "shard": SHARD, "peer": PEER}
    assert recorder.record_sync(request_id="a", inputs={"x": big}, **kwargs)
    assert recorder.record_sync(request_id="b", inputs={"x": big}, **kwargs)
    with caplog.at_level(logging.ERROR, "veilnet.node"):
        assert not recorder.record_sync(request_id="c", inputs={"x": big}, **kwargs)
    assert not recorder.active and "RECORDING STOPPED" in caplog.text
    assert not recorder.record_sync(request_id="d", inputs={"x": big[:1]}, **kwargs)
    assert [v.request_id for v in read_views(tmp_path / "rec")] == ["a", "b"]
    assert recorder.used <= 20_000
    # a restart counts what is already there
    assert ReceivedRecorder(tmp_path / "rec", max_bytes=20_000).used == recorder.used


def test_unusable_dir_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    with caplog.at_level(logging.ERROR, "veilnet.node"):
        recorder = ReceivedRecorder(tmp_path / "file" / "rec")
        assert not recorder.active
        trio.run(lambda: recorder.record(protocol="/veilnet/infer/1", op="infer",
                                         request_id="r", shard=SHARD, peer=PEER,
                                         inputs={"x": np.zeros(3)}))
    assert "RECORDING STOPPED" in caplog.text


def test_write_error_is_logged_once_and_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = ReceivedRecorder(tmp_path / "rec")
    assert recorder.active

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("node.recorder.np.save", full_disk)
    caplog.clear()
    with caplog.at_level(logging.ERROR, "veilnet.node"):
        for rid in ("r1", "r2"):
            trio.run(lambda rid=rid: recorder.record(  # type: ignore[misc]
                protocol="/veilnet/infer/1", op="infer", request_id=rid, shard=SHARD,
                peer=PEER, inputs={"x": np.zeros(3)}))
    assert not recorder.active and caplog.text.count("RECORDING STOPPED") == 1
    assert "No space left" in caplog.text


def test_existing_dir_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    assert ReceivedRecorder(root).active and _mode(root) == 0o700


def test_reader_rejects_bad_index(tmp_path: Path) -> None:
    with pytest.raises(ReceivedFormatError, match=r"index\.jsonl"):
        read_views(tmp_path)
    line = {"format": FORMAT, "time": 1.0, "protocol": "/veilnet/infer/1", "op": "infer",
            "request_id": "r", "shard": SHARD, "session": None, "peer": PEER,
            "inputs": [{"name": "x", "file": "../etc/passwd", "dtype": "uint8", "shape": [1]}]}
    (tmp_path / INDEX_FILE).write_text(json.dumps(line) + "\n")
    with pytest.raises(ReceivedFormatError, match="not inside"):
        read_views(tmp_path)
    line["inputs"] = []
    # a last line cut short (the node stopped while writing it) is skipped
    (tmp_path / INDEX_FILE).write_text(json.dumps(line) + "\n" + '{"format": "veil')
    assert len(read_views(tmp_path)) == 1


def test_safe_name() -> None:
    assert safe_name("a/b:c d") == "a_b_c_d"
    assert safe_name("..") == "_" and safe_name("") == "_"
    assert safe_name(".hidden") == "hidden"
    assert len(safe_name("x" * 500)) == 80
