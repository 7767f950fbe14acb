"""GPU tuning aid: time the Triton fused-adapter kernels for several (BT, BK, warps) tiles, the two
weight-gradient GEMMs and the whole fused fwd / fwd+bwd (dense and Compacter), bf16, T=8192, D=1024,
m=64, CUDA-graph timed over L2-cold rotating inputs. Run from the repository root on a GPU:
``PYTHONPATH=. python scripts/adapter_tile_sweep.py``; pick the best tile in
kadapt/ops/triton/fused_adapter.py (_tiles / _bwd_tiles). Not part of the test suite."""
import torch, kadapt
import kadapt.ops.triton.fused_adapter as K
from kadapt.ops import fused_adapter, AdapterWeight
dev, dt = "cuda", torch.bfloat16
T, D, m, n, NB = 8192, 1024, 64, 4, 6
g = torch.Generator(device=dev).manual_seed(0)
def rnd(*s, scale=0.02): return (torch.randn(*s, device=dev, generator=g) * scale).to(dt)
xs = [rnd(T, D, scale=1.0) for _ in range(NB)]; dys = [rnd(T, D, scale=1.0) for _ in range(NB)]
zs = [torch.randn(T, m, device=dev, generator=g) for _ in range(NB)]
wd, wu, bd, bu = rnd(D, m), rnd(m, D), rnd(m), rnd(D)
def gtime(fn, reps=10):
    for i in range(NB): fn(i)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for i in range(2 * NB): fn(i % NB)
    gr.replay(); torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); gr.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / (2 * NB))
    return sorted(ts)[reps // 2]
fl = 2 * T * D * 2 / 2.96e12 * 1e6
print(f"floor 2 passes {fl:.1f} us, 3 passes {1.5*fl:.1f} us")
for bt, bk, w in [(32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 64, 4), (32, 256, 4), (16, 256, 4)]:
    K._tiles = lambda mm, bt=bt, bk=bk, w=w: (bt, bk, max(16, 1 << (mm - 1).bit_length()), w)
    try:
        tf = gtime(lambda i: K.fused_adapter_fwd(xs[i], None, True, 0, [wd], bd, 0, [wu], bu, 0))
        tb = gtime(lambda i: K.fused_adapter_bwd(dys[i], zs[i], 0, [wd], 0, [wu], True, 0))
        print(f"BT={bt:3d} BK={bk:3d} w={w}: fwd {tf:6.1f} ({tf/fl:.2f}x)  bwd kernel {tb:6.1f} ({tb/(1.5*fl):.2f}x of 3 passes)", flush=True)
    except Exception as e:
        print(bt, bk, w, "failed", str(e)[:200])
K._tiles = lambda mm: (32, 128, max(16, 1 << (mm - 1).bit_length()), 4)
ha = [torch.randn(T, 72, device=dev, generator=g).to(dt) for _ in range(NB)]
print(f"GEMM x^T g_z {gtime(lambda i: xs[i].t() @ ha[i][:, :64]):.1f} us;  [h|1]^T dy {gtime(lambda i: ha[i].t() @ dys[i]):.1f} us")
A = rnd(n, n, n, scale=0.5).requires_grad_()
for kind, (wd_, wu_) in {"dense": (AdapterWeight.dense(wd.clone().requires_grad_()), AdapterWeight.dense(wu.clone().requires_grad_())),
        "compacter": (AdapterWeight.compacter(A, rnd(n, D//n, 1, scale=0.2).requires_grad_(), rnd(n, 1, m//n, scale=0.2).requires_grad_()),
                      AdapterWeight.compacter(A, rnd(n, m//n, 1, scale=0.2).requires_grad_(), rnd(n, 1, D//n, scale=0.2).requires_grad_()))}.items():
    kadapt.set_backend("triton")
    xr = [x.clone().requires_grad_() for x in xs]; b1, b2 = bd.clone().requires_grad_(), bu.clone().requires_grad_()
    ws = list({id(p): p for p in [*wd_.tensors, *wu_.tensors, b1, b2]}.values())
    with torch.no_grad():
        tf = gtime(lambda i: fused_adapter(xs[i], wd_, b1, wu_, b2, add_input=True))
    tb = gtime(lambda i: torch.autograd.grad(fused_adapter(xr[i], wd_, b1, wu_, b2, add_input=True), [xr[i]] + ws, dys[i]))
    print(f"{kind}: fused fwd {tf:.1f} us ({tf/fl:.2f}x)  fwd+bwd {tb:.1f} us ({tb/(2.5*fl):.2f}x)")
