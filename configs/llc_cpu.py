# A CPU preset for the L2H4 (K = 8) LLC curve, chosen by measurement (README: "The paper's curve on
# a CPU"): the v1 sampler's step size, localisation and nbeta with 4 chains x 400 draws after 100
# burn-in steps on fresh minibatches of 256, L(w*) on 65,536 sequences: 100x fewer
# sequence-gradients than v1 per checkpoint. (2 chains were in the paper's band at 4 of the 5 study
# checkpoints; their stated se is optimistic.)
#   python llc.py configs/llc_cpu.py out/L2H4-s0
# epsilon 3e-4, gamma 20/3, nbeta 200/3, seed 0
exec(open(__file__.rsplit("/", 1)[0] + "/llc_v1.py").read())
num_chains = 4
num_draws = 400
num_burnin = 100
batch_size = 256
data_mode = "stream"
n = 65536
