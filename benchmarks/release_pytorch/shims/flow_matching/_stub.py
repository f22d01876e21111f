class _NotUsed:
    def __init__(self, *a, **k):
        raise RuntimeError("flow_matching placeholder: CondOT path is not part of this benchmark")
