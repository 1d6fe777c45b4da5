# Language-model CPU demo (a few minutes on one core): the paper's attention-only 2-layer
# architecture scaled down (d_model 64, 4 heads of 16, context 128) on CPython's bundled docs (no
# download), with the paper's 5,000-token byte-level BPE, AdamW with weight decay 0.05 and a
# constant learning rate. Dense log-spaced checkpoints. The test loss falls from ln 5000 = 8.5 to
# well below the corpus' unigram entropy (6.6 nats).
task = "lm"
out_dir = "out/lm_tiny"
seed = 1
corpus = "python"
vocab_size = 5000
n_ctx = 128
n_layer = 2
n_head = 4
d_model = 64
optimizer = "adamw"
weight_decay = 0.05
lr_schedule = "constant"
lr = 1e-2              # high, for a short run; the paper uses 1e-3 at d_model 256
batch_size = 16
max_steps = 601         # steps 0..600
n_log = 30              # log-spaced checkpoints (dense early) ...
n_lin = 0
ckpt_every = 100        # ... and every 100 steps, up to the last
log_interval = 20
eval_batch_size = 64
