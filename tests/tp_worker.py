"""One rank of tests/test_tensor_parallel.py (or the single process it is compared with).

    python3 -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py MODEL_DIR OUT_DIR
    python3 tests/tp_worker.py MODEL_DIR OUT_DIR            # one process, the whole model

Loads the saved model (transformers' tensor parallelism, `tp_plan="auto"`, when launched with
several ranks: each rank holds a slice of the heads; float32 on the CPU, bfloat16 on GPUs), generates greedily through the rocketkv
backend with a DynamicCache and with a RocketKVCache, and writes OUT_DIR/rank<R>_of<W>.json: the
tokens, each layer's KV heads and stored tokens, the explain report, and per graph the collectives Dynamo
traced and the ones left in the graph the pass rewrote.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import rkv_compile
from rkv_compile.backend import Runtime, make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.hf import cache_argument, returned_cache

OPTIONS = {"token_budget": 64, "max_new_tokens": 8}
STEPS = 6


def collectives(gm: torch.fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes
               if "_c10d_functional" in str(getattr(node, "target", "")))


def main(model_dir: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()   # the GPU machine: bfloat16 over NCCL
    placement = {"tp_plan": "auto"} if world > 1 else {"device_map": "cuda"} if cuda else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32, **placement)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, model.config.vocab_size, (1, 300),
                        generator=torch.Generator().manual_seed(3)).to(model.device)
    graphs = []
    # On the CPU the rewritten graphs run as traced: Inductor's CPU compiles of three
    # processes' graphs took most of the test's time and are not what it checks (the GPU run,
    # tests_gpu/test_tp_on_gpus.py, compiles them).
    rocketkv = rkv_compile.rocketkv if cuda else make_backend(compiler=lambda gm, _: gm.forward)

    def backend(gm, example_inputs, options=None):
        compiled = rocketkv(gm, example_inputs, options=options)
        rewritten = compiled.main.gm if isinstance(compiled, Runtime) else gm   # as rewritten
        graphs.append({"traced": collectives(gm), "rewritten": collectives(rewritten)})
        return compiled

    result = {"world": world, "rank": rank}
    with torch.no_grad():
        result["explain"] = str(rkv_compile.explain(
            model.generate, ids, max_new_tokens=3, do_sample=False, options=OPTIONS))
        forward = model.forward
        model.forward = torch.compile(forward, backend=backend, options=OPTIONS)
        for name, cache in (("dynamic", None), ("rocketkv_cache", RocketKVCache(model.config, 8))):
            out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 return_dict_in_generate=True, **{cache_argument(): cache})
            result[name] = out.sequences[0, 300:].tolist()
            result[f"{name}_stored"] = [[layer.keys.shape[1], layer.lengths[0]]
                                        for layer in rkv_compile.stored(returned_cache(out))]
        model.forward = forward
    result["graphs"] = graphs
    with open(os.path.join(out_dir, f"rank{rank}_of{world}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
