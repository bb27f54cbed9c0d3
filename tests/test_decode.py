"""lowbit's greedy decoding loop returns ``generate``'s tokens, compiles into one graph, and keeps no model alive."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch

import lowbit
from conftest import ARCHS, tiny_model
from lowbit import decode, kernels


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 9, 5 and 7 tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, mask, n: int, eos: list[int], pad: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos or None,
                          pad_token_id=pad, cache_implementation="static")  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_returns_generates_tokens(arch: str) -> None:
    """Token for token what ``generate`` with a static cache returns, for one prompt and for left-padded batches,
    without an end token and with end tokens that end the rows at different steps (before, at and after a check of
    whether all ended), with padding apart from the end token and equal to it."""
    model = tiny_model(arch).eval()
    vocab = model.config.vocab_size
    ids, mask = _batch(vocab)
    with torch.no_grad():
        free = _generate(model, ids, mask, 40, [], 0)
        assert torch.equal(decode.greedy(model, ids, mask, 40, eos_token_id=[], pad_token_id=0), free)
        one = ids[2:, 2:]
        assert torch.equal(decode.greedy(model, one, None, 7, eos_token_id=[], pad_token_id=0),
                           _generate(model, one, None, 7, [], 0))  # fmt: skip
        new = free[:, ids.shape[1] :]
        every_row = [int(new[0, 3]), int(new[1, 5]), int(new[2, 9])]  # all rows end before the first check
        picks = [every_row, [int(new[0, 3]), int(new[1, 20])], [int(new[2, 16])], [int(new[0, 35])], [vocab - 1]]
        for eos in picks:
            for n, pad in ((40, 0), (17, eos[0])):
                ref = _generate(model, ids, mask, n, eos, pad)
                assert torch.equal(decode.greedy(model, ids, mask, n, eos_token_id=eos, pad_token_id=pad), ref)


def test_greedy_compiles_one_graph_reused_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (traced whole, as on a GPU, here with an eager backend), a quantized model whose q/k/v and gate/up
    are fused decodes ``generate``'s tokens in one graph with no break and no recompile over the steps of two calls
    with prompts of different lengths; the second call reuses the first's decoder, and a call that needs a longer
    cache, another batch size or another precision gets a new one in its place (one kept per model)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(decode, "COMPILE", {"backend": "aot_eager", "fullgraph": True, "dynamic": False})
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert kernels.prepare_decoding(model)[0] > 0  # fused groups, as ``generate`` decodes
        for prompt, n in ((ids, 12), (ids[:, :4], 20)):
            ref = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 cache_implementation="static")  # fmt: skip
            assert torch.equal(decode.greedy(model, prompt, max_new_tokens=n, pad_token_id=0, compile=True), ref)
            first = decode._decoders[model]
        assert first.length == decode.LENGTH_STEP and first.step is not decode._step
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
        decode.greedy(model, ids, max_new_tokens=decode.LENGTH_STEP, pad_token_id=0, compile=True)
        longer = decode._decoders[model]
        assert longer is not first and longer.length == 2 * decode.LENGTH_STEP
        decode.greedy(model, torch.cat([ids, ids]), max_new_tokens=3, pad_token_id=0, compile=True)
        assert decode._decoders[model] is not longer and decode._decoders[model].state[0] == 2
        two = decode._decoders[model]
        model.to(torch.bfloat16)  # keys and values in bf16: another cache
        decode.greedy(model, torch.cat([ids, ids]), max_new_tokens=3, pad_token_id=0, compile=True)
        assert decode._decoders[model] is not two and decode._decoders[model].state[3] == torch.bfloat16
    decode.release(model)
    assert model not in decode._decoders
    torch._dynamo.reset()


def test_greedy_decodes_uncompiled_where_compiling_would_not_pay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step that cannot be compiled (here a backend that fails) runs eagerly, with a note, and gives the same
    tokens; so does a model with chunked attention, whose cache would make CUDA graphs re-record at every token; an
    inference-mode call followed by a normal one builds a new cache rather than failing."""
    from torch._dynamo.exc import TorchDynamoException

    def broken(gm, example_inputs):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(decode, "COMPILE", {"backend": broken, "fullgraph": True})
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    ref = decode.greedy(model, ids, max_new_tokens=6, eos_token_id=[], compile=False)
    torch._dynamo.reset()
    assert torch.equal(decode.greedy(model, ids, max_new_tokens=6, eos_token_id=[], compile=True), ref)
    assert "could not be compiled" in capsys.readouterr().err and decode._decoders[model].step is decode._step
    assert issubclass(torch._dynamo.exc.BackendCompilerFailed, TorchDynamoException)
    chunked = tiny_model("llama").eval()
    chunked.config.attention_chunk_size = 4  # no Llama block reads it: the decoder's choice is all it changes
    with torch.inference_mode():
        eager = decode.greedy(chunked, ids, max_new_tokens=6, eos_token_id=[], compile=False)
    assert torch.equal(decode.greedy(chunked, ids, max_new_tokens=6, eos_token_id=[], compile=True), eager)
    assert "chunked attention" in capsys.readouterr().err and decode._decoders[chunked].step is decode._step
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_compiles_every_architecture_into_one_graph(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every architecture, quantized to W4 with q/k/v and gate/up fused as ``generate`` decodes it, compiled (traced
    whole with an eager backend, as on a GPU), returns the tokens of ``generate``'s static cache in one graph with
    no break and no recompile over the steps. Sliding-window attention (every layer: Mistral; alternate layers:
    Gemma-2/3) runs with a window of 8 tokens, far shorter than the 9-token prompts plus 30 new tokens, against
    ``generate``'s rolling sliding layers, with full-length layers in their place."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import StaticLayer

    from conftest import tiny_config

    monkeypatch.setattr(decode, "COMPILE", {"backend": "aot_eager", "fullgraph": True, "dynamic": False})
    sliding = arch in ("mistral", "gemma2", "gemma3_text")

    def model_with(window: int):
        config = tiny_config(arch)
        if sliding:
            config.sliding_window = window
        torch.manual_seed(0)  # the same weights whatever the window
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
        kernels.prepare_decoding(model, rows=3)
        return model

    model = model_with(8)
    ids, mask = _batch(model.config.vocab_size, seed=3)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = _generate(model, ids, mask, 30, [], 0)
        assert torch.equal(decode.greedy(model, ids, mask, 30, eos_token_id=[], pad_token_id=0, compile=True), ref)
        assert all(type(layer) is StaticLayer for layer in decode._decoders[model].cache.layers)
        if sliding:  # the window matters here: with one longer than the text the tokens differ
            assert not torch.equal(_generate(model_with(64), ids, mask, 30, [], 0), ref)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    decode.release(model)
    torch._dynamo.reset()


def test_compiled_greedy_follows_a_lora_trained_between_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step, which can check the decoding kernel's LoRA copies by identity only, decodes with the factors
    as they are at each call: trained in place between two calls (an optimizer step), with a prompt longer than the
    decoding kernel takes (so the prompt's eager pass does not refresh the copies on its way), the second call
    gives the eager tokens of the trained model, and the first call's tokens no longer."""
    monkeypatch.setattr(decode, "COMPILE", {"backend": "aot_eager", "fullgraph": True, "dynamic": False})
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64, init="qlora", rank=8), progress=False)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(2))  # 20 rows > torch-int4's 16
    torch._dynamo.reset()
    with torch.no_grad():
        kernels.prepare_decoding(model)
        before = decode.greedy(model, ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0, compile=True)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    gen = torch.Generator().manual_seed(5)
    for p in params:  # an optimizer step, in place, with a large made-up gradient (B starts at zero)
        p.grad = torch.randn(p.shape, generator=gen)
    torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad():
        after = decode.greedy(model, ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0, compile=True)
        decode.release(model)
        eager = decode.greedy(model, ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0, compile=False)
    assert torch.equal(after, eager) and not torch.equal(after, before)
    torch._dynamo.reset()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor needs a C++ compiler")
def test_greedy_compiles_with_inductor_on_the_cpu() -> None:
    """With inductor itself, as ``generate --static-cache`` compiles the step on the CPU (C++ kernels; about 40 s
    here, the only test that builds them): a W4 model with fused siblings and a trained LoRA decodes through the
    compiled step -- it did not fall back to eager steps -- and returns the eager loop's tokens."""
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64, init="qlora", rank=8), progress=False)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        ids = torch.randint(3, 128, (1, 6), generator=gen)
        assert kernels.prepare_decoding(model)[0] > 0
        eager = decode.greedy(model, ids, max_new_tokens=10, eos_token_id=[], pad_token_id=0, compile=False)
        decode.release(model)
        torch._dynamo.reset()
        compiled = decode.greedy(model, ids, max_new_tokens=10, eos_token_id=[], pad_token_id=0, compile=True)
        assert decode._decoders[model].step is not decode._step
    assert torch.equal(compiled, eager)
    decode.release(model)
    torch._dynamo.reset()


def test_greedy_defers_to_generate_for_other_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """A generation config that asks for more than an argmax (here a repetition penalty) is decoded by ``generate``,
    whose tokens differ from a plain argmax's, with a note saying so."""
    model = tiny_model("qwen2").eval()
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = decode.greedy(model, ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
        assert decode.processors(model) == [] and "note" not in capsys.readouterr().err
        model.generation_config.min_new_tokens = 0  # does nothing: still a plain argmax
        assert decode.processors(model) == []
        model.generation_config.repetition_penalty = 3.0
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = decode.greedy(model, ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert decode.processors(model) == ["repetition_penalty"]
    model.generation_config.num_beams = 2
    assert decode.processors(model) == ["repetition_penalty", "num_beams"]
    assert torch.equal(got, ref) and not torch.equal(got, plain)
    assert "repetition_penalty" in capsys.readouterr().err


def test_greedy_keeps_no_model_alive_and_checks_its_input() -> None:
    """The kept decoder does not hold its model: a model dropped by its user is freed, decoder and all."""
    model = tiny_model("gpt2").eval()
    decode.greedy(model, torch.tensor([[5, 6]]), max_new_tokens=3)
    assert model in decode._decoders
    with pytest.raises(ValueError, match="at least 1"):
        decode.greedy(model, torch.tensor([[5, 6]]), max_new_tokens=0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
