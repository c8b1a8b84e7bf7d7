"""Programs that run INSIDE the sandbox (evals/sandbox.py mounts this folder read-only at /jail).

Standard library only; each program imports its siblings by path, never `evals`. `plain.py` is also
imported outside (as `evals.jail.plain`) to read back what a program sent.
"""
