"""Selective-copy and Pig Latin generators: layouts, hand-checked rules, determinism."""
import numpy as np
import pytest

from hiss_jax.tasks import pig_latin as pl
from hiss_jax.tasks.selective_copy import FIRST_DATA, MARKER, NOISE, SelectiveCopy


def test_selective_copy_answer_is_the_data_tokens_in_order():
    gen = SelectiveCopy(seq_len=40, n_data=6, vocab_size=12)
    b = gen.batch(seed=3, index=0, batch_size=64)
    inputs, targets, mask = b["inputs"], b["targets"], b["mask"]
    assert inputs.shape == targets.shape == mask.shape == (64, 46)
    assert (inputs[:, 40:] == MARKER).all() and mask[:, 40:].all() and not mask[:, :40].any()
    for row in range(64):
        region = inputs[row, :40]
        data = region[region != NOISE]
        assert len(data) == 6 and (data >= FIRST_DATA).all() and (data < 12).all()
        np.testing.assert_array_equal(targets[row, 40:], data)
    assert (inputs[:, :40] != MARKER).all()


def test_selective_copy_is_deterministic_and_seeded():
    gen = SelectiveCopy()
    a, b = gen.batch(0, 5, 8), gen.batch(0, 5, 8)
    c = gen.batch(1, 5, 8)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert a["inputs"].shape == (8, 144)


def test_selective_copy_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_data"):
        SelectiveCopy(seq_len=4, n_data=8)
    with pytest.raises(ValueError, match="vocab_size"):
        SelectiveCopy(vocab_size=2)


@pytest.mark.parametrize("word, expected", [
    ("string", "ingstray"), ("chair", "airchay"), ("queen", "eenquay"), ("apple", "appleway"),
    ("well-known", "ellway-ownknay"), ("squeal", "ealsquay"), ("the", "ethay"),
    ("school", "oolschay"), ("yellow", "ellowyay"), ("rhythm", "ythmrhay"), ("my", "ymay"),
    ("hmm", "hmmay"), ("eye", "eyeway"), ("pig", "igpay"), ("latin", "atinlay"),
])
def test_pig_latin_rules(word, expected):
    assert pl.to_pig_latin(word) == expected


@pytest.mark.parametrize("bad", ["Apple", "don't", "-ab", "ab--c", "", "caf\u00e9"])
def test_pig_latin_rejects_non_words(bad):
    assert not pl.is_valid_word(bad)
    with pytest.raises(ValueError, match="lowercase"):
        pl.to_pig_latin(bad)


def test_vocabulary_has_29_tokens_and_round_trips():
    assert pl.VOCAB_SIZE == 29 == len(pl.LETTERS) + 3
    assert {pl.HYPHEN, pl.SOS, pl.EOS} == {26, 27, 28}
    toks = pl.encode("well-known")
    assert max(toks) < pl.VOCAB_SIZE and pl.decode(toks + [pl.EOS, 3]) == "well-known"


def test_examples_layout_source_sep_target_eos():
    ex = pl.make_examples(["chair", "apple"], seq_len=16)
    seq = pl.encode("chair") + [pl.SOS] + pl.encode("airchay") + [pl.EOS]
    np.testing.assert_array_equal(ex["inputs"][0, :len(seq) - 1], seq[:-1])
    np.testing.assert_array_equal(ex["targets"][0, :len(seq) - 1], seq[1:])
    # loss on the target letters and the EOS: positions from the SOS onward
    assert ex["mask"][0].sum() == len("airchay") + 1 and ex["mask"][0, 5] and not ex["mask"][0, 4]
    assert ex["inputs"][0, 5] == pl.SOS and ex["prefix_len"][0] == 6
    assert (ex["inputs"][0, len(seq) - 1:] == pl.EOS).all()
    with pytest.raises(ValueError, match="seq_len"):
        pl.make_examples(["chair"], seq_len=8)


def test_split_is_by_word_and_seeded():
    words = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(10) for j in range(10)]
    tr, te = pl.split_words(words, 0.2, seed=1)
    assert len(te) == 20 and not set(tr) & set(te) and set(tr) | set(te) == set(words)
    assert pl.split_words(words, 0.2, seed=1) == (tr, te)
    assert pl.split_words(words, 0.2, seed=2)[1] != te


def test_hyphenated_compounds_translate_per_part():
    comps = pl.hyphenated_compounds(["chair", "apple", "string", "queen"], 5, seed=0)
    assert len(comps) == 5 and len(set(comps)) == 5
    for c in comps:
        a, b = c.split("-")
        assert pl.to_pig_latin(c) == pl.to_pig_latin(a) + "-" + pl.to_pig_latin(b)


def test_wordfreq_list_is_filtered():
    pytest.importorskip("wordfreq")
    words = pl.word_list(2000)
    assert len(words) > 1500 and len(set(words)) == len(words)
    assert all(pl.is_valid_word(w) and 2 <= len(w) <= 16 for w in words)
    assert "the" in words


def _task(words, n_eval=0):
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(seed=0, test_fraction=0.5, n_eval=n_eval))
    return pl.PigLatinTask(cfg, batch_size=4, eval_batch_size=3, words=words)


def test_pig_latin_task_batches_and_exact_word_scoring():
    words = ["chair", "apple", "string", "queen", "well-known", "the", "my", "pig"]
    task = _task(words)
    assert len(task.test_words) == 4 and not set(task.test_words) & set(task.train_words)
    assert task.seq_len % 8 == 0 and task.seq_len >= 10 + 1 + 14
    b = task.train_batch(0)
    assert b["inputs"].shape == (4, task.seq_len) and b["mask"].any(axis=1).all()
    # eval batches of 3 over 4 words: the wrapped row of the last batch has no mask
    evals = task.eval_batches()
    assert len(evals) == 2 and evals[1]["mask"][1:].sum() == 0

    def oracle(prefix, plen, corrupt=()):
        # perfect predictions: preds[:, t] = sequence[t + 1]
        preds = np.full(prefix.shape, pl.EOS, np.int32)
        for r in range(len(prefix)):
            src = prefix[r, :plen[r] - 1]
            tgt = pl.encode(pl.to_pig_latin(pl.decode(src))) + [pl.EOS]
            seq = list(src) + [pl.SOS] + tgt
            preds[r, :len(seq) - 1] = seq[1:]
            if pl.decode(src) in corrupt:
                preds[r, plen[r] - 1 + len(tgt) - 1] = 0  # letters right, EOS missing
        return preds

    assert task.decode_eval(oracle) == {"exact_word_acc": 1.0, "n_words": 4, "errors": []}
    bad = task.test_words[0]
    out = task.decode_eval(lambda p, l: oracle(p, l, corrupt=(bad,)))
    assert out["exact_word_acc"] == 0.75 and out["errors"][0][0] == bad
