"""Threads and processes (issue 7.4).

- 8 Python threads calling pack / mpgemm / quantize at once on shared inputs get the
  results of serial calls;
- the ops release the GIL (another Python thread keeps running during a long call);
- soniq.set_num_threads changes nothing in the results, also when changed between calls;
- the kernels run on torch's OpenMP threads (issue 13) with results bit-identical to soniq's
  own pool and one thread; a forked child computes on the pool;
- no deadlock after fork: a forked child (and a fork-context DataLoader worker) can use
  soniq even when the parent's pool was busy in another thread at the moment of fork.
"""
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import soniq
from soniq import ops

N_THREADS = 8


@pytest.fixture
def restore_threads():
    n = soniq.get_num_threads()
    yield
    soniq.set_num_threads(n)


def _inputs(seed=0, M=33, N=70, K=200):
    rng = np.random.default_rng(seed)
    wbits = rng.choice([2, 4], size=N)
    w = np.stack([rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), size=K) for b in wbits])
    abits = rng.choice([4, 8], size=K)
    x = np.stack([rng.integers(0, 2**abits)] * M) if M == 1 else rng.integers(0, 2**abits, size=(M, K))
    return x, abits, w, wbits


def _work(x, abits, w, wbits):
    """One round of every op; returns comparable results."""
    px = ops.pack(x, abits, signed=False, axis=1)
    pw = ops.pack(w, wbits, signed=True, k_layout=px, scale=np.linspace(0.5, 2, len(wbits)))
    pw_int = ops.pack(w, wbits, signed=True, k_layout=px)
    out = {
        "int": ops.mpgemm(px, pw_int),
        "float": ops.mpgemm(px, pw),
        "unpack": ops.unpack(pw_int),
        "data": pw_int.data.numpy().copy(),
    }
    xf = torch.from_numpy(x.astype(np.float32) / 7.0)
    out["quantize"] = _plain(ops.quantize(xf, 0.25, 4, signed=True, noise="uniform", seed=1234))
    return out


def _plain(r):
    """Any op result as comparable numpy arrays (tensors, arrays, tuples, PackedTensors)."""
    if isinstance(r, (tuple, list)):
        return [_plain(t) for t in r]
    if isinstance(r, soniq.PackedTensor):
        return [_plain(t) for t in r.state_dict().values()]
    if isinstance(r, torch.Tensor):
        return r.detach().cpu().numpy().copy()
    return np.asarray(r).copy()


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k], want[k]
        if isinstance(w, list):
            for gi, wi in zip(g, w):
                assert gi.tobytes() == wi.tobytes(), k
        else:
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), k  # bit-identical


def test_eight_threads_match_serial():
    inputs = [_inputs(seed) for seed in range(3)]
    serial = [_work(*inp) for inp in inputs]
    barrier = threading.Barrier(N_THREADS)
    errors = []

    def run(tid):
        try:
            barrier.wait()
            for it in range(4):
                i = (tid + it) % len(inputs)
                _assert_same(_work(*inputs[i]), serial[i])
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    assert not errors, errors[0]


def test_ops_release_the_gil(restore_threads):
    """While one thread is inside a long mpgemm, the main thread keeps executing Python:
    the longest pause it sees is far shorter than the native call. (The scalar reference
    path on one thread gives a call long enough to see, whatever the fast kernels do.)"""
    soniq.set_num_threads(1)
    rng = np.random.default_rng(1)
    K = 4096
    a = ops.pack(rng.integers(0, 256, size=(64, K)), 8, signed=False)
    with soniq.use_isa("scalar"):
        M = 128
        while True:  # grow until one call takes >= 0.2 s
            b = ops.pack(rng.integers(0, 256, size=(M, K)), 8, signed=False)
            ops.mpgemm(a, b)  # warm
            t0 = time.perf_counter()
            ops.mpgemm(a, b)
            call = time.perf_counter() - t0
            if call >= 0.2 or M >= 4096:
                break
            M *= 2
        if call < 0.1:
            pytest.skip(f"the kernel is too fast to show a GIL pause ({call:.3f} s at M={M})")

        started = threading.Event()

        def long_call():
            started.set()
            for _ in range(2):
                ops.mpgemm(a, b)

        t = threading.Thread(target=long_call)
        t.start()
        started.wait()
        last, worst, ticks = time.perf_counter(), 0.0, 0
        while t.is_alive():
            now = time.perf_counter()
            worst, last, ticks = max(worst, now - last), now, ticks + 1
        t.join()
    assert ticks > 1000
    assert worst < call / 2, f"main thread stalled {worst:.3f} s during a {call:.3f} s call"


def test_set_num_threads_changes_nothing(restore_threads):
    inp = _inputs(5, M=70, N=300, K=333)
    soniq.set_num_threads(1)
    want = _work(*inp)
    for n in (2, 3, 4, 8, 1, 16):
        soniq.set_num_threads(n)
        assert soniq.get_num_threads() == n
        _assert_same(_work(*inp), want)


def test_resizing_between_calls_stays_exact(restore_threads):
    """Regression: workers made by a resize must not take the previous job for a new one."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(64, 200))
    b = rng.integers(0, 4, size=(256, 200))
    pa, pb = ops.pack(a, 2, signed=False), ops.pack(b, 2, signed=False)
    want = a @ b.T
    for it in range(150):
        soniq.set_num_threads(2 + it % 3)
        np.testing.assert_array_equal(ops.mpgemm(pa, pb), want)


def test_set_num_threads_rejects_bad_values():
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises((ValueError, TypeError)):
            soniq.set_num_threads(bad)


# ---- fork -------------------------------------------------------------------------------
def _child_compute(q, x, abits, w, wbits):
    # as a DataLoader worker does: torch's OpenMP pool is not fork-safe if another parent
    # thread was inside a torch parallel region at the fork (soniq's own pool is)
    torch.set_num_threads(1)
    try:
        q.put(("ok", _work(x, abits, w, wbits)))
    except BaseException as e:  # pragma: no cover - reported by the parent
        q.put(("error", repr(e)))


def test_fork_while_pool_busy_does_not_deadlock(restore_threads):
    soniq.set_num_threads(2)
    inp = _inputs(7, M=64, N=256, K=300)
    want = _work(*inp)  # the parent's pool now has workers
    rng = np.random.default_rng(8)
    big = ops.pack(rng.integers(0, 16, size=(256, 2048)), 4, signed=False)
    stop = threading.Event()

    def busy():  # keeps soniq's pool (and its locks) busy while we fork
        while not stop.is_set():
            ops.mpgemm(big, big)

    t = threading.Thread(target=busy)
    t.start()
    try:
        ctx = mp.get_context("fork")
        for _ in range(3):
            time.sleep(0.05)
            q = ctx.Queue()
            p = ctx.Process(target=_child_compute, args=(q,) + inp)
            p.start()
            try:
                status, got = q.get(timeout=120)
            finally:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            assert status == "ok", got
            _assert_same(got, want)
            assert p.exitcode == 0
    finally:
        stop.set()
        t.join()


class _SoniqDataset(torch.utils.data.Dataset):
    def __init__(self, inp):
        self.inp = inp

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(_work(*self.inp)["int"])


def test_dataloader_fork_workers_use_soniq():
    inp = _inputs(9)
    want = torch.from_numpy(_work(*inp)["int"])  # parent uses soniq before the fork
    loader = torch.utils.data.DataLoader(_SoniqDataset(inp), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = list(loader)
    assert len(got) == 4
    for g in got:
        assert torch.equal(g, want)


# ---- the OpenMP route (issue 13): kernels on torch's own OpenMP threads ------------------
TORCH_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
needs_torch_openmp = pytest.mark.skipif(not TORCH_OPENMP, reason="this torch does not run on OpenMP")
_C = soniq._native._C


@pytest.fixture
def restore_backend():
    n = torch.get_num_threads()
    yield
    _C.set_thread_backend("auto")
    torch.set_num_threads(n)


def _libgomps_mapped():
    with open("/proc/self/maps") as f:
        return {os.path.realpath(line.split()[-1]) for line in f if "libgomp" in line.split()[-1]}


@needs_torch_openmp
def test_kernels_run_on_torchs_libgomp():
    """The route is on, and the runtime it found is mapped in this process and is torch's own
    (its wheel ships torch/lib/libgomp.so.1). Other libraries may map their own renamed copy
    (scikit-learn's libgomp-<hash>.so), which is not torch's team and must not be picked.
    The route needs soniq's thread count equal to torch's and the automatic backend: set here,
    as tests that ran before may have left other settings (found in a full CI run)."""
    before = (soniq.get_num_threads(), _C.thread_backend())
    _C.set_thread_backend("auto")
    soniq.set_num_threads(torch.get_num_threads())
    try:
        assert _C.thread_backend() == "openmp"
    finally:
        soniq.set_num_threads(before[0])
    lib = os.path.realpath(_C.openmp_library())
    assert os.path.basename(lib).startswith("libgomp") and lib in _libgomps_mapped()
    shipped = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if os.path.exists(shipped):
        assert lib == os.path.realpath(shipped)


_SAME_THREADS = """
import os, sys, torch, soniq
from soniq import _C
torch.set_num_threads(2)
torch.randn(1 << 22).exp_()  # torch's OpenMP team of 2 exists now
_C.set_thread_backend(sys.argv[1])
before = set(os.listdir("/proc/self/task"))
tids = set(_C._parallel_tids(64, 2000))
after = set(os.listdir("/proc/self/task"))
print(len(tids), len({str(t) for t in tids} - before), len(after - before), _C.thread_backend())
"""


@needs_torch_openmp
@pytest.mark.skipif(soniq._native._C.default_num_threads() < 2, reason="needs 2 cores")
def test_openmp_route_uses_torchs_threads_and_makes_none():
    """A job's tasks run on threads that existed before it (torch's team, made by a torch op),
    and no thread is created; soniq's own pool, the control, makes one."""
    def run(backend):
        r = subprocess.run([sys.executable, "-c", _SAME_THREADS, backend], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()
    n_tids, foreign, created, backend = run("auto")
    assert backend == "openmp" and int(n_tids) == 2, "the job did not run on 2 threads"
    assert int(foreign) == 0 and int(created) == 0
    n_tids, foreign, created, backend = run("pool")
    assert backend == "pool" and int(n_tids) == 2 and int(foreign) == 1 and int(created) == 1


def _work_fused(x, abits, w, wbits):
    """_work plus float activations through ops.quantize_pack into a float mpgemm (the
    packed modules' path), with a NaN row (its output row marked, the others exact)."""
    from soniq.ops._quantize_pack import make_plan

    out = _work(x, abits, w, wbits)
    xf = torch.from_numpy(x.astype(np.float32) * 0.37)
    xf[min(3, len(xf) - 1), 1] = float("nan")
    pw = ops.pack(w, wbits, signed=True, scale=np.linspace(0.5, 2, len(wbits)),
                  k_layout=soniq.KLayout.from_bits(torch.from_numpy(abits)))
    plan = make_plan(torch.from_numpy(abits), 0.25, x.shape[1], signed=False, k_layout=pw)
    a = plan(xf, nan_rows=True)
    out["fused"] = ops.mpgemm(a, pw).numpy().copy()
    out["nan_rows"] = a._nan_rows.numpy().copy()
    return out


@pytest.mark.parametrize("shape", [dict(M=1, N=333, K=1000), dict(M=67, N=130, K=517), dict(M=256, N=512, K=384)])
def test_openmp_route_matches_pool_and_one_thread(restore_threads, restore_backend, shape):
    """Bit-identical results whichever threads run the tasks: torch's OpenMP team (when this
    torch has one), soniq's own pool, one thread, and more threads than cores."""
    inp = _inputs(11, **shape)
    soniq.set_num_threads(1)
    want = _work_fused(*inp)
    for backend in ("auto", "pool"):
        _C.set_thread_backend(backend)
        for n in (2, 3, 5):
            torch.set_num_threads(n)  # the OpenMP route takes torch's team, so torch's count
            soniq.set_num_threads(n)
            if backend == "auto" and TORCH_OPENMP:
                assert _C.thread_backend() == "openmp"
            _assert_same(_work_fused(*inp), want)


def test_every_task_runs_exactly_once_on_every_route(restore_threads, restore_backend):
    """Tasks are claimed from per-thread slots (interleaved) and taken over by threads whose
    slot ran dry: whatever the counts, each index runs once."""
    for backend in ("auto", "pool"):
        _C.set_thread_backend(backend)
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            soniq.set_num_threads(threads)
            for n in (1, 2, 3, 4, 5, 7, 64, 65, 1000):
                runs = _C._parallel_runs(n)
                assert runs == [1] * n, (backend, threads, n)


def test_task_errors_propagate_on_every_route(restore_threads, restore_backend):
    torch.set_num_threads(2)
    soniq.set_num_threads(2)
    for backend in ("auto", "pool"):
        _C.set_thread_backend(backend)
        with pytest.raises(RuntimeError, match="task 5 failed"):
            _C._parallel_tids(40, 100, 5)
        assert all(t > 0 for t in _C._parallel_tids(40, 100))  # the route still works


@needs_torch_openmp
def test_a_count_apart_from_torchs_uses_the_pool(restore_threads, restore_backend):
    """A team of another size than torch's would make libgomp end and recreate threads at
    every switch between soniq's regions and torch's: such a count runs on the pool."""
    torch.set_num_threads(2)
    soniq.set_num_threads(3)
    assert _C.thread_backend() == "pool"
    soniq.set_num_threads(2)
    assert _C.thread_backend() == "openmp"
    _C.set_thread_backend("pool")
    assert _C.thread_backend() == "pool"


def test_thread_backend_rejects_unknown_names(restore_backend):
    with pytest.raises(ValueError, match="'auto' or 'pool'"):
        _C.set_thread_backend("gomp")


_FOLLOW = """
import torch, soniq
out = []
for n in (1, 2, 1):
    torch.set_num_threads(n)
    out.append(soniq.get_num_threads())
soniq.set_num_threads(3)
torch.set_num_threads(1)
out.append(soniq.get_num_threads())
print(*out)
"""


@needs_torch_openmp
@pytest.mark.skipif(soniq._native._C.default_num_threads() < 2, reason="needs 2 cores")
def test_default_thread_count_follows_torch():
    """Until soniq.set_num_threads is called the count is torch's; after it, soniq's own."""
    r = subprocess.run([sys.executable, "-c", _FOLLOW], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "2", "1", "3"]


_FORK_BEFORE_FIRST_CALL = """
import os, torch, soniq
from soniq import _C
torch.set_num_threads(2)
torch.randn(1 << 22).exp_()  # torch's team of 2 exists; soniq has run nothing yet
pid = os.fork()
if pid == 0:  # torch stays at 2 threads, so soniq's default count is torch's: 2. No torch op
    # runs here (torch's own regions would hang in a child: its team is not fork-safe)
    ok = _C.thread_backend() == "pool" and len(_C._parallel_tids(16, 1000)) == 16
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@needs_torch_openmp
def test_fork_before_soniqs_first_call_leaves_the_openmp_route():
    """The child is recognized even when soniq had not run a kernel before the fork (a region
    on the child's copy of torch's team would wait forever for threads that do not exist)."""
    r = subprocess.run([sys.executable, "-c", _FORK_BEFORE_FIRST_CALL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0"]


def _child_route(q, inp):
    torch.set_num_threads(1)
    try:
        q.put(("ok", _C.thread_backend(), _work_fused(*inp)))
    except BaseException as e:  # pragma: no cover - reported by the parent
        q.put(("error", repr(e), None))


@needs_torch_openmp
def test_forked_child_leaves_the_openmp_route(restore_threads, restore_backend):
    """libgomp's team does not survive fork: a child (here after the parent's kernels and
    torch's ops ran on the team) computes on soniq's own pool, with 2 threads, exactly."""
    torch.set_num_threads(2)
    soniq.set_num_threads(2)
    inp = _inputs(12, M=64, N=256, K=300)
    want = _work_fused(*inp)
    torch.randn(1 << 20).exp_()
    assert _C.thread_backend() == "openmp"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_route, args=(q, inp))
    p.start()
    try:
        status, backend, got = q.get(timeout=120)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert status == "ok", backend
    assert backend == "pool"
    _assert_same(got, want)
    assert p.exitcode == 0
    assert _C.thread_backend() == "openmp"  # the parent keeps it


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_balanced_runs_are_contiguous_equal_length_and_largest_first(threads):
    """mpgemm's order for tasks of unequal size: parallel_for's equal runs must each be one
    contiguous range of the tasks (the thread's own range of outputs) with about equal work,
    largest first, padded with -1; every task exactly once."""
    rng = np.random.default_rng(threads)
    cases = [[4] * 23 + [3, 1], [4] * 19 + [1] + [4] * 4 + [3], [1], [5, 1], [0, 0, 7],
             list(rng.integers(1, 9, 40)), [9] + [1] * 30]
    for work in cases:
        order = _C._balanced_runs(work, threads)
        n, T = len(work), max(1, min(threads, len(work)))
        assert len(order) % T == 0
        assert sorted(i for i in order if i >= 0) == list(range(n))
        L = len(order) // T
        runs = [[i for i in order[t * L:(t + 1) * L] if i >= 0] for t in range(T)]
        assert all(order[t * L:(t + 1) * L][len(r):] == [-1] * (L - len(r)) for t, r in enumerate(runs))
        flat = [i for r in runs for i in sorted(r)]
        assert flat == list(range(n))  # contiguous, in order
        for r in runs:
            assert [work[i] for i in r] == sorted((work[i] for i in r), reverse=True)
        # about equal work: no run exceeds the ideal share by more than the largest task
        sums = [sum(work[i] for i in r) for r in runs]
        assert max(sums) <= sum(work) / T + max(work)
