"""Select+Fit's value solve on the GPU at the sizes a 16k RULER prompt gives (issue 16: its RULER runs took
4.3-5.6 s a sample in a lane of four): time and objective with the normal matrix A'A formed in float32 and in
TF32 (``solve_values``'s ``gram``), and the float64 Cholesky of its systems batched and one at a time
(``cholesky_solve``'s ``batched_up_to``).

    python scripts/gpu/selectfit_gram.py [SEED] [--smoke] [--profile]

A problem per (free size M, 2 KV heads): 2,048 targets x 6 query heads = 12,288 rows (the method's
``max_targets`` and Qwen2.5-1.5B's grouping), head dim 128, a 16k store whose logits have a standard deviation
of about 2.5 and a few strongly attended tokens (what trained models' attention looks like, roughly: random
weights give near-uniform attention, which makes every solve easy). The exact part is 4 sinks and 32 recent
tokens; the free part starts from the M tokens the targets attend to most, as SnapKV's selection would. The
objective is the method's own (``objective``: relative output error plus the ridge penalty); what matters is
the gap between the two precisions against the objective's size.
"""
import sys
import time

import torch

from kvbench.methods.selectfit import Problems, cholesky_solve, objective, probabilities, solve_values

SMOKE = "--smoke" in sys.argv  # a small rehearsal on the CPU
DEV = "cpu" if SMOKE else "cuda"
D, ROWS, N, SINKS, RECENT = 128, (256 if SMOKE else 2048) * 6, 2048 if SMOKE else 16384, 4, 32
FREE = (100, 300) if SMOKE else (1600, 4060, 8156)  # kept 0.1 / 0.25 / 0.5 of 16k, less the 36 exact slots


def problems(free: int, heads: int = 2, seed: int = 0) -> tuple[Problems, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    scale = D ** -0.5
    q = torch.randn(heads, ROWS, D, device=DEV, generator=g)
    k = torch.randn(heads, N, D, device=DEV, generator=g) * 2.5
    heavy = torch.randint(0, N, (heads, 64), device=DEV, generator=g)  # a few tokens every query looks at
    k.scatter_add_(1, heavy[..., None].expand(-1, -1, D), q.mean(1, keepdim=True).expand(-1, 64, -1) * 40)
    v = torch.randn(heads, N, D, device=DEV, generator=g)
    logits = torch.einsum("prd,pnd->prn", q, k) * scale
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse[..., None])
    out = torch.einsum("prn,pnd->prd", probs, v)
    exact = torch.cat([torch.arange(SINKS), torch.arange(N - RECENT, N)]).to(DEV)
    middle_score = probs.sum(1)
    middle_score[:, exact] = -1
    chosen = middle_score.topk(free, dim=1).indices.sort(dim=1).values
    take = lambda t, idx: torch.gather(t, 1, idx[..., None].expand(-1, -1, D))
    ke, ve = k[:, exact], v[:, exact]
    exact_scores = torch.einsum("prd,ped->pre", q, ke) * scale
    pb = Problems(q, out, lse, exact_scores, ve, torch.ones(heads, free, dtype=torch.bool, device=DEV),
                  take(v, chosen), (out ** 2).sum(-1).mean(-1), scale)
    return pb, take(k, chosen)


def main():
    seed = int(next((a for a in sys.argv[1:] if a.isdigit()), 0))
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {DEV}; rows {ROWS}, store {N}, D {D}")
    for free in FREE:
        pb, keys = problems(free, seed=seed)
        line = [f"M={free:5d}"]
        for gram in ("float32", "tf32"):
            pb.ridge = None  # fixed by the first solve, as in the method
            solve_values(pb, keys, 1.0, gram)
            sync()
            if gram == "float32":
                start = objective(pb, keys, pb.prior_values, 0.0)
                line.append(f"selected values: objective {start.mean():.4f}")
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                values = solve_values(pb, keys, 1.0, gram)
                sync()
                times.append(time.perf_counter() - t0)
            f = objective(pb, keys, values, 0.0)
            line.append(f"{gram}: {min(times) * 1e3:7.1f} ms, objective {f.mean():.6f} ({f.tolist()})")
            if gram == "float32":
                reference = values
        gap = (values - reference).norm() / reference.norm()
        line.append(f"values tf32 vs float32: relative difference {gap:.2e}")
        _, _, p_free = probabilities(pb, keys)
        system = torch.einsum("prm,prn->pmn", p_free, p_free).double()
        system.diagonal(dim1=-2, dim2=-1).add_(pb.ridge.double()[:, None])
        rhs = torch.randn(len(system), free, D, dtype=torch.float64, device=DEV)
        solved = {}
        for name, limit in (("batched", 10 ** 9), ("one at a time", 0)):
            cholesky_solve(system, rhs, limit)
            sync()
            t0 = time.perf_counter()
            solved[name] = cholesky_solve(system, rhs, limit)
            sync()
            line.append(f"Cholesky {name} {(time.perf_counter() - t0) * 1e3:.1f} ms")
        gap = (solved["batched"] - solved["one at a time"]).norm() / solved["batched"].norm()
        line.append(f"difference {gap:.1e}")
        print(" | ".join(line), flush=True)
        if "--profile" in sys.argv and free == FREE[-1]:  # where one solve's time goes, by kernel
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
                solve_values(pb, keys, 1.0, "tf32")
                sync()
            sort = "self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70))


if __name__ == "__main__":
    main()
