"""Tokenizer transplant (``mergekitty tokensurgeon MODEL DONOR OUT``).

The fixture builds a DONOR and a MODEL of different hidden sizes whose vocabularies share words
under other ids (the model's are the donor's permuted), with special tokens of other spellings and
a few donor words the model lacks. Each new word's donor rows are a known sparse combination of
shared words' rows; the same combination of the model's rows is its ground truth. The expected
output is computed here from the files, by token text, and the approximation methods are checked
against plain numpy implementations of their formulas.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli, without_torch_env

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DONOR_SPECIAL = ["<unk>", "<|begin|>", "<|end|>", "<pad>"]
WORDS = [f"a{i}" for i in range(92)]
SHARED, NEW_WORDS = WORDS[:80], WORDS[80:]  # the model lacks NEW_WORDS
MODEL_SPECIAL = ["<s>", "</s>", "<unk>"]
MODEL_ONLY = [f"m{i}" for i in range(5)]
DONOR_ROWS, MODEL_ROWS = 100, 90  # both embeddings have rows past their last token


# ------------------------------------------------------------------------------ building the pair
def write_word_tokenizer(path: Path, words: list[str], **special: str) -> None:
    """A whitespace WordLevel tokenizer of ``words`` (ids are positions) with ``special`` roles."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=special["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def donor_id(token: str) -> int:
    return (DONOR_SPECIAL + WORDS).index(token)


def build_pair(root: Path, *, tie: bool = False, donor_tie: bool = False, linear: bool = False, seed: int = 0) -> dict:
    """(donor, model, truth): truth[tensor][word] is the model-space row each new word should get.

    ``tie``/``donor_tie``: the model/donor ties its head to its embedding. ``linear``: the
    model's shared rows are a linear image of the donor's (model = donor @ A)."""
    from mergekitty.tiny_models import make_model

    rng = np.random.default_rng(seed)
    donor = make_model(root / "donor", "llama", seed=1, vocab_size=DONOR_ROWS, tie_word_embeddings=donor_tie)
    model = make_model(
        root / "model", "llama", seed=2, hidden_size=32, intermediate_size=64, vocab_size=MODEL_ROWS,
        tie_word_embeddings=tie,
    )  # fmt: skip
    write_word_tokenizer(
        donor, DONOR_SPECIAL + WORDS, unk_token="<unk>", bos_token="<|begin|>", eos_token="<|end|>", pad_token="<pad>"
    )
    perm = rng.permutation(len(SHARED))
    model_words = MODEL_SPECIAL + [SHARED[i] for i in perm] + MODEL_ONLY
    write_word_tokenizer(model, model_words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    edit_json(donor / "config.json", bos_token_id=1, eos_token_id=2, pad_token_id=3)
    edit_json(donor / "generation_config.json", bos_token_id=1, eos_token_id=[2], pad_token_id=3)
    edit_json(model / "config.json", bos_token_id=0, eos_token_id=1)
    edit_json(model / "generation_config.json", bos_token_id=0, eos_token_id=1)

    d_state, m_state = read_tensors(donor), read_tensors(model)
    # each new word's donor rows: a combination of three shared words' rows, per donor matrix
    combos: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name in (EMBED,) if donor_tie else (EMBED, HEAD):
        d = d_state[name]
        combos[name] = {}
        for w in NEW_WORDS:
            atoms = rng.choice(len(SHARED), 3, replace=False)
            coef = rng.uniform(0.5, 1.5, 3) * rng.choice([-1.0, 1.0], 3)
            d[donor_id(w)] = sum(c * d[donor_id(SHARED[i])] for c, i in zip(coef, atoms))
            combos[name][w] = (atoms, coef)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for name in (EMBED,) if tie else (EMBED, HEAD):
        space = HEAD if name == HEAD and not donor_tie else EMBED  # the donor matrix its weights come from
        m = m_state[name]
        if linear:
            a = rng.standard_normal((d_state[space].shape[1], m.shape[1])).astype(np.float32) * 0.2
            for w in SHARED:
                m[model_words.index(w)] = d_state[space][donor_id(w)] @ a
        truth[name] = {
            w: sum(c * m[model_words.index(SHARED[i])] for c, i in zip(coef, atoms)).astype(np.float32)
            for w, (atoms, coef) in combos[space].items()
        }
    write_tensors(donor, d_state)
    write_tensors(model, m_state)
    return {"donor": donor, "model": model, "truth": truth, "model_words": model_words}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def transplanted(pair, tmp_path_factory):
    from mergekitty.tokensurgeon import transplant

    out = tmp_path_factory.mktemp("out") / "model"
    return out, transplant(pair["model"], pair["donor"], out)


# ------------------------------------------------------------------------------ numpy references
def omp_reference(dictionary: np.ndarray, x: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Orthogonal matching pursuit of one target, step by step with np.linalg.lstsq."""
    d = dictionary.astype(np.float64)
    x = x.astype(np.float64)
    chosen: list[int] = []
    coef = np.zeros(0)
    residual = x.copy()
    for _ in range(k):
        if np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(x):
            break
        scores = np.abs(d @ residual) / np.linalg.norm(d, axis=1)
        scores[chosen] = -1
        chosen.append(int(np.argmax(scores)))
        coef = np.linalg.lstsq(d[chosen].T, x, rcond=None)[0]
        residual = x - d[chosen].T @ coef
    return chosen, coef


def knn_reference(dictionary: np.ndarray, x: np.ndarray, k: int, cosine: bool, scheme: str):
    d = dictionary.astype(np.float64)
    x = x.astype(np.float64)
    if cosine:
        dist = 1 - d @ x / (np.linalg.norm(d, axis=1) * np.linalg.norm(x))
    else:
        dist = np.linalg.norm(d - x, axis=1)
    near = np.argsort(dist, kind="stable")[:k]
    n = d[near]
    if scheme == "distance_proportional":
        w = np.exp(-dist[near]) / np.exp(-dist[near]).sum()
    elif scheme == "least_squares":
        w = np.linalg.lstsq(n.T, x, rcond=None)[0]
    else:  # barycentric: minimise ||n.T w - x||^2 subject to sum(w) = 1 (Lagrange system)
        kkt = np.block([[2 * n @ n.T, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
        w = np.linalg.solve(kkt, np.concatenate([2 * n @ x, [1.0]]))[:k]
    return near, w


# ------------------------------------------------------------------------------ approximation
def test_omp_matches_the_reference():
    from mergekitty.tokensurgeon.approximate import omp

    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((50, 24)).astype(np.float32)
    targets = rng.standard_normal((7, 24)).astype(np.float32)
    targets[3] = 0.7 * dictionary[5] - 1.3 * dictionary[40]  # a sparse one stops after two atoms
    for batch_size in (512, 3):
        fit = omp(dictionary, targets, 6, batch_size=batch_size)
        for i, x in enumerate(targets):
            chosen, coef = omp_reference(dictionary, x, 6)
            assert fit.atoms[i, : len(chosen)].tolist() == chosen
            assert (fit.atoms[i, len(chosen) :] == -1).all()
            np.testing.assert_allclose(fit.weights[i, : len(chosen)], coef, rtol=1e-6, atol=1e-8)
    assert sorted(fit.atoms[3, :2].tolist()) == [5, 40]
    np.testing.assert_allclose(fit.apply(dictionary)[3], targets[3], atol=1e-5)


@pytest.mark.parametrize("scheme", ["distance_proportional", "barycentric", "least_squares"])
@pytest.mark.parametrize("cosine", [False, True])
def test_knn_matches_the_reference(scheme, cosine):
    from mergekitty.tokensurgeon.approximate import knn

    rng = np.random.default_rng(1)
    dictionary = rng.standard_normal((40, 16)).astype(np.float32)
    targets = rng.standard_normal((5, 16)).astype(np.float32)
    fit = knn(dictionary, targets, 4, cosine=cosine, scheme=scheme, batch_size=2)
    for i, x in enumerate(targets):
        near, w = knn_reference(dictionary, x, 4, cosine, scheme)
        assert fit.atoms[i].tolist() == near.tolist()
        np.testing.assert_allclose(fit.weights[i], w, rtol=1e-6, atol=1e-9)


def test_barycentric_recovers_a_point_between_two_neighbours():
    from mergekitty.tokensurgeon.approximate import knn

    rng = np.random.default_rng(2)
    dictionary = rng.standard_normal((30, 16)).astype(np.float32)
    x = 0.6 * dictionary[7] + 0.4 * dictionary[12]
    fit = knn(dictionary, x[None], 2, scheme="barycentric")
    assert fit.atoms[0].tolist() == [7, 12]
    np.testing.assert_allclose(fit.weights[0], [0.6, 0.4], atol=1e-5)


# ------------------------------------------------------------------------------ token matching
def test_sentencepiece_and_byte_level_tokens_match_by_text(tmp_path):
    from mergekitty.tokenizer.vocab import AddedToken, Vocabulary
    from mergekitty.tokensurgeon.match import match_tokens

    sp = Vocabulary(
        tmp_path, "tokenizer.model",
        {"<unk>": 0, "<s>": 1, "</s>": 2, "▁the": 3, "<0x0A>": 4, "<0x41>": 5, "A": 6, "▁cat": 7, "ing": 8},
    )  # fmt: skip
    gpt2 = Vocabulary(
        tmp_path, "vocab.json",
        {"<|endoftext|>": 0, "Ġthe": 1, "Ċ": 2, "A": 3, "ing": 4, "Ġdog": 5, "<|im_start|>": 6},
        added={"<|endoftext|>": AddedToken("<|endoftext|>", special=True), "<|im_start|>": AddedToken("<|im_start|>", special=True)},
    )  # fmt: skip
    match = match_tokens(sp, gpt2, {"unk": 0, "bos": 1, "eos": 2}, {"bos": 0, "eos": 0}, 9, 8)
    pairs = dict(zip(match.copied.tolist(), match.copied_from.tolist()))
    # the bos/eos token by its eos role; "Ġthe" is "▁the"; "Ċ" (the newline byte) is "<0x0A>"; "A" is
    # the piece "A" (before "<0x41>")
    assert pairs == {0: 2, 1: 3, 2: 4, 3: 6, 4: 8}
    assert (match.special, match.exact, match.bytes) == (1, 3, 1)
    assert match.new.tolist() == [5, 6] and match.new_tokens == ("Ġdog", "<|im_start|>")
    assert match.padding.tolist() == [7]
    # the atoms: ordinary shared tokens only (not the special eos/bos)
    assert sorted(zip(match.shared_donor.tolist(), match.shared_model.tolist())) == [(1, 3), (2, 4), (3, 6), (4, 8)]

    # the other way round: the SentencePiece byte piece <0x41> has no "A" of its own left to prefer
    back = match_tokens(gpt2, sp, {"bos": 0, "eos": 0}, {"unk": 0, "bos": 1, "eos": 2}, 8, 9)
    back_pairs = dict(zip(back.copied.tolist(), back.copied_from.tolist()))
    assert back_pairs[5] == 3 and back_pairs[6] == 3 and back_pairs[4] == 2 and back_pairs[3] == 1
    assert back_pairs[1] == 0 and back_pairs[2] == 0  # bos and eos are both <|endoftext|>
    assert back.new_tokens == ("<unk>", "▁cat")


def test_tokenizer_kind_is_read_from_tokenizer_json(tmp_path):
    from mergekitty.tokenizer.vocab import read_vocabulary
    from mergekitty.tokensurgeon.match import (
        BYTE_LEVEL_KIND,
        PLAIN_KIND,
        SENTENCEPIECE_KIND,
        byte_of_char,
        tokenizer_kind,
    )

    cases = {
        "byte": ({"type": "ByteLevel", "add_prefix_space": False}, BYTE_LEVEL_KIND),
        "meta": ({"type": "Metaspace", "replacement": "▁"}, SENTENCEPIECE_KIND),
        "plain": ({"type": "Whitespace"}, PLAIN_KIND),
    }
    for name, (pre, kind) in cases.items():
        (tmp_path / name).mkdir()
        data = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": pre, "added_tokens": []}
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(data))
        vocab = read_vocabulary(tmp_path / name)
        assert vocab is not None and tokenizer_kind(vocab) == kind, name
    table = byte_of_char()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41


# ------------------------------------------------------------------------------ the transplant
def _rows_by_token(path: Path, tensor: str, words: list[str]) -> dict[str, np.ndarray]:
    t = read_tensors(path)[tensor]
    return {w: t[i] for i, w in enumerate(words)}


def test_shared_rows_are_copied_and_new_rows_approximated(pair, transplanted):
    out, result = transplanted
    state = read_tensors(out)
    model = read_tensors(pair["model"])
    words = pair["model_words"]
    assert result.match.special == 3 and result.match.exact == len(SHARED)
    assert result.match.new_tokens == ("<pad>", *NEW_WORDS) and result.match.padding.tolist() == [96, 97, 98, 99]
    for tensor in (EMBED, HEAD):
        got = state[tensor]
        assert got.shape == (DONOR_ROWS, 32)
        for w in SHARED:  # a shared word keeps the model's row, bit for bit
            assert np.array_equal(got[donor_id(w)], model[tensor][words.index(w)])
        for donor_special, model_special in (("<unk>", "<unk>"), ("<|begin|>", "<s>"), ("<|end|>", "</s>")):
            assert np.array_equal(got[donor_id(donor_special)], model[tensor][words.index(model_special)])
        mean = model[tensor][: len(words)].mean(axis=0)
        for w in NEW_WORDS:
            truth = pair["truth"][tensor][w]
            error = np.linalg.norm(got[donor_id(w)] - truth) / np.linalg.norm(truth)
            assert error < 1e-4, (tensor, w, error)
            assert np.linalg.norm(mean - truth) / np.linalg.norm(truth) > 0.5  # the baseline is far off
        np.testing.assert_allclose(got[96:], np.broadcast_to(mean, (4, 32)), rtol=1e-5, atol=1e-7)
    for name, t in model.items():  # everything else is the model's
        if name not in (EMBED, HEAD):
            assert np.array_equal(state[name], t), name
    (embed_report, head_report) = result.matrices
    assert (embed_report.tensor, embed_report.space) == (EMBED, EMBED)
    assert (head_report.tensor, head_report.space) == (HEAD, HEAD)
    assert embed_report.new_rows == 13 and embed_report.heldout == 8
    # the new words are exact combinations in the donor; <pad> is a random row that is not
    assert embed_report.fit_error is not None and embed_report.fit_error < 1.0


def test_configs_and_tokenizer_are_the_donors(pair, transplanted):
    out, _ = transplanted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == DONOR_ROWS and cfg["hidden_size"] == 32
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert cfg["tie_word_embeddings"] is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, [2], 3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (pair["donor"] / name).read_bytes()


@pytest.mark.slow
def test_output_loads_and_the_tokenizer_round_trips(pair, transplanted):
    import torch
    import transformers

    out, _ = transplanted
    tok = transformers.AutoTokenizer.from_pretrained(out)
    donor_tok = transformers.AutoTokenizer.from_pretrained(pair["donor"])
    text = "a3 a85 a17 a91 a0"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == donor_tok.encode(text, add_special_tokens=False) == [donor_id(w) for w in text.split()]
    assert tok.decode(ids) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    state = read_tensors(out)
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(state[EMBED]))
    assert torch.equal(model.get_output_embeddings().weight, torch.from_numpy(state[HEAD]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), DONOR_ROWS) and torch.isfinite(logits).all()


def test_tied_model_stays_tied(tmp_path):
    from mergekitty.tokensurgeon import transplant

    pair = build_pair(tmp_path, tie=True)
    result = transplant(pair["model"], pair["donor"], tmp_path / "out")
    state = read_tensors(tmp_path / "out")
    assert HEAD not in state and result.tied and len(result.matrices) == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    for w in NEW_WORDS:
        truth = pair["truth"][EMBED][w]
        assert np.linalg.norm(state[EMBED][donor_id(w)] - truth) / np.linalg.norm(truth) < 1e-4


def test_untied_model_with_a_tied_donor_fits_its_head_in_the_donors_embedding(tmp_path):
    from mergekitty.tokensurgeon import transplant

    pair = build_pair(tmp_path, donor_tie=True)
    result = transplant(pair["model"], pair["donor"], tmp_path / "out")
    assert [(r.tensor, r.space) for r in result.matrices] == [(EMBED, EMBED), (HEAD, EMBED)]
    state = read_tensors(tmp_path / "out")
    for tensor in (EMBED, HEAD):
        for w in NEW_WORDS:
            truth = pair["truth"][tensor][w]
            assert np.linalg.norm(state[tensor][donor_id(w)] - truth) / np.linalg.norm(truth) < 1e-4


def test_word_start_markers_of_both_kinds_match(pair, tmp_path):
    """The donor's vocabulary spelled byte-level (``Ġa5``), the model's SentencePiece style
    (``▁a5``): the same words match, as the plain spelling did."""
    from mergekitty.tokensurgeon import transplant

    donor, model = tmp_path / "donor", tmp_path / "model"
    for src, dst, marker, pre in (
        (pair["donor"], donor, "Ġ", {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}),
        (pair["model"], model, "▁", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}),
    ):  # fmt: skip
        shutil.copytree(src, dst)
        data = json.loads((dst / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        data["model"]["vocab"] = {(marker + t if t.startswith(("a", "m")) else t): i for t, i in vocab.items()}
        data["pre_tokenizer"] = pre
        (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    result = transplant(model, donor, tmp_path / "out")
    assert (result.match.exact, result.match.special, result.match.new.size) == (len(SHARED), 3, 13)
    state, model_state = read_tensors(tmp_path / "out"), read_tensors(pair["model"])
    for w in SHARED:
        assert np.array_equal(state[EMBED][donor_id(w)], model_state[EMBED][pair["model_words"].index(w)])


def test_heldout_figure_is_near_zero_when_the_model_is_a_linear_image_of_the_donor(tmp_path):
    """The reconstruction figure predicts shared tokens left out from the others: exact when the
    model's rows are a linear map of the donor's (omp fits each in the donor's 64 dimensions)."""
    from mergekitty.tokensurgeon import transplant

    pair = build_pair(tmp_path, linear=True)
    result = transplant(pair["model"], pair["donor"], tmp_path / "out")
    embed = result.matrices[0]
    assert embed.heldout == 8
    assert embed.heldout_error is not None and embed.heldout_error < 1e-3
    assert embed.mean_row_error is not None and embed.mean_row_error > 0.5


@pytest.mark.parametrize("scheme", ["distance_proportional", "barycentric"])
def test_knn_rows_are_the_reference_combination(pair, tmp_path, scheme):
    from mergekitty.tokensurgeon import transplant

    transplant(pair["model"], pair["donor"], tmp_path / "out", method="knn", k=5, cosine=True, weight_scheme=scheme)
    state, donor, model = read_tensors(tmp_path / "out"), read_tensors(pair["donor"]), read_tensors(pair["model"])
    words = pair["model_words"]
    for tensor in (EMBED, HEAD):
        atoms_donor = np.stack([donor[tensor][donor_id(w)] for w in SHARED])
        atoms_model = np.stack([model[tensor][words.index(w)] for w in SHARED])
        for w in NEW_WORDS:
            near, weights = knn_reference(atoms_donor, donor[tensor][donor_id(w)], 5, True, scheme)
            expected = weights @ atoms_model[near]
            np.testing.assert_allclose(state[tensor][donor_id(w)], expected, rtol=1e-5, atol=1e-6)


def test_bf16_rows_are_copied_bit_for_bit(pair, tmp_path):
    """A bfloat16 model: shared rows keep their bits; new rows are the float32 result rounded."""
    import torch
    from safetensors.torch import load_file, save_file

    from mergekitty.tokensurgeon import transplant

    model = tmp_path / "model-bf16"
    shutil.copytree(pair["model"], model)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(model / "model.safetensors").items()}
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    transplant(model, pair["donor"], tmp_path / "out")
    f32 = transplant(pair["model"], pair["donor"], tmp_path / "out-f32")
    assert f32.vocab_size == DONOR_ROWS
    got = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(tmp_path / "out-f32" / "model.safetensors")
    words = pair["model_words"]
    for tensor in (EMBED, HEAD):
        assert got[tensor].dtype == torch.bfloat16
        for w in SHARED:
            assert torch.equal(
                got[tensor][donor_id(w)].view(torch.int16), state[tensor][words.index(w)].view(torch.int16)
            )
        new = [donor_id(w) for w in NEW_WORDS]
        # the bf16 model's rows are rounded, so its combinations differ from the f32 ones by that rounding
        torch.testing.assert_close(got[tensor][new].float(), reference[tensor][new], rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------ failures
def _cli(capsys, *args: str) -> tuple[int, str]:
    from mergekitty.cli.tokensurgeon import main

    code = 0
    try:
        main([*map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["-a", "subword"], "-a/--approximation-method subword (mergekit's method, not offered here)"),
        (["--magikarp"], "--magikarp is not supported"),
        (["-bm", "yes"], "-bm/--byte-match is not supported"),
        (["-nvn", "0.1"], "-nvn/--new-vocab-noise is not supported"),
        (["-b"], "-b/--barycentric weights the nearest neighbours of -a knn"),
        (["-c"], "-c/--cosine-similarity weights the nearest neighbours of -a knn"),
        (["-a", "knn", "-b", "-w", "least_squares"], "contradict"),
        (["-a", "knn", "-w", "softmax"], "-w/--weight-scheme softmax: choose one of"),
    ],
)
def test_options_not_offered_are_one_line(pair, tmp_path, capsys, extra, says):
    code, err = _cli(capsys, pair["model"], pair["donor"], tmp_path / "out", *extra)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("error:") and says in line, line
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line(pair, tmp_path, capsys):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(pair["donor"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    other_arch = tmp_path / "other-arch"
    shutil.copytree(pair["donor"], other_arch)
    edit_json(other_arch / "config.json", architectures=["MistralForCausalLM"], model_type="mistral")
    past_rows = tmp_path / "past-rows"
    shutil.copytree(pair["model"], past_rows)
    tok = json.loads((past_rows / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 95, "content": "<extra>", "special": True, "normalized": False})
    (past_rows / "tokenizer.json").write_text(json.dumps(tok))
    cases = [
        ((pair["model"], no_tokenizer, tmp_path / "o1"), f"donor {no_tokenizer} has no tokenizer files"),
        (
            (past_rows, pair["donor"], tmp_path / "o5"),
            f"{past_rows / 'tokenizer.json'}: token '<extra>' has id 95, but the model's embedding has 90 rows",
        ),
        ((pair["model"], other_arch, tmp_path / "o2"), "pass --allow-crimes"),
        ((pair["model"], pair["donor"], pair["model"]), "is the model"),
        ((pair["model"], tmp_path / "missing", tmp_path / "o3"), "missing"),
    ]
    for args, says in cases:
        code, err = _cli(capsys, *args, "-q")
        assert code == 1, args
        (line,) = err.strip().splitlines()
        assert line.startswith("error:") and says in line, line
    code, _ = _cli(capsys, pair["model"], other_arch, tmp_path / "o4", "-q", "--allow-crimes")
    assert code == 0 and (tmp_path / "o4" / "config.json").is_file()


def test_an_interrupted_run_leaves_the_old_output(pair, tmp_path):
    from mergekitty.tokensurgeon import transplant

    out = tmp_path / "out"
    transplant(pair["model"], pair["donor"], out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    stages = []

    def stop(stage: str, done: int, total: int) -> None:
        stages.append((stage, done, total))
        if stage == "writing" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transplant(pair["model"], pair["donor"], out, method="knn", batch_size=5, progress=stop)
    assert stages[:3] == [
        (f"approximating {EMBED}", 5, 13),
        (f"approximating {EMBED}", 10, 13),
        (f"approximating {EMBED}", 13, 13),
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ the command
@pytest.mark.slow
def test_command_prints_the_reconstruction_figures(pair, tmp_path):
    proc = run_cli("mergekitty", "tokensurgeon", pair["model"], pair["donor"], tmp_path / "out", "-k", "16")
    err = " ".join(proc.stderr.split())
    assert "copied 83 (80 same text, 0 byte pieces, 3 by role); approximated 13 by omp (k=16); padding rows 4" in err
    assert f"reconstruction {EMBED}: fit in the donor's {EMBED}: relative error" in err
    assert "held-out shared tokens (8): relative error" in err and "(mean row:" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_runs_without_torch(pair, tmp_path):
    (tmp_path / "env").mkdir()
    env = without_torch_env(tmp_path / "env")
    proc = run_cli("mergekitty", "tokensurgeon", pair["model"], pair["donor"], tmp_path / "out", "-q", env=env)
    assert not proc.stderr
    assert read_tensors(tmp_path / "out")[EMBED].shape == (DONOR_ROWS, 32)
