"""Whole training steps, five systems side by side: HF eager, torch.compile, Liger-Kernel,
Unsloth and fastft, on random-weight models of published shapes. Run ``python bench/train_step
--help``; see bench/README.md."""
