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
