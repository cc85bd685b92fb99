"""Carry a bundled model (rkv_compile/hf.py) to the GPU machine, whose calls take 64 MiB each.

    python3 benchmarks/stage_model.py qwen2.5-coder-0.5b      # here, once

Cuts the model's GGUF file into pieces in the ignored folders .stage/p01,
.stage/p02, ..., puts the wheels of the GGUF reader and of quanto (transformers' QuantizedCache)
for the machine's Python 3.12 in .stage/whl,
each piece as large as a call can carry beside the working tree (64 MiB, less the tracked
files and 2 MiB to spare), and prints the calls to make, back to back while the machine stays warm (/tmp survives between
calls only then): each carries one piece and appends it to /tmp/<model>/<file>; the last one
checks the file's digest. Then runs set the model's variable (RKV_QWEN_DIR=/tmp/<model>) and
install the reader: `python3 -m pip install -q --no-index --no-deps --target /tmp/site
.stage/whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH` (carry [".stage/whl"]).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rkv_compile.hf import MODELS, model_dir  # noqa: E402

CALL_LIMIT = 64 << 20
GGUF_READER = "gguf==0.19.0"
# transformers' QuantizedCache at 2-4 bits (`rkv eval`'s hf-quantized row) needs quanto, a
# pure-Python wheel, and ninja, which it imports; neither is on the GPU machine
QUANTO = ("optimum-quanto==0.2.7", "ninja==1.13.2")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(MODELS))
    args = parser.parse_args()
    model = MODELS[args.model]
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    exclude = os.path.join(root, ".git", "info", "exclude")
    os.makedirs(os.path.dirname(exclude), exist_ok=True)
    ignored = os.path.exists(exclude) and "/.stage/" in open(exclude).read().split()
    if not ignored:
        with open(exclude, "a") as f:
            f.write("/.stage/\n")
    stage = os.path.join(root, ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    source = os.path.join(model_dir(args.model), model.gguf)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                             check=True).stdout.decode().split("\0")
    tree = sum(os.path.getsize(os.path.join(root, f)) for f in tracked
               if f and os.path.isfile(os.path.join(root, f)))
    piece = (CALL_LIMIT - tree - (2 << 20)) >> 20 << 20
    pieces = 0
    with open(source, "rb") as f:
        while block := f.read(piece):
            pieces += 1
            os.makedirs(os.path.join(stage, f"p{pieces:02}"))
            with open(os.path.join(stage, f"p{pieces:02}", "piece"), "wb") as out:
                out.write(block)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", "-d", os.path.join(stage, "whl"),
                    GGUF_READER, *QUANTO], check=True)
    target = f"/tmp/{args.model}"
    print(f"{pieces} pieces of {model.gguf} ({piece >> 20} MiB each) in .stage/; make these "
          "calls back to back:")
    for i in range(1, pieces + 1):
        command = f"mkdir -p {target} && cat .stage/p{i:02}/piece >> {target}/{model.gguf}"
        if i == 1:
            command = f"rm -f {target}/{model.gguf}; " + command
        if i == pieces:
            command += f" && echo '{model.sha256}  {target}/{model.gguf}' | sha256sum -c"
        print(f'  carry [".stage/p{i:02}"]: {command}')
    print(f"then: export {model.env}={target} (and the reader from .stage/whl, see this file)")


if __name__ == "__main__":
    main()
