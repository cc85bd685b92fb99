"""What only a CUDA machine can check: Inductor traces the triton_op, and decode graphs on CUDA
run the Triton kernels and generate the tokens of the eager oracle."""
import torch
from models import tiny_hf
from oracle import oracle_generate

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.kernels import triton_decode as T

assert torch.cuda.is_available(), "tests_gpu/ runs on the GPU machine"
BUDGET = {"token_budget": 64, "max_new_tokens": 8}


def test_inductor_traces_the_triton_op():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*s, generator=gen).to("cuda", torch.bfloat16)
               for s in [(1, 32, 1, 128), (1, 8, 1500, 128), (1, 8, 1500, 128)])
    f = torch.compile(lambda q, k, v: torch.ops.rocketkv.sparse_decode_triton(
        q, k, v, 128**-0.5, 3, 60, 128) * 2)
    torch.testing.assert_close(f(q, k, v), 2 * T.sparse_decode(q, k, v, 128**-0.5, 3, 60, 128))


def test_cuda_decode_uses_triton_and_matches_oracle():
    model = tiny_hf("llama").cuda()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(300)).cuda()
    with torch.no_grad():
        report = rkv_compile.explain(lambda: model.generate(ids, max_new_tokens=3), options=BUDGET)
    decode = [s for s in report.sites if s.query_len == "1"]
    assert decode and all("triton kernels" in s.action for s in decode)
    forward = model.forward
    model.forward = torch.compile(forward, backend=rkv_compile.rocketkv, options=BUDGET)
    try:
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    finally:
        model.forward = forward
    expected, _ = oracle_generate(model, ids, RocketKVConfig.from_options(BUDGET), 8)
    assert out[0, 300:].tolist() == expected
