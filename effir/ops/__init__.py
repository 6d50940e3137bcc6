"""Fused ops: autograd functions, backend dispatch and torch.library registration (Liger-style `ops`)."""
