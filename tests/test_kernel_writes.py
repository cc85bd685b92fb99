"""What Inductor believes our Triton kernels write agrees with what the ops declare.

Inductor traces into a `triton_op` and decides from each kernel's TTIR which of its tensor
arguments the kernel writes (`identify_accessed_tensors`): it follows every store's address
back to the kernel's pointer arguments, through calls into helper functions but not through
loads. Every decode op declares `mutates_args=()`, so a kernel Inductor believes writes into
an op input gets a copy of that input, not the input. From 4bb3244 a helper returned the
header words that size RocketKV's selection, so the header (an int32 view of the keys) was
"written" by the fused select-and-attend kernel: on CUDA every 16-bit decode through
Inductor gave wrong tokens (float32 and the kernels run eagerly were right), and with CUDA
graphs off Inductor failed to compile the step. The GPU suite found it; this test finds it on
the CPU: it records each kernel launch of the ops (none runs), asks Inductor's analysis what
each writes for an sm_90 target, and holds the answer to the op's contract.

The analysis needs Triton's compiler, not its interpreter, so it runs in a child process
without TRITON_INTERPRET (`main`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _cases():
    """(name, op, its tensor inputs, its other arguments): each decode `triton_op` over shapes
    that take each of its launch paths."""
    from test_triton_decode import _inputs, _packed

    from rkv_compile import state as S

    ops = torch.ops.rocketkv
    cases = []
    for D in (16, 64):   # the GPU suite's head dim, and a real model's
        q, k, v = _inputs(2, 2, 2, D, 200, torch.bfloat16, 0)
        mask = torch.rand(2, 1, 1, 200, generator=torch.Generator().manual_seed(0)) > 0.3
        plan = {S.Word.STORED: [180, 150], S.Word.CHUNK: 2, S.Word.DIMS: 4}
        cases += [(f"D {D}, plain keys", ops.sparse_decode_triton, (q, k, v),
                   (None, 0.25, [2], [4], [16])),
                  (f"D {D}, plain keys, masked", ops.sparse_decode_triton, (q, k, v, mask),
                   (0.25, [2], [4], [16]))]
        for codes in (None, (4, 32, [64, 30])):
            name = f"D {D}" + ("" if codes is None else ", codes")
            args = () if codes is None else tuple(codes[:2])
            keys, values, _ = _packed(k, v, plan, codes)
            cases += [
                (f"{name}, rocketkv, one program per head", ops.decode_triton,
                 (q, keys, values), (0.25, 16, *args)),
                (f"{name}, rocketkv, a split list", ops.decode_triton, (q, keys, values),
                 (0.25, 140, *args)),
                (f"{name}, quest", ops.page_decode_triton, (q, keys, values),
                 (0.25, 4, 8, *args)),
                (f"{name}, sparq", ops.sparq_decode_triton, (q, keys, values),
                 (0.25, 16, *args)),
                (f"{name}, exact", ops.exact_decode_triton, (q, keys, values), (0.25, *args)),
                (f"{name}, rocketkv, {LONG_ROW}", ops.decode_triton, (q, keys, values),
                 (0.25, 16, *args)),
                (f"{name}, sparq, {LONG_ROW}", ops.sparq_decode_triton, (q, keys, values),
                 (0.25, 16, *args)),
            ]
    return cases


# Cases whose rows are selected in two levels (`_long_row_selection`), as rows past
# SELECTION_LANES are: the selection's sizes made small, so these rows take it.
LONG_ROW = "a long row"
LONG_ROW_SIZES = dict(SELECTION_LANES=8, LONG_SEGMENT=32)


def main():
    """In the child: every launch of every case, and what Inductor's analysis says it writes,
    as JSON lines on stdout."""
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    from triton.backends.compiler import GPUTarget

    from rkv_compile.kernels import triton_decode

    class Hopper:   # the analysis compiles the kernel's TTIR for the current target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    launches = []

    def recording(kernel):
        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}))
                return launch
        return Launch()

    triton_decode.wrap_triton = recording
    triton.runtime.driver.set_active(Hopper())
    for name, op, tensors, rest in _cases():
        del launches[:]
        sizes = LONG_ROW_SIZES if LONG_ROW in name else {}
        saved = {size: getattr(triton_decode, size) for size in sizes}
        for size, value in sizes.items():
            setattr(triton_decode, size, value)
        try:
            op(*tensors, *rest)
        finally:
            for size, value in saved.items():
                setattr(triton_decode, size, value)
        inputs = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
        for kernel, kwargs in launches:
            accesses = identify_accessed_tensors(kernel, kwargs, {})
            writes = sorted(dep.name for dep in accesses.read_writes.writes
                            if isinstance(kwargs.get(dep.name), torch.Tensor))
            print(json.dumps(dict(case=name, kernel=kernel.fn.__name__, writes=writes,
                                  into_inputs=[w for w in writes if kwargs[w].untyped_storage()
                                               .data_ptr() in inputs])))


def test_no_decode_kernel_writes_into_an_op_input():
    """For every decode op and launch path, Inductor's analysis finds no write into the op's
    inputs (keys, values, their header, the query, the mask), and the kernels it finds
    writing are the ones that produce the output and its workspaces."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", "import test_kernel_writes as t; t.main()"],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert "assuming every input is mutated" not in run.stderr, run.stderr[-4000:]
    assert {row["case"] for row in rows} == {case[0] for case in _cases()}
    assert {row["kernel"] for row in rows} == {
        "_chunk_logits_kernel", "_select_kernel", "_sparse_attention_kernel", "_combine_kernel",
        "_packed_select_attend_kernel", "_segment_softmax_kernel", "_segment_candidates_kernel",
        "_merge_candidates_kernel"}
    assert [row for row in rows if row["into_inputs"]] == []
    assert all(row["writes"] for row in rows)   # the analysis saw each kernel's stores
    # the two-level selection writes its own workspaces only (not the logits it reads)
    long_rows = {(row["case"].split(", ")[-2], row["kernel"]): row["writes"] for row in rows
                 if LONG_ROW in row["case"] and row["kernel"] in (
                     "_segment_softmax_kernel", "_segment_candidates_kernel",
                     "_merge_candidates_kernel")}
    for policy in ("rocketkv", "sparq"):
        assert long_rows[policy, "_segment_softmax_kernel"] == ["parts_ptr"]
        assert long_rows[policy, "_segment_candidates_kernel"] == ["candidates_ptr"]
    assert long_rows["rocketkv", "_merge_candidates_kernel"] == ["out_ptr"]
    assert long_rows["sparq", "_merge_candidates_kernel"] == ["mass_ptr", "out_ptr"]
