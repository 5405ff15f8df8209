"""from_pretrained: budgets, checkpoint errors, and host memory while streaming experts."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import expertflow as ef
from expertflow.checkpoint import CheckpointError
from expertflow.loader import format_bytes, parse_bytes

from moe_models import build, expert_bytes, save


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    """These tests compare fp32 on the CPU (the GPU suite is tests/test_offload_gpu.py)."""
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = build("mixtral")
    return model, save(model, tmp_path_factory.mktemp("mixtral"), "published")


def rewrite(folder: Path, out: Path, edit) -> Path:
    """Copies a single-file checkpoint, passing its tensors through ``edit(dict) -> dict``."""
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_parse_and_format_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == parse_bytes("4096") == 4096
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    with pytest.raises(ValueError, match="cannot read '12 parsecs' as a size"):
        parse_bytes("12 parsecs")


def test_slot_count_follows_the_budget(mixtral):
    model, folder = mixtral
    non_expert, per, count = expert_bytes(model)
    for slots in (2, 5, 11):
        m = ef.from_pretrained(folder, gpu_memory=non_expert + slots * per, headroom=0, progress=False)
        assert m.expertflow.cache.num_slots == slots
        m.expertflow.close()
    m = ef.from_pretrained(folder, gpu_memory="1GiB", headroom=0, progress=False)
    assert m.expertflow.cache.num_slots == count  # never more slots than experts
    m.expertflow.close()


def test_a_process_that_holds_some_experts_gets_no_more_slots_than_it_can_fill():
    """plan_slots with num_owned (a distributed rank's share of each layer): every way of asking,
    the count stops at num_layers x num_owned; without it, at every expert."""
    from expertflow.loader import plan_slots
    from expertflow.models import architecture_for

    model = build("mixtral")  # 3 layers x 8 experts, top-2
    arch, config = architecture_for("mixtral"), model.config
    _, per, _ = expert_bytes(model)
    # the budget beside the model's weights as plan_slots counts them (all of this model's: its experts
    # are not offloaded)
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    ample = resident + 100 * per
    for owned, most in ((None, 24), (3, 9), (1, 3)):
        assert plan_slots(model, arch, config, 3, "all_gpu", ample, num_owned=owned) == most
        assert plan_slots(model, arch, config, 3, "lru", ample, headroom=0, num_owned=owned) == most
        assert plan_slots(model, arch, config, 3, "lru", ample, expert_slots="100%", num_owned=owned) == most
        assert plan_slots(model, arch, config, 3, "lru", ample, expert_slots=2, num_owned=owned) == 2
        assert plan_slots(model, arch, config, 3, "lru", resident + 5 * per, headroom=0, num_owned=owned) == min(5, most)


def test_budget_below_minimum_states_the_minimum(mixtral):
    model, folder = mixtral
    non_expert, per, _ = expert_bytes(model)
    minimum = non_expert + 1000 + 2 * per
    with pytest.raises(ef.ExpertFlowError, match=f"is below the minimum of .* \\({minimum} bytes\\) for this model"):
        ef.from_pretrained(folder, gpu_memory=minimum - 1, headroom=1000, progress=False)
    m = ef.from_pretrained(folder, gpu_memory=minimum, headroom=1000, progress=False)
    assert m.expertflow.cache.num_slots == 2
    m.expertflow.close()


def test_stated_minimum_works_with_the_default_headroom(mixtral):
    """The default headroom is a tenth of the budget, so the minimum is where budget - budget // 10 first
    holds the weights and two slots; both the exact bytes and the rounded figure the error shows work."""
    model, folder = mixtral
    non_expert, per, _ = expert_bytes(model)
    need = non_expert + 2 * per
    exact = next(b for b in range(need, 2 * need) if b - b // 10 >= need)  # from the definition
    with pytest.raises(ef.ExpertFlowError) as error:
        ef.from_pretrained(folder, gpu_memory=exact - 1, progress=False)
    stated = re.search(r"minimum of ([0-9.]+ \w+) \((\d+) bytes\)", str(error.value))
    assert int(stated.group(2)) == exact
    for budget in (exact, stated.group(1).replace(" ", "")):
        m = ef.from_pretrained(folder, gpu_memory=budget, progress=False)
        assert m.expertflow.cache.num_slots >= 2
        m.expertflow.close()


def test_config_with_fewer_layers_than_the_weights_names_the_extra_weights(tmp_path):
    """A config that describes 2 of the checkpoint's 3 layers would load a third of the model away."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match its config.json: it has weights this model does not "
                                              r"\(\d+\): .*model\.layers\.2\.input_layernorm\.weight"):
        ef.from_pretrained(folder, progress=False)


def test_config_with_more_layers_than_the_weights_names_the_missing_weights(tmp_path):
    folder = save(build("olmoe"), tmp_path / "m", "fused")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"it lacks weights this model needs \(\d+\): .*model\.layers\.3\."):
        ef.from_pretrained(folder, progress=False)


def test_invalid_config_is_a_checkpoint_error(tmp_path, mixtral):
    folder = tmp_path / "m"
    shutil.copytree(mixtral[1], folder)
    config = json.loads((folder / "config.json").read_text())
    for text in (json.dumps({**config, "hidden_size": "abc"}), "{not json"):
        (folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match="config.json is not a valid transformers config"):
            ef.from_pretrained(folder, progress=False)


def test_shards_in_a_subfolder_load(tmp_path):
    model = build("olmoe")
    folder = save(model, tmp_path / "m", "fused", num_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "shards").mkdir()
    for shard in set(index["weight_map"].values()):
        (folder / shard).rename(folder / "shards" / shard)
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    m = ef.from_pretrained(folder, gpu_memory="1GiB", progress=False)
    try:
        ids = torch.tensor([[3, 14, 15, 92]])
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False), want)
    finally:
        m.expertflow.close()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "shards/../../x.safetensors"])
def test_shards_outside_the_folder_are_refused(tmp_path, shard):
    folder = save(build("olmoe"), tmp_path / "m", "fused", num_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names shard '{re.escape(shard)}' outside"):
        ef.from_pretrained(folder, progress=False)


def test_damaged_safetensors_files_are_named(tmp_path, mixtral):
    truncated = tmp_path / "truncated"
    shutil.copytree(mixtral[1], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a valid safetensors file: tensor .* ends at byte"):
        ef.from_pretrained(truncated, progress=False)
    huge = tmp_path / "huge_header"
    shutil.copytree(mixtral[1], huge)
    (huge / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(CheckpointError, match=r"its header length 4611686018427387904 is beyond the file's"):
        ef.from_pretrained(huge, progress=False)
    index = tmp_path / "bad_index"
    shutil.copytree(mixtral[1], index)
    (index / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(CheckpointError, match="is not a valid safetensors index"):
        ef.from_pretrained(index, progress=False)


def test_missing_shard_names_it(tmp_path):
    folder = save(build("olmoe"), tmp_path / "olmoe", "fused", num_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shards that are missing .*model-00002-of-00002.safetensors"):
        ef.from_pretrained(folder, progress=False)


def test_unknown_architecture(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown MoE architecture 'llama'; ExpertFlow supports: mixtral, qwen2_moe"):
        ef.from_pretrained(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="has no config.json"):
        ef.from_pretrained(tmp_path / "nowhere", progress=False)


def test_no_safetensors(tmp_path, mixtral):
    (tmp_path / "config.json").write_text((mixtral[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        ef.from_pretrained(tmp_path, progress=False)


def test_mismatched_expert_shape_names_tensor_and_file(tmp_path, mixtral):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def edit(t):
        t[name] = t[name][:, :-1].contiguous()
        return t

    folder = rewrite(mixtral[1], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*model.safetensors has shape \[32, 47\], expected \[32, 48\]"):
        ef.from_pretrained(folder, progress=False)


def test_mismatched_expert_dtype_names_tensor_and_file(tmp_path, mixtral):
    name = "model.layers.2.block_sparse_moe.experts.5.w1.weight"

    def edit(t):
        t[name] = t[name].half()
        return t

    folder = rewrite(mixtral[1], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*model.safetensors is torch.float16 but .* is torch.float32"):
        ef.from_pretrained(folder, progress=False)


def test_missing_expert_names_the_layouts(tmp_path, mixtral):
    def edit(t):
        del t["model.layers.0.block_sparse_moe.experts.7.w3.weight"]
        return t

    folder = rewrite(mixtral[1], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"expert 7 of MoE layer 0 \(model.layers.0.mlp.experts\) is not in the checkpoint.*w1/w3/w2"):
        ef.from_pretrained(folder, progress=False)


def test_dtype_conversion_on_load(mixtral):
    model, folder = mixtral
    m = ef.from_pretrained(folder, gpu_memory="1GiB", dtype=torch.bfloat16, progress=False)
    w = m.expertflow.pool.expert(1, 3)["down"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.model.layers[1].mlp.experts.down_proj[3].to(torch.bfloat16))
    m.expertflow.close()


def test_device_must_match_backend(mixtral):
    if ef.get_backend().is_gpu:
        pytest.skip("checks the CPU-only case")
    with pytest.raises(ef.ExpertFlowError, match="device cuda does not match the host backend"):
        ef.from_pretrained(mixtral[1], device="cuda", progress=False)
    with pytest.raises(ValueError, match="unknown offload policy 'fifo'"):
        ef.from_pretrained(mixtral[1], policy="fifo", progress=False)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import expertflow as ef
    import torch, transformers  # imported before the baseline is read
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = ef.from_pretrained(sys.argv[1], gpu_memory="512MiB", headroom=0, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "pool": model.expertflow.pool.total_bytes}))
    """
)


def test_peak_host_memory_is_the_pool_plus_a_little(tmp_path):
    """A 2 GB checkpoint loads with peak RSS within the pool's size plus 300 MB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, num_local_experts=10, num_experts_per_tok=2,
    )
    folder = tmp_path / "big"
    folder.mkdir()
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    g = torch.Generator().manual_seed(0)
    # Two shards written one at a time, so writing the checkpoint never holds all of it either.
    names = sorted(shapes)
    weight_map = {}
    for i, part in enumerate((names[0::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: (torch.randn(shapes[k].shape, generator=g) * 0.02) for k in part}, folder / shard)
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert size > 1.9e9
    env = {**os.environ, "EXPERTFLOW_BACKEND": "host"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["pool"] > 1.9e9
    growth = r["peak"] - r["base"]
    assert growth <= r["pool"] + 300e6, f"peak grew {growth / 1e9:.2f} GB for a {r['pool'] / 1e9:.2f} GB pool"


def test_config_with_other_expert_counts_names_the_mismatched_weights(tmp_path, mixtral):
    folder = tmp_path / "m"
    shutil.copytree(mixtral[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 4}))
    with pytest.raises(CheckpointError, match=r"it has weights of other shapes \(3\): model\.layers\.0\.mlp\.gate\.weight "
                                              r"\[8, 32\] \(the model has \[4, 32\]\)"):
        ef.from_pretrained(folder, progress=False)
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 9}))
    with pytest.raises(CheckpointError, match="routes each token to 9 of 8 experts; top-k must be between 1 and the expert count"):
        ef.from_pretrained(folder, progress=False)
