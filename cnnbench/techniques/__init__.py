"""One module per technique: a plain function that does the work, plus a thin hook.

Training: ``precision`` (autocast dtype + GradScaler), ``compile`` (torch.compile and the time it
takes). Trained models: ``quantize``, ``prune``, ``distill``, ``checkpoint``, and ``compress``, the
hook the runner calls.
"""
