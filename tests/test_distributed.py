"""Experts spread over processes (one per GPU; here gloo on the CPU): greedy tokens identical to one
process, each expert cached and computed by exactly one rank, and one pool per host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from expertflow.runtime import ExpertPool, TensorSpec

from moe_models import build, save


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``expertflow ARGS`` in a subprocess on the host backend (``env`` adds variables)."""
    env = {**os.environ, "EXPERTFLOW_BACKEND": "host", **(env or {})}
    return subprocess.run([sys.executable, "-m", "expertflow.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def run_cli(*args: str, env: dict | None = None) -> dict:
    done = cli(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model_type, policy", [("mixtral", "lru"), ("qwen2_moe", "lru"), ("mixtral", "expertflow")])
def test_two_processes_generate_the_tokens_of_one(tmp_path, model_type, policy):
    folder = save(build(model_type), tmp_path / model_type, "published")
    args = ["generate", "--model", str(folder), "--prompt-ids", "5,17,3,88,41,9,12", "--max-new-tokens", "12",
            "--expert-slots", "50%", "--policy", policy, "--json"]
    one = run_cli(*args)
    two = run_cli(*args, "--nproc-per-node", "2")
    assert two["token_ids"] == one["token_ids"]
    assert len(one["token_ids"]) == 12
    ranks = two["stats"]["ranks"]
    assert len(ranks) == two["stats"]["world_size"] == 2
    # Each (layer, expert) use runs on exactly one rank: the ranks' accesses add up to one process's.
    assert two["stats"]["accesses"] == one["stats"]["accesses"]
    assert all(r["accesses"] > 0 for r in ranks)
    # Layers whose misses fall on one rank send some to the other link (distributed.assign).
    assert two["stats"]["computed_unowned"] > 0
    # Twice the slots between them, each expert on one rank: the ranks copy no more than one process.
    assert two["stats"]["bytes_copied"] <= one["stats"]["bytes_copied"]


_ATTACH = """
import json, sys, torch
from expertflow.runtime import ExpertPool, TensorSpec

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

before = {f: status(f) for f in ("RssAnon", "RssShmem")}
pool = ExpertPool.uniform(4, 8, [TensorSpec("w", torch.float32, (1024, 1024))], "host", attach=sys.argv[1])
total = sum(float(pool.expert(l, e)["w"][0, 0]) for l in range(4) for e in range(8))  # touches every expert
checksum = float(pool.expert(3, 7)["w"].sum())
pool.set_expert(0, int(sys.argv[2]), {"w": torch.full((1024, 1024), -1.0)})
after = {f: status(f) for f in ("RssAnon", "RssShmem")}
print(json.dumps({"first": total, "checksum": checksum, "anon": after["RssAnon"] - before["RssAnon"],
                  "shared": after["RssShmem"] - before["RssShmem"]}))
"""


def test_one_pool_per_host_whatever_the_processes():
    """Two processes map the pool another made: they read its bytes, their writes are seen by all,
    and their private memory does not grow with the pool's 128 MiB (only shared pages do)."""
    spec = [TensorSpec("w", torch.float32, (1024, 1024))]
    with ExpertPool.uniform(4, 8, spec, "host", shared=True) as pool:
        for l in range(4):
            for e in range(8):
                pool.set_expert(l, e, {"w": torch.full((1024, 1024), float(10 * l + e))})
        assert pool.shared_path is not None and pool.total_bytes == 32 * 4 * 2**20
        reports = []
        for rank in (1, 2):
            done = subprocess.run([sys.executable, "-c", _ATTACH, pool.shared_path, str(rank)], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            reports.append(json.loads(done.stdout))
        want_first = float(sum(10 * l + e for l in range(4) for e in range(8)))
        assert reports[0]["first"] == want_first
        assert reports[1]["first"] == want_first - 1 - 1  # it sees the first one's write: expert (0, 1) became -1
        for report in reports:
            assert report["checksum"] == 37.0 * 1024 * 1024
            assert report["anon"] < 48 * 2**20  # no private copy of the 128 MiB pool
        assert reports[0]["shared"] >= 4 * 2**20  # the experts it touched are shared pages
        for rank in (1, 2):  # the attached processes' writes landed in this process's pool
            assert float(pool.expert(0, rank)["w"].sum()) == -1024.0 * 1024


def test_attaching_needs_the_same_layout_and_a_living_pool(tmp_path):
    from expertflow.runtime import ExpertFlowError

    spec = [TensorSpec("w", torch.float32, (64, 64))]
    with ExpertPool.uniform(2, 4, spec, "host", shared=True) as pool:
        with pytest.raises(ExpertFlowError, match="both processes must load the same model"):
            ExpertPool.uniform(3, 4, spec, "host", attach=pool.shared_path)
        # The same bytes in another layout (transposed, another dtype or name) are refused, not misread.
        for other in ([TensorSpec("w", torch.float32, (32, 128))], [TensorSpec("w", torch.int32, (64, 64))],
                      [TensorSpec("v", torch.float32, (64, 64))]):
            with pytest.raises(ExpertFlowError, match="is a shared expert pool of other layouts"):
                ExpertPool.uniform(2, 4, other, "host", attach=pool.shared_path)
        for bad in ("", 5):
            with pytest.raises(ExpertFlowError, match="attach takes a shared pool's path"):
                ExpertPool.uniform(2, 4, spec, "host", attach=bad)
        path = pool.shared_path
        same = ExpertPool.uniform(2, 4, spec, "host", attach=path)  # in-process, as another rank would
        pool.set_expert(1, 3, {"w": torch.ones(64, 64)})
        assert np.array_equal(same.expert(1, 3)["w"].numpy(), np.ones((64, 64), dtype=np.float32))
        same.close()
    with pytest.raises(ExpertFlowError, match="could not open the shared expert pool"):
        ExpertPool.uniform(2, 4, spec, "host", attach="/proc/self/fd/987654")
    # A file of exactly the pool's size that is not a pool is refused, and left as it was.
    impostor = tmp_path / "same-size.bin"
    impostor.write_bytes(b"x" * (4096 + 2 * 4 * 64 * 64 * 4))
    with pytest.raises(ExpertFlowError, match="is not a shared expert pool"):
        ExpertPool.uniform(2, 4, spec, "host", attach=str(impostor))
    assert impostor.read_bytes() == b"x" * (4096 + 2 * 4 * 64 * 64 * 4)


def test_distributed_needs_torchrun(tmp_path, monkeypatch):
    import expertflow as ef

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    folder = save(build("mixtral"), tmp_path / "m", "published")
    with pytest.raises(RuntimeError, match="needs a torchrun launch"):
        ef.from_pretrained(folder, distributed=True, backend="host", progress=False)


@pytest.mark.parametrize("backend_name", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_shared_pool_serves_the_cache_like_a_private_one(backend_name):
    """Slots filled from shared host memory (page-locked for the GPU on CUDA) hold the expert's bytes."""
    from expertflow.runtime import ExpertCache

    spec = [TensorSpec("w1", torch.float32, (33, 65)), TensorSpec("w2", torch.bfloat16, (7,))]
    g = torch.Generator().manual_seed(3)
    with ExpertPool.uniform(3, 5, spec, backend_name, shared=True) as pool:
        want = {}
        for l in range(3):
            for e in range(5):
                want[l, e] = {t.name: torch.randn(t.shape, generator=g).to(t.dtype) for t in spec}
                pool.set_expert(l, e, want[l, e])
        with ExpertCache(pool, num_slots=4) as cache:
            for l, e in [(0, 4), (2, 1), (1, 3), (0, 0), (2, 4)]:
                (weights,) = cache.acquire(l, [e])
                for name, tensor in want[l, e].items():
                    assert torch.equal(weights[name].cpu(), tensor)
                cache.release(l, [e])


def _assign(experts, owner, resident):
    """distributed.assign on one layer whose residency is ``resident [world, len(experts)]``."""
    from expertflow.distributed import assign

    holders = np.zeros((resident.shape[0], 1, len(owner)), dtype=bool)
    holders[:, 0, experts] = resident
    return assign(0, experts, owner, holders)


def test_assignment_keeps_hits_in_place_and_deals_out_misses():
    assign = _assign
    owner = np.arange(8) % 2
    nobody = np.zeros((2, 4), dtype=bool)
    # Four misses over two links: two copies each, every owner keeping its own where the counts allow.
    assert assign([0, 1, 2, 3], owner, nobody).tolist() == [0, 1, 0, 1]
    # Two misses owned by rank 0: the second goes to the idle link.
    assert assign([0, 2], owner, np.zeros((2, 2), dtype=bool)).tolist() == [0, 1]
    # Held experts run where they are held (the owner first), whoever owns them.
    held = np.array([[False, True], [True, True]])
    assert assign([4, 5], owner, held).tolist() == [1, 1]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.data())
def test_assignment_balances_copies_from_its_definition(world, data):
    assign = _assign
    num_experts = data.draw(st.integers(world, 16))
    experts = sorted(data.draw(st.sets(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts)))
    resident = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=len(experts), max_size=len(experts)),
                                           min_size=world, max_size=world)))
    owner = np.arange(num_experts) % world
    ranks = assign(experts, owner, resident)
    assert ranks.shape == (len(experts),) and ((ranks >= 0) & (ranks < world)).all()
    misses = 0
    copies = np.zeros(world, dtype=int)
    for i, e in enumerate(experts):
        if resident[:, i].any():  # a held expert runs on a rank that holds it, its owner if that one does
            assert resident[ranks[i], i]
            if resident[owner[e], i]:
                assert ranks[i] == owner[e]
        else:
            misses += 1
            copies[ranks[i]] += 1
    assert copies.max() == -(-misses // world)  # no link copies more than its share, rounded up


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.data())
def test_prefetches_are_dealt_out_from_their_definition(world, data):
    from expertflow.distributed import deal_prefetches

    num_layers, num_experts = data.draw(st.integers(1, 5)), data.draw(st.integers(world, 12))
    holders = np.array(data.draw(st.lists(st.booleans(), min_size=world * num_layers * num_experts,
                                          max_size=world * num_layers * num_experts))).reshape(world, num_layers, num_experts)
    # a plan may name one expert twice (gate-ahead picks before an oracle's): it must still go one way
    pairs = data.draw(st.lists(st.tuples(st.integers(0, num_layers - 1), st.integers(0, num_experts - 1)),
                               max_size=2 * num_layers * num_experts))
    layers = np.array([p[0] for p in pairs], dtype=np.int32)
    experts = np.array([p[1] for p in pairs], dtype=np.int32)
    owner = np.arange(num_experts) % world
    ranks = deal_prefetches(layers, experts, owner, holders)
    assert ranks.shape == (len(pairs),)
    copies = []
    dealt: dict = {}
    for (layer, e), rank in zip(pairs, ranks.tolist()):
        held_by = holders[:, layer, e]
        if held_by.any():  # stays where it is held, its owner first: no expert crosses two links
            assert rank == (owner[e] if held_by[owner[e]] else np.flatnonzero(held_by)[0])
        elif (layer, e) in dealt:
            assert rank == dealt[layer, e]  # named again: the same link
        else:
            dealt[layer, e] = rank
            copies.append(rank)
    # The copies take turns: after every prefix (in due order) no link has two more than another.
    counts = np.zeros(world, dtype=int)
    for rank in copies:
        counts[rank] += 1
        assert counts.max() - counts.min() <= 1


def test_the_cache_reports_what_it_holds():
    from expertflow.runtime import ExpertCache

    pool = ExpertPool.uniform(3, 5, [TensorSpec("w", torch.float32, (4,))], "host")
    with pool, ExpertCache(pool, num_slots=4, policy="lru") as cache:
        assert not cache.held(3, 5).any()
        cache.acquire(2, [4, 1])
        cache.release(2, [4, 1])
        cache.acquire(0, [3])
        cache.release(0, [3])
        want = np.zeros((3, 5), dtype=bool)
        want[2, [1, 4]] = want[0, 3] = True
        assert (cache.held(3, 5) == want).all()


def test_two_process_server_answers_as_one_process(tmp_path):
    """`expertflow serve --nproc-per-node 2`: rank 0 serves, rank 1 follows its passes; concurrent
    greedy streams (one client leaving early) give each request's tokens generated alone."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import threading

    from test_server import start_server

    import expertflow as ef
    from expertflow.cli import BUNDLED_MODEL

    proc, base = start_server("--expert-slots", "50%", "--dtype", "float32", "--max-batch-size", "2",
                              "--nproc-per-node", "2", timeout=240)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        prompts = ["ROMEO:", "The json module", "JULIET:", "def main"]
        streamed: dict[str, str] = {}

        def stream(prompt: str) -> None:
            chunks = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=10, temperature=0, stream=True)
            streamed[prompt] = "".join(c.choices[0].text for c in chunks)

        def leave_early() -> None:
            chunks = client.completions.create(model="tiny-mixtral", prompt="First Citizen:", max_tokens=40, temperature=0,
                                               stream=True)
            next(iter(chunks))
            chunks.close()  # the request is cancelled on rank 0; rank 1 drops its mirror

        threads = [threading.Thread(target=stream, args=(p,)) for p in prompts] + [threading.Thread(target=leave_early)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        after = client.completions.create(model="tiny-mixtral", prompt="ROMEO:", max_tokens=10, temperature=0).choices[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    model = ef.from_pretrained(BUNDLED_MODEL, expert_slots="50%", dtype="float32", backend="host", progress=False)
    try:
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            with ef.Engine(model, max_batch_size=1) as engine:
                alone = tokenizer.decode(engine.generate([ids], max_new_tokens=10)[0])
            assert streamed[prompt] == alone
        assert after == streamed["ROMEO:"]  # still in step after a client left
    finally:
        model.expertflow.close()


@pytest.mark.parametrize("num_tokens, num_slots", [(1, 2), (7, 3), (33, 16)])
def test_the_sharded_combine_is_bit_identical_to_one_process(tmp_path, num_tokens, num_slots):
    """bf16, one rank over gloo: the sharded path (holders exchanged, outputs summed by all_reduce, then
    added in expert order) gives exactly the one-process layer output, waves included."""
    import torch.distributed as dist

    from expertflow.distributed import ExpertShard
    from expertflow.loader import attach, load_offloaded

    folder = save(build("mixtral", dtype=torch.bfloat16), tmp_path / "m", "published")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard = ExpertShard(0, 1, control=dist.new_group(backend="gloo"))
        outputs = []
        for sharded in (False, True):
            model, arch, pool = load_offloaded(folder, backend="host", progress=False)
            engine = attach(model, arch, pool, num_slots, "lru", shard=shard if sharded else None)
            try:
                g = torch.Generator().manual_seed(num_tokens)
                hidden = torch.randn(num_tokens, model.config.hidden_size, generator=g).to(torch.bfloat16)
                routing = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(num_tokens)])
                weights = torch.rand(num_tokens, 2, generator=g).to(torch.bfloat16)
                with torch.no_grad():
                    outputs.append(engine.layers[1].module(hidden, routing, weights))
            finally:
                engine.close()
        assert torch.equal(outputs[0], outputs[1])
    finally:
        dist.destroy_process_group()


def test_launch_problems_are_one_line_before_any_rank_starts(tmp_path):
    """--nproc-per-node checks what would fail in every rank before starting one: exit 2, one line."""
    cases = [(["--nproc-per-node", "17"], "more than the model's 16 experts per layer"),
             (["--nproc-per-node", "2", "--model", str(tmp_path / "none")], "does not exist"),
             (["--nproc-per-node", "2", "--policy", "bogus"], "unknown offload policy 'bogus'")]
    for extra, message in cases:
        done = cli("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *extra, timeout=120)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Variables left from another launch do not make the command wait for ranks that never come.
    stale = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29556"}
    result = run_cli("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--nproc-per-node", "2", "--json",
                     env=stale)
    assert len(result["token_ids"]) == 2


def test_engine_refuses_what_is_not_a_forecast():
    import expertflow as ef
    from expertflow.cli import BUNDLED_MODEL
    from expertflow.serving import EngineError

    model = ef.from_pretrained(BUNDLED_MODEL, expert_slots="50%", backend="host", progress=False)
    try:
        with pytest.raises(EngineError, match="predictor must be a routing-path predictor"):
            ef.Engine(model, predictor=5)
        with pytest.raises(EngineError, match="path_forecast must be a function"):
            ef.Engine(model, path_forecast=5)
    finally:
        model.expertflow.close()
