import sys, torch
d = torch.load(sys.argv[1]); names = list(d)
print(names, {n: len(d[n]) for n in names})
S = len(d["fp"])
for i in range(S):
    row = []
    v_fp = d["fp"][i].double().var(dim=(0, 2))
    for n in names:
        x = d[n][i].double()
        v = x.var(dim=(0, 2))
        dev = (x - d["fp"][i].double()).pow(2).mean()
        row.append(f"{n}: var/fp {(v / v_fp).mean().item():.4f} msd {dev.item():.4f}")
    print(i, f"fp var {v_fp.mean().item():.3f}", " | ".join(row[1:]))
