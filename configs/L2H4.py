# The paper's run (Hoogland et al. 2024; regression.md §3-6): L2H4, D=4, K=8, sigma^2=0.125,
# M=infinite, Adam, one-cycle triangle peaking at 3e-3, batch 256, 500k steps, 190 checkpoints.
# Seeds 0-4: --seed=N.
out_dir = "out/L2H4-s0"
D = 4
K = 8
sigma2 = 0.125
num_tasks = 0
n_layer = 2
n_head = 4
d_model = 64
d_mlp = 64
lr = 3e-3
batch_size = 256
max_steps = 500_000
n_log = 100
n_lin = 100
log_interval = 100
# the hand-derived gradient on CPU (self-checked; an edited model: autograd, one warning)
fast_grad = "auto"
