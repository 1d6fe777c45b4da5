# The paper recipe with K=16 pairs per context (main branch's yaml; positional table 32 x 64, 52,741
# params).
exec(open(__file__.rsplit("/", 1)[0] + "/L2H4.py").read())
out_dir = "out/L2H4K16-s0"
K = 16
