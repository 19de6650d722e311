import torch

# One thread: the suite's tensors are small, and on a shared 2-core machine OpenMP's spin-waiting
# threads can stall each parallel region when the cores are oversubscribed (Ray workers run beside).
torch.set_num_threads(1)
