import sys; sys.path.insert(0, "tests")
import torch, rkv_compile
from torch._dynamo.utils import counters
from models import tiny_hf
from rkv_compile.cache import RocketKVCache
model = tiny_hf("llama").cuda()
ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(7)).cuda()
options = {"token_budget": 64, "max_new_tokens": 10, "cudagraphs": True}
model.forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=RocketKVCache(model.config, 10), disable_compile=True)
print("INDUCTOR", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "fxgraph" in k}, flush=True)
