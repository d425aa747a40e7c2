"""tokenizer_transplant: alignment, OMP against a reference, shared rows, tying, save/reload, refusals, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_config, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hfpatch
from hfpatch.errors import PatchError, RecipeError, UnsupportedModelError
from hfpatch.techniques.tokenizer.alignment import align, piece_bytes
from hfpatch.techniques.tokenizer.length_bias import constant_logit_direction, ridge_direction
from hfpatch.techniques.tokenizer.omp import apply_codes, omp

CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "hello world, hello there; the world is wide and the fox is brown.",
    "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n",
    "über café naïve — déjà vu 東京",
]


def _bytelevel(folder, vocab_size: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _sentencepiece(folder, vocab_size: int):
    """A Llama-style BPE: `▁` word starts, byte fallback pieces <0x00>..<0xFF>, <unk>/<s>/</s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                                    decoders.Strip(" ", 1, 0)]).__getstate__())
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    old = _bytelevel(root / "old", 300)
    new_bl = _bytelevel(root / "new_bl", 340)
    new_sp = _sentencepiece(root / "new_sp", 120)
    return {"old": (root / "old", old), "bytelevel": (root / "new_bl", new_bl), "sentencepiece": (root / "new_sp", new_sp)}


def _model(kind: str, vocab: int, *, tied: bool = True, seed: int = 0):
    config = tiny_config(kind)
    config.vocab_size = vocab
    config.tie_word_embeddings = tied
    return tiny_model(kind, seed=seed, config=config)


def _recipe(toks, new: str, method: str = "mean", **extra):
    return hfpatch.Recipe([{"type": "tokenizer_transplant", "tokenizer": str(toks[new][0]),
                            "base_tokenizer": str(toks["old"][0]), "method": method, "progress": False, **extra}])


# --------------------------------------------------------------------------------------------------
# OMP


def _reference_omp(y: torch.Tensor, atoms: torch.Tensor, k: int):
    """Textbook OMP, one target at a time, least squares through the normal equations."""
    chosen, residual = [], y.clone()
    for _ in range(k):
        corr = (atoms / atoms.norm(dim=1, keepdim=True)) @ residual
        corr[chosen] = 0
        chosen.append(int(corr.abs().argmax()))
        A = atoms[chosen].T
        coef = torch.linalg.solve(A.T @ A, A.T @ y)
        residual = y - A @ coef
    return chosen, coef


def test_omp_matches_reference_and_recovers_exact_codes():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(300, 128, generator=g, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    true_idx = torch.stack([torch.randperm(300, generator=g)[:5] for _ in range(20)])
    true_coef = torch.randn(20, 5, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(20, 5, generator=g, dtype=torch.float64))
    y = torch.einsum("bk,bkd->bd", true_coef, atoms[true_idx])
    idx, coef = omp(y, atoms, k=5, candidates=None)
    for b in range(20):
        ref_idx, ref_coef = _reference_omp(y[b], atoms, 5)
        assert idx[b].tolist() == ref_idx
        torch.testing.assert_close(coef[b], ref_coef, rtol=1e-8, atol=1e-10)
        order = true_idx[b].argsort()
        assert sorted(idx[b].tolist()) == true_idx[b][order].tolist()
    torch.testing.assert_close(torch.einsum("bk,bkd->bd", coef, atoms[idx]), y, rtol=0, atol=1e-10)


def test_omp_non_unit_atoms_and_more_atoms_than_needed():
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(200, 32, generator=g, dtype=torch.float64) * torch.rand(200, 1, generator=g, dtype=torch.float64) * 5
    idx0 = torch.stack([torch.randperm(200, generator=g)[:4] for _ in range(10)])
    y = torch.einsum("bk,bkd->bd", torch.randn(10, 4, generator=g, dtype=torch.float64) + 2, atoms[idx0])
    idx, coef = omp(y, atoms, k=12)  # k above the true sparsity: extra atoms get ~0 weight
    torch.testing.assert_close(torch.einsum("bk,bkd->bd", coef, atoms[idx]), y, rtol=0, atol=1e-8)
    for b in range(10):  # the reference with the same k picks the same atoms
        ref_idx, _ = _reference_omp(y[b], atoms, 4)
        assert idx[b, :4].tolist() == ref_idx


def test_omp_stops_refitting_when_the_next_atom_is_dependent():
    """Atoms spanning only 8 dimensions: after 8 picks every further atom is dependent on the picked ones, so
    its coefficient is 0 and the first 8 keep their least-squares fit (the target is outside the span)."""
    g = torch.Generator().manual_seed(4)
    atoms = torch.randn(60, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 16, generator=g, dtype=torch.float64)
    y = torch.randn(5, 16, generator=g, dtype=torch.float64)
    idx, coef = omp(y, atoms, k=12)
    assert idx.shape == (5, 12) and torch.isfinite(coef).all()
    assert coef[:, 8:].abs().max() == 0
    for b in range(5):
        ref_idx, ref_coef = _reference_omp(y[b], atoms, 8)
        assert idx[b, :8].tolist() == ref_idx
        torch.testing.assert_close(coef[b, :8], ref_coef, rtol=1e-6, atol=1e-8)


def test_omp_ridge_refits_by_ridge_regression():
    """With ridge > 0 the picked atoms' coefficients are the ridge solution (unit atoms' gram + ridge * I), and
    they shrink compared with plain OMP on nearly collinear atoms."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 32, generator=g, dtype=torch.float64)
    atoms = torch.cat([base, base + 1e-3 * torch.randn(40, 32, generator=g, dtype=torch.float64)])  # near twins
    y = torch.randn(6, 32, generator=g, dtype=torch.float64)
    idx, coef = omp(y, atoms, k=10, ridge=0.05)
    for b in range(6):
        A = atoms[idx[b]]
        norms = A.norm(dim=1)
        unit = A / norms[:, None]
        ref = torch.linalg.solve(unit @ unit.T + 0.05 * torch.eye(10, dtype=torch.float64), unit @ y[b]) / norms
        torch.testing.assert_close(coef[b], ref, rtol=1e-8, atol=1e-10)
    _, plain = omp(y, atoms, k=10)
    assert coef.abs().max() < plain.abs().max()


def test_omp_reproduces_a_linear_map():
    """If donor space = base space @ A, codes fitted in the donor space rebuild the base rows exactly."""
    g = torch.Generator().manual_seed(2)
    base_anchors = torch.randn(120, 24, generator=g, dtype=torch.float64)
    A = torch.randn(24, 40, generator=g, dtype=torch.float64)  # injective linear map into a bigger space
    idx0 = torch.stack([torch.randperm(120, generator=g)[:6] for _ in range(30)])
    base_new = torch.einsum("bk,bkd->bd", torch.randn(30, 6, generator=g, dtype=torch.float64), base_anchors[idx0])
    idx, coef = omp(base_new @ A, base_anchors @ A, k=24)  # k = the rank: every exact donor fit transfers
    torch.testing.assert_close(torch.einsum("bk,bkd->bd", coef, base_anchors[idx]), base_new, rtol=0, atol=1e-8)
    torch.testing.assert_close(apply_codes(idx, coef, base_anchors.float()), base_new.float(), rtol=0, atol=1e-4)


def test_omp_screened_candidates_still_fit():
    g = torch.Generator().manual_seed(3)
    atoms = torch.randn(2000, 64, generator=g)
    y = torch.randn(50, 64, generator=g)
    full_idx, full_coef = omp(y, atoms, k=16, candidates=None)
    idx, coef = omp(y, atoms, k=16, candidates=200)
    err = lambda i, c: ((apply_codes(i, c, atoms) - y).norm(dim=1) / y.norm(dim=1)).mean()  # noqa: E731
    # Screening is an approximation (on isotropic random atoms, its worst case, about 1.4x the residual).
    assert err(idx, coef) < 1.6 * err(full_idx, full_coef) < 1.6
    same_idx, same_coef = omp(y, atoms, k=16, candidates=2000)
    assert torch.equal(same_idx, full_idx) and torch.allclose(same_coef, full_coef, atol=1e-5)
    with pytest.raises(ValueError):
        omp(y, atoms[:, :10], k=4)


# --------------------------------------------------------------------------------------------------
# alignment


def test_piece_bytes_normalises_bytelevel_sentencepiece_and_byte_fallback():
    assert piece_bytes("Ġworld", "bytelevel") == b" world" == piece_bytes("▁world", "sentencepiece")
    assert piece_bytes("Ċ", "bytelevel") == b"\n" == piece_bytes("<0x0A>", "sentencepiece")
    assert piece_bytes("Ã©", "bytelevel") == "é".encode()


def test_alignment_shares_by_bytes_and_maps_specials_by_role(toks):
    old = toks["old"][1]
    a = align(old, toks["sentencepiece"][1])
    new = toks["sentencepiece"][1]
    # specials by role: <s> -> bos <|im_start|>, </s> -> eos <|im_end|>, <unk> -> unk <|endoftext|>
    assert a.special_map[new.bos_token_id] == old.bos_token_id
    assert a.special_map[new.eos_token_id] == old.eos_token_id
    assert a.special_map[new.unk_token_id] == old.unk_token_id
    pairs = dict(zip(a.shared_new.tolist(), a.shared_old.tolist()))
    old_vocab = old.get_vocab()
    words = [t for t in new.get_vocab() if t.startswith("▁") and len(t) > 2 and "Ġ" + t[1:] in old_vocab]
    assert words, "the two test tokenizers should share some word-start tokens"
    for t in words:
        assert pairs[new.convert_tokens_to_ids(t)] == old_vocab["Ġ" + t[1:]]
    assert pairs[new.convert_tokens_to_ids("<0x0A>")] == old.convert_tokens_to_ids("Ċ")
    # every other new token decomposes into old tokens that spell exactly its bytes
    for i in a.todo:
        if a.new_bytes[i]:
            assert b"".join(a.old_bytes[j] for j in a.pieces[i]) == a.new_bytes[i] or not a.pieces[i]


# --------------------------------------------------------------------------------------------------
# the technique on tiny models


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("gpt2", True), ("gemma3_text", True),
                                       ("qwen2", False)])
@pytest.mark.parametrize("new", ["bytelevel", "sentencepiece"])
def test_transplant_round_trip(toks, kind, tied, new):
    old_tok, new_tok = toks["old"][1], toks[new][1]
    model = _model(kind, len(old_tok), tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    gen_before = model.generation_config.to_dict()
    with hfpatch.patch(model, _recipe(toks, new, "tokenadapt" if tied else "omp", k=8)) as handle:
        tok = handle.tokenizer
        assert tok is handle.technique("tokenizer_transplant").tokenizer
        a = handle.technique("tokenizer_transplant").alignment
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert emb.weight.shape[0] == head.weight.shape[0] == len(new_tok) == model.config.vocab_size
        assert head.out_features == len(new_tok)
        assert (head.weight is emb.weight) == tied
        # shared rows bit-identical, input and lm_head
        in_key = next(k for k in before if k.endswith(("embed_tokens.weight", "wte.weight")))
        assert torch.equal(emb.weight[a.shared_new], before[in_key][a.shared_old])
        if not tied:
            assert torch.equal(head.weight[a.shared_new], before["lm_head.weight"][a.shared_old])
        assert torch.isfinite(emb.weight).all() and torch.isfinite(head.weight).all()
        # special ids follow the new tokenizer
        assert model.config.bos_token_id == tok.bos_token_id == model.generation_config.bos_token_id
        assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
        ids = tok("the quick brown fox", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 4 and int(out.max()) < len(new_tok)
        assert handle.stats["tokenizer_transplant"]["shared"] == a.shared_new.numel()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == config_before and model.generation_config.to_dict() == gen_before
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("method", ["omp", "tokenadapt", "mean", "zero", "random"])
def test_every_method_keeps_shared_rows_and_second_instance_untouched(toks, method):
    model, twin = _model("llama", len(toks["old"][1])), _model("llama", len(toks["old"][1]))
    ref = twin.get_input_embeddings().weight.clone()
    with hfpatch.patch(model, _recipe(toks, "bytelevel", method, k=4)) as handle:
        a = handle.technique("tokenizer_transplant").alignment
        w = model.get_input_embeddings().weight
        assert torch.equal(w[a.shared_new], ref[a.shared_old])
        if method == "zero":
            assert not w[torch.tensor(a.todo)].any()
    assert torch.equal(twin.get_input_embeddings().weight, ref) and twin.config.vocab_size == len(toks["old"][1])


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_reload_with_plain_transformers(toks, tmp_path, tied):
    model = _model("llama", len(toks["old"][1]), tied=tied)
    with hfpatch.patch(model, _recipe(toks, "sentencepiece", "mean")) as handle:
        model.save_pretrained(tmp_path)
        handle.tokenizer.save_pretrained(tmp_path)
        ids = handle.tokenizer("hello world", return_tensors="pt")["input_ids"]
        logits = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == reloaded.config.vocab_size == reloaded.get_input_embeddings().weight.shape[0]
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    assert reloaded.config.eos_token_id == tok.eos_token_id and reloaded.generation_config.bos_token_id == tok.bos_token_id
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_chat_template_carried_only_when_expressible(toks):
    model = _model("llama", len(toks["old"][1]))
    with hfpatch.patch(model, _recipe(toks, "bytelevel")) as handle:  # same special tokens: carried over
        assert handle.stats["tokenizer_transplant"]["chat_template"] in ("own", "carried over")
        assert handle.tokenizer.chat_template
    with hfpatch.patch(model, _recipe(toks, "sentencepiece")) as handle:  # no <|im_start|>: not carried
        assert handle.stats["tokenizer_transplant"]["chat_template"].startswith("not carried")
        assert not handle.tokenizer.chat_template


def test_refusals(toks):
    old_len = len(toks["old"][1])
    small = _model("llama", 50)  # fewer rows than the base tokenizer has tokens: not its tokenizer
    with pytest.raises(PatchError, match="not this model's tokenizer"):
        hfpatch.patch(small, _recipe(toks, "bytelevel"))
    assert small.config.vocab_size == 50 and small.get_input_embeddings().weight.shape[0] == 50
    model = _model("llama", old_len)
    with pytest.raises(PatchError, match="donor= is used by method 'omp' only"):
        hfpatch.patch(model, _recipe(toks, "bytelevel", "mean", donor=str(toks["old"][0])))
    with pytest.raises(PatchError, match="cannot load the new tokenizer"):
        hfpatch.patch(model, hfpatch.Recipe([{"type": "tokenizer_transplant", "tokenizer": "/nonexistent/tok",
                                              "base_tokenizer": str(toks["old"][0])}]))
    with pytest.raises(RecipeError, match="method"):
        _recipe(toks, "bytelevel", "magic").build_techniques()
    with pytest.raises(UnsupportedModelError, match="tokenizer_transplant"):
        hfpatch.patch(tiny_model("llava"), _recipe(toks, "bytelevel"))
    assert model.config.vocab_size == old_len


def test_donor_mode_with_a_linear_donor(toks, tmp_path):
    """A donor whose embeddings are a linear map of a base that already knows the new vocabulary: OMP
    rebuilds rows from anchors in the donor space, close to the truth for well-spanned rows."""
    new_tok = toks["bytelevel"][1]
    donor = _model("llama", len(new_tok), seed=5)
    donor.save_pretrained(tmp_path / "donor")
    model = _model("llama", len(toks["old"][1]))
    with hfpatch.patch(model, _recipe(toks, "bytelevel", "omp", donor=str(tmp_path / "donor"), k=8)) as handle:
        a = handle.technique("tokenizer_transplant").alignment
        assert handle.stats["tokenizer_transplant"]["donor"] == str(tmp_path / "donor")
        assert torch.isfinite(model.get_input_embeddings().weight).all()
        assert torch.equal(model.get_input_embeddings().weight[a.shared_new],
                           _model("llama", len(toks["old"][1])).get_input_embeddings().weight[a.shared_old])


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_transplant_refuses_to_overwrite_without_force(toks, tmp_path, capsys):
    from hfpatch.apps.cli import main

    src = tmp_path / "model"
    _model("llama", len(toks["old"][1])).save_pretrained(src)
    toks["old"][1].save_pretrained(src)
    out = tmp_path / "out"
    args = ["transplant", "--model", str(src), "--tokenizer", str(toks["sentencepiece"][0]), "--method", "mean",
            "--out", str(out)]
    assert main(args) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == len(AutoTokenizer.from_pretrained(out)) == len(toks["sentencepiece"][1])
    stamp = (out / "config.json").stat().st_mtime_ns
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "config.json").stat().st_mtime_ns == stamp
    assert main([*args, "--force"]) == 0
    assert main([*args, "--force", "--length-bias", "-3"]) == 0  # the option reaches the technique
    biased = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    assert not torch.equal(biased, reloaded.get_input_embeddings().weight)


@pytest.mark.parametrize("tied", [True, False])
def test_length_bias_moves_each_new_output_row_along_the_fitted_direction(toks, tied):
    """length_bias b: every initialised output row = the method's row + b * (pieces - 1) * u, u fitted so that
    h . u ~ 1 on the model's own samples; shared rows and (untied) input rows stay as without it."""
    old_vocab = len(toks["old"][1])
    plain_model, model = _model("llama", old_vocab, tied=tied), _model("llama", old_vocab, tied=tied)
    with hfpatch.patch(plain_model, _recipe(toks, "bytelevel", "mean")):
        plain_out = plain_model.get_output_embeddings().weight.detach().clone()
        plain_in = plain_model.get_input_embeddings().weight.detach().clone()
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    with hfpatch.patch(model, _recipe(toks, "bytelevel", "mean", length_bias=-3.0)) as handle:
        technique = handle.technique("tokenizer_transplant")
        a, u = technique.alignment, technique.direction
        out = model.get_output_embeddings().weight.detach()
        fit = handle.stats["tokenizer_transplant"]["length_bias"]["direction_fit"]
        todo = torch.tensor(a.todo)
        counts = torch.tensor([len(a.pieces[i]) for i in a.todo], dtype=torch.float32)
        assert (counts > 1).any()
        torch.testing.assert_close(out[todo] - plain_out[todo], -3.0 * (counts - 1)[:, None] * u[None, :])
        assert torch.equal(out[a.shared_new], plain_out[a.shared_new])
        if not tied:
            assert torch.equal(model.get_input_embeddings().weight, plain_in)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the sampling used its own RNG
    assert fit["positions"] == 4 * 256
    # unpatch restores every tensor and the vocabulary size; the sampling left the weights alone
    restored = model.state_dict()
    assert restored.keys() == original.keys() and all(torch.equal(restored[n], t) for n, t in original.items())
    assert model.config.vocab_size == old_vocab
    start = toks["old"][1].bos_token_id
    again, _ = constant_logit_direction(_model("llama", old_vocab, tied=tied), start)
    assert torch.equal(again, u)  # seeded: the same model gives the same direction


def test_ridge_direction_finds_the_constant_component():
    """States with a hidden constant projection (h . e = 1 along a random unit e, plus noise elsewhere): the
    fitted u gives h . u ~ 1 everywhere."""
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    noise = torch.randn(500, 16, generator=g)
    states = noise - (noise @ e)[:, None] * e[None, :] + e[None, :]
    u, fit = ridge_direction(states, ridge=1e-4)
    assert abs(fit["mean"] - 1.0) < 1e-2 and fit["std"] < 1e-2
    torch.testing.assert_close(states @ u, torch.ones(500), atol=2e-2, rtol=0)


def test_length_bias_refused_where_it_does_not_apply(toks):
    model = _model("llama", len(toks["old"][1]))
    for method in ("zero", "random"):
        with pytest.raises(PatchError, match="length_bias"):
            hfpatch.patch(model, _recipe(toks, "bytelevel", method, length_bias=-3.0))
    assert model.config.vocab_size == len(toks["old"][1])
