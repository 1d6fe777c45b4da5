# LLC sampler of the paper's figures ("v1", llc-and-ed.md §1.8): submission branch sweep
# 0-L2H4-llcs-over-time.yaml, gs/ls/ns = 0.01/0.001/3e-4. Fixed set of n = 2^20 sequences drawn once
# (the same set for every checkpoint), shuffled minibatches of 1024; 10 chains x 5000 draws, no
# burn-in; init_seed 0. (The paper also recorded per-token LLCs: add --per_token.)
#   python llc.py configs/llc_v1.py --ckpt out/L2H4-s0
epsilon = 3e-4
gamma = 20 / 3
nbeta = 200 / 3
num_chains = 10
num_draws = 5000
num_burnin = 0
batch_size = 1024
data_mode = "fixed"
n = 2 ** 20
seed = 0
# the hand-derived gradient where it matches autograd at w*, else autograd with one warning
chain_mode = "auto"
