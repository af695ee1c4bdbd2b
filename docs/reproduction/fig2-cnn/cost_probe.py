# ruff: noqa: E402, B007  (the probe scripts as they were run, concatenated)
"""Cost probes behind docs/reproduction/fig2-cnn.md (one thread): a fit_adam step of PaperCNN,
100 stacked copies by vmap and by grouped convolution, and Hessian-vector products in float64.

Run: OMP_NUM_THREADS=1 .venv/bin/python docs/reproduction/fig2-cnn/cost_probe.py
(The three parts were run as separate scripts on 2026-12-03; their printed numbers are quoted.)
"""

# ---- part 1: fit_adam step, stacked vmap step
import time

import torch
from torch.func import vmap

torch.set_num_threads(1)
from inflens import Objective
from inflens.curvature import Curvature
from inflens.data import Data
from inflens.models import PaperCNN
from inflens.train import AdamConfig, fit_adam

g = torch.Generator().manual_seed(0)
x = torch.rand(5500, 1, 28, 28, generator=g)
y = torch.randint(0, 10, (5500,), generator=g)
m = PaperCNN(dtype=torch.float32)
obj = Objective(m, "cross_entropy", l2=0.0)
print("p", obj.p)
t = time.perf_counter()
fit_adam(obj, (x, y), AdamConfig(50, 500, 1e-4))
print("single step s", (time.perf_counter() - t) / 50)
# stacked K copies via vmap
K = 100
names = list(dict(m.named_parameters()))
th = obj.theta.repeat(K, 1).requires_grad_(True)
xb = x[:500]
yb = y[:500]


def one(theta):
    return obj.losses(theta, xb, yb).mean()


f = torch.func.grad(lambda T: vmap(one)(T).sum())
t = time.perf_counter()
for _ in range(3):
    gg = f(th)
print("stacked vmap step s (K=100)", (time.perf_counter() - t) / 3)
# grouped conv alternative measured in same way? skip

# ---- part 2: grouped convolution
import torch.nn.functional as F

K = 100
B = 500
x = torch.rand(B, 1, 28, 28)
L = [(3, 1, 8, 1), (3, 8, 8, 2), (3, 8, 8, 1), (3, 8, 8, 2), (3, 8, 8, 1), (1, 8, 10, 1)]
ws = [(torch.randn(K * co, ci, k, k) * 0.1).requires_grad_() for k, ci, co, s in L]
bs = [torch.zeros(K * co, requires_grad=True) for k, ci, co, s in L]


def fwd(x):
    h = x.expand(B, K, 28, 28)
    for (k, ci, co, s), w, b in zip(L, ws, bs):
        h = torch.tanh(F.conv2d(h, w, b, stride=s, groups=K))
    return h.mean((2, 3)).view(B, K, 10)


t = time.perf_counter()
for _ in range(3):
    out = fwd(x)
    out.sum().backward()
print("grouped K=100 step", (time.perf_counter() - t) / 3)
K = 1
ws = [(torch.randn(K * co, ci, k, k) * 0.1).requires_grad_() for k, ci, co, s in L]
bs = [torch.zeros(K * co, requires_grad=True) for k, ci, co, s in L]
t = time.perf_counter()
for _ in range(10):
    out = fwd(x)
    out.sum().backward()
print("K=1 step", (time.perf_counter() - t) / 10)

# ---- part 3: Hessian-vector products, float64
g = torch.Generator().manual_seed(0)
x = torch.rand(5500, 1, 28, 28, generator=g, dtype=torch.float64)
y = torch.randint(0, 10, (5500,), generator=g)
m64 = PaperCNN(dtype=torch.float64)
o64 = Objective(m64, "cross_entropy", l2=0.0)
for n in (500,):
    c = Curvature(o64, Data((x[:n], y[:n])), damping=0.0, progress=False)
    eye = torch.eye(o64.p, dtype=torch.float64)
    for k in (1, 32):
        t = time.perf_counter()
        c.matvec(eye[:k])
        dt = time.perf_counter() - t
        print(n, k, "s", dt, "dense est full n (s)", dt * o64.p / k * 5500 / n, flush=True)
