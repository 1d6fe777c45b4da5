# The paper's language model (language.md §1-2): L2W256, attention-only, 2 layers of 8 heads x 32,
# d_model 256, vocabulary 5,000, context 1,024, shortformer positions, 3,355,016 parameters.
# AdamW(lr 1e-3, wd 0.05, betas 0.9/0.999), no schedule, no warm-up, no clipping; batch 100 x 1,024
# tokens; steps 0..50,000 with a checkpoint every 100 (501 checkpoints).
# Seed 1 is the paper's model.
# The default corpus (CPython's docs, ~0.6M tokens) is repeated thousands of times at this scale:
# for the paper's data use --corpus=hub:<dataset repo>:<files> or a folder of .jsonl/.arrow/.txt
# shards, and --tokenizer=hub (the paper's TinyStories 5k tokenizer); README, "The paper's files".
task = "lm"
out_dir = "out/L2W256-s1"
seed = 1
corpus = "python"
tokenizer = "train"
vocab_size = 5000
n_ctx = 1024
n_layer = 2
n_head = 8
d_model = 256
optimizer = "adamw"
weight_decay = 0.05
lr_schedule = "constant"
lr = 1e-3
batch_size = 100
max_steps = 50_001
ckpt_every = 100
n_log = 0
n_lin = 0
log_interval = 10
eval_batch_size = 320
# sequences per forward/backward: bounds CPU memory (~150 MB each at n_ctx 1024); GPU: 0 (all)
micro_batch = 4
