"""Classic SSM token tasks: selective copying, Pig Latin, the discretisation study (docs/TASKS.md).

    python -m hiss_jax.tasks --config configs/selective_copy.py[:family[,tiny]]
    python -m hiss_jax.tasks.suite --out runs/tasks
"""
