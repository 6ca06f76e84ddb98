"""The control plane is the Lambda package: importing it must not pull in the data plane's heavy
libraries (a cold start would pay seconds for them, and the zip would not hold them)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "transformers", "onnxruntime", "optimum", "tokenizers", "onnx")


def test_import_app_loads_no_heavy_library():
    code = (
        "import sys, app\n"
        f"heavy = {HEAVY!r}\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"import app loaded: {out.stdout.strip()}"
    # -X importtime lists every module imported; none of them may be a heavy one either
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY)
