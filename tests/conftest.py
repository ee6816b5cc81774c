import os

import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
