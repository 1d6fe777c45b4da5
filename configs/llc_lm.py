# The paper's LLC settings for the language model (language.md §3; stan/ED llc.ipynb): step size
# 0.003, localisation 300, n*beta = n / ln n with a nominal n = 100 (= 21.7147), 20 chains x 200
# draws, no burn-in, batches of 100 packed rows, drawn from the run's training split.
#   python llc.py configs/llc_lm.py --ckpt=out/L2W256-s1
epsilon = 0.003
gamma = 300.0
nbeta = 21.71472409516259    # 100 / ln(100)
num_chains = 20
num_draws = 200
num_burnin = 0
batch_size = 100
# fresh batches from the run's training split (the paper cycles through a 1M-row set)
data_mode = "stream"
n = 2000                     # rows for L(w*): the paper's draw-0 batches of 20 chains x 100
seed = 1
# one chain at a time: 20 vmapped chains would hold 20 x 100 x 1023 x 5000 logits (~41 GB)
chain_mode = "loop"
