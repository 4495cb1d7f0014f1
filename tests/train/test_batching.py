import numpy as np
import pytest

from hiss_jax.train import batching
from tests.train import standins


def test_train_order_is_a_pure_function_of_seed_and_step():
    ds = standins.make_dataset(n_train=10)
    a = batching.TrainBatches(ds.train, 4, seed=3, chunk_size=10)
    b = batching.TrainBatches(ds.train, 4, seed=3, chunk_size=10)
    assert a.steps_per_epoch == 2
    for step in (0, 1, 2, 7, 5, 0):  # any order, fresh objects: same batch
        np.testing.assert_array_equal(a(step)["inputs"], b(step)["inputs"])
    # each epoch visits distinct sequences; epochs differ in order
    e0 = np.concatenate([a.indices(0), a.indices(1)])
    assert len(set(e0.tolist())) == 8
    assert not np.array_equal(e0, np.concatenate([a.indices(2), a.indices(3)]))
    c = batching.TrainBatches(ds.train, 4, seed=4, chunk_size=10)
    assert not np.array_equal(a.indices(0), c.indices(0))


def test_windows_are_cut_inside_valid_steps_and_aligned():
    ds = standins.make_dataset(n_train=8, t=6)
    tb = batching.TrainBatches(ds.train, 4, seed=0, chunk_size=10, window=2)
    batch = tb(3)
    assert batch["inputs"].shape == (4, 20, 3)
    assert batch["targets"].shape == (4, 2, 2) and batch["mask"].shape == (4, 2)
    assert batch["mask"].all()  # every episode has >= 3 valid steps, so windows of 2 are valid
    # alignment: the targets of a window are the targets of the matching input chunk
    for j, idx in enumerate(tb.indices(3)):
        x, y = ds.train.inputs[idx], ds.train.targets[idx]
        starts = [a for a in range(5) if np.array_equal(x[a * 10:(a + 2) * 10], batch["inputs"][j])]
        assert starts and np.array_equal(y[starts[0]:starts[0] + 2], batch["targets"][j])


def test_eval_batches_count_every_sequence_once():
    ds = standins.make_dataset(n_val=5)
    batches = list(batching.eval_batches(ds.val, 4))
    assert [b["inputs"].shape[0] for b in batches] == [4, 4]
    assert sum(int(b["mask"].sum()) for b in batches) == int(ds.val.mask.sum())
    assert not batches[1]["mask"][1:].any()  # padded rows carry mask 0


def test_too_few_sequences_names_the_fix():
    ds = standins.make_dataset(n_train=3)
    with pytest.raises(ValueError, match="config.train.batch_size=4"):
        batching.TrainBatches(ds.train, 4, seed=0, chunk_size=10)


def test_augmentation_draws_are_a_pure_function_of_the_step():
    ds = standins.make_dataset(n_train=8)

    def jitter(x, y, m, rng):
        return x + rng.normal(size=x.shape).astype(x.dtype), y

    a = batching.TrainBatches(ds.train, 4, seed=1, chunk_size=10, augment=jitter)
    b = batching.TrainBatches(ds.train, 4, seed=1, chunk_size=10, augment=jitter)
    np.testing.assert_array_equal(a(5)["inputs"], b(5)["inputs"])
    assert not np.array_equal(a(5)["inputs"], ds.train.inputs[a.indices(5)])
    assert not np.array_equal(a(5)["inputs"] - ds.train.inputs[a.indices(5)],
                              a(7)["inputs"] - ds.train.inputs[a.indices(7)])
