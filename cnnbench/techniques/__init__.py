"""One module per technique: a plain function that does the work, called from the training loop.

``precision`` — autocast dtype + GradScaler; ``compile`` — torch.compile and the time it takes.
"""
