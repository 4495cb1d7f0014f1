"""The token-task training loop: a run killed mid-way resumes from its checkpoint and ends where
an uninterrupted run ends."""
import os

import numpy as np
import pytest

from configs import selective_copy as selective_copy_config
from hiss_jax.tasks import selective_copy, train_tokens


def _config():
    config = selective_copy_config.get_config("mamba,tiny")
    config.model.d_model, config.model.mamba.d_state, config.model.n_layers = 16, 4, 1
    config.task.seq_len, config.task.n_data, config.task.vocab_size = 8, 2, 6
    config.task.n_eval = 32
    config.train.batch_size, config.train.eval_batch_size = 8, 32
    config.train.num_steps, config.train.eval_every, config.train.log_every = 6, 2, 2
    config.optim.warmup_steps = 0
    config.kernels.impl = "xla"
    return config


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = train_tokens.train_and_evaluate(_config(), str(tmp_path / "whole"), verbose=False)

    original = selective_copy.SelectiveCopyTask.train_batch

    def dies_at_step_5(self, step):
        if step == 5:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    workdir = str(tmp_path / "split")
    monkeypatch.setattr(selective_copy.SelectiveCopyTask, "train_batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_tokens.train_and_evaluate(_config(), workdir, verbose=False)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    monkeypatch.setattr(selective_copy.SelectiveCopyTask, "train_batch", original)
    resumed = train_tokens.train_and_evaluate(_config(), workdir, verbose=False)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert '"from_step": 4' in f.read()  # restarted from the step-4 checkpoint, not 0
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6]
    for a, b in zip(whole["history"], resumed["history"]):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert os.path.exists(os.path.join(workdir, "results.json"))


def test_pig_latin_words_file_replaces_wordfreq(tmp_path):
    from hiss_jax.tasks import pig_latin
    path = tmp_path / "words.txt"
    path.write_text("the\nString\nqueen\nx\nwell-known\nthe\nrhythm\n")
    assert pig_latin.word_list(3, words_file=str(path)) == ["the", "string", "queen"]
    assert pig_latin.word_list(words_file=str(path)) == ["the", "string", "queen",
                                                         "well-known", "rhythm"]
    with pytest.raises(FileNotFoundError, match="words_file='/nonexistent'"):
        pig_latin.word_list(words_file="/nonexistent")
