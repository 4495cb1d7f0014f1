"""Selective scan (Mamba-1). Placeholder: being written."""


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                   delta_softplus=False, initial_state=None, return_final_state=False,
                   impl="auto"):
    raise NotImplementedError("selective_scan is being written")
