import os,re,sys
root=sys.argv[1] if len(sys.argv)>1 else 'src'
mods={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        # A tests.rs is a unit-test module (`#[cfg(test)] mod tests;`).
        if f=='tests.rs': continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)
        top=rel.split('/')[0].replace('.rs','')
        if top in ('lib','main'): continue
        src=open(p).read()
        # strip test modules roughly
        i=src.find('#[cfg(test)]')
        if i>=0: src=src[:i]
        deps=mods.setdefault(top,set())
        for m in re.finditer(r'crate::(\w+)',src):
            if m.group(1)!=top: deps.add(m.group(1))
        for m in re.finditer(r'use crate::\{([^}]*)\}',src):
            for part in m.group(1).split(','):
                n=part.strip().split('::')[0]
                if n and n!=top and n!='self': deps.add(n)
# tarjan
idx={};low={};st=[];on=set();out=[];c=[0]
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in mods.get(v,()):
        if w not in mods: continue
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        out.append(comp)
for v in mods:
    if v not in idx: sc(v)
cyc=[x for x in out if len(x)>1]
for m in sorted(mods): print(m,'->',' '.join(sorted(d for d in mods[m] if d in mods)))
print('CYCLES:',cyc if cyc else 'none')
