"""Image smoke check, run by provision.sh with the image's own Python: the data plane imports and
ONNX Runtime runs a session on the execution providers the variant promises.

    python smoke.py --variant gpu   # fails the AMI build unless CUDA actually runs a session
"""

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

MODULES = ("chalicelib.manifest", "inference", "training", "onnxruntime", "tokenizers", "numpy", "boto3")


def tiny_model(path: Path) -> None:
    """A one-node ONNX graph (y = x + x), enough to prove a provider can run a session."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "smoke", [x], [y])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=("gpu", "cpu"), required=True)
    args = ap.parse_args(argv)
    for name in MODULES:
        importlib.import_module(name)
    import numpy as np
    import onnxruntime as ort

    want = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if args.variant == "gpu"
        else ["CPUExecutionProvider"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "smoke.onnx"
        tiny_model(model)
        session = ort.InferenceSession(str(model), providers=want)
        out = session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})[0]
    if not np.allclose(out, 2.0):
        print(f"smoke: wrong result {out}", file=sys.stderr)
        return 1
    if session.get_providers()[0] != want[0]:
        print(f"smoke: {want[0]} did not load (session runs on {session.get_providers()})", file=sys.stderr)
        return 1
    print(f"smoke: onnxruntime {ort.__version__} ok on {session.get_providers()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
