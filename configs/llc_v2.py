# LLC sampler of the later main-branch sweeps ("v2", llc-and-ed.md §1.8):
# 0-L2H4-llcs-over-time.yaml, gs/ls/ns = 0.03/0.003/1e-3. Fresh minibatches of 1024 from the
# training distribution at every step; L(w*) on a fixed seeded set of n = 2^17 sequences; 8 chains x
# 500 draws after 500 burn-in steps; init_seed 42.
epsilon = 1e-3
gamma = 6.0
nbeta = 60.0
num_chains = 8
num_draws = 500
num_burnin = 500
batch_size = 1024
data_mode = "stream"
n = 131072
seed = 42
# the hand-derived gradient where it matches autograd at w*, else autograd with one warning
chain_mode = "auto"
