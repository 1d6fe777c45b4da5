# CPU demo (about a minute on one core): the paper's L2H4 model and task on a compressed schedule
# (2,000 steps instead of 500,000), enough for in-context learning to emerge (test loss well below
# the zero predictor's 4.125, approaching ridge's 1.66). 60-odd log/linear-spaced checkpoints.
out_dir = "out/tiny"
max_steps = 2000
lr = 3e-3
batch_size = 256
n_log = 50
n_lin = 20
log_interval = 50
