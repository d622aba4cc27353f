"""Per-organ class-conditional generators (diffusion, GAN) and their audit.

Layout (diffusers-style: networks, sampling and training apart)::

    registry.py       @register_generator, create_generator, list_generators, load_generator
    base.py           BaseGenerator: fit / sample / save_pretrained / from_pretrained, per-step RNG
    training.py       fit_generator: the one training loop both backends plug into (accelerate, resume, EMA,
                      checkpoints, history); a backend supplies build_training and training_step
    models/unet.py    the diffusers UNet2DModel used as class-conditional denoiser
    models/gan_nets.py  conditional DCGAN generator + spectral-norm projection discriminator
    diffusion.py      DiffusionGenerator ("diffusion"): DDPM training step (noise, v-prediction MSE) + EMA
    sampling.py       the denoising loop with classifier-free guidance (DPM-Solver++, DDIM, DDPM)
    gan.py            GANGenerator ("gan"): hinge loss, EMA of G, standing BN statistics
    data.py           an organ's train-split slices, classes and windowing
    audit.py          Frechet distance, HU histogram, diversity, memorization (near copies)
    grid.py           grid.png of real vs synthetic slices
    run.py            generate(ws, cfg, organ) / generate_all: the `toolkit gen` work (writes a SyntheticSet)
    cli.py            the `toolkit gen` command

Nothing here is imported eagerly, so ``toolkit --help`` stays fast.
"""
