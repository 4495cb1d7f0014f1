"""Fixtures for the data tests."""
import pytest


@pytest.fixture(scope="session")
def imu_raw(tmp_path_factory):
    """A small synthetic IMU set in the raw layout (10 episodes x 6 s), shared read-only."""
    from hiss_jax.data import write_synthetic
    path = tmp_path_factory.mktemp("imu") / "synthetic_imu_processed.h5"
    return write_synthetic("imu", str(path), seed=3, n_episodes=10, episode_seconds=6)
