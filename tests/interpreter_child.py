"""Triton tests on machines without CUDA: a test module re-runs itself in a child pytest under
TRITON_INTERPRET=1 (the interpreter must be chosen before triton is first imported)."""
import os
import re
import subprocess
import sys

CHILD_ENV = "LATENTMOE_TRITON_TEST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


def run_module_under_interpreter(path: str) -> None:
    """Run the module's non-GPU tests in the child; fail on any failed or skipped test but the runner."""
    import triton  # noqa: F401  (a dev dependency: missing it must fail, not skip)
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-o", "addopts=", "-q", "-m", "not gpu",
                           "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Only the runner itself may be skipped in the child: a silently skipped kernel test would hide a failure.
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed, 1 skipped", summary) and "failed" not in summary, proc.stdout[-3000:]
