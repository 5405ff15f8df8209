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
    return out


def generate(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def logits(model, prompt):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(prompt, decoder_input_ids=prompt[:, :5]).logits
        return model(prompt).logits


CASES = [(a, l) for a in ARCHS for l in ("fused", "published") if not (a == "switch_transformers" and l == "fused")]


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("arch,layout", CASES)
def test_same_tokens_and_logits_as_transformers(checkpoints, arch, layout, policy):
    reference, folder = checkpoints[(arch, layout)]
    want_tokens = generate(reference, PROMPT)
    want_logits = logits(reference, PROMPT)
    budget = quarter_budget(reference)
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
