"""``veilnet audit DEPLOY --views DIR`` on an ``ee-decoder/1`` deployment
(models/audit_views_decoder.py): session views written as node/recorder.py writes them, holding
what the client really sends each node shard of the SmolLM2 deployment: the real client head's
rows for a prompt (``open``) and for each greedy token after it (``step``), and the later node
shards' inputs computed by really running the deployment's node shards and re-basing shards
in-process (models/decoding.py's shard walk, each node shard with its KV cache)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from recorded_views import write_view
from tokenizers import Tokenizer

from models import Manifest, Pipeline
from models.audit_report import AuditError, AuditReport, special_ids
from models.audit_views_decoder import audit_decoder_views
from models.decoding import DecoderLayout, LocalHop, walk

PROMPTS = ["<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n"
           "<|im_start|>assistant\n", "The history of the printing press begins"]
STEPS = (8, 4)  # greedy tokens fed back after each prompt (one step view each)


def generate(deploy: Path, root: Path) -> tuple[list[int], dict[int, int]]:
    """Record each prompt's generation in ``root``: ``(ids the first node shard received,
    views per node shard index)``. The last node shard sees only the first prompt; node shard
    3 also gets a re-opened session (the whole history of the first prompt at once, as a
    replay re-opens it) and a session of noise no first-shard view explains."""
    manifest = Manifest.load(deploy)
    tok = Tokenizer.from_file(str(deploy / "client" / "tokenizer.json"))
    pipe, layout = Pipeline(manifest, spin=False), DecoderLayout.of(manifest)
    first, second, last = manifest.node_shards
    fed: list[int] = []
    views: Counter[int] = Counter()
    history: list[np.ndarray] = []  # node shard 3's inputs for the first prompt
    for n, (prompt, steps) in enumerate(zip(PROMPTS, STEPS, strict=True)):
        hops = {s.index: LocalHop(pipe, layout, s) for s in manifest.node_shards}
        ids = tok.encode(prompt).ids
        for k in range(steps + 1):
            fed += ids
            walker = walk(layout, np.array([ids], np.int64))
            shard, feeds = next(walker)
            try:
                while True:
                    if shard.role == "node":
                        if shard.index != last.index or n == 0:
                            write_view(root, f"r{n}-{shard.index}-{k}", shard.cid, feeds,
                                       op="step" if k else "open",
                                       session=f"s{n}-{shard.index}")
                            views[shard.index] += 1
                        if shard.index == second.index and n == 0:
                            history.append(next(iter(feeds.values())))
                        out = hops[shard.index](feeds)
                    else:
                        out = pipe.run_local(shard, feeds)
                    shard, feeds = walker.send(out)
            except StopIteration as done:
                ids = [int(np.argmax(done.value[0, -1]))]
    name = layout.hop_inputs(second)[0].name
    write_view(root, "reopened", second.cid, {name: np.concatenate(history, axis=1)},
               op="open", session="s-reopened")
    write_view(root, "noise", second.cid,
               {name: np.random.default_rng(0).standard_normal((1, 5, 576)).astype(np.float32)},
               op="open", session="s-noise")
    write_view(root, "foreign", "bafkforeign", {"x": np.zeros(3, np.float32)})
    views[second.index] += 2
    assert first.index in views
    return fed, dict(views)


@pytest.fixture(scope="module")
def recorded(smollm2_deployment: Path, smollm2_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditReport, list[int],
                                                                 dict[int, int]]:
    root = tmp_path_factory.mktemp("decoder-views") / "received"
    fed, views = generate(smollm2_deployment, root)
    report = audit_decoder_views(Manifest.load(smollm2_deployment), [root], smollm2_dir,
                                 progress=lambda m: None)
    print(report.table())
    return report, fed, views


def test_first_node_shard_views_are_read(recorded: tuple[AuditReport, list[int], dict[int, int]],
                                         smollm2_deployment: Path) -> None:
    report, fed, views = recorded
    special = special_ids(smollm2_deployment / "client" / "tokenizer.json")
    counted = [i for i in fed if i not in special]
    rotation = report.row("exact weight matching", "rotation")
    assert rotation.success == 1.0  # every node shard with views: rel. error ~1.5e-8
    assert set(rotation.detail["shards"]) == {str(i) for i in views}
    assert all(s["rotation_rel_error"] < 1e-6 for s in rotation.detail["shards"].values())
    for attack in ("exact weight matching", "keyless norms", "keyless traffic rotation"):
        row = report.row(attack, "input tokens")
        assert row.success >= 0.99, attack  # measured 1.0 for all three
        assert row.detail["tokens"] == len(counted)  # every non-special token fed
        assert row.baseline == pytest.approx(Counter(counted).most_common(1)[0][1]
                                             / len(counted), abs=1e-12)
    first = Manifest.load(smollm2_deployment).node_shards[0]
    assert report.views is not None
    assert report.views["attacked"]["views"] == views[first.index] == sum(STEPS) + 2


def test_later_node_shards_are_probed_on_linked_views(
        recorded: tuple[AuditReport, list[int], dict[int, int]],
        smollm2_deployment: Path) -> None:
    report, _, views = recorded
    _, second, last = Manifest.load(smollm2_deployment).node_shards
    assert report.views is not None
    linked = {s["index"]: s for s in report.views["linked"]}
    # every view of a real session is linked (the re-opened one too); the noise is not
    assert linked[second.index]["views"] == views[second.index]
    assert linked[second.index]["linked"] == views[second.index] - 1
    assert linked[last.index]["linked"] == views[last.index] == STEPS[0] + 1
    assert any(f"s-noise on node shard {second.index}: not linked" in u
               for u in report.views["unscored"])
    for shard, name in ((second, "hidden_9.rebased"), (last, "hidden_19.rebased")):
        row = report.row(f"decrypt-then-probe [{name}]", "input tokens")
        print(name, row.success, row.baseline, row.detail["coverage"], row.detail["tokens"])
        assert row.detail["shard"] == shard.index and row.detail["views"]["open"] >= 1
        assert 0 < row.detail["coverage"] <= 1 and row.success <= row.detail["coverage"]
        assert row.success > row.baseline  # measured 0.33 vs 0.11 and 0.27 vs 0.14
    assert "not scored: 1 of the 1 views of" in report.table()


def test_recordings_without_this_deployment_are_refused(smollm2_deployment: Path,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "rec"
    write_view(root, "r", "bafkelsewhere", {"x": np.zeros((1, 2, 576), np.float32)}, op="open",
               session="s")
    with pytest.raises(AuditError, match="no recorded views of this deployment") as err:
        audit_decoder_views(Manifest.load(smollm2_deployment), [root], None, lambda m: None)
    assert str(root) in str(err.value) and "shards found: bafkelsewhere" in str(err.value)
