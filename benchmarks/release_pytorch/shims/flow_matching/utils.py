import torch.nn as nn


class ModelWrapper(nn.Module):  # only subclassed inside the (unused) CondOT branch
    def __init__(self, model):
        super().__init__()
        self.model = model
