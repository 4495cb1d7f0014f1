"""Pig Latin translation as character-level next-token prediction.

Rules (`to_pig_latin`), applied to each hyphen-separated part of a lowercase word:
  * a part that starts with a vowel (a, e, i, o, u) keeps its letters and adds "way":
    "apple" -> "appleway";
  * otherwise its leading consonant cluster moves to the end and "ay" is added, so "sh", "ch",
    "th", "str", ... move as one block: "string" -> "ingstray", "chair" -> "airchay";
  * "qu" is part of the cluster (the u sounds as w): "queen" -> "eenquay", "squeal" -> "ealsquay";
  * "y" is a consonant at the start of a part ("yellow" -> "ellowyay") and a vowel after it
    ("rhythm" -> "ythmrhay", "my" -> "ymay");
  * a part with no vowel at all (no a/e/i/o/u, no non-initial y: "hmm", "nth") adds "ay";
  * hyphenated words translate part by part: "well-known" -> "ellway-ownknay".

Vocabulary (29 tokens): 'a'..'z' = 0..25, '-' = 26, SOS = 27, EOS = 28.  SOS doubles as the
separator: one example is the token sequence

    source  SOS  target  EOS          e.g.  c h a i r SOS a i r c h a y EOS

and the model (decoder-only, causal) is trained to predict every next token; the loss reads only
the positions whose next token is a target letter or the EOS.  Padding uses EOS with mask 0.

Words: wordfreq's English list (top `n_words`, default 20k), kept when lowercase ASCII letters and
hyphens only (no empty part, length within [min_len, max_len]); split into train / test by word
with a seeded permutation (`split_words`).  wordfreq is imported lazily (optional extra `tasks`).
"""
from __future__ import annotations

import os
import re

import numpy as np

VOWELS = frozenset("aeiou")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
HYPHEN = 26
SOS = 27  # also the source / target separator
EOS = 28  # also the padding token (mask 0)
VOCAB_SIZE = 29
_WORD_RE = re.compile(r"^[a-z]+(-[a-z]+)*$")


def _translate_part(part: str) -> str:
    if part[0] in VOWELS:
        return part + "way"
    i = 1  # the first letter is a consonant here ('y' included)
    while i < len(part) and part[i] not in VOWELS and part[i] != "y":
        i += 1
    if i < len(part) and part[i - 1] == "q" and part[i] == "u":
        i += 1  # "qu" moves together
    return part[i:] + part[:i] + "ay"


def to_pig_latin(word: str) -> str:
    """English word (lowercase letters and hyphens) -> Pig Latin (module docstring rules)."""
    if not _WORD_RE.match(word):
        raise ValueError(f"{word=} is not lowercase letters with single inner hyphens; "
                         f"filter it out (see `is_valid_word`)")
    return "-".join(_translate_part(p) for p in word.split("-"))


def is_valid_word(word: str) -> bool:
    return bool(_WORD_RE.match(word))


def encode(text: str) -> list[int]:
    """'ab-c' -> [0, 1, 26, 2]."""
    return [HYPHEN if ch == "-" else LETTERS.index(ch) for ch in text]


def decode(tokens) -> str:
    """Token ids up to (not including) the first EOS / SOS -> text."""
    out = []
    for t in tokens:
        t = int(t)
        if t in (SOS, EOS):
            break
        out.append("-" if t == HYPHEN else LETTERS[t])
    return "".join(out)


def raw_word_list(n_words: int = 20000, words_file: str = "") -> list[str]:
    """The first `n_words` lines of `words_file` (one word per line, most frequent first), or
    wordfreq's top `n_words` English words when no file is given."""
    if words_file:
        if not os.path.exists(words_file):
            raise FileNotFoundError(
                f"config.task.words_file={words_file!r} does not exist; write one with "
                f"`python -m hiss_jax.tasks.pig_latin {words_file}` or set it to '' for wordfreq")
        with open(words_file) as f:
            return [line.strip() for line in f if line.strip()][:n_words]
    try:
        import wordfreq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Pig Latin task needs wordfreq: pip install 'hiss_jax[tasks]' "
                          "(or pip install wordfreq), or a config.task.words_file") from e
    return list(wordfreq.top_n_list("en", n_words, wordlist="best"))


def word_list(n_words: int = 20000, min_len: int = 2, max_len: int = 16,
              extra: tuple[str, ...] = (), words_file: str = "") -> list[str]:
    """The top `n_words` English words (`raw_word_list`) + `extra`, filtered, unique, in
    frequency order."""
    words = raw_word_list(n_words, words_file) + list(extra)
    seen, out = set(), []
    for w in words:
        w = w.lower()
        if w not in seen and is_valid_word(w) and min_len <= len(w) <= max_len:
            seen.add(w)
            out.append(w)
    return out


def split_words(words, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by word: no test word appears in training."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{test_fraction=} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(words))
    n_test = max(1, int(round(test_fraction * len(words))))
    test = [words[i] for i in order[:n_test]]
    train = [words[i] for i in order[n_test:]]
    return train, test


def max_target_len(max_word_len: int) -> int:
    """Longest Pig Latin output for a word of at most `max_word_len` characters: +3 per part."""
    return max_word_len + 3 * ((max_word_len + 1) // 2)


def make_examples(words, seq_len: int) -> dict:
    """Words -> next-token arrays over `source SOS target EOS`, padded to seq_len with EOS.

    -> {'inputs', 'targets': int32 (W, seq_len), 'mask': bool (W, seq_len),
        'prefix': int32 (W, seq_len) source + SOS then EOS padding, 'prefix_len': int32 (W,)}.
    targets[t] = sequence[t + 1]; mask is True where targets[t] is a target letter or the EOS.
    """
    n = len(words)
    inputs = np.full((n, seq_len), EOS, np.int32)
    targets = np.full((n, seq_len), EOS, np.int32)
    mask = np.zeros((n, seq_len), bool)
    prefix = np.full((n, seq_len), EOS, np.int32)
    prefix_len = np.zeros((n,), np.int32)
    for i, w in enumerate(words):
        src, tgt = encode(w), encode(to_pig_latin(w))
        seq = src + [SOS] + tgt + [EOS]
        if len(seq) - 1 > seq_len:
            raise ValueError(f"word {w!r} needs {len(seq) - 1} steps > task.seq_len={seq_len}; "
                             f"raise task.seq_len or lower task.max_word_len")
        inputs[i, :len(seq) - 1] = seq[:-1]
        targets[i, :len(seq) - 1] = seq[1:]
        mask[i, len(src):len(seq) - 1] = True
        prefix[i, :len(src) + 1] = src + [SOS]
        prefix_len[i] = len(src) + 1
    return {"inputs": inputs, "targets": targets, "mask": mask, "prefix": prefix,
            "prefix_len": prefix_len}


def hyphenated_compounds(words, n: int, seed: int, max_part_len: int = 7) -> list[str]:
    """n seeded synthetic compounds 'w1-w2' of short list words (wordfreq's list has none)."""
    short = [w for w in words if len(w) <= max_part_len and "-" not in w]
    rng = np.random.default_rng([seed, 7])
    out, seen = [], set()
    while len(out) < n and len(short) > 1:
        a, b = rng.choice(len(short), 2, replace=False)
        w = f"{short[a]}-{short[b]}"
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class PigLatinTask:
    """The token-task interface of `hiss_jax.tasks.train_tokens` for Pig Latin.

    Word list = wordfreq top n_words filtered (+ n_hyphenated compounds), split by word
    (task.test_fraction, task.seed).  Training batches sample training words with replacement,
    seeded by (seed, step).  `decode_eval` measures exact-word accuracy on the held-out words with
    streaming greedy decoding.
    """
    name = "pig_latin"
    vocab_size = VOCAB_SIZE

    def __init__(self, task_cfg, batch_size: int, eval_batch_size: int, words=None):
        self.seed = int(task_cfg.seed)
        if words is None:
            words = word_list(int(task_cfg.n_words), int(task_cfg.min_word_len),
                              int(task_cfg.max_word_len),
                              words_file=task_cfg.get("words_file", ""))
            words = words + hyphenated_compounds(words, int(task_cfg.n_hyphenated), self.seed)
        self.train_words, self.test_words = split_words(words, float(task_cfg.test_fraction),
                                                        self.seed)
        if int(task_cfg.n_eval) > 0:
            self.test_words = self.test_words[:int(task_cfg.n_eval)]
        longest = max(len(w) for w in words)
        # source + SOS + target (+3 per part) ; the EOS is a target, not an input
        need = max(len(w) + 1 + len(to_pig_latin(w)) for w in words)
        self.seq_len = -(-need // 8) * 8
        self.max_word_len = longest
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.train = make_examples(self.train_words, self.seq_len)
        self.test = make_examples(self.test_words, self.seq_len)

    def train_batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, 1, int(step)])
        idx = rng.integers(0, len(self.train_words), self.batch_size)
        return {k: self.train[k][idx] for k in ("inputs", "targets", "mask")}

    def _test_batches(self):
        n, bs = len(self.test_words), self.eval_batch_size
        for start in range(0, n, bs):
            idx = np.arange(start, start + bs) % n  # last batch wraps; `valid` marks real rows
            valid = np.arange(start, start + bs) < n
            yield idx, valid

    def eval_batches(self) -> list[dict]:
        out = []
        for idx, valid in self._test_batches():
            batch = {k: self.test[k][idx] for k in ("inputs", "targets", "mask")}
            batch["mask"] = batch["mask"] & valid[:, None]
            out.append(batch)
        return out

    def decode_eval(self, decode_fn) -> dict:
        """decode_fn(prefix, prefix_len) -> preds (B, T) (see hiss_jax.tasks.decode) ->
        {'exact_word_acc', 'n_words', 'examples': first few (word, expected, got)}."""
        correct, n, examples = 0, 0, []
        for idx, valid in self._test_batches():
            preds = np.asarray(decode_fn(self.test["prefix"][idx], self.test["prefix_len"][idx]))
            for row, (i, ok) in enumerate(zip(idx, valid)):
                if not ok:
                    continue
                word = self.test_words[i]
                gen = preds[row, self.test["prefix_len"][i] - 1:]
                got, want = decode(gen), to_pig_latin(word)
                # exact: the right letters, then EOS (not SOS, not the end of the buffer)
                ok_word = got == want and len(gen) > len(want) and int(gen[len(want)]) == EOS
                correct += ok_word
                got = got if ok_word or got != want else got + "<no EOS>"
                n += 1
                if not ok_word and len(examples) < 10:
                    examples.append((word, want, got))
        return {"exact_word_acc": correct / max(n, 1), "n_words": n, "errors": examples}


if __name__ == "__main__":
    # python -m hiss_jax.tasks.pig_latin FILE [N]: wordfreq's top N (20000) English words to FILE,
    # for machines without wordfreq (config.task.words_file=FILE).
    import sys
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    with open(path, "w") as f:
        f.write("\n".join(raw_word_list(n)) + "\n")
    print(f"wrote {n} words to {path}")
