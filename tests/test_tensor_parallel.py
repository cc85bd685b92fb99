"""RocketKV under transformers' tensor parallelism (`tp_plan="auto"`, torch.distributed): two
CPU processes over gloo, each holding half of the heads, against one process holding them all.

Stage 1 and stage 2 decide per KV head, so each rank compresses its own KV heads with no
communication of its own: the rewritten graphs keep exactly the collectives Dynamo traced (the
model's all-reduces), and the tokens are the single process's.
"""
import json
import os
import subprocess
import sys

from models import tiny_hf

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args, out_dir, env):
    subprocess.run([sys.executable, *args, os.path.join(HERE, "tp_worker.py"),
                    str(out_dir / "model"), str(out_dir)], check=True, env=env, timeout=1500)


def run_workers(out_dir) -> tuple[dict, list[dict]]:
    """tp_worker.py as one process, then as two ranks: their results."""
    tiny_hf("llama").save_pretrained(out_dir / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE,
                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    _run([], out_dir, env)
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
         out_dir, env)
    one = json.loads((out_dir / "rank0_of1.json").read_text())
    return one, [json.loads((out_dir / f"rank{r}_of2.json").read_text()) for r in range(2)]


def test_two_ranks_generate_as_one_process(tmp_path):
    one, ranks = run_workers(tmp_path)
    for rank in ranks:
        # the same tokens as one process, through both caches
        assert rank["dynamic"] == one["dynamic"] and rank["rocketkv_cache"] == one["rocketkv_cache"]
        # each rank stores its own KV head (of 2), as many tokens as one process keeps per head
        for name in ("dynamic_stored", "rocketkv_cache_stored"):
            assert rank[name] == [[1, tokens] for _, tokens in one[name]]
        # the pass adds no communication: each graph keeps the collectives Dynamo traced
        assert rank["graphs"] and all(g["rewritten"] == g["traced"] for g in rank["graphs"])
        assert any(g["traced"] > 0 for g in rank["graphs"])
    assert ranks[0]["explain"] == ranks[1]["explain"]   # every rank rewrites the same sites
    assert "rocketkv keeps" in ranks[0]["explain"]
    assert all(g["traced"] == 0 for g in one["graphs"])
