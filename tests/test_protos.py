"""The committed stubs in rlhf/v1/ must be exactly what scripts/gen_protos.py makes."""

import subprocess
import sys

from common.paths import REPO_ROOT


def test_committed_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"stubs are stale, run `make protos`:\n{result.stdout}{result.stderr}"


def test_every_service_is_generated():
    from rlhf.v1 import admin_pb2, feedback_pb2, inference_pb2

    services = {
        name
        for module in (admin_pb2, feedback_pb2, inference_pb2)
        for name in module.DESCRIPTOR.services_by_name
    }
    assert services == {"Inference", "Feedback", "Admin"}


def test_check_detects_a_stale_stub(tmp_path):
    """A hand-edited copy of the stubs: --check must fail and name the file."""
    import shutil

    for part in ("scripts", "protos", "rlhf"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part)
    stub = tmp_path / "rlhf" / "v1" / "common_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# hand edit\n")
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "rlhf/v1/common_pb2.pyi" in result.stdout
