"""QAT under DistributedDataParallel: 2 CPU processes (gloo, loopback) run
soniq.demos.ddp_qat.train; a single process replays the same updates (two replicas, one per
rank, gradients averaged as DDP averages them) and must reach the identical model and file."""
import copy
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import soniq
from soniq.demos import ddp_qat as D

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    D.init_from_env(timeout_s=60)
    res = D.train(rank)
    state = {k: v.detach().clone() for k, v in res["model"].state_dict().items()}
    torch.save({"state": state, "probe": res["probe"], "tiers": res["spoiled_tiers"]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:
        soniq.save(soniq.convert(res["model"]), os.path.join(out_dir, "rank0.safetensors"))
    torch.distributed.destroy_process_group()


def _replay(out_dir):
    """What DDP computes, in one process: replica r draws rank r's noise and data."""
    reps = [soniq.qat.prepare(D.make_model(), D.config()) for _ in range(2)]
    for q in soniq.qat.quant_layers(reps[1]).values():
        q.w_quant.noise_rank = q.a_quant.noise_rank = 1
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in reps]
    with torch.no_grad():  # calibration: rank 0's ranges for both; rank 1 still draws its noise
        reps[0](D.batches(0, 1, offset=9)[0][0])
        reps[1].load_state_dict(reps[0].state_dict())
        reps[1](D.batches(1, 1, offset=9)[0][0])

    def step(data, penalty):
        for o in opts:
            o.zero_grad()
        for m, (x, y) in zip(reps, data):
            loss = F.cross_entropy(m(x), y)
            (loss + soniq.qat.bit_penalty(m) if penalty else loss).backward()
        for p0, p1 in zip(reps[0].parameters(), reps[1].parameters()):
            if p0.grad is not None:  # DDP: each rank's gradient times 1/world, then summed
                g = p0.grad * 0.5 + p1.grad * 0.5
                p0.grad, p1.grad = g, g.clone()
        for o in opts:
            o.step()

    for data in zip(D.batches(0, 6), D.batches(1, 6)):
        step(data, True)
    with torch.no_grad():
        probes = [m(D.probe_input()) for m in reps]
    spoiled = copy.deepcopy(reps[0])
    with torch.no_grad():
        for q in soniq.qat.quant_layers(spoiled).values():
            q.w_quant.bits_logit.add_(torch.randn(q.w_quant.channels, generator=torch.Generator().manual_seed(0)))
    soniq.qat.freeze_precision(spoiled)
    for m in reps:
        soniq.qat.freeze_precision(m)
    for data in zip(D.batches(0, 4, offset=1), D.batches(1, 4, offset=1)):
        step(data, False)
    soniq.save(soniq.convert(reps[0]), os.path.join(out_dir, "single.safetensors"))
    tiers = [q.w_quant.frozen_bits for q in soniq.qat.quant_layers(spoiled).values()]
    return reps, probes, tiers


def test_two_process_ddp_qat_matches_single_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process DDP run did not finish in 240 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # bit logits, clips, scales, tiers, every buffer: identical on both ranks
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert any("bits_logit" in k for k in r0["state"])
    # phase-1 noise differs per rank ...
    assert not torch.equal(r0["probe"], r1["probe"])
    # ... freeze_precision gives every rank rank 0's tiers, even from different bit logits
    for a, b in zip(r0["tiers"], r1["tiers"]):
        assert torch.equal(a, b)
    # ... and a single process replaying (seed, rank) reproduces everything exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: float reductions depend on the thread count
    try:
        reps, probes, tiers = _replay(str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(probes[0], r0["probe"]) and torch.equal(probes[1], r1["probe"])
    for a, b in zip(tiers, r0["tiers"]):
        assert torch.equal(a, b)
    for k, v in reps[0].state_dict().items():
        assert torch.equal(v, r0["state"][k]), k
    assert (tmp_path / "single.safetensors").read_bytes() == (tmp_path / "rank0.safetensors").read_bytes()


def test_seeded_noise_is_reproducible_and_rank_dependent():
    x = torch.randn(8, D.IN)
    outs = {}
    for rank in (0, 1, 0):
        m = soniq.qat.prepare(D.make_model(), D.config())
        for q in soniq.qat.quant_layers(m).values():
            q.w_quant.noise_rank = q.a_quant.noise_rank = rank
        with torch.no_grad():
            got = [m(x), m(x)]
        assert not torch.equal(got[0], got[1])  # a new draw each step
        if rank in outs:
            assert all(torch.equal(a, b) for a, b in zip(got, outs[rank]))
        outs[rank] = got
    assert not torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("reentrant", [False, True])
def test_seeded_noise_survives_activation_checkpointing(reentrant):
    """A checkpointed segment recomputed in backward draws the same noise as its forward, so
    the gradients equal the plain run's and the noise counter advances once per forward."""
    from torch.utils.checkpoint import checkpoint

    x, y = D.batches(0, 1)[0]
    grads, calls = [], []
    for ckpt in (False, True):
        m = soniq.qat.prepare(D.make_model(), D.config())
        x_in = x.clone().requires_grad_(reentrant)  # reentrant checkpoint needs an input with grad
        for _ in range(2):  # two steps: the second draws new noise
            m.zero_grad()
            out = checkpoint(m, x_in, use_reentrant=reentrant) if ckpt else m(x_in)
            F.cross_entropy(out, y).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        calls.append([q.w_quant.noise_calls for q in soniq.qat.quant_layers(m).values()])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    assert calls[0] == calls[1] == [2] * len(calls[0])
