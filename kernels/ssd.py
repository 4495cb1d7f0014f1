"""SSD scan (Mamba-2). Placeholder: being written."""


def ssd(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_state=None, return_final_state=False, impl="auto"):
    raise NotImplementedError("ssd is being written")
