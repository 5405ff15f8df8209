"""bf16 on the GPU: offloaded generation yields the same 32 tokens as transformers, every policy."""

import pytest
import torch

import expertflow as ef
from expertflow.policies import POLICY_NAMES

from moe_models import ARCHS, build, quarter_budget, save

pytestmark = pytest.mark.gpu
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        model = build(arch, dtype=torch.bfloat16)
        out[arch] = (model, save(model, tmp_path_factory.mktemp(arch), "published"))
    return out


def generate(model):
    with torch.no_grad():
        return model.generate(PROMPT.cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist()


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_same_tokens_on_gpu(bf16_checkpoints, arch, policy):
    model, folder = bf16_checkpoints[arch]
    auto = type(model)
    # The eager experts loop: the arithmetic ExpertFlow's offloaded experts also run.
    eager = {} if model.config.is_encoder_decoder else {"experts_implementation": "eager"}
    reference = auto.from_pretrained(folder, dtype=torch.bfloat16, **eager).cuda().eval()
    want = generate(reference)
    del reference
    offloaded = ef.from_pretrained(folder, gpu_memory=quarter_budget(model), headroom=0, policy=policy, progress=False)
    try:
        assert next(offloaded.parameters()).device.type == "cuda"
        assert generate(offloaded) == want
        if policy != "all_gpu":
            assert offloaded.expertflow.stats()["misses"] > 0
    finally:
        offloaded.expertflow.close()


def count_syncs(fn) -> int:
    """Synchronising CUDA calls torch makes while ``fn`` runs (its sync debug mode warns on each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("policy", ["all_gpu", "lru", "expertflow"])
def test_host_syncs_per_forward(bf16_checkpoints, policy, tmp_path):
    """One sync per MoE layer (its routing transfer) plus, with a step predictor, one per forward."""
    from expertflow.predictor import PredictorConfig, RoutingPathPredictor

    model, folder = bf16_checkpoints["mixtral"]
    prompt = PROMPT.cuda()
    resident = type(model).from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        baseline = count_syncs(lambda: resident(prompt))
    resident = None  # free the resident copy before loading the offloaded one
    predictor = None
    if policy == "expertflow":  # an untrained predictor: its forward and transfer are what is counted
        c = model.config
        predictor = RoutingPathPredictor(PredictorConfig(c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok,
                                                         c.hidden_size))
    offloaded = ef.from_pretrained(folder, gpu_memory=quarter_budget(model), headroom=0, policy=policy, progress=False,
                                   predictor=predictor)
    try:
        engine = offloaded.expertflow
        with torch.no_grad():
            offloaded(prompt)  # warm-up
            got = count_syncs(lambda: offloaded(prompt))
        extra = engine.num_layers + (1 if policy == "expertflow" else 0)
        assert got <= baseline + extra, f"{got} syncs, transformers makes {baseline}; at most {extra} more expected"
    finally:
        offloaded.expertflow.close()


@pytest.mark.parametrize("arch,layout,expert_dtype", [("mixtral", "published", "fp8"), ("mixtral", "published", "int8"),
                                                      ("gpt_oss", "mxfp4", None)])
def test_compressed_experts_expand_per_slot_as_torch_does(tmp_path, monkeypatch, arch, layout, expert_dtype):
    """On the GPU each expert expands from its slot in one native call (formats.SlotExpander): logits
    and tokens are bit for bit those of the same run expanding each weight with torch, so every slot's
    codes, scales and biases are read at the right offsets (gpt-oss: transposed, with biases)."""
    from expertflow import formats, offload

    if not formats.kernels_available(0):
        pytest.skip("this build or GPU has no expansion kernels")
    folder = save(build(arch, dtype=torch.bfloat16), tmp_path, layout)
    prompt = PROMPT.cuda()

    def run(native: bool):
        model = ef.from_pretrained(folder, expert_slots="25%", policy="lru", expert_dtype=expert_dtype, progress=False)
        try:
            assert model.expertflow.expert_format.name == (expert_dtype or "mxfp4")
            with torch.no_grad():
                out = generate(model), model(prompt).logits, model.expertflow.stats()["misses"]
            assert bool(model.expertflow._expanders) == native  # the path under test ran (or did not)
            return out
        finally:
            model.expertflow.close()

    tokens, logits, misses = run(native=True)
    assert misses > 0  # experts moved through the slots
    monkeypatch.setattr(offload, "kernels_available", lambda device_index: False)
    monkeypatch.setattr(formats, "kernels_available", lambda device_index: False)
    torch_tokens, torch_logits, _ = run(native=False)
    assert tokens == torch_tokens
    assert torch.equal(logits, torch_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_experts_in_bf16_agree_with_all_gpu(bf16_checkpoints, arch):
    """bf16 on the GPU with every miss computed on the CPU (``cpu_experts="on"``): the CPU's bf16
    kernels round differently, so logits stay within bf16's tolerance of ``all_gpu``'s, and greedy
    tokens are identical up to any step where the two runs' logit difference exceeds the reference's
    margin between its top two tokens (a near-tie that rounding can flip)."""
    model, folder = bf16_checkpoints[arch]
    prompt = PROMPT.cuda()

    def run(**kwargs):
        m = ef.from_pretrained(folder, headroom=0, progress=False, **kwargs)
        try:
            with torch.no_grad():
                out = m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            return out.sequences[0].tolist(), [s[0].float() for s in out.scores], m.expertflow.stats()
        finally:
            m.expertflow.close()

    want, want_scores, _ = run(policy="all_gpu")
    got, got_scores, stats = run(gpu_memory=quarter_budget(model), policy="lru", cpu_experts="on")
    assert stats["cpu_experts"] > 0 and stats["misses"] == 0  # every miss ran on the CPU
    first = next((i for i, (a, b) in enumerate(zip(got[prompt.shape[1]:], want[prompt.shape[1]:])) if a != b), None)
    steps = len(want_scores) if first is None else first + 1
    def gap(step: int) -> torch.Tensor:  # largest difference over the tokens generation may pick (not -inf)
        finite = want_scores[step].isfinite()
        assert torch.equal(finite, got_scores[step].isfinite())
        return (got_scores[step][finite] - want_scores[step][finite]).abs().max()

    for step in range(steps):
        assert gap(step) <= 0.05 * want_scores[step][want_scores[step].isfinite()].abs().max(), step
    if first is not None:  # a flipped near-tie: the runs' difference covers the reference's margin
        top2 = want_scores[first].topk(2).values
        assert gap(first) >= top2[0] - top2[1], first


def test_a_failing_cpu_expert_raises_in_its_forward(bf16_checkpoints, monkeypatch):
    """On a GPU the stream waits for a CPU expert's result while the launching thread goes on; an
    expert that fails on the CPU still releases the stream (no hang) and its error is raised within
    the forward pass that ran it. The engine then runs on."""
    import torch.nn.functional as F

    from expertflow.offload import OffloadedExperts

    model, folder = bf16_checkpoints["mixtral"]
    m = ef.from_pretrained(folder, gpu_memory=quarter_budget(model), headroom=0, policy="lru", cpu_experts="on",
                           progress=False)
    compute = OffloadedExperts.compute

    def failing(self, weights, x, linear=F.linear, *args):
        if x.device.type == "cpu":
            raise RuntimeError("the CPU expert broke")
        return compute(self, weights, x, linear, *args)

    try:
        with torch.no_grad():
            m(PROMPT.cuda())  # warm: some experts in slots
            monkeypatch.setattr(OffloadedExperts, "compute", failing)
            with pytest.raises(RuntimeError, match="the CPU expert broke"):
                for _ in range(4):  # until a miss goes to the CPU
                    m(PROMPT.cuda())
            monkeypatch.setattr(OffloadedExperts, "compute", compute)
            assert m(PROMPT.cuda()).logits.isfinite().all()
        torch.cuda.synchronize()
    finally:
        m.expertflow.close()


@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_cuda_graphs_give_the_eager_tokens(tmp_path, policy):
    """fp32: decoding with the non-expert layers as CUDA graphs (cuda_graphs=True) around the eager
    offloaded experts gives the eager model's 32 tokens, in a first (compiling) and a second generation."""
    model = build("mixtral", dtype=torch.float32)
    folder = save(model, tmp_path, "published")
    eager = ef.from_pretrained(folder, gpu_memory=quarter_budget(model), headroom=0, policy=policy, progress=False)
    try:
        want = generate(eager)
    finally:
        eager.expertflow.close()
    graphs = ef.from_pretrained(folder, gpu_memory=quarter_budget(model), headroom=0, policy=policy, progress=False,
                                cuda_graphs=True)
    try:
        assert graphs.generation_config.compile_config.mode == "reduce-overhead"
        assert generate(graphs) == want
        assert generate(graphs) == want
        assert graphs.expertflow.stats()["misses"] > 0
    finally:
        graphs.expertflow.close()
