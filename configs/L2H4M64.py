# A finite task prior: M = 64 tasks drawn once (task_seed), sampled uniformly per sequence.
exec(open(__file__.rsplit("/", 1)[0] + "/L2H4.py").read())
out_dir = "out/L2H4M64-s0"
num_tasks = 64
