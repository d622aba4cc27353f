"""Per-organ class-conditional generators (diffusion, GAN) and their audit."""
