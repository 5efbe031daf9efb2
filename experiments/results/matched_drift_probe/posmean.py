import torch
d = torch.load("/tmp/probe/dit_w3a4.pt"); S = len(d)
for i in range(S):
    u, e = d[i][0].double(), d[i][1].double()   # N, C, P
    N = e.shape[0]
    tot = e.pow(2).mean()
    ch = e.mean(dim=(0, 2), keepdim=True)
    pos = e.mean(dim=0, keepdim=True) - ch
    var = (e - e.mean(0, keepdim=True)).pow(2).sum(0, keepdim=True) / (N - 1)
    pos_energy = pos.pow(2).mean() - (var / N).mean()     # debiased
    # split half reliability of the position map
    a, b = e[: N // 2].mean(0) - e[: N // 2].mean(dim=(0, 2))[:, None], e[N // 2:].mean(0) - e[N // 2:].mean(dim=(0, 2))[:, None]
    r = float((a * b).sum() / (a.norm() * b.norm()))
    print(i, f"channel-mean share {float(ch.pow(2).mean() / tot):.3f}  position-map share {float(pos_energy / tot):.3f}  split-half r {r:.2f}")
