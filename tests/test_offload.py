"""Offloaded generation equals the resident transformers model, for every architecture and policy."""

from __future__ import annotations

import pytest
import torch

import expertflow as ef
from expertflow.policies import POLICY_NAMES

from moe_models import ARCHS, build, quarter_budget, save

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])
NEW_TOKENS = 10



@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    """These tests compare fp32 on the CPU (the GPU suite is tests/test_offload_gpu.py)."""
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(arch, layout): (reference model, folder)} built once per test module."""
    out = {}
    for arch in ARCHS:
        model = build(arch)
        for layout in ("fused", "published"):
            if arch == "switch_transformers" and layout == "fused":
                continue  # Switch checkpoints only exist with one module per expert
            out[(arch, layout)] = (model, save(model, tmp_path_factory.mktemp(f"{arch}-{layout}"), layout, num_shards=2))
    # gpt-oss's MXFP4 checkpoint: the reference is transformers' own model on the dequantized weights.
    from transformers import AutoModelForCausalLM, Mxfp4Config

    folder = save(build("gpt_oss"), tmp_path_factory.mktemp("gpt_oss-mxfp4"), "mxfp4", num_shards=2)
    dequantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                       dtype=torch.float32).float().eval()  # 5.17 dequantizes to bf16 (exact)
    out[("gpt_oss", "mxfp4")] = (dequantized, folder)
    return out


def generate(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def logits(model, prompt):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(prompt, decoder_input_ids=prompt[:, :5]).logits
        return model(prompt).logits


CASES = [(a, l) for a in ARCHS for l in ("fused", "published")
         if not (a == "switch_transformers" and l == "fused") and not (a == "gpt_oss" and l == "published")]  # gpt-oss publishes fused
CASES.append(("gpt_oss", "mxfp4"))


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("arch,layout", CASES)
def test_same_tokens_and_logits_as_transformers(checkpoints, arch, layout, policy):
    reference, folder = checkpoints[(arch, layout)]
    want_tokens = generate(reference, PROMPT)
    want_logits = logits(reference, PROMPT)
    budget = quarter_budget(reference, stored_format="mxfp4" if layout == "mxfp4" else None)
    model = ef.from_pretrained(folder, gpu_memory=budget, policy=policy, headroom=0, progress=False)
    try:
        stats_cache = model.expertflow.cache
        if policy != "all_gpu":
            assert stats_cache.num_slots <= reference_experts(reference) // 4
        got_tokens = generate(model, PROMPT)
        assert got_tokens.tolist() == want_tokens.tolist()
        torch.testing.assert_close(logits(model, PROMPT), want_logits, rtol=1e-5, atol=1e-5)
        s = model.expertflow.stats()
        assert s["hits"] + s["misses"] == s["accesses"] > 0
        if policy != "all_gpu":
            assert s["misses"] > 0 and s["evictions"] > 0  # the budget really forced offloading
    finally:
        model.expertflow.close()


def reference_experts(model) -> int:
    from moe_models import expert_bytes

    return expert_bytes(model)[2]


def reference_moe(hidden, routing, weights, experts_of, act):
    """transformers' eager experts loop, written out: for each expert in ascending order, its tokens'
    SwiGLU output times their routing weight, accumulated in token order."""
    out = torch.zeros_like(hidden)
    for e in sorted(set(routing.flatten().tolist())):
        for t in range(hidden.shape[0]):
            for r in range(routing.shape[1]):
                if routing[t, r] == e:
                    gate_up, down = experts_of(e)
                    g, u = (hidden[t] @ gate_up.T).chunk(2)
                    out[t] += ((act(g) * u) @ down.T) * weights[t, r]
    return out


@pytest.mark.parametrize("num_tokens,num_slots", [(1, 2), (7, 3), (33, 16)])
def test_run_layer_groups_tokens_like_the_reference(checkpoints, num_tokens, num_slots):
    """Odd token counts, batches needing more experts than slots (waves), every token once."""
    reference, folder = checkpoints[("mixtral", "fused")]
    model = ef.from_pretrained(folder, policy="lru", expert_slots=num_slots, headroom=0, progress=False)
    try:
        engine = model.expertflow
        layer = engine.layers[1]
        g = torch.Generator().manual_seed(num_tokens)
        hidden = torch.randn(num_tokens, reference.config.hidden_size, generator=g)
        routing = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(num_tokens)])
        weights = torch.rand(num_tokens, 2, generator=g)
        got = layer.module(hidden, routing, weights)
        experts = reference.model.layers[1].mlp.experts
        want = reference_moe(hidden, routing, weights, lambda e: (experts.gate_up_proj[e], experts.down_proj[e]),
                             torch.nn.functional.silu)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert engine.host_transfers == 1
    finally:
        model.expertflow.close()


@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_one_routing_transfer_per_layer_visit(checkpoints, policy):
    reference, folder = checkpoints[("qwen3_moe", "fused")]
    model = ef.from_pretrained(folder, policy=policy, gpu_memory=quarter_budget(reference), headroom=0, progress=False)
    try:
        generate(model, PROMPT)
        # NEW_TOKENS forward passes (the prefill and NEW_TOKENS - 1 decode steps), each visiting every layer once.
        assert model.expertflow.host_transfers == NEW_TOKENS * model.expertflow.num_layers
    finally:
        model.expertflow.close()


def test_compressed_experts_fit_more_slots_in_the_same_budget(checkpoints):
    """gpt-oss's MXFP4 experts stay compressed: the budget that holds a quarter of them dense holds
    over three times as many slots, and their bytes per expert are what MXFP4 packs."""
    reference, mxfp4_folder = checkpoints[("gpt_oss", "mxfp4")]
    _, dense_folder = checkpoints[("gpt_oss", "fused")]
    budget = quarter_budget(reference)
    dense = ef.from_pretrained(dense_folder, gpu_memory=budget, policy="lru", headroom=0, progress=False)
    packed = ef.from_pretrained(mxfp4_folder, gpu_memory=budget, policy="lru", headroom=0, progress=False)
    try:
        assert packed.expertflow.expert_format.name == "mxfp4" and dense.expertflow.expert_format.dense
        assert packed.expertflow.cache.num_slots >= 3 * dense.expertflow.cache.num_slots
        # gate_up (128 out x 32 in) and down (32 x 64): 4-bit codes and a byte of scale per 32 inputs,
        # or fp32 weights; fp32 biases either way; each tensor 256-byte aligned
        align = lambda n: -(-n // 256) * 256  # noqa: E731
        weights = [(128, 32), (32, 64)]
        assert packed.expertflow.pool.expert_bytes(0) == sum(align(o * i // 2) + align(o * i // 32) + align(4 * o) for o, i in weights)
        assert dense.expertflow.pool.expert_bytes(0) == sum(align(4 * o * i) + align(4 * o) for o, i in weights)
    finally:
        dense.expertflow.close()
        packed.expertflow.close()


@pytest.mark.parametrize("expert_dtype", ["fp8", "int8"])
def test_quantized_at_load_computes_the_quantized_weights(checkpoints, expert_dtype):
    """expert_dtype quantizes a dense checkpoint's experts at load: the offloaded model gives the
    tokens and logits of transformers' model whose expert weights are replaced by their quantized
    values (q * scale, per 128x128 block for fp8, per row for int8), and its pool holds the codes."""
    import copy

    from expertflow.formats import FP8_BLOCK

    reference, folder = checkpoints[("mixtral", "published")]
    quantized = copy.deepcopy(reference)
    for layer in quantized.model.layers:
        experts = layer.mlp.experts
        for param in (experts.gate_up_proj, experts.down_proj):
            with torch.no_grad():
                for e in range(param.shape[0]):
                    w = param[e]
                    if expert_dtype == "int8":
                        scale = w.abs().amax(dim=1, keepdim=True) / 127
                        param[e] = torch.round(w / scale).clamp(-127, 127) * scale
                    else:
                        out, inp = w.shape
                        for i in range(0, out, FP8_BLOCK):
                            for j in range(0, inp, FP8_BLOCK):
                                block = w[i : i + FP8_BLOCK, j : j + FP8_BLOCK]
                                scale = block.abs().max() / 448
                                param[e, i : i + FP8_BLOCK, j : j + FP8_BLOCK] = (block / scale).to(torch.float8_e4m3fn).float() * scale
    model = ef.from_pretrained(folder, expert_slots="25%", policy="lru", expert_dtype=expert_dtype, progress=False)
    try:
        assert model.expertflow.expert_format.name == expert_dtype
        codes = model.expertflow.pool.expert(0, 3)["gate_up"]
        assert codes.dtype == (torch.int8 if expert_dtype == "int8" else torch.float8_e4m3fn)
        assert generate(model, PROMPT).tolist() == generate(quantized, PROMPT).tolist()
        torch.testing.assert_close(logits(model, PROMPT), logits(quantized, PROMPT), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits(quantized, PROMPT), logits(reference, PROMPT), atol=1e-6)  # it did quantize
    finally:
        model.expertflow.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoints_keep_their_experts_in_fp8(tmp_path, arch):
    """A DeepSeek-V3 / Qwen3 FP8 style checkpoint (every projection e4m3 with 128 x 128 block scales):
    the experts stay fp8 in pool and slots, and the tokens and logits are those of transformers' own
    model on the dequantized checkpoint."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    sizes = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256)  # whole 128 x 128 blocks
    folder = save(build(arch, overrides=sizes), tmp_path / arch, "fp8", num_shards=2)
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                     dtype=torch.float32).eval()
    for expert_dtype, stored in ((None, torch.float8_e4m3fn), ("bf16", torch.float32)):  # "bf16": expanded at load
        model = ef.from_pretrained(folder, expert_slots="25%", policy="lru", dtype="float32", expert_dtype=expert_dtype,
                                   progress=False)
        try:
            assert model.expertflow.expert_format.name == ("fp8" if expert_dtype is None else "dense")
            assert model.expertflow.pool.expert(1, 2)["gate_up"].dtype == stored
            assert generate(model, PROMPT).tolist() == generate(reference, PROMPT).tolist()
            torch.testing.assert_close(logits(model, PROMPT), logits(reference, PROMPT), rtol=1e-5, atol=1e-5)
            assert model.expertflow.stats()["misses"] > 0
        finally:
            model.expertflow.close()
    # Blocks that do not tile the experts are refused before any weight loads.
    unaligned = save(build(arch), tmp_path / "unaligned", "fp8")
    with pytest.raises(ValueError, match="an FFN that is a multiple of 128"):
        ef.from_pretrained(unaligned, progress=False)


def test_fp8_checkpoints_with_half_precision_scales_or_without_scales(tmp_path):
    """Scales shipped in bf16 widen to fp32 exactly (the same tokens as transformers); experts whose
    scales the checkpoint lacks are refused by name instead of left as garbage."""
    import json as _json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    sizes = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256)
    folder = save(build("qwen3_moe", overrides=sizes), tmp_path / "fp8", "fp8")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if k.endswith("_scale_inv") else v for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                     dtype=torch.float32).eval()
    model = ef.from_pretrained(folder, expert_slots="25%", policy="lru", dtype="float32", progress=False)
    try:
        assert generate(model, PROMPT).tolist() == generate(reference, PROMPT).tolist()
    finally:
        model.expertflow.close()
    # The fused layout with an fp8 config: no scales for the experts.
    fused = save(build("qwen3_moe", overrides=sizes), tmp_path / "fused", "fused")
    config = _json.loads((fused / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (fused / "config.json").write_text(_json.dumps(config))
    with pytest.raises(ValueError, match="lacks down_scale, gate_up_scale"):
        ef.from_pretrained(fused, expert_slots="25%", progress=False)


def test_compiled_decoding_gives_the_resident_tokens_and_follows_a_new_engine(checkpoints):
    """enable_cuda_graphs' compiled decoding (here on the CPU, torch.compile's default mode: no
    graphs) around the eager experts gives the resident model's tokens; a second engine attached to
    the compiled model has its own step hook run (a hook traced with the first must not be called)."""
    from torch._dynamo.utils import counters

    from expertflow.loader import attach, enable_cuda_graphs, load_offloaded

    reference, folder = checkpoints[("mixtral", "published")]
    prompt = torch.tensor([[3, 14, 15, 92, 65]])

    def tokens(model):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0).tolist()

    want = tokens(reference)
    model, arch, pool = load_offloaded(folder, progress=False)
    try:
        with pytest.raises(ValueError, match="CUDA graphs needs a CUDA device"):
            enable_cuda_graphs(model)
        with pytest.raises(ValueError, match="mode must be one of"):
            enable_cuda_graphs(model, mode="fast")
        enable_cuda_graphs(model, mode="default")
        assert model.generation_config.cache_implementation == "static"
        num_slots = pool.num_layers * pool.num_experts(0) // 2
        # expertflow plans at each step (a hook), lru does not: the third engine's hook is not the first's
        for n, policy in enumerate(("expertflow", "lru", "expertflow")):
            graphs_before = counters["stats"]["unique_graphs"]
            engine = attach(model, arch, pool, num_slots, policy, owns_pool=False)
            try:
                assert tokens(model) == want
                assert engine.steps == (6 if policy == "expertflow" else 0) and engine.stats()["misses"] > 0
            finally:
                engine.close()
            if n == 0:
                assert counters["stats"]["unique_graphs"] > graphs_before  # it did compile
    finally:
        pool.close()


def test_stable_hooks_call_the_hooks_present_and_leave_with_the_last():
    """StableHook: hooks run in the order added, a forward hook's result replaces the output and a
    pre-hook's the inputs; the module's dispatcher goes with its last hook and comes back with the next."""
    from expertflow.offload import StableHook

    module = torch.nn.Linear(3, 3)
    x = torch.ones(1, 3)
    plain = module(x)
    calls = []
    first = StableHook(module, lambda m, i, o: calls.append("first"))
    second = StableHook(module, lambda m, i, o: o * 2)
    torch.testing.assert_close(module(x), plain * 2)
    assert calls == ["first"] and len(module._forward_hooks) == 1
    pre = StableHook(module, lambda m, i: (i[0] * 0,), pre=True)
    torch.testing.assert_close(module(x), module.bias.detach().expand(1, 3) * 2)
    pre.remove()
    second.remove()
    first.remove()
    assert len(module._forward_hooks) == 0 and len(module._forward_pre_hooks) == 0
    torch.testing.assert_close(module(x), plain)
    again = StableHook(module, lambda m, i, o: o + 1)
    torch.testing.assert_close(module(x), plain + 1)
    again.remove()
    again.remove()  # twice: nothing left to take
    assert len(module._forward_hooks) == 0


def test_forced_routing_replaces_the_routers_choice_and_the_gate_ahead_guess(checkpoints):
    """A benchmark's forced routing (bench.harness.force_routing): each layer runs the forced experts,
    and a policy that guesses the next layer with its router hears the forced choice of that layer."""
    from expertflow.bench.harness import force_routing

    _, folder = checkpoints[("mixtral", "published")]
    model = ef.from_pretrained(folder, policy="gate_ahead", expert_slots="50%", headroom=0, progress=False)
    engine = model.expertflow
    assert engine.policy.gate_from_router
    num_layers = engine.num_layers
    forced = {layer: torch.tensor([[layer % 8, (layer + 3) % 8]]) for layer in range(num_layers)}
    heard = []
    on_layer = engine.policy.on_layer
    engine.policy.on_layer = lambda layer, chosen, gate: heard.append((layer, chosen.tolist(), gate)) or on_layer(layer, chosen, gate)
    handles = force_routing(model, engine.architecture, lambda layer: forced[layer])
    try:
        with torch.no_grad():
            model(torch.tensor([[3]]))
    finally:
        for h in handles:
            h.remove()
        engine.close()
    assert [layer for layer, _, _ in heard] == list(range(num_layers))
    for layer, chosen, gate in heard:
        assert chosen == forced[layer].tolist()
        if layer + 1 < num_layers:
            assert gate.tolist() == forced[layer + 1].tolist()
    assert all(m.forced_routing is None for m in model.modules() if hasattr(m, "forced_routing"))
