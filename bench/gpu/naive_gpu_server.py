"""The naive GPU baseline for ``bench/gpu_bench.py``: a transformers pipeline on the GPU inside
the request handler, one request at a time (what a tutorial would deploy).

    python bench/gpu/naive_gpu_server.py PORT [--cpu] [--base MINILM_DIR]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoTokenizer, pipeline

    port = int(sys.argv[1])
    device = "cpu" if "--cpu" in sys.argv else 0
    import gpu_bench

    base = gpu_bench.base_model_dir(sys.argv[sys.argv.index("--base") + 1] if "--base" in sys.argv else None)
    model = gpu_bench.hf_classifier(base)
    pipe = pipeline(
        "text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(base), device=device
    )

    async def classify(request):
        body = await request.json()
        return JSONResponse({"results": pipe(body["inputs"])})  # blocks the loop: one at a time

    async def ready(request):
        return JSONResponse({"status": "ready"})

    app = Starlette(routes=[Route("/v1/classify", classify, methods=["POST"]), Route("/readyz", ready)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
