# The quick CPU setting (the same as llc.py's defaults, written out): the tiny demo run's ~60
# checkpoints of the L2H4 model in a few minutes on one core. 4 chains x 100 draws after 50 burn-in
# steps, fresh minibatches of 32, L(w*) on 4096 sequences. eps = 3e-4 (v1's step) with v2's nbeta
# and gamma: in a calibration on the demo run (eps 1e-4/3e-4/1e-3 x gamma 6/30 at steps 97, 789,
# 2842) eps = 1e-3 lost chains to divergence at trained checkpoints, 3e-4 did not. Short chains: a
# cheap, qualitative LLC curve, not the paper's numbers.
epsilon = 3e-4
gamma = 6.0
nbeta = 60.0
num_chains = 4
num_draws = 100
num_burnin = 50
batch_size = 32
data_mode = "stream"
n = 4096
# unlike the defaults: the hand-derived gradient where it matches autograd at w* (else autograd)
chain_mode = "auto"
