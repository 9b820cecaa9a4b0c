import torch, itertools
from safetensors.torch import load_file
import torch.nn.functional as F
import mdt.models as M
from mdt.sparse import SparseTensor, subdivide2
from mdt.sparse.nn import group_norm_per_sample
G='/work/shared/reference/trellis-golden/'
io=load_file(G+'slat_dec_mesh.io.safetensors')
m=M.from_pretrained(G+'slat_dec_mesh')
def keyed(c,f):
    c=c.long(); k=((c[:,0]*2048+c[:,1])*2048+c[:,2])*2048+c[:,3]; o=torch.argsort(k); return c[o], f[o]
c2,f2=keyed(io['out_coords'],io['out_feats'])
def gn(x, mod, mode):
    if mode=='per_sample': return x.replace(group_norm_per_sample(x, mod.num_groups, mod.weight, mod.bias, mod.eps))
    f=x.feats.t().unsqueeze(0); return x.replace(F.group_norm(f, mod.num_groups, mod.weight, mod.bias, mod.eps)[0].t())
def block(b, x, mode, order):
    h = gn(x, b.act_layers[0], mode); h=h.replace(F.silu(h.feats))
    h = subdivide2(h); xs = subdivide2(x); xs = h.replace(xs.feats)
    h = b.out_layers[0](h); h = gn(h, b.out_layers[1], mode); h=h.replace(F.silu(h.feats)); h=b.out_layers[3](h)
    return h + b.skip_connection(xs)
with torch.no_grad():
    x=SparseTensor(io['feats'],io['coords']); tr=m.trunk(x)
    for mode in ['per_sample','batch']:
        h=tr
        for b in m.upsample: h=block(b,h,mode,0)
        out=m.out_layer(h)
        c1,f1=keyed(out.coords,out.feats); print(mode, (f1-f2).abs().max().item())
    # test: after only first block, is scale plausible? compare stats
    print('gold stats', f2.mean().item(), f2.std().item(), 'ours', f1.mean().item(), f1.std().item())
def run(tr, variant):
    h=tr
    if variant=='ln': h=h.replace(F.layer_norm(h.feats,h.feats.shape[-1:]))
    for b in m.upsample:
        x=h
        a = gn(x, b.act_layers[0], 'per_sample'); a=a.replace(F.silu(a.feats))
        if variant=='skip_from_act': xs = subdivide2(a)
        else: xs = subdivide2(x)
        hh = subdivide2(a); xs = hh.replace(xs.feats)
        hh = b.out_layers[0](hh); hh = gn(hh, b.out_layers[1], 'per_sample'); hh=hh.replace(F.silu(hh.feats)); hh=b.out_layers[3](hh)
        if variant=='noskip': h = hh
        else: h = hh + b.skip_connection(xs)
    out=m.out_layer(h); c1,f1=keyed(out.coords,out.feats); return (f1-f2).abs().max().item()
with torch.no_grad():
    for v in ['base','ln','skip_from_act','noskip']: print(v, run(tr, v))
def norm(x, mod, kind):
    if kind=='gn': return gn(x, mod, 'per_sample')
    if kind=='ln': return x.replace(F.layer_norm(x.feats, x.feats.shape[-1:], mod.weight, mod.bias, 1e-5))
    if kind=='gn1': return x.replace(group_norm_per_sample(x, 1, mod.weight, mod.bias, 1e-5))
    if kind=='gnC': return x.replace(group_norm_per_sample(x, x.feats.shape[1], mod.weight, mod.bias, 1e-5))
def run2(tr, k1, k2):
    h=tr
    for b in m.upsample:
        x=h
        a = norm(x, b.act_layers[0], k1); a=a.replace(F.silu(a.feats))
        hh = subdivide2(a); xs = hh.replace(subdivide2(x).feats)
        hh = b.out_layers[0](hh); hh = norm(hh, b.out_layers[1], k2); hh=hh.replace(F.silu(hh.feats)); hh=b.out_layers[3](hh)
        h = hh + b.skip_connection(xs)
    out=m.out_layer(h); c1,f1=keyed(out.coords,out.feats); return (f1-f2).abs().max().item()
with torch.no_grad():
    for k1 in ['gn','ln','gn1','gnC']:
        for k2 in ['gn','ln','gn1','gnC']: print(k1,k2, run2(tr,k1,k2))
from mdt.sparse import SparseTensor as ST
def subdiv(x, variant):
    offs = torch.tensor([[a,b,d] for a in (0,1) for b in (0,1) for d in (0,1)], dtype=torch.int32)
    N=x.feats.shape[0]
    if variant=='coord_offset_major':
        coords = x.coords.clone(); coords[:,1:]*=2
        child = coords.unsqueeze(0).repeat(8,1,1); child[:,:,1:] += offs.unsqueeze(1)
        child = child.reshape(-1,4)
        feats = x.feats.unsqueeze(1).expand(-1,8,-1).reshape(-1, x.feats.shape[1])
    # sort so batches contiguous
    o = torch.argsort(child[:,0].long(), stable=True)
    return ST(feats[o], child[o], batch_size=x.batch_size)
def run3(tr, variant):
    h=tr
    for b in m.upsample:
        x=h
        a = norm(x, b.act_layers[0], 'gn'); a=a.replace(F.silu(a.feats))
        hh = subdiv(a, variant); xs = hh.replace(subdiv(x, variant).feats)
        hh = b.out_layers[0](hh); hh = norm(hh, b.out_layers[1], 'gn'); hh=hh.replace(F.silu(hh.feats)); hh=b.out_layers[3](hh)
        h = hh + b.skip_connection(xs)
    out=m.out_layer(h); c1,f1=keyed(out.coords,out.feats); return (f1-f2).abs().max().item()
with torch.no_grad(): print('offset-major', run3(tr,'coord_offset_major'))
def run4(tr, g1, g2):
    h=tr
    for b in m.upsample:
        x=h
        a = x.replace(group_norm_per_sample(x, g1, b.act_layers[0].weight, b.act_layers[0].bias, 1e-5)); a=a.replace(F.silu(a.feats))
        hh = subdivide2(a); xs = hh.replace(subdivide2(x).feats)
        hh = b.out_layers[0](hh); hh = hh.replace(group_norm_per_sample(hh, g2, b.out_layers[1].weight, b.out_layers[1].bias, 1e-5)); hh=hh.replace(F.silu(hh.feats)); hh=b.out_layers[3](hh)
        h = hh + b.skip_connection(xs)
    return h
with torch.no_grad():
    for g in [1,2,4,8,16,32]:
        h = run4(tr, g, g); out=m.out_layer(h); c1,f1=keyed(out.coords,out.feats); print(g, (f1-f2).abs().max().item())
    W=m.out_layer.weight; bb=m.out_layer.bias
    hg = torch.linalg.lstsq(W, (f2-bb).t()).solution.t()
    print('recon resid', ((hg@W.t()+bb)-f2).abs().max().item())
    h = run4(tr, 32, 32); c1,h1 = keyed(h.coords, h.feats)
    print('h diff', (h1-hg).abs().max().item(), h1.std().item(), hg.std().item())
    print('corr', torch.corrcoef(torch.stack([h1.flatten(), hg.flatten()]))[0,1].item())
def subdiv2(x, variant):
    offs = torch.tensor([[a,b,d] for a in (0,1) for b in (0,1) for d in (0,1)], dtype=torch.int32)
    coords = x.coords.clone(); coords[:,1:]*=2
    if variant=='feats_offset_major':
        child = (coords.unsqueeze(1) + torch.cat([torch.zeros(8,1,dtype=torch.int32), offs],1).unsqueeze(0)).reshape(-1,4)
        feats = x.feats.repeat(8,1)
    elif variant=='both_offset_major_nosort':
        child = (coords.unsqueeze(0) + torch.cat([torch.zeros(8,1,dtype=torch.int32), offs],1).unsqueeze(1)).reshape(-1,4)
        feats = x.feats.repeat(8,1)
    return ST(feats, child, batch_size=x.batch_size)
def run5(tr, variant):
    h=tr
    for b in m.upsample:
        x=h
        a = norm(x, b.act_layers[0], 'gn'); a=a.replace(F.silu(a.feats))
        hh = subdiv2(a, variant); xs = hh.replace(subdiv2(x, variant).feats)
        hh = b.out_layers[0](hh); hh = norm(hh, b.out_layers[1], 'gn'); hh=hh.replace(F.silu(hh.feats)); hh=b.out_layers[3](hh)
        h = hh + b.skip_connection(xs)
    out=m.out_layer(h); c1,f1=keyed(out.coords,out.feats); return (f1-f2).abs().max().item()
with torch.no_grad():
    for v in ['feats_offset_major','both_offset_major_nosort']: print(v, run5(tr, v))
