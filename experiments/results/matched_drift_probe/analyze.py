import sys, torch
d = torch.load(sys.argv[1]); S = len(d)
E = torch.stack([d[i][1] for i in range(S)]).double()   # S, N, C, P
U = torch.stack([d[i][0] for i in range(S)]).double()
E = E - E.mean(dim=(1, 3), keepdim=True)
n = E.flatten(1).norm(dim=1)
C = (E.flatten(1) @ E.flatten(1).T) / (n[:, None] * n[None])
torch.set_printoptions(precision=2, linewidth=200)
print("N runs", E.shape[1], "var per step", (n**2 / E[0].numel()).tolist())
print("corr(e_i, e_i+1):", [round(float(C[i, i+1]), 2) for i in range(S-1)])
print("corr(e_i, e_i+2):", [round(float(C[i, i+2]), 2) for i in range(S-2)])
print("corr(e_i, e_last):", [round(float(C[i, S-1]), 2) for i in range(S)])
# correlation with u (the slope D2 removes) per step
Uc = U - U.mean(dim=(1, 3), keepdim=True)
print("corr(e_i, u_i):", [round(float((E[i]*Uc[i]).sum()/ (E[i].norm()*Uc[i].norm())), 2) for i in range(S)])
# per-sample mean of e over positions (a per-image bias) share of variance
m = E.mean(dim=3, keepdim=True)
print("share of per-image-channel mean:", [round(float((m**2).sum(dim=(1,2,3))[i]*E.shape[3] / (E[i]**2).sum()), 3) for i in range(S)])
