"""The same training code on 1 and 4 (forced host) CPU devices gives the same numbers."""
import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_four_device_mesh_matches_one_device(tmp_path):
    out = tmp_path / "mesh.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.train._mesh_script", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    one = res["one"]
    assert one["batch_devices"] == 1
    assert res["data4"]["mesh"] == {"data": 4, "model": 1} and res["data4"]["batch_devices"] == 4
    assert res["data2_model2"]["mesh"] == {"data": 2, "model": 2}
    # 'mlp' -> 'model' in config.mesh.rules: the (30, 16) hidden kernel is split in two
    assert one["kernel_shard_shape"] == [30, 16]
    assert res["data2_model2"]["kernel_shard_shape"] == [30, 8]
    for name in ("data4", "data2_model2"):
        other = res[name]
        assert_close(np.array(other["losses"]), np.array(one["losses"]), np.float32, what=name)
        assert_close(np.array(other["sse"]), np.array(one["sse"]), np.float32, what=name)
        for a, b in zip(other["params"], one["params"]):
            assert_close(np.array(a), np.array(b), np.float32, what=f"{name} params")
