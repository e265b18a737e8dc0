"""The ONNX Llama decoder against a plain numpy Llama forward pass (written here from the math,
sharing no code with the builder) on a tiny random model: prefill, cached decode, cache
consistency, tied/untied head, and errors for bad weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from errors import InputError
from models.llama_graph import LlamaConfig, build_llama_decoder
from models.split import split_model

CFG = LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn=48, vocab=97,
                  rope_theta=10000.0, rms_eps=1e-5)
TOL = 2e-5


def make_weights(cfg: LlamaConfig, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, hd = cfg.d_model, cfg.head_dim

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"token_embd.weight": rand(cfg.vocab, d, scale=1.0),
         "output_norm.weight": 1.0 + rand(d, scale=0.1)}
    if not tied:
        w["output.weight"] = rand(cfg.vocab, d)
    for i in range(cfg.n_layers):
        w |= {
            f"blk.{i}.attn_norm.weight": 1.0 + rand(d, scale=0.1),
            f"blk.{i}.attn_q.weight": rand(cfg.n_heads * hd, d),
            f"blk.{i}.attn_k.weight": rand(cfg.n_kv_heads * hd, d),
            f"blk.{i}.attn_v.weight": rand(cfg.n_kv_heads * hd, d),
            f"blk.{i}.attn_output.weight": rand(d, cfg.n_heads * hd),
            f"blk.{i}.ffn_norm.weight": 1.0 + rand(d, scale=0.1),
            f"blk.{i}.ffn_gate.weight": rand(cfg.ffn, d),
            f"blk.{i}.ffn_up.weight": rand(cfg.ffn, d),
            f"blk.{i}.ffn_down.weight": rand(d, cfg.ffn),
        }
    return w


# --- reference: Hugging Face LlamaForCausalLM, written plainly in float64 numpy ---

def ref_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def ref_forward(
    cfg: LlamaConfig, w: dict[str, np.ndarray], ids: np.ndarray,
    past: list[tuple[np.ndarray, np.ndarray]] | None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    batch, seq = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    past_len = 0 if past is None else past[0][0].shape[2]
    pos = past_len + np.arange(seq)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)  # [seq, hd]
    total = past_len + seq
    mask = np.where(np.arange(total)[None, :] > pos[:, None], -1e30, 0.0)  # [seq, total]

    x = w64["token_embd.weight"][ids]
    presents = []
    for i in range(cfg.n_layers):
        def lw(name: str, i: int = i) -> np.ndarray:
            return w64[f"blk.{i}.{name}.weight"]

        n = ref_rms_norm(x, lw("attn_norm"), cfg.rms_eps)
        q = (n @ lw("attn_q").T).reshape(batch, seq, nh, hd).transpose(0, 2, 1, 3)
        k = (n @ lw("attn_k").T).reshape(batch, seq, nkv, hd).transpose(0, 2, 1, 3)
        v = (n @ lw("attn_v").T).reshape(batch, seq, nkv, hd).transpose(0, 2, 1, 3)
        q = q * cos + ref_rotate_half(q) * sin
        k = k * cos + ref_rotate_half(k) * sin
        if past is not None:
            k = np.concatenate([past[i][0], k], axis=2)
            v = np.concatenate([past[i][1], v], axis=2)
        presents.append((k, v))
        rep = nh // nkv
        k_rep = np.repeat(k, rep, axis=1)  # repeat_kv: head h uses kv head h // rep
        v_rep = np.repeat(v, rep, axis=1)
        scores = q @ k_rep.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v_rep).transpose(0, 2, 1, 3).reshape(batch, seq, nh * hd)
        h = x + ctx @ lw("attn_output").T
        n = ref_rms_norm(h, lw("ffn_norm"), cfg.rms_eps)
        gate = n @ lw("ffn_gate").T
        silu = gate / (1.0 + np.exp(-gate))
        x = h + (silu * (n @ lw("ffn_up").T)) @ lw("ffn_down").T
    x = ref_rms_norm(x, w64["output_norm.weight"], cfg.rms_eps)
    head = w64["token_embd.weight"] if cfg.tied_embeddings else w64["output.weight"]
    return x @ head.T, presents


# --- running the graph ---

class Runner:
    def __init__(self, cfg: LlamaConfig, model: onnx.ModelProto) -> None:
        self.cfg = cfg
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])

    def empty(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        shape = (batch, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                for _ in range(self.cfg.n_layers)]

    def __call__(
        self, ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_{i}"] = k.astype(np.float32)
            feeds[f"past_value_{i}"] = v.astype(np.float32)
        names = ["logits"] + [f"present_{kind}_{i}" for i in range(self.cfg.n_layers)
                              for kind in ("key", "value")]
        out = dict(zip(names, self.session.run(names, feeds), strict=True))
        return out["logits"], [(out[f"present_key_{i}"], out[f"present_value_{i}"])
                               for i in range(self.cfg.n_layers)]


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return make_weights(CFG)


@pytest.fixture(scope="module")
def runner(weights: dict[str, np.ndarray]) -> Runner:
    return Runner(CFG, build_llama_decoder(CFG, weights))


def assert_presents_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        assert gk.shape == wk.shape and gv.shape == wv.shape
        np.testing.assert_allclose(gk, wk, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(gv, wv, atol=TOL, rtol=TOL)


def test_prefill_and_cached_decode_match_reference(
    runner: Runner, weights: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CFG.vocab, size=(2, 7))
    logits, past = runner(ids, runner.empty(2))
    ref_logits, ref_past = ref_forward(CFG, weights, ids, None)
    assert logits.shape == (2, 7, CFG.vocab) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=TOL)
    assert_presents_close(past, ref_past)
    for step in range(3):
        nxt = rng.integers(0, CFG.vocab, size=(2, 1))
        logits, past = runner(nxt, past)
        ref_logits, ref_past = ref_forward(CFG, weights, nxt, ref_past)
        assert logits.shape == (2, 1, CFG.vocab)
        assert past[0][0].shape == (2, CFG.n_kv_heads, 8 + step, CFG.head_dim)
        np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=TOL)
        assert_presents_close(past, ref_past)


def test_cached_decode_also_takes_several_new_tokens(
    runner: Runner, weights: dict[str, np.ndarray]
) -> None:
    ids = np.random.default_rng(2).integers(0, CFG.vocab, size=(1, 9))
    _, past = runner(ids[:, :4], runner.empty(1))
    logits, past = runner(ids[:, 4:], past)
    ref_logits, ref_past = ref_forward(CFG, weights, ids, None)
    np.testing.assert_allclose(logits, ref_logits[:, 4:], atol=TOL, rtol=TOL)
    assert_presents_close(past, ref_past)


def test_prefill_at_once_equals_token_by_token(runner: Runner) -> None:
    ids = np.random.default_rng(3).integers(0, CFG.vocab, size=(2, 6))
    full_logits, full_past = runner(ids, runner.empty(2))
    past = runner.empty(2)
    for t in range(ids.shape[1]):
        logits, past = runner(ids[:, t:t + 1], past)
        np.testing.assert_allclose(logits[:, 0], full_logits[:, t], atol=TOL, rtol=TOL)
    assert_presents_close(past, full_past)


def test_batch_rows_are_independent(runner: Runner) -> None:
    ids = np.random.default_rng(4).integers(0, CFG.vocab, size=(2, 5))
    both, _ = runner(ids, runner.empty(2))
    one, _ = runner(ids[1:], runner.empty(1))
    np.testing.assert_allclose(both[1:], one, atol=TOL, rtol=TOL)


def test_untied_head_uses_output_weight() -> None:
    cfg = LlamaConfig(**{**CFG.__dict__, "tied_embeddings": False})
    w = make_weights(cfg, seed=5, tied=False)
    run = Runner(cfg, build_llama_decoder(cfg, w))
    ids = np.random.default_rng(6).integers(0, cfg.vocab, size=(2, 4))
    logits, _ = run(ids, run.empty(2))
    ref_logits, _ = ref_forward(cfg, w, ids, None)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=TOL)
    tied_logits, _ = ref_forward(CFG, w, ids, None)  # same weights through the tied head
    assert not np.allclose(logits, tied_logits, atol=1e-2)
    # a tied model ignores output.weight even when the file has one
    tied = Runner(CFG, build_llama_decoder(CFG, w))
    np.testing.assert_allclose(tied(ids, tied.empty(2))[0], tied_logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.1.attn_k.weight",
                                  "blk.0.ffn_down.weight", "output_norm.weight"])
def test_missing_tensor_is_named(weights: dict[str, np.ndarray], name: str) -> None:
    w = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        build_llama_decoder(CFG, w)


def test_missing_untied_head_is_named(weights: dict[str, np.ndarray]) -> None:
    cfg = LlamaConfig(**{**CFG.__dict__, "tied_embeddings": False})
    with pytest.raises(InputError, match=r"output\.weight"):
        build_llama_decoder(cfg, weights)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.1.ffn_norm.weight",
                                  "token_embd.weight", "blk.1.ffn_up.weight"])
def test_wrong_shape_is_named(weights: dict[str, np.ndarray], name: str) -> None:
    w = dict(weights)
    w[name] = w[name][:-1]  # one row short
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        build_llama_decoder(CFG, w)


def test_bad_head_grouping_is_rejected(weights: dict[str, np.ndarray]) -> None:
    cfg = LlamaConfig(**{**CFG.__dict__, "n_kv_heads": 3})
    with pytest.raises(InputError, match="n_kv_heads"):
        build_llama_decoder(cfg, weights)


def test_graph_is_valid_and_has_cut_points(weights: dict[str, np.ndarray]) -> None:
    model = build_llama_decoder(CFG, weights)
    onnx.checker.check_model(model)
    produced = {out for node in model.graph.node for out in node.output}
    for name in ["hidden_embed", *(f"hidden_{i}" for i in range(CFG.n_layers))]:
        assert name in produced
    assert [i.name for i in model.graph.input] == ["input_ids"] + [
        f"past_{kind}_{i}" for i in range(CFG.n_layers) for kind in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [
        f"present_{kind}_{i}" for i in range(CFG.n_layers) for kind in ("key", "value")]


def test_each_layer_reads_only_its_input_and_cache(weights: dict[str, np.ndarray]) -> None:
    model = build_llama_decoder(CFG, weights)
    inits = {t.name for t in model.graph.initializer}
    for i in range(CFG.n_layers):
        prev = "hidden_embed" if i == 0 else f"hidden_{i - 1}"
        nodes = [n for n in model.graph.node if n.name.startswith(f"l{i}/")
                 or n.name in (f"hidden_{i}", f"present_key_{i}", f"present_value_{i}")]
        produced = {out for n in nodes for out in n.output}
        external = {x for n in nodes for x in n.input if x not in produced and x not in inits}
        assert external == {prev, f"past_key_{i}", f"past_value_{i}"}


def test_split_at_hidden_cuts_runs_like_the_whole_graph(
    runner: Runner, weights: dict[str, np.ndarray]
) -> None:
    cuts = ["hidden_embed", *(f"hidden_{i}" for i in range(CFG.n_layers))]
    shards = split_model(build_llama_decoder(CFG, weights), cuts)
    assert len(shards) == len(cuts) + 1
    for i, shard in enumerate(shards[1:-1]):  # layer shards read only their cut and cache
        prev = "hidden_embed" if i == 0 else f"hidden_{i - 1}"
        assert sorted(shard.inputs) == sorted([prev, f"past_key_{i}", f"past_value_{i}"])
    ids = np.random.default_rng(7).integers(0, CFG.vocab, size=(2, 3))
    _, past = runner(ids, runner.empty(2))
    step = np.array([[5], [11]])
    want_logits, want_past = runner(step, past)
    tensors: dict[str, np.ndarray] = {"input_ids": step}
    for i, (k, v) in enumerate(past):
        tensors[f"past_key_{i}"], tensors[f"past_value_{i}"] = k, v
    for shard in shards:
        session = ort.InferenceSession(shard.model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        outs = session.run(shard.outputs, {name: tensors[name] for name in shard.inputs})
        tensors |= dict(zip(shard.outputs, outs, strict=True))
    np.testing.assert_allclose(tensors["logits"], want_logits, atol=TOL, rtol=TOL)
    assert_presents_close([(tensors[f"present_key_{i}"], tensors[f"present_value_{i}"])
                           for i in range(CFG.n_layers)], want_past)
